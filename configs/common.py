"""Shared pieces of every config: preset-argument parsing, the model, input and mesh blocks, and durations.

Configs are `get_config(arg)` functions (big_vision / flax examples style). `arg` is the text after the colon
in `--config=configs/pretrain.py:demo,variant=tiny,img_size=64`: a preset name followed by typed key=value
preset arguments. Single fields are then overridden with `--config.x=y`, and the config is locked, so a
mistyped key is an error rather than a silently ignored setting.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parses 'preset,key=value,...' into a ConfigDict typed by `defaults`.

    A bare word that is not a key=value pair sets the `preset` field (or, when a boolean default of that name
    exists, switches it on, e.g. `runlocal`). Unknown keys raise with the list of valid ones.
    """
    result = ml_collections.ConfigDict(defaults)
    for token in filter(None, (t.strip() for t in (arg or "").split(","))):
        if "=" not in token:
            if isinstance(defaults.get(token), bool):
                result[token] = True
            elif "preset" in defaults:
                result.preset = token
            else:
                raise ValueError(f"unexpected config argument {token!r}; valid keys: {sorted(defaults)}")
            continue
        key, value = (s.strip() for s in token.split("=", 1))
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; valid keys: {sorted(defaults)}")
        default = defaults[key]
        if isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"config argument {key} expects true/false, got {value!r}")
            result[key] = value.lower() in ("true", "1")
        elif default is None:
            result[key] = value
        else:
            result[key] = type(default)(value)
    return result


def model_block(variant: str, img_size: int, **fields) -> ml_collections.ConfigDict:
    """The `model` sub-config. Unset size fields (None) come from the variant's preset in models/vit.py."""
    block = ml_collections.ConfigDict({
        "variant": variant,
        "img_size": img_size,
        "in_chans": 3,
        "patch_size": config_dict.placeholder(int),
        "width": config_dict.placeholder(int),
        "depth": config_dict.placeholder(int),
        "heads": config_dict.placeholder(int),
        "mlp_ratio": 4.0,
        "decoder_width": config_dict.placeholder(int),
        "decoder_depth": config_dict.placeholder(int),
        "decoder_heads": config_dict.placeholder(int),
        "norm_pix_loss": False,
        "mask_ratio": 0.75,
        "dtype": "float32",  # compute dtype; params and the loss stay float32
        "attention": "auto",  # auto | custom | xla | cudnn (usf_mae_jax/models/attention.py)
    })
    block.update(fields)
    return block


def input_block(**fields) -> ml_collections.ConfigDict:
    """The `input` sub-config read by usf_mae_jax/data/pipeline.py."""
    block = ml_collections.ConfigDict({
        "source": "synthetic",  # synthetic (in memory) | shards (ArrayRecord folders from data_prep)
        "data_dir": "",  # a dataset folder, a comma-separated list of them, or a root holding dataset folders
        "weights": "",  # comma-separated per-dataset mixture weights; '' = proportional to size
        "augment": "usf_mae",  # usf_mae | mae | eval | none
        "channels": 0,  # host image channels: 0 = auto (3 if any dataset is colour, else 1), or force 1 / 3
        "synthetic_count": 1024,
        "synthetic_seed": 0,
        "num_threads": 0,  # threads building batches, per process; 0 = half the cores (pipeline.host_threads)
        "prefetch_buffer": 0,  # host batches built ahead; 0 = two per thread
        "device_prefetch": 2,  # global batches already sent to the devices
        "worker_processes": 0,  # 0 = threads in-process; a many-core host wants some (docs/data_pipeline.md)
        "max_corrupt_fraction": 0.01,
    })
    block.update(fields)
    return block


def mesh_block(data: int = -1, fsdp: int = 1, fsdp_min_size: int = 2**18) -> ml_collections.ConfigDict:
    """Mesh axes ('data', 'fsdp'); -1 fills the remaining devices. Params smaller than fsdp_min_size elements
    stay replicated; larger ones are sharded along their largest divisible dimension."""
    return ml_collections.ConfigDict({"data": data, "fsdp": fsdp, "fsdp_min_size": fsdp_min_size})


def duration_fields(**values) -> dict:
    """Unit-suffixed durations (usf_mae_jax/core/steps.py resolves them); the alternatives of each one are
    typed placeholders, so exactly the ones a preset or an override sets are in force."""
    fields = {}
    for name in ("total", "warmup", "eval"):
        fields[f"{name}_steps"] = config_dict.placeholder(int)
        fields[f"{name}_epochs"] = config_dict.placeholder(float)
    fields["warmup_fraction"] = config_dict.placeholder(float)
    fields.update(values)
    return fields


def check_runlocal(args: ml_collections.ConfigDict, *conflicting: str) -> None:
    """`runlocal` sets its own sizes and durations; an explicit preset argument it would override is an error
    rather than silently ignored (e.g. `busbra,epochs=3,runlocal`)."""
    if not args.get("runlocal"):
        return
    given = [f"{k}={args[k]}" for k in conflicting if args.get(k)]
    if given:
        raise ValueError(f"runlocal sets its own model size and duration; drop {', '.join(given)} or runlocal")


def apply_downstream_args(c: ml_collections.ConfigDict, args: ml_collections.ConfigDict,
                          **runlocal_model) -> ml_collections.ConfigDict:
    """The preset arguments shared by the downstream configs (fine-tune, linear probe, segmentation): fold,
    subset, variant, img_size, epochs, and `runlocal`'s tiny model (plus `runlocal_model` fields) and short
    schedule. Returns `c`."""
    if args.fold >= 0:
        c.fold = args.fold
    if args.subset:
        c.subset = args.subset
    if args.variant:
        c.model.variant = args.variant
    if args.img_size:
        c.model.img_size = args.img_size
    if args.epochs:
        c.total_epochs = float(args.epochs)
    if args.runlocal:
        c.model.update(variant="mu", img_size=32, patch_size=8, depth=2, dtype="float32", **runlocal_model)
        c.batch_size, c.eval_batch_size = 8, 16
        c.total_epochs, c.warmup_epochs = 1.0, None
        c.warmup_steps = 1
        c.log_steps = 1
    return c
