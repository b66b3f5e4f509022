"""Shared pieces of every config: preset-argument parsing, the model block and the unit-suffixed durations.

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
        "attention": "xla",  # or "cudnn" (flash attention on NVIDIA GPUs)
    })
    block.update(fields)
    return block


def input_block(**fields) -> ml_collections.ConfigDict:
    """The `input` sub-config read by usf_mae_jax/data/pipeline.py."""
    block = ml_collections.ConfigDict({
        "source": "synthetic",  # synthetic (in memory) | shards (ArrayRecord folders from data_prep)
        "data_dir": "",  # a dataset folder, a comma list of them, or a root holding dataset folders
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
    """Unit-suffixed durations; leave the alternatives of each one as typed placeholders."""
    fields = {}
    for name in ("total", "warmup"):
        fields[f"{name}_steps"] = config_dict.placeholder(int)
        fields[f"{name}_epochs"] = config_dict.placeholder(float)
    fields["warmup_fraction"] = config_dict.placeholder(float)
    fields.update(values)
    return fields


def resolve_steps(config, name: str, steps_per_epoch: int, total_steps: int | None = None) -> int:
    """Turns `{name}_steps`, `{name}_epochs` or `{name}_fraction` (exactly one set) into a step count."""
    set_fields = [f"{name}_{unit}" for unit in ("steps", "epochs", "fraction")
                  if config.get(f"{name}_{unit}") is not None]
    if len(set_fields) != 1:
        raise ValueError(f"set exactly one of {name}_steps / {name}_epochs / {name}_fraction, got {set_fields}")
    field = set_fields[0]
    value = config[field]
    if field.endswith("_steps"):
        return int(value)
    if field.endswith("_epochs"):
        return int(round(value * steps_per_epoch))
    if total_steps is None:
        raise ValueError(f"{field} needs the total number of steps")
    return int(round(value * total_steps))
