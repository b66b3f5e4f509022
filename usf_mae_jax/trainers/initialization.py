"""The `init` of downstream tasks: which weights, which architecture, and where they came from.

`config.init` is a pretraining or fine-tuning workdir (read-only), an interop import directory or a PyTorch
`.pth`/`.pt`/`.safetensors` (interop/weights.py `load_weights`). The architecture comes from the init when it
records one; `model.img_size` always comes from the config, and the position table is resized to it. An
explicit architecture override that contradicts the init is an error rather than a silent choice.

The provenance (paths, file hash, the pretraining run's data folders and their manifests) is written to
`provenance.json`, so that leakage of test images into pretraining can be checked.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

from usf_mae_jax.cli import CheckpointError, ConfigError
from usf_mae_jax.core import checkpoint, files
from usf_mae_jax.data import folders
from usf_mae_jax.interop import hf_vitmae, weights
from usf_mae_jax.models import vit

log = logging.getLogger(__name__)

ARCHITECTURE_FIELDS = ("patch_size", "in_chans", "width", "depth", "heads", "mlp_ratio")


@dataclasses.dataclass
class InitInfo:
    params: dict | None  # pure dict (MAE or classifier params), None for random init
    source_img_size: int | None
    model_config: vit.ModelConfig  # the downstream model's architecture at the config's img_size
    provenance: dict


def _manifest_summary(path: str) -> dict:
    entry = {"path": os.path.abspath(path), "sha256": files.file_sha256(path)}
    try:
        manifest = files.read_json(path)
        entry.update(dataset=manifest.get("dataset"), counts=manifest.get("counts"),
                     content_sha256=manifest.get("content_sha256"))
    except (OSError, json.JSONDecodeError) as err:
        entry["error"] = f"unreadable manifest: {err}"
    return entry


def init_provenance(path: str | None) -> dict:
    """Where the init came from, with the pretraining data manifests when the init is a pretraining workdir.

    A `.pth` or a Hugging Face ViTMAE directory records its files' hashes, an import directory its conversion
    report; the pretraining data of a released checkpoint is not recorded in the file, so
    `pretraining_manifests` is empty there.
    """
    if not path:
        return {"init": None, "kind": "random", "pretraining_manifests": []}
    record: dict[str, Any] = {"init": os.path.abspath(path), "pretraining_manifests": []}
    if os.path.isfile(path):
        record.update(kind="torch_file", sha256=files.file_sha256(path))
        return record
    if os.path.isdir(os.path.join(path, checkpoint.CHECKPOINT_DIR)):
        record["kind"] = "workdir"
        # The newest committed step when the init was read: a live pretraining moves on while readers use it.
        record["checkpoint_step"] = (checkpoint.workdir_steps(path) or [None])[-1]
        config_path = os.path.join(path, "config.json")
        if os.path.isfile(config_path):
            saved = files.read_json(config_path)
            inputs = saved.get("input", {})
            record["pretraining_config"] = {"task": saved.get("task"), "preset": saved.get("preset"),
                                            "input_source": inputs.get("source"),
                                            "data_dir": inputs.get("data_dir"), "init": saved.get("init")}
            for entry in folders.entries(inputs.get("data_dir") or ""):
                record["pretraining_manifests"] += [_manifest_summary(os.path.join(m, folders.MANIFEST_NAME))
                                                    for m in folders.manifest_folders(entry)]
        nested = os.path.join(path, "provenance.json")  # a fine-tuned workdir carries its init's provenance
        if os.path.isfile(nested):
            record["init_provenance"] = files.read_json(nested)
        return record
    if hf_vitmae.is_hf_dir(path):
        record["kind"] = "hf_vitmae_dir"
        record["files"] = {name: files.file_sha256(os.path.join(path, name)) for name in sorted(os.listdir(path))
                           if os.path.isfile(os.path.join(path, name))}
        return record
    record["kind"] = "import_dir"
    report = os.path.join(path, "conversion_report.json")
    if os.path.isfile(report):
        record["conversion_report"] = files.read_json(report)
    return record


def layer_decay_for(opt_cfg: Any, model_config: vit.ModelConfig, pretrained: bool = True) -> float:
    """The configured layer decay, or the reference's value for the model size (0.65 B, 0.75 L/H).

    Without a pretrained encoder, `optimizer.scratch_layer_decay` wins when set: layer decay shields
    pretrained lower blocks, and a random encoder has nothing to shield.
    """
    if not pretrained and opt_cfg.get("scratch_layer_decay") is not None:
        return float(opt_cfg.scratch_layer_decay)
    if opt_cfg.get("layer_decay") is not None:
        return float(opt_cfg.layer_decay)
    return 0.65 if model_config.width <= 768 else 0.75


def resolve_init(config: Any) -> InitInfo:
    """Loads `config.init` (or nothing) and decides the downstream model's architecture."""
    model_cfg = config.model
    if not config.init:
        log.warning("config.init is not set: the encoder starts from RANDOM initialisation. Pass "
                    "--config.init=PATH (a pretraining workdir, an interop import dir or a .pth) to "
                    "evaluate a pretrained model.")
        return InitInfo(None, None, vit.config_from_block(model_cfg), init_provenance(None))
    params, fields = weights.load_weights(config.init)
    if fields is None:
        raise CheckpointError(f"init {config.init}: its model configuration is unknown (a workdir without "
                              "config.json?); cannot tell the architecture")
    source = vit.ModelConfig(**{k: v for k, v in fields.items()
                                if k in {f.name for f in dataclasses.fields(vit.ModelConfig)}})
    explicit = {k: model_cfg[k] for k in ARCHITECTURE_FIELDS if model_cfg.get(k) is not None}
    conflicts = {k: (v, getattr(source, k)) for k, v in explicit.items() if v != getattr(source, k)}
    if conflicts:
        raise ConfigError(f"init {config.init} has another architecture than config.model sets "
                          f"(field: (config, init)): {conflicts}; drop those overrides")
    if model_cfg.variant and vit.SIZES.get(model_cfg.variant, {}).get("width") != source.width:
        log.info("config.model.variant=%s is ignored: the init %s has width %d, depth %d", model_cfg.variant,
                 config.init, source.width, source.depth)
    model_config = dataclasses.replace(source, img_size=int(model_cfg.img_size), dtype=model_cfg.dtype,
                                       attention=model_cfg.attention)
    log.info("init %s: %s; source img_size %d -> %d", config.init,
             {k: getattr(source, k) for k in ARCHITECTURE_FIELDS}, source.img_size, model_config.img_size)
    return InitInfo(params, source.img_size, model_config, init_provenance(config.init))
