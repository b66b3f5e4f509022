"""Command line for checkpoint interop.

    python -m usf_mae_jax.interop import --checkpoint X.pth --out DIR [--heads H] [--allow_unexpected]
    python -m usf_mae_jax.interop export --checkpoint DIR_or_X.pth --out Y.safetensors
        [--format mae|timm_vit] [--heads H]

`import` writes an Orbax checkpoint directory that `init_from` accepts (`torch_mae.load_pretrained`):
    DIR/params                  ocp.StandardCheckpointer save of the nested params dict
    DIR/model_config.json       dataclasses.asdict(ModelConfig)
    DIR/conversion_report.json  the key report (used / missing / unexpected / verified / ignored)
`export` writes torch state-dict keys (reference MAE or timm ViT) as safetensors, with the model config in the
file's metadata. Both print the key report and the time taken.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

from usf_mae_jax.interop import torch_mae, torch_pickle


def import_checkpoint(checkpoint: str, out: str, heads: int | None = None,
                      allow_unexpected: bool = False) -> dict:
    """Converts a torch checkpoint into an import directory; returns the report."""
    import orbax.checkpoint as ocp  # local: `export` from a .pth does not need Orbax

    params, config, report = torch_mae.load_pretrained(checkpoint, heads=heads,
                                                       allow_unexpected=allow_unexpected)
    out = os.path.abspath(out)
    if os.path.exists(os.path.join(out, "params")):
        raise FileExistsError(f"{out}/params already exists; choose another --out or remove it")
    os.makedirs(out, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(out, "params"), params)
    checkpointer.wait_until_finished()
    with open(os.path.join(out, "model_config.json"), "w") as f:
        json.dump(dataclasses.asdict(config), f, indent=2)
    with open(os.path.join(out, "conversion_report.json"), "w") as f:
        json.dump({"source": os.path.abspath(checkpoint), **report}, f, indent=2)
    return report


def export_checkpoint(checkpoint: str, out: str, fmt: str = "mae", heads: int | None = None
                      ) -> dict[str, np.ndarray]:
    """Writes the torch keys of an import directory (or a .pth) as safetensors; returns the tensors.

    `heads` only matters for a .pth source: it is recorded in the file's metadata.
    """
    params, config, _ = torch_mae.load_pretrained(checkpoint, heads=heads)
    tensors = torch_mae.flax_to_torch(params, config, fmt)
    metadata = {"format": fmt, "model_config": json.dumps(dataclasses.asdict(config))}
    torch_pickle.write_safetensors(out, tensors, metadata)
    return tensors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m usf_mae_jax.interop", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    importer = commands.add_parser("import", help="torch .pth/.pt/.safetensors -> Orbax import directory")
    importer.add_argument("--checkpoint", required=True)
    importer.add_argument("--out", required=True)
    importer.add_argument("--heads", type=int, default=None,
                          help="encoder heads; default: from the size preset with the same width")
    importer.add_argument("--allow_unexpected", action="store_true",
                          help="ignore checkpoint keys the conversion does not understand")
    exporter = commands.add_parser("export", help="import directory (or .pth) -> .safetensors torch keys")
    exporter.add_argument("--checkpoint", required=True)
    exporter.add_argument("--out", required=True)
    exporter.add_argument("--format", choices=torch_mae.EXPORT_FORMATS, default="mae")
    exporter.add_argument("--heads", type=int, default=None, help="encoder heads of a .pth source")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    if args.command == "import":
        report = import_checkpoint(args.checkpoint, args.out, args.heads, args.allow_unexpected)
        print(torch_mae.format_report(report))
        print(f"wrote {os.path.abspath(args.out)} in {time.perf_counter() - start:.2f} s")
    else:
        tensors = export_checkpoint(args.checkpoint, args.out, args.format, args.heads)
        print(f"exported {len(tensors)} tensors in {args.format} format: {', '.join(sorted(tensors)[:6])}, ...")
        print(f"wrote {args.out} in {time.perf_counter() - start:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
