"""Argument checking shared by the `python -m data_prep` commands: bad values are one-line errors.

`OneLineParser` turns argparse's usage-plus-error exit into a `ConfigError`, so a missing or malformed
option is reported by `usf_mae_jax.cli.run_cli` like every other user error: one line, exit status 2. The
`type=` callables below reject a bad value while the command line is parsed, before anything is read or
written: sizes and counts that must be positive, fractions, dataset folder names and split names (the
writer's rules, `writer.check_dataset_name` / `writer.check_split`). Paths are checked by each command's
`run`, which knows whether a path must exist (`existing_folder`).
"""

from __future__ import annotations

import argparse
import os

from data_prep import writer
from usf_mae_jax.cli import ConfigError, MissingInputError


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise `ConfigError` (one line) instead of printing usage and exiting."""

    def error(self, message: str):
        raise ConfigError(f"{message} (see {self.prog} --help)")


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """An integer >= 1 (worker counts, records per shard, image sizes, frame caps)."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0 (caps where 0 means 'no cap')."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, got {value}")
    return value


def _fraction(text: str, include_one: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (0.0 <= value <= 1.0 if include_one else 0.0 <= value < 1.0):
        raise argparse.ArgumentTypeError(f"must be in [0, 1{']' if include_one else ')'}, got {value}")
    return value


def fraction(text: str) -> float:
    """A share in [0, 1]."""
    return _fraction(text, include_one=True)


def fraction_below_one(text: str) -> float:
    """A share in [0, 1): a held-out fraction that must leave something to train on."""
    return _fraction(text, include_one=False)


def dataset_name(text: str) -> str:
    """A plain folder name for the dataset (letters, digits, `_ . -`)."""
    try:
        return writer.check_dataset_name(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def split_name(text: str) -> str:
    """A lowercase split name like `train` or `val`, as the shard file names require."""
    try:
        return writer.check_split(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def existing_folder(path: str, option: str) -> str:
    """`path` when it is a folder; otherwise a one-line error naming the option and the path."""
    if not os.path.exists(path):
        raise MissingInputError(f"{option} {path}: no such folder")
    if not os.path.isdir(path):
        raise ConfigError(f"{option} {path}: not a folder")
    return path
