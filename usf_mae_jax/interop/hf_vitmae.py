"""Hugging Face `transformers` ViTMAE directories <-> our params.

A ViTMAE directory is `config.json` (`model_type: vit_mae`) with `model.safetensors` or a pickled
`pytorch_model.bin`, and optionally `preprocessor_config.json`: what `save_pretrained` writes, what the
`facebook/vit-mae-*` repositories hold, and what `ViTMAEForPreTraining.from_pretrained(DIR)` and
`ViTMAEModel.from_pretrained(DIR)` read without `trust_remote_code`.

The conversion goes through the reference MAE keys of `torch_mae` (docs/mae_fidelity.md), so transposes,
shape checks, position-table checks and the key report are that module's. This module adds:
  * the key table reference MAE <-> HF (`reference_to_hf`, `hf_to_reference`; docs/interop.md lists it).
    HF's attention has separate `query`/`key`/`value` Linears: the fused `qkv` weight (3D, D) is split into
    its three row blocks [q | k | v], each already head-major as HF's `view(..., heads, head_dim)` expects
    (transformers/models/vit_mae/modeling_vit_mae.py, `ViTMAEAttention`);
  * the architecture from `config.json` (heads included: no preset guess), checked against the weights;
  * the other spellings of the same keys, brought to the hub layout that export writes:
      - `vit.layers.N.attention.q_proj` / `o_proj`, `mlp.fc1` / `fc2`: the module names of transformers 5
        (`ViTMAEForPreTraining.state_dict()` in 5.25.0);
      - `decoder.decoder_encoder.layer.N`: the decoder blocks as transformers 5.25.0's `save_pretrained`
        writes them (its reverse renaming of `layers.` hits `decoder_layers.`);
      - no `vit.` prefix: a `ViTMAEModel` saved on its own (encoder only).
Export always writes the hub layout (`vit.encoder.layer.N.attention.attention.query`, ...), which
transformers 4 reads as it is and transformers 5 renames on load (transformers/conversion_mapping.py).

The fixed sin-cos tables are written into the file: transformers 5.25.0 reports them MISSING otherwise and
leaves the encoder's uninitialised and the decoder's zero. HF builds them as [sin_h | cos_h | sin_w | cos_w]
and swaps the halves, which is our table bit for bit (tests/test_hf_interop.py checks it).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import re
import shutil
import zipfile

import numpy as np

from usf_mae_jax.cli import CheckpointError, ConfigError, MissingInputError
from usf_mae_jax.interop import torch_mae, torch_pickle
from usf_mae_jax.models import vit
from usf_mae_jax.models.vit import ModelConfig

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
PICKLE_FILE = "pytorch_model.bin"
PREPROCESSOR_FILE = "preprocessor_config.json"
EXPORT_FILES = frozenset({CONFIG_FILE, SAFETENSORS_FILE, PICKLE_FILE, PREPROCESSOR_FILE})
MODEL_TYPE = "vit_mae"
DEFAULT_MASK_RATIO = 0.75  # the reference MAE's and ViTMAEConfig's default

# ViTMAEConfig's defaults (transformers/models/vit_mae/configuration_vit_mae.py), for fields a config.json omits.
HF_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                   hidden_act="gelu", layer_norm_eps=1e-12, image_size=224, patch_size=16, num_channels=3,
                   qkv_bias=True, decoder_num_attention_heads=16, decoder_hidden_size=512,
                   decoder_num_hidden_layers=8, decoder_intermediate_size=2048, norm_pix_loss=False)

# Reference MAE key (or module) -> HF key (or module), outside the blocks.
TOP_LEVEL = {"cls_token": "vit.embeddings.cls_token", "pos_embed": "vit.embeddings.position_embeddings",
             "patch_embed.proj": "vit.embeddings.patch_embeddings.projection", "norm": "vit.layernorm",
             "mask_token": "decoder.mask_token", "decoder_pos_embed": "decoder.decoder_pos_embed",
             "decoder_embed": "decoder.decoder_embed", "decoder_norm": "decoder.decoder_norm",
             "decoder_pred": "decoder.decoder_pred"}
STACKS = {"blocks": "vit.encoder.layer", "decoder_blocks": "decoder.decoder_layers"}
# Inside a block; the fused `attn.qkv` becomes `attention.attention.{query,key,value}`.
BLOCK = {"norm1": "layernorm_before", "attn.proj": "attention.output.dense", "norm2": "layernorm_after",
         "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
QKV = ("query", "key", "value")
TABLES = (TOP_LEVEL["pos_embed"], TOP_LEVEL["decoder_pos_embed"])

# Other spellings of the HF keys -> the hub layout (module docstring), applied in this order.
_SPELLINGS = (
    (re.compile(r"^(vit\.)?layers\.(\d+)\."), r"\1encoder.layer.\2."),
    (re.compile(r"^decoder\.decoder_encoder\.layer\.(\d+)\."), r"decoder.decoder_layers.\1."),
    (re.compile(r"\.attention\.q_proj\."), ".attention.attention.query."),
    (re.compile(r"\.attention\.k_proj\."), ".attention.attention.key."),
    (re.compile(r"\.attention\.v_proj\."), ".attention.attention.value."),
    (re.compile(r"\.attention\.o_proj\."), ".attention.output.dense."),
    (re.compile(r"\.mlp\.fc1\."), ".intermediate.dense."),
    (re.compile(r"\.mlp\.fc2\."), ".output.dense."),
)
_BASE_MODEL_MODULES = ("embeddings.", "encoder.", "layernorm.")
_REFERENCE_BLOCK = re.compile(r"(blocks|decoder_blocks)\.(\d+)\.(.+)\.(weight|bias)")
_HF_BLOCK = re.compile(r"(vit\.encoder\.layer|decoder\.decoder_layers)\.(\d+)\.(.+)\.(weight|bias)")


def is_hf_dir(path: str) -> bool:
    """A folder with a config.json and single-file weights (safetensors or a torch pickle)."""
    return os.path.isfile(os.path.join(path, CONFIG_FILE)) and any(
        os.path.isfile(os.path.join(path, name)) for name in (SAFETENSORS_FILE, PICKLE_FILE))


def canonical_key(key: str) -> str:
    """Any spelling of an HF ViTMAE key (module docstring) -> the hub layout that export writes."""
    for pattern, replacement in _SPELLINGS:
        key = pattern.sub(replacement, key)
    return f"vit.{key}" if key.startswith(_BASE_MODEL_MODULES) else key


def reference_to_hf(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Reference MAE state dict (torch layouts) -> HF ViTMAEForPreTraining keys; values are not copied."""
    out = {}
    for key, value in state.items():
        if match := _REFERENCE_BLOCK.fullmatch(key):
            stack, index, part, leaf = match.groups()
            prefix = f"{STACKS[stack]}.{index}"
            if part == "attn.qkv":
                for name, rows in zip(QKV, np.split(value, 3, axis=0)):
                    out[f"{prefix}.attention.attention.{name}.{leaf}"] = rows
            else:
                out[f"{prefix}.{BLOCK[part]}.{leaf}"] = value
        elif key in TOP_LEVEL:
            out[TOP_LEVEL[key]] = value
        else:
            module, _, leaf = key.rpartition(".")
            out[f"{TOP_LEVEL[module]}.{leaf}"] = value
    return out


def hf_to_reference(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inverse of `reference_to_hf` for hub-layout keys it produces (each block's q, k and v all present)."""
    top, stacks, block = ({v: k for k, v in table.items()} for table in (TOP_LEVEL, STACKS, BLOCK))
    out, fused = {}, {}
    for key, value in state.items():
        if match := _HF_BLOCK.fullmatch(key):
            stack, index, part, leaf = match.groups()
            prefix = f"{stacks[stack]}.{index}"
            if part.startswith("attention.attention."):
                fused.setdefault(f"{prefix}.attn.qkv.{leaf}", {})[part.rpartition(".")[2]] = value
            else:
                out[f"{prefix}.{block[part]}.{leaf}"] = value
        elif key in top:
            out[top[key]] = value
        else:
            module, _, leaf = key.rpartition(".")
            out[f"{top[module]}.{leaf}"] = value
    for key, parts in fused.items():
        out[key] = np.concatenate([parts[name] for name in QKV], axis=0)
    return out


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch layout of a param shape: Linear (out, in), conv (D, C, p, p) (as torch_mae.to_torch_array)."""
    if path[-1] == "kernel" and len(shape) == 2:
        return shape[::-1]
    if path[-1] == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return shape


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF key of the ViTMAEForPreTraining that `config` describes, with its shape (tables included)."""
    zero = np.float32(0)
    state = {torch_mae.path_to_torch_key(path): np.broadcast_to(zero, _torch_shape(path, shape))
             for path, shape in torch_mae.mae_param_shapes(config).items()}
    state["pos_embed"] = np.broadcast_to(zero, (1, 1 + config.num_patches, config.width))
    state["decoder_pos_embed"] = np.broadcast_to(zero, (1, 1 + config.num_patches, config.decoder_width))
    return {key: value.shape for key, value in reference_to_hf(state).items()}


def _square(value, name: str, source: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise CheckpointError(f"{source}: {name} {value} is not square; our model needs square images and "
                                  "patches")
        value = value[0]
    return int(value)


def model_config_from_hf(fields: dict, source: str) -> tuple[ModelConfig, list[str]]:
    """(our ModelConfig, notes) from a ViTMAE config.json; what our model cannot compute is a CheckpointError."""
    if fields.get("model_type") != MODEL_TYPE:
        raise CheckpointError(f"{source}: model_type {fields.get('model_type')!r} is not {MODEL_TYPE!r}; "
                              "only ViTMAE directories are read")
    field = {**HF_DEFAULTS, **fields}
    if field["hidden_act"] != "gelu":  # HF's "gelu" is the exact erf GELU of the reference blocks
        raise CheckpointError(f"{source}: hidden_act {field['hidden_act']!r}; our blocks use the exact 'gelu'")
    if not field["qkv_bias"]:
        raise CheckpointError(f"{source}: qkv_bias is false; our attention always has a qkv bias")
    ratio = field["intermediate_size"] / field["hidden_size"]
    decoder_ratio = field["decoder_intermediate_size"] / field["decoder_hidden_size"]
    if ratio != decoder_ratio:
        raise CheckpointError(f"{source}: MLP ratio {ratio:g} in the encoder but {decoder_ratio:g} in the decoder; "
                              "our model has one mlp_ratio")
    try:
        config = ModelConfig(
            img_size=_square(field["image_size"], "image_size", source),
            patch_size=_square(field["patch_size"], "patch_size", source), in_chans=int(field["num_channels"]),
            width=int(field["hidden_size"]), depth=int(field["num_hidden_layers"]),
            heads=int(field["num_attention_heads"]), mlp_ratio=ratio,
            decoder_width=int(field["decoder_hidden_size"]), decoder_depth=int(field["decoder_num_hidden_layers"]),
            decoder_heads=int(field["decoder_num_attention_heads"]), norm_pix_loss=bool(field["norm_pix_loss"]))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: {err}") from err
    notes = []
    if float(field["layer_norm_eps"]) != vit.LN_EPS:
        notes.append(f"{source} sets layer_norm_eps {float(field['layer_norm_eps']):g}; our LayerNorms use "
                     f"{vit.LN_EPS:g}, the reference MAE's")
    return config, notes


def hf_config(config: ModelConfig, mask_ratio: float, with_decoder: bool = True) -> dict:
    """The config.json of our model as a ViTMAEConfig (field names: configuration_vit_mae.py)."""
    return {
        "architectures": ["ViTMAEForPreTraining" if with_decoder else "ViTMAEModel"], "model_type": MODEL_TYPE,
        "hidden_size": config.width, "num_hidden_layers": config.depth, "num_attention_heads": config.heads,
        "intermediate_size": int(config.width * config.mlp_ratio), "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
        "layer_norm_eps": vit.LN_EPS, "image_size": config.img_size, "patch_size": config.patch_size,
        "num_channels": config.in_chans, "qkv_bias": True, "decoder_hidden_size": config.decoder_width,
        "decoder_num_hidden_layers": config.decoder_depth, "decoder_num_attention_heads": config.decoder_heads,
        "decoder_intermediate_size": int(config.decoder_width * config.mlp_ratio), "mask_ratio": float(mask_ratio),
        "norm_pix_loss": bool(config.norm_pix_loss),
    }


def preprocessor_config(config: ModelConfig) -> dict:
    """A ViTImageProcessor doing what our evaluation input does: grey frames copied to 3 channels, the nearest
    resize of the `eval` transform (data/augment.py), /255, ImageNet mean and std (models/vit.py)."""
    return {"image_processor_type": "ViTImageProcessor", "do_convert_rgb": True, "do_resize": True,
            "size": {"height": config.img_size, "width": config.img_size}, "resample": 0,  # PIL NEAREST
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(vit.IMAGENET_MEAN), "image_std": list(vit.IMAGENET_STD)}


def _read_weights(directory: str) -> tuple[str, dict[str, np.ndarray]]:
    """(file, state dict) of a ViTMAE folder: model.safetensors, else pytorch_model.bin by the refusing unpickler."""
    path = os.path.join(directory, SAFETENSORS_FILE)
    if not os.path.isfile(path):
        path = os.path.join(directory, PICKLE_FILE)
    if not os.path.isfile(path):
        raise MissingInputError(f"{directory} has neither {SAFETENSORS_FILE} nor {PICKLE_FILE}")
    try:
        if path.endswith(".safetensors"):
            return path, torch_pickle.read_safetensors(path)[0]
        return path, torch_mae.load_torch_state_dict(path)
    except CheckpointError:
        raise  # unsafe globals, bad headers, not a state dict: the message names the file
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({type(err).__name__}: {err})") from err


def load_hf_dir(directory: str, heads: int | None = None,
                allow_unexpected: bool = False) -> tuple[dict, ModelConfig, dict]:
    """(params, config, report) of a ViTMAE directory; what `init` and `interop import` call for one.

    The weights must be those config.json describes: a key of another shape, a block the config lacks, or a
    missing encoder key is an error naming both files. A missing decoder is allowed (encoder-only, e.g. a
    saved ViTMAEModel): it stays freshly initialised, as for an encoder-only `.pth`.
    """
    config_file = os.path.join(directory, CONFIG_FILE)
    try:
        with open(config_file) as f:
            fields = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{config_file}: unreadable ({err})") from err
    if not isinstance(fields, dict):
        raise CheckpointError(f"{config_file}: not a JSON object")
    config, notes = model_config_from_hf(fields, config_file)
    if heads is not None and heads != config.heads:
        raise ConfigError(f"--heads {heads} contradicts {config_file}, which sets {config.heads} heads")
    weights_file, raw = _read_weights(directory)
    state = {canonical_key(key): value for key, value in raw.items()}
    expected = expected_shapes(config)
    described = (f"the model {config_file} describes ({config.depth} blocks of width {config.width}, decoder "
                 f"{config.decoder_depth} of width {config.decoder_width}, patch {config.patch_size}, "
                 f"{config.img_size} px)")
    wrong = [f"{k} {tuple(v.shape)} (expected {expected[k]})" for k, v in sorted(state.items())
             if k in expected and tuple(v.shape) != expected[k]]
    if wrong:
        raise CheckpointError(f"{weights_file}: shapes do not fit {described}: {', '.join(wrong[:4])}")
    unexpected = sorted(set(state) - set(expected))
    if unexpected and not allow_unexpected:
        raise torch_mae.UnexpectedKeysError(f"{weights_file}: keys {unexpected[:6]} are not in {described}; pass "
                                            "allow_unexpected=True (--allow_unexpected) to ignore them")
    missing = sorted(set(expected) - set(state) - set(TABLES))
    decoder = sorted(k for k in expected if k.startswith("decoder.") and k not in TABLES)
    if missing and missing != decoder:
        raise CheckpointError(f"{weights_file}: lacks {missing[:6]} of {described}")
    reference = hf_to_reference({k: v for k, v in state.items() if k in expected})
    try:
        params, converted = torch_mae.torch_to_flax(reference, config)
    except torch_mae.PositionTableError as err:
        key, _, rest = str(err).partition(":")
        raise torch_mae.PositionTableError(f"{weights_file}: {TOP_LEVEL.get(key, key)}:{rest}") from err
    for note in notes:
        logger.warning("%s", note)
    report = dict(kind=converted["kind"], num_classes=None, source=os.path.abspath(directory),
                  used=sorted(k for k in state if k in expected and k not in TABLES),
                  verified=sorted(k for k in state if k in TABLES), ignored=[], missing=missing,
                  unexpected=unexpected, notes=notes, mask_ratio=float(fields.get("mask_ratio", DEFAULT_MASK_RATIO)))
    return params, config, report


def _replaceable(out: str) -> bool:
    """An existing --out folder holding nothing but the files an export writes (never a user's folder)."""
    return os.path.isdir(out) and not os.path.islink(out) and set(os.listdir(out)) <= EXPORT_FILES


def export_hf_dir(params: dict, config: ModelConfig, out: str, mask_ratio: float = DEFAULT_MASK_RATIO,
                  overwrite: bool = False, source: str = "") -> dict[str, np.ndarray]:
    """Writes `out/` (config.json, model.safetensors, preprocessor_config.json) for `from_pretrained`.

    The folder is written as `.NAME.tmp` next to `out` and renamed when complete, so a failed write never
    leaves a partial export under the final name. An existing `out` is replaced only with `overwrite`, and
    only when it holds nothing but an export's files. Returns the tensors written, by HF key.
    """
    classifier = sorted(k for k in params if k in torch_mae.CLASSIFIER_ENTRIES)
    if classifier:
        raise CheckpointError(f"{source or 'the checkpoint'} holds classifier entries {classifier}; transformers' "
                              "ViTMAE has no classification head: export it with --format timm_vit")
    out = os.path.abspath(out)
    if os.path.lexists(out) and not overwrite:
        raise ConfigError(f"{out} already exists; pass --overwrite to replace it")
    if os.path.lexists(out) and not _replaceable(out):
        raise ConfigError(f"--out {out} is not a folder written by this export (it holds other files); "
                          "refusing to replace it")
    with_decoder = "decoder_embed" in params
    tensors = reference_to_hf(torch_mae.flax_to_torch(params, config, "mae"))
    metadata = {"format": "pt", "model_config": json.dumps(dataclasses.asdict(config)), "source": source}
    documents = {CONFIG_FILE: hf_config(config, mask_ratio, with_decoder)}
    if config.in_chans == 3:
        documents[PREPROCESSOR_FILE] = preprocessor_config(config)
    parent, name = os.path.split(out)
    temp, old = os.path.join(parent, f".{name}.tmp"), os.path.join(parent, f".{name}.old")
    shutil.rmtree(temp, ignore_errors=True)  # left by an interrupted export
    try:
        os.makedirs(temp)
        for file_name, document in documents.items():
            with open(os.path.join(temp, file_name), "w") as f:
                json.dump(document, f, indent=2)
        torch_pickle.write_safetensors(os.path.join(temp, SAFETENSORS_FILE), tensors, metadata)
        if os.path.lexists(out):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(temp, out)
            shutil.rmtree(old)
        else:
            os.replace(temp, out)
    except OSError as err:
        shutil.rmtree(temp, ignore_errors=True)
        if err.filename is None:  # a failed write() names no file
            raise OSError(err.errno, err.strerror, temp) from err
        raise
    return tensors
