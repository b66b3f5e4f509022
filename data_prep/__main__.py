"""`python -m data_prep <command> ...`: one entry point for every converter.

Each command lives in its own module exposing `add_arguments(parser)` and `run(args) -> int` (the benchmark
builders take the benchmark name as an extra argument). A module is imported only when its command is the
one being run, so a converter that is missing or broken gives a clear error for that command alone and
never blocks the others.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# command -> (module, benchmark name passed to the module or None, help)
COMMANDS = {
    "folder": ("data_prep.folder", None, "any tree of images -> shards"),
    "synthetic": ("data_prep.synthetic", None, "the synthetic ultrasound set -> shards (with lesion labels)"),
    "openus46": ("data_prep.openus46.cli", None, "the 46 public datasets of OpenUS-46 -> shards"),
    "busbra": ("data_prep.benchmarks.cli", "busbra", "BUS-BRA benchmark (breast, benign/malignant)"),
    "mmotu": ("data_prep.benchmarks.cli", "mmotu", "MMOTU-2D benchmark (ovarian tumours, 8 classes)"),
    "gist514": ("data_prep.benchmarks.cli", "gist514", "GIST514-DB benchmark (GIST vs leiomyoma)"),
    "labelled": ("data_prep.benchmarks.cli", "labelled", "a folder or CSV of labelled images"),
}


def _import_command(command: str):
    module_name = COMMANDS[command][0]
    try:
        return importlib.import_module(module_name)
    except ImportError as e:
        raise SystemExit(f"data_prep {command}: cannot import {module_name} ({e}); "
                         "this converter is not available in this checkout") from e


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    module, benchmark = None, None
    for command, (_, bench_name, help_text) in COMMANDS.items():
        sub = commands.add_parser(command, help=help_text)
        if command == chosen:
            module, benchmark = _import_command(command), bench_name
            if benchmark is None:
                module.add_arguments(sub)
            else:
                module.add_arguments(sub, benchmark)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(module.run(args) if benchmark is None else module.run(args, benchmark))


if __name__ == "__main__":
    sys.exit(main())
