"""Command line for checkpoint interop.

    python -m usf_mae_jax.interop [--verbose] import --checkpoint X.pth_or_HF_DIR --out DIR [--heads H]
        [--allow_unexpected]
    python -m usf_mae_jax.interop [--verbose] export --checkpoint WORKDIR_or_DIR_or_X.pth --out Y.safetensors
        [--format mae|timm_vit|hf_vitmae] [--step N] [--heads H] [--overwrite]

`import` writes an Orbax checkpoint directory that `init` accepts (`torch_mae.load_pretrained`):
    DIR/params                  ocp.StandardCheckpointer save of the nested params dict
    DIR/model_config.json       dataclasses.asdict(ModelConfig)
    DIR/conversion_report.json  the key report (used / missing / unexpected / verified / ignored)
Its source is a `.pth`/`.pt`/`.safetensors` file or a Hugging Face ViTMAE directory (`hf_vitmae.py`).
`export` writes torch state-dict keys (reference MAE or timm ViT) as safetensors, with the model config in the
file's metadata, or, with `--format hf_vitmae`, a folder that transformers' `ViTMAEForPreTraining` /
`ViTMAEModel.from_pretrained` loads (config.json with the workdir's mask ratio, model.safetensors,
preprocessor_config.json). Its source is a pretraining or fine-tuning workdir (read-only: its newest
checkpoint, or `--step N`; the best state when the run selected one), an import directory, a ViTMAE directory
or a `.pth`. The file or folder is written under a temporary name renamed at the end; an existing one is
replaced only with `--overwrite`. Both print the key report and the time taken.

Both run under `usf_mae_jax.cli.run_cli`: an unsafe or unrecognised checkpoint, a missing file, an existing
output or a full disk prints one line, `python -m usf_mae_jax.interop <command>: <message>`, and exits
non-zero; `--verbose` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import sys
import time
import zipfile

import numpy as np

from usf_mae_jax.cli import CheckpointError, ConfigError, MissingInputError, UserError, run_cli, verbose_requested
from usf_mae_jax.interop import hf_vitmae, torch_mae, torch_pickle

PROG = "python -m usf_mae_jax.interop"
FORMATS = (*torch_mae.EXPORT_FORMATS, "hf_vitmae")


class _OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise `ConfigError` (one line) instead of printing usage and exiting."""

    def error(self, message: str):
        raise ConfigError(f"{message} (see {self.prog} --help)")


def _load_workdir(workdir: str, step: int | None) -> tuple[dict, torch_mae.ModelConfig, dict]:
    """(params, config, report) of a training workdir's checkpoint, read without writing to the workdir."""
    from usf_mae_jax.core import checkpoint

    params, fields = checkpoint.load_params(workdir, step)
    if fields is None:
        raise CheckpointError(f"{workdir} records no model (no resolved_model in its config.json)")
    if "patch_embed" not in params:
        raise CheckpointError(f"{workdir} holds only a probe head, no encoder; export the init it was "
                              "trained on instead")
    known = {f.name for f in dataclasses.fields(torch_mae.ModelConfig)}
    config = torch_mae.ModelConfig(**{k: v for k, v in fields.items() if k in known})
    with open(os.path.join(workdir, "config.json")) as f:  # load_params found the model fields there
        mask_ratio = json.load(f).get("model", {}).get("mask_ratio", hf_vitmae.DEFAULT_MASK_RATIO)
    return params, config, {"source": os.path.abspath(workdir), "mask_ratio": float(mask_ratio)}


def _load(checkpoint: str, step: int | None = None, **kwargs) -> tuple[dict, torch_mae.ModelConfig, dict]:
    """`torch_mae.load_pretrained`, with a missing path and a checkpoint it cannot convert as UserErrors.

    The loader reports an incompatible state dict (no preset for its width, a shape that does not fit) as a
    ValueError that names the problem, and a truncated or corrupt file surfaces as the unpickler's or zip
    reader's own error; at the command line these are facts about the checkpoint, not bugs.
    """
    if not os.path.exists(checkpoint):
        raise MissingInputError(f"checkpoint {checkpoint} does not exist")
    if os.path.isdir(os.path.join(checkpoint, "checkpoints")):
        return _load_workdir(checkpoint, step)
    if step is not None:
        raise ConfigError(f"--step applies to a training workdir; {checkpoint} is not one")
    if os.path.isdir(checkpoint) and hf_vitmae.is_hf_dir(checkpoint):
        return hf_vitmae.load_hf_dir(checkpoint, **kwargs)
    try:
        return torch_mae.load_pretrained(checkpoint, **kwargs)
    except UserError:
        raise
    except FileNotFoundError as err:  # an import directory without its model_config.json
        raise MissingInputError(str(err)) from err
    except ValueError as err:
        raise CheckpointError(f"{checkpoint}: {err}") from err
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{checkpoint}: corrupt or truncated checkpoint ({type(err).__name__}: {err})"
                              ) from err


def import_checkpoint(checkpoint: str, out: str, heads: int | None = None,
                      allow_unexpected: bool = False) -> dict:
    """Converts a torch checkpoint into an import directory; returns the report."""
    import orbax.checkpoint as ocp  # local: `export` from a .pth does not need Orbax

    out = os.path.abspath(out)
    if os.path.exists(os.path.join(out, "params")):
        raise ConfigError(f"{out}/params already exists; choose another --out or remove it")
    params, config, report = _load(checkpoint, heads=heads, allow_unexpected=allow_unexpected)
    os.makedirs(out, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(out, "params"), params)
    checkpointer.wait_until_finished()
    with open(os.path.join(out, "model_config.json"), "w") as f:
        json.dump(dataclasses.asdict(config), f, indent=2)
    with open(os.path.join(out, "conversion_report.json"), "w") as f:
        json.dump({"source": os.path.abspath(checkpoint), **report}, f, indent=2)
    return report


def export_checkpoint(checkpoint: str, out: str, fmt: str = "mae", heads: int | None = None,
                      overwrite: bool = False, step: int | None = None) -> dict[str, np.ndarray]:
    """Writes the torch keys of a checkpoint as safetensors (or a ViTMAE folder); returns the tensors.

    `heads` only matters for a .pth source: it is recorded in the file's metadata. An existing `out` is
    replaced only with `overwrite`; the file is written under a temporary name and renamed when complete, so
    a failed write (a full disk) never leaves a truncated file under the final name.
    """
    if fmt == "hf_vitmae":
        if os.path.lexists(out) and not overwrite:  # before reading a large checkpoint
            raise ConfigError(f"{out} already exists; pass --overwrite to replace it")
        params, config, report = _load(checkpoint, step, heads=heads)
        return hf_vitmae.export_hf_dir(params, config, out, report.get("mask_ratio", hf_vitmae.DEFAULT_MASK_RATIO),
                                       overwrite, os.path.abspath(checkpoint))
    if os.path.isdir(out):
        raise ConfigError(f"--out {out} is a folder; name the .safetensors file to write")
    if os.path.lexists(out) and not overwrite:
        raise ConfigError(f"{out} already exists; pass --overwrite to replace it")
    params, config, _ = _load(checkpoint, step, heads=heads)
    tensors = torch_mae.flax_to_torch(params, config, fmt)
    metadata = {"format": fmt, "model_config": json.dumps(dataclasses.asdict(config))}
    temp = os.path.join(os.path.dirname(os.path.abspath(out)), f".{os.path.basename(out)}.tmp")
    try:
        torch_pickle.write_safetensors(temp, tensors, metadata)
        os.replace(temp, out)
    except OSError as err:
        if os.path.exists(temp):
            os.remove(temp)
        if err.filename is None:  # a failed write() names no file
            raise OSError(err.errno, err.strerror, temp) from err
        raise
    return tensors


def _parse_and_run(argv: list[str]) -> int:
    parser = _OneLineParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show the full traceback of an error instead of its one-line message")
    commands = parser.add_subparsers(dest="command", required=True)
    importer = commands.add_parser("import", help="torch .pth/.pt/.safetensors or a Hugging Face ViTMAE "
                                   "directory -> Orbax import directory")
    importer.add_argument("--checkpoint", required=True)
    importer.add_argument("--out", required=True)
    importer.add_argument("--heads", type=int, default=None,
                          help="encoder heads; default: from the size preset with the same width")
    importer.add_argument("--allow_unexpected", action="store_true",
                          help="ignore checkpoint keys the conversion does not understand")
    exporter = commands.add_parser("export", help="workdir, import directory or .pth -> .safetensors torch keys "
                                   "or a Hugging Face ViTMAE directory")
    exporter.add_argument("--checkpoint", required=True)
    exporter.add_argument("--out", required=True)
    exporter.add_argument("--format", choices=FORMATS, default="mae",
                          help="mae | timm_vit: a .safetensors file; hf_vitmae: a folder for transformers")
    exporter.add_argument("--heads", type=int, default=None, help="encoder heads of a .pth source")
    exporter.add_argument("--step", type=int, default=None, help="the checkpoint step of a workdir (default: newest)")
    exporter.add_argument("--overwrite", action="store_true", help="replace an existing --out file or export folder")
    for sub in (importer, exporter):
        sub.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="show the full traceback of an error")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    if args.command == "import":
        report = import_checkpoint(args.checkpoint, args.out, args.heads, args.allow_unexpected)
        print(torch_mae.format_report(report))
        for note in report.get("notes", []):
            print(f"note: {note}")
        print(f"wrote {os.path.abspath(args.out)} in {time.perf_counter() - start:.2f} s")
    else:
        tensors = export_checkpoint(args.checkpoint, args.out, args.format, args.heads, args.overwrite, args.step)
        print(f"exported {len(tensors)} tensors in {args.format} format: {', '.join(sorted(tensors)[:6])}, ...")
        print(f"wrote {args.out} in {time.perf_counter() - start:.2f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if a in ("import", "export")), None)
    prog = f"{PROG} {command}" if command else PROG
    return run_cli(lambda: _parse_and_run(argv), prog, verbose=verbose_requested(argv))


if __name__ == "__main__":
    sys.exit(main())
