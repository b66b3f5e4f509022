"""Where datasets are: the one rule for turning `input.data_dir` into dataset folders.

`input.data_dir` (and `embed --data_dir`) is a folder, a comma-separated list of folders, or a root of dataset
folders. A folder is a *dataset* when it holds the `manifest.json` that `python -m data_prep` writes last, once
a conversion has finished; a folder without one is a root, and its sub-folders that are datasets are taken,
sorted by name. Converted benchmarks (TFDS layout with `splits.json`) are found by `data.benchmarks`.
"""

from __future__ import annotations

import os

from usf_mae_jax.cli import ConfigError, MissingInputError

MANIFEST_NAME = "manifest.json"


def entries(data_dir: str) -> list[str]:
    """The comma-separated entries of a data location, stripped; empty entries are ignored."""
    return [d.strip() for d in str(data_dir or "").split(",") if d.strip()]


def manifest_folders(folder: str) -> list[str]:
    """`folder` itself when it is a dataset, else its dataset sub-folders (sorted); [] when there is none."""
    if os.path.isfile(os.path.join(folder, MANIFEST_NAME)):
        return [folder]
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, d) for d in os.listdir(folder)
                  if os.path.isfile(os.path.join(folder, d, MANIFEST_NAME)))


def dataset_folders(data_dir: str, what: str = "input.data_dir") -> list[str]:
    """Every dataset folder named by `data_dir`, in order; a one-line error when an entry holds none."""
    named = entries(data_dir)
    if not named:
        raise ConfigError(f"{what} is empty: give dataset folders written by `python -m data_prep`")
    folders = []
    for entry in named:
        if not os.path.isdir(entry):
            raise MissingInputError(f"{what} entry {entry!r} is not a directory")
        found = manifest_folders(entry)
        if not found:
            raise MissingInputError(f"{entry}: no finished dataset here (no {MANIFEST_NAME} in it or in its "
                                    "sub-folders); run `python -m data_prep ...` first")
        folders += found
    return folders
