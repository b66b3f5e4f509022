"""`python -m data_prep [--verbose] <command> ...`: one entry point for every converter.

Each command lives in its own module exposing `add_arguments(parser)` and `run(args) -> int` (the benchmark
builders take the benchmark name as an extra argument). A module is imported only when its command is the
one being run, so a converter that is missing or broken gives a clear error for that command alone and
never blocks the others.

Every command runs under `usf_mae_jax.cli.run_cli`: a bad option, a missing or empty source, a wrong layout
or a full disk prints one line, `python -m data_prep <command>: <what is wrong>`, and exits non-zero;
`--verbose` (before or after the command) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from data_prep.arguments import OneLineParser
from usf_mae_jax.cli import UserError, run_cli, verbose_requested

PROG = "python -m data_prep"
# command -> (module, benchmark name passed to the module or None, help)
COMMANDS = {
    "folder": ("data_prep.folder", None, "any tree of images -> shards"),
    "synthetic": ("data_prep.synthetic", None, "the synthetic ultrasound set -> shards (with lesion labels)"),
    "openus46": ("data_prep.openus46.cli", None, "the 46 public datasets of OpenUS-46 -> shards"),
    "busbra": ("data_prep.benchmarks.cli", "busbra", "BUS-BRA benchmark (breast, benign/malignant)"),
    "mmotu": ("data_prep.benchmarks.cli", "mmotu", "MMOTU-2D benchmark (ovarian tumours, 8 classes)"),
    "gist514": ("data_prep.benchmarks.cli", "gist514", "GIST514-DB benchmark (GIST vs leiomyoma)"),
    "busi": ("data_prep.benchmarks.cli", "busi", "BUSI benchmark (breast, benign/malignant/normal, k-fold)"),
    "labelled": ("data_prep.benchmarks.cli", "labelled", "a folder or CSV of labelled images"),
    "mock": ("data_prep.benchmarks.mock_cli", None, "a synthetic BUS-BRA-layout benchmark with cue-controlled lesions"),
}
VERBOSE_HELP = "show the full traceback of an error instead of its one-line message"


def _import_command(command: str):
    module_name = COMMANDS[command][0]
    try:
        return importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"cannot import {module_name} ({e}); this converter is not available in this "
                        "checkout or environment") from e


def _chosen_command(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def _parse_and_run(argv: list[str]) -> int:
    parser = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    chosen = _chosen_command(argv)
    module, benchmark = None, None
    for command, (_, bench_name, help_text) in COMMANDS.items():
        sub = commands.add_parser(command, help=help_text)
        sub.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
        if command == chosen:
            module, benchmark = _import_command(command), bench_name
            if benchmark is None:
                module.add_arguments(sub)
            else:
                module.add_arguments(sub, benchmark)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(module.run(args) if benchmark is None else module.run(args, benchmark))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = _chosen_command(argv)
    prog = f"{PROG} {chosen}" if chosen in COMMANDS else PROG
    return run_cli(lambda: _parse_and_run(argv), prog, verbose=verbose_requested(argv))


if __name__ == "__main__":
    sys.exit(main())
