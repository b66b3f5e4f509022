"""Reference MAE / USF-MAE PyTorch checkpoints <-> our Flax parameters.

The key table is docs/mae_fidelity.md ("Reference checkpoint keys"). Our parameter paths
mirror the torch keys (`blocks.3.attn.qkv.weight` <-> `blocks_3/attn/qkv/kernel`), so the conversion is:
  * Linear `weight` (out, in) -> `kernel` (in, out) = W.T. The fused qkv needs no split: its rows are
    [q | k | v], each head-major, and our attention reshapes the (D, 3D) kernel output exactly so;
  * the patch-embed conv weight (D, C, p, p) -> kernel (p, p, C, D) = transpose(2, 3, 1, 0);
  * LayerNorm `weight` -> `scale`; tokens as they are;
  * `pos_embed` / `decoder_pos_embed` are fixed tables, not parameters: they are compared with ours and the
    conversion fails if they differ.

Besides pretraining checkpoints (`kind="pretrain"`, decoder optional), two classification layouts of the
reference fine-tune code are accepted, and their extra entries are returned in the params dict under:
  * fine-tuned (`kind="finetune"`: `fc_norm.*`, `head.*`): `fc_norm/{scale,bias}`, `head/{kernel,bias}`, and
    `pos_embed` (1, 1 + L, D), because fine-tuning trains the position table;
  * linear probe (`kind="linprobe"`: `head.0` BatchNorm statistics, `head.1` Linear): `head_bn/{mean,var}`
    and `head/{kernel,bias}` (`head.0.num_batches_tracked` is ignored); the encoder is frozen there, so
    `pos_embed` must still equal the fixed table.

The report is a JSON-able dict: `used`, `missing` and `unexpected` torch keys, `verified` position tables,
`ignored` keys, the checkpoint `kind` and `num_classes` (ModelConfig has no class count).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from usf_mae_jax.cli import CheckpointError
from usf_mae_jax.interop import torch_pickle
from usf_mae_jax.models import pos_embed, vit
from usf_mae_jax.models.mae import MaskedAutoencoder
from usf_mae_jax.models.vit import ModelConfig

logger = logging.getLogger(__name__)

NORM_MODULES = frozenset({"norm", "norm1", "norm2", "fc_norm", "decoder_norm"})
POSITION_TABLES = ("pos_embed", "decoder_pos_embed")
IGNORED_KEYS = {"head.0.num_batches_tracked": "BatchNorm step counter, not needed for inference"}
EXPORT_FORMATS = ("mae", "timm_vit")
# Entries of a params dict that belong to a classifier, not to the MAE (see the module docstring).
CLASSIFIER_ENTRIES = ("fc_norm", "head", "head_bn", "pos_embed")
Path = tuple[str, ...]


class PositionTableError(CheckpointError):
    """A checkpoint's fixed position table is not the 2-D sin-cos table our model computes."""


class UnexpectedKeysError(CheckpointError):
    """A checkpoint holds keys the conversion does not understand."""


def _read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(state dict, safetensors metadata or {}) of a `.pth`/`.pt`/`.safetensors` file."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        return torch_pickle.read_safetensors(path)
    obj = torch_pickle.load_pickle_checkpoint(path)
    if isinstance(obj, dict) and "model" in obj:
        obj = obj["model"]  # training checkpoints: optimizer, args, epoch, scaler are left unread
    if not isinstance(obj, dict) or not obj:
        raise torch_pickle.CheckpointFormatError(f"{path}: expected a state dict or a dict with a 'model' "
                                                 f"entry, got {type(obj).__name__}")
    not_tensors = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch_pickle.TensorRef))
    if not_tensors:
        raise torch_pickle.CheckpointFormatError(
            f"{path}: not a state dict (entries {not_tensors[:8]} are not tensors) and no 'model' entry")
    state_dict = {str(k): v.numpy() for k, v in obj.items()}
    if all(k.startswith("module.") for k in state_dict):  # saved from a DistributedDataParallel wrapper
        logger.info("%s: stripping the 'module.' prefix of every key", path)
        state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    return state_dict, {}


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a bare state dict, or the `model` entry of a training checkpoint, as NumPy arrays."""
    return _read_checkpoint(path)[0]


def checkpoint_kind(state_dict: dict[str, np.ndarray]) -> str:
    """'linprobe' (BatchNorm head), 'finetune' (fc_norm / head) or 'pretrain'."""
    if "head.0.running_mean" in state_dict or "head.1.weight" in state_dict:
        return "linprobe"
    if "head.weight" in state_dict or "fc_norm.weight" in state_dict:
        return "finetune"
    return "pretrain"


def _num_classes(state_dict: dict[str, np.ndarray]) -> int | None:
    for key in ("head.weight", "head.1.weight"):
        if key in state_dict:
            return int(state_dict[key].shape[0])
    return None


def _block_count(state_dict: dict[str, np.ndarray], prefix: str) -> int:
    indices = {int(m.group(1)) for k in state_dict if (m := re.match(rf"{prefix}\.(\d+)\.", k))}
    return max(indices) + 1 if indices else 0


def _preset_value(width_field: str, width: int, field: str,
                  prefer: str | None = None) -> tuple[str, int] | None:
    """(preset name, its `field`) for the first size preset whose `width_field` equals `width`."""
    names = [n for n, size in vit.SIZES.items() if size[width_field] == width]
    if prefer in names:
        names.insert(0, prefer)
    return (names[0], vit.SIZES[names[0]][field]) if names else None


def infer_model_config(state_dict: dict[str, np.ndarray], heads: int | None = None,
                       **overrides) -> ModelConfig:
    """Reads width, depth, patch size, image size, decoder width/depth and mlp ratio from the shapes.

    Heads are not visible in the shapes: they come from the size preset with the same width (base: 12
    encoder / 16 decoder heads) unless `heads` (or `decoder_heads=`) is given. Without a decoder in the
    checkpoint, the decoder of the matching preset is used (it will be freshly initialised).
    """
    if "patch_embed.proj.weight" not in state_dict:
        raise ValueError("checkpoint has no 'patch_embed.proj.weight'; not a ViT / MAE state dict")
    width, in_chans, patch, patch_w = state_dict["patch_embed.proj.weight"].shape
    if patch != patch_w:
        raise ValueError(f"non-square patches {patch}x{patch_w} are not supported")
    fields: dict[str, Any] = dict(width=int(width), in_chans=int(in_chans), patch_size=int(patch),
                                  depth=_block_count(state_dict, "blocks"))
    if fields["depth"]:
        fields["mlp_ratio"] = state_dict["blocks.0.mlp.fc1.weight"].shape[0] / width
    if "pos_embed" in state_dict:
        grid = math.isqrt(state_dict["pos_embed"].shape[1] - 1)
        if grid * grid != state_dict["pos_embed"].shape[1] - 1:
            raise ValueError(f"pos_embed shape {state_dict['pos_embed'].shape} is not 1 + a square grid")
        fields["img_size"] = grid * int(patch)
    encoder_preset = _preset_value("width", int(width), "heads")
    if heads is not None:
        fields["heads"] = heads
    elif "heads" not in overrides:
        if encoder_preset is None:
            raise ValueError(f"no size preset has width {width}; pass heads= to choose the number of heads")
        fields["heads"] = encoder_preset[1]
    preset_name = encoder_preset[0] if encoder_preset else None
    if "decoder_embed.weight" in state_dict:
        fields["decoder_width"] = int(state_dict["decoder_embed.weight"].shape[0])
        fields["decoder_depth"] = _block_count(state_dict, "decoder_blocks")
        if fields["decoder_depth"]:
            ratio = state_dict["decoder_blocks.0.mlp.fc1.weight"].shape[0] / fields["decoder_width"]
            if fields["depth"] and ratio != fields["mlp_ratio"]:
                raise ValueError(f"decoder mlp ratio {ratio} differs from the encoder's "
                                 f"{fields['mlp_ratio']}")
    elif preset_name is not None:
        size = vit.SIZES[preset_name]
        fields.update(decoder_width=size["decoder_width"], decoder_depth=size["decoder_depth"])
    if "decoder_heads" not in overrides:
        decoder_preset = _preset_value("decoder_width", fields.get("decoder_width", 512), "decoder_heads",
                                       preset_name)
        if decoder_preset is None:
            raise ValueError(f"no size preset has decoder width {fields['decoder_width']}; "
                             "pass decoder_heads= to choose the number of decoder heads")
        fields["decoder_heads"] = decoder_preset[1]
    return ModelConfig(**{**fields, **overrides})


def torch_key_to_path(key: str) -> Path:
    """`blocks.3.attn.qkv.weight` -> ('blocks_3', 'attn', 'qkv', 'kernel'); see the module docstring."""
    *modules, leaf = key.split(".")
    path: list[str] = []
    i = 0
    while i < len(modules):
        name, following = modules[i], modules[i + 1] if i + 1 < len(modules) else None
        if name in ("blocks", "decoder_blocks") and following is not None and following.isdigit():
            path.append(f"{name}_{following}")
            i += 2
        elif name == "head" and following in ("0", "1"):
            path.append("head_bn" if following == "0" else "head")
            i += 2
        else:
            path.append(name)
            i += 1
    if not path:
        return (leaf,)
    leaves = {"weight": "scale" if path[-1] in NORM_MODULES else "kernel", "bias": "bias",
              "running_mean": "mean", "running_var": "var"}
    return (*path, leaves.get(leaf, f"?{leaf}"))


def path_to_torch_key(path: Path, linear_probe: bool = False) -> str:
    """Inverse of `torch_key_to_path`; `head` is `head.1` in a linear-probe checkpoint."""
    if len(path) == 1:
        return path[0]
    modules = []
    for name in path[:-1]:
        if match := re.fullmatch(r"(blocks|decoder_blocks)_(\d+)", name):
            modules.append(f"{match.group(1)}.{match.group(2)}")
        elif name == "head_bn":
            modules.append("head.0")
        elif name == "head" and linear_probe:
            modules.append("head.1")
        else:
            modules.append(name)
    leaf = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
            "var": "running_var"}[path[-1]]
    return ".".join([*modules, leaf])


def to_flax_array(path: Path, array: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel" and array.ndim == 2:
        array = array.T
    elif path[-1] == "kernel" and array.ndim == 4:
        array = array.transpose(2, 3, 1, 0)  # (D, C, p, p) -> (p, p, C, D)
    return np.ascontiguousarray(array, np.float32)


def to_torch_array(path: Path, array: Any) -> np.ndarray:
    array = np.asarray(array)
    if path[-1] == "kernel" and array.ndim == 2:
        array = array.T
    elif path[-1] == "kernel" and array.ndim == 4:
        array = array.transpose(3, 2, 0, 1)  # (p, p, C, D) -> (D, C, p, p)
    return np.ascontiguousarray(array)


def flatten(tree: dict, prefix: Path = ()) -> dict[Path, Any]:
    out: dict[Path, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, (*prefix, str(key))))
        else:
            out[(*prefix, str(key))] = value
    return out


def unflatten(flat: dict[Path, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    return tree


def mae_param_shapes(config: ModelConfig) -> dict[Path, tuple[int, ...]]:
    """Shapes of every MaskedAutoencoder parameter, by path.

    Written out rather than traced with `nnx.eval_shape`, which takes seconds for ViT-B; a test checks the
    two agree.
    """
    d, dd, p, c = config.width, config.decoder_width, config.patch_size, config.in_chans
    shapes: dict[Path, tuple[int, ...]] = {
        ("cls_token",): (1, 1, d), ("mask_token",): (1, 1, dd),
        ("patch_embed", "proj", "kernel"): (p, p, c, d), ("patch_embed", "proj", "bias"): (d,),
        ("norm", "scale"): (d,), ("norm", "bias"): (d,),
        ("decoder_embed", "kernel"): (d, dd), ("decoder_embed", "bias"): (dd,),
        ("decoder_norm", "scale"): (dd,), ("decoder_norm", "bias"): (dd,),
        ("decoder_pred", "kernel"): (dd, p * p * c), ("decoder_pred", "bias"): (p * p * c,),
    }
    blocks = [(f"blocks_{i}", d) for i in range(config.depth)]
    blocks += [(f"decoder_blocks_{j}", dd) for j in range(config.decoder_depth)]
    for block, width in blocks:
        hidden = int(width * config.mlp_ratio)
        for norm in ("norm1", "norm2"):
            shapes.update({(block, norm, "scale"): (width,), (block, norm, "bias"): (width,)})
        for module, name, n_in, n_out in (("attn", "qkv", width, 3 * width), ("attn", "proj", width, width),
                                          ("mlp", "fc1", width, hidden), ("mlp", "fc2", hidden, width)):
            shapes[(block, module, name, "kernel")] = (n_in, n_out)
            shapes[(block, module, name, "bias")] = (n_out,)
    return shapes


def _classifier_shapes(state_dict: dict[str, np.ndarray], config: ModelConfig, kind: str,
                       num_classes: int | None) -> dict[Path, tuple[int, ...]]:
    """Shapes of the classifier entries a fine-tuned / linear-probe checkpoint brings along."""
    if kind == "pretrain":
        return {}
    d = config.width
    shapes = {}
    if "fc_norm.weight" in state_dict:  # global-pool models; cls-token models keep `norm` instead
        shapes.update({("fc_norm", "scale"): (d,), ("fc_norm", "bias"): (d,)})
    if num_classes is not None:
        shapes.update({("head", "kernel"): (d, num_classes), ("head", "bias"): (num_classes,)})
    if kind == "linprobe":
        shapes.update({("head_bn", "mean"): (d,), ("head_bn", "var"): (d,)})
    else:
        shapes[("pos_embed",)] = (1, 1 + config.num_patches, d)
    return shapes


def _check_position_table(key: str, array: np.ndarray, config: ModelConfig) -> None:
    width = config.width if key == "pos_embed" else config.decoder_width
    ours = pos_embed.sincos_2d(width, config.grid)[None]
    if array.shape != ours.shape:
        raise PositionTableError(f"{key}: shape {array.shape} does not match our table {ours.shape} "
                                 f"(width {width}, {config.grid}x{config.grid} patches)")
    # A float16/bfloat16 checkpoint stores the table rounded: compare in its dtype.
    rounded = ours.astype(array.dtype).astype(np.float32)
    difference = float(np.max(np.abs(array.astype(np.float32) - rounded)))
    if difference > 1e-6:
        raise PositionTableError(f"{key}: differs from our fixed 2-D sin-cos table by up to "
                                 f"{difference:.3g}; the checkpoint used another position embedding")


def torch_to_flax(state_dict: dict[str, np.ndarray], config: ModelConfig,
                  allow_unexpected: bool = False) -> tuple[dict, dict]:
    """Converts a torch state dict to our nested params dict; returns (params, report).

    Raises on a shape that does not fit `config`, on a position table that is not ours, and on unexpected
    keys unless `allow_unexpected`.
    """
    kind, num_classes = checkpoint_kind(state_dict), _num_classes(state_dict)
    mae_shapes = mae_param_shapes(config)
    expected = {**mae_shapes, **_classifier_shapes(state_dict, config, kind, num_classes)}
    report: dict[str, Any] = dict(kind=kind, num_classes=num_classes, used=[], missing=[], unexpected=[],
                                  verified=[], ignored=[])
    flat: dict[Path, np.ndarray] = {}
    for key in sorted(state_dict):
        array = np.asarray(state_dict[key])
        if key in POSITION_TABLES and not (key == "pos_embed" and kind == "finetune"):
            _check_position_table(key, array, config)
            report["verified"].append(key)
            continue
        if key in IGNORED_KEYS:
            report["ignored"].append(key)
            continue
        path = torch_key_to_path(key)
        if path not in expected:
            report["unexpected"].append(key)
            continue
        value = to_flax_array(path, array)
        if value.shape != expected[path]:
            raise ValueError(f"{key}: shape {array.shape} (as {'/'.join(path)}: {value.shape}) does not fit "
                             f"the inferred model, which expects {expected[path]}")
        flat[path] = value
        report["used"].append(key)
    linear_probe = kind == "linprobe"
    report["missing"] = [path_to_torch_key(p, linear_probe) for p in expected if p not in flat]
    if report["unexpected"] and not allow_unexpected:
        raise UnexpectedKeysError(f"unexpected checkpoint keys {report['unexpected']}; pass "
                                  "allow_unexpected=True (--allow_unexpected) to ignore them")
    return unflatten(flat), report


def format_report(report: dict) -> str:
    """Human-readable key report, one section per list."""
    lines = [f"checkpoint kind: {report.get('kind')}, classes: {report.get('num_classes')}"]
    for section in ("used", "verified", "ignored", "missing", "unexpected"):
        keys = report.get(section, [])
        listed = ": " + ", ".join(keys) if keys and section != "used" else ""
        lines.append(f"{section} ({len(keys)}){listed}")
    decoder_missing = [k for k in report.get("missing", []) if k.startswith(("decoder", "mask_token"))]
    if decoder_missing:
        lines.append("note: the decoder is not in the checkpoint and stays freshly initialised; "
                     "reconstructions will look like noise until it is trained")
    return "\n".join(lines)


def mae_params(params: dict) -> dict:
    """The MaskedAutoencoder part of a params dict (classifier entries removed)."""
    return {k: v for k, v in params.items() if k not in CLASSIFIER_ENTRIES}


def load_params_into(model: nnx.Module, params: dict) -> None:
    """Overwrites the model's parameters present in `params`; the others keep their initial values."""
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)


def load_torch_mae(path: str | os.PathLike, norm_pix_loss: bool = False, heads: int | None = None,
                   allow_unexpected: bool = False, seed: int = 0) -> MaskedAutoencoder:
    """Builds our Flax MAE with the weights of a reference PyTorch checkpoint (`.pth`, `.pt`, safetensors).

    Parameters the checkpoint lacks (e.g. an encoder-only release without decoder) keep a fresh
    initialisation from `seed`; the report is logged.
    """
    state_dict = load_torch_state_dict(path)
    config = infer_model_config(state_dict, heads=heads, norm_pix_loss=norm_pix_loss)
    params, report = torch_to_flax(state_dict, config, allow_unexpected=allow_unexpected)
    logger.info("loaded %s\n%s", os.fspath(path), format_report(report))
    loaded = mae_params(params)
    if len(flatten(loaded)) == len(mae_param_shapes(config)):
        # Every parameter is in the checkpoint: skip the random initialisation (seconds for ViT-B on CPU).
        model = nnx.eval_shape(lambda: MaskedAutoencoder(config, rngs=nnx.Rngs(seed)))
        loaded = jax.tree.map(jnp.asarray, loaded)
    else:
        model = MaskedAutoencoder(config, rngs=nnx.Rngs(seed))
    load_params_into(model, loaded)
    return model


def _read_import_dir(directory: str) -> tuple[dict, ModelConfig, dict]:
    import orbax.checkpoint as ocp  # local: only the import-directory path needs Orbax

    config_file = os.path.join(directory, "model_config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{directory}: no model_config.json; not a directory written by "
                                "`python -m usf_mae_jax.interop import`")
    with open(config_file) as f:
        config = ModelConfig(**json.load(f))
    params = ocp.StandardCheckpointer().restore(os.path.abspath(os.path.join(directory, "params")))
    params = unflatten({p: np.asarray(v) for p, v in flatten(params).items()})
    report_file = os.path.join(directory, "conversion_report.json")
    report = {}
    if os.path.isfile(report_file):
        with open(report_file) as f:
            report = json.load(f)
    return params, config, report


def load_pretrained(path: str | os.PathLike, heads: int | None = None, allow_unexpected: bool = False,
                    **overrides) -> tuple[dict, ModelConfig, dict]:
    """(params, config, report) from a `.pth`/`.pt`/`.safetensors` file or an import directory.

    This is what `init` calls. `overrides` (e.g. `norm_pix_loss=True`) are ModelConfig fields applied
    on top of what the checkpoint shows; for an import directory they replace fields of its config.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        params, config, report = _read_import_dir(path)
        return params, dataclasses.replace(config, **overrides), report
    state_dict, metadata = _read_checkpoint(path)
    if "model_config" in metadata:  # our own safetensors exports record the heads
        saved = json.loads(metadata["model_config"])
        overrides = {"decoder_heads": saved["decoder_heads"], **overrides}
        heads = saved["heads"] if heads is None else heads
    config = infer_model_config(state_dict, heads=heads, **overrides)
    params, report = torch_to_flax(state_dict, config, allow_unexpected=allow_unexpected)
    return params, config, report


def flax_to_torch(params: dict, config: ModelConfig, fmt: str = "mae") -> dict[str, np.ndarray]:
    """Our params -> torch state-dict arrays.

    fmt="mae": the reference MaskedAutoencoderViT keys, fixed tables included (and any classifier entries
    under the reference fine-tune / linear-probe names). fmt="timm_vit": timm VisionTransformer keys
    (`vit_base_patch16_224` for base): the encoder, `pos_embed`, `norm` and, when present, `fc_norm` and a
    plain Linear `head`; the decoder and a linear-probe BatchNorm head have no timm equivalent and are left
    out.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {EXPORT_FORMATS}")
    flat = flatten(params)
    linear_probe = any(p[0] == "head_bn" for p in flat)
    out: dict[str, np.ndarray] = {}
    for path, value in flat.items():
        if fmt == "timm_vit" and (path[0].startswith("decoder") or path[0] == "mask_token"
                                  or (linear_probe and path[0] in ("head", "head_bn"))):
            continue
        out[path_to_torch_key(path, linear_probe and fmt == "mae")] = to_torch_array(path, value)
    if "pos_embed" not in out:
        out["pos_embed"] = pos_embed.sincos_2d(config.width, config.grid)[None].copy()
    if fmt == "mae" and any(p[0] == "decoder_embed" for p in flat):
        out["decoder_pos_embed"] = pos_embed.sincos_2d(config.decoder_width, config.grid)[None].copy()
    return out
