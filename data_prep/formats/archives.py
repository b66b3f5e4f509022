"""Archive handling before any globbing: nested zip unpacking and instructions for RAR / multi-part sets.

Several OpenUS-46 datasets arrive as zips inside zips (AUL's class zips, FASS, FH-PS-AOP, STMUS_NDA,
MicroSeg, regPro's train/val zips, DDTI inside "Thyroid Dataset", one zip per DFHI plane; docs/openus46.md F8).
`unpack_nested_zips` extracts every zip under a dataset folder into a sibling folder named after the zip's
stem, repeating until no new zip appears. Extraction goes to a temporary folder renamed at the end, so an
interrupted run never leaves a half-extracted tree that looks finished. Member paths are checked so a zip
cannot write outside its target folder. An unreadable or unsafe zip is a `DataError` naming the file, which the
OpenUS-46 converter reports as that dataset's failure.

RAR (Fast-U-Net, TRFE-Net's GitHub copy of TN3K), 7z and split archives (CardiacUDC's Kaggle `.z01`
parts) cannot be opened with the standard library; `archive_instructions` says how to extract them by hand.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import zipfile

from usf_mae_jax.cli import DataError

ZIP_SUFFIXES = (".zip", ".change2zip")
_SPLIT_PART = re.compile(r"\.(z\d\d|\d{3}|part\d+\.rar)$", re.IGNORECASE)


def archive_instructions(path: str) -> str | None:
    """How to extract an archive the converter cannot open itself, or None for a plain zip / non-archive."""
    name = os.path.basename(path)
    lower = name.lower()
    if _SPLIT_PART.search(lower):
        return (f"{path}: one part of a multi-part archive. Put all parts in one folder and extract the "
                "first one with 7-Zip (e.g. `7z x <name>.zip` or `7z x <name>.part1.rar`), then run again.")
    if lower.endswith(".rar"):
        return (f"{path}: RAR archive. Extract it in place with `unrar x '{name}'` or `7z x '{name}'` "
                "(the converter does not read RAR), then run again.")
    if lower.endswith((".7z", ".tar", ".tar.gz", ".tgz")):
        return (f"{path}: extract this archive in place (`7z x '{name}'` or `tar xf '{name}'`), "
                "then run again.")
    return None


def _target_dir(zip_path: str) -> str:
    base = os.path.basename(zip_path)
    for suffix in ZIP_SUFFIXES:
        if base.lower().endswith(suffix):
            base = base[: -len(suffix)]
            break
    return os.path.join(os.path.dirname(zip_path), base)


def _safe_extract(zip_path: str, target: str) -> None:
    partial = target + ".partial"
    if os.path.exists(partial):
        shutil.rmtree(partial)
    try:
        with zipfile.ZipFile(zip_path) as archive:
            root = os.path.realpath(partial)
            for member in archive.namelist():
                destination = os.path.realpath(os.path.join(partial, member))
                if not (destination == root or destination.startswith(root + os.sep)):
                    raise DataError(f"{zip_path}: member {member!r} would be written outside {target}")
            archive.extractall(partial)
    except zipfile.BadZipFile as err:
        shutil.rmtree(partial, ignore_errors=True)
        hint = " (a Kaggle '.change2zip' may need `7z x`)" if zip_path.lower().endswith(".change2zip") else ""
        raise DataError(f"{zip_path}: not a readable zip archive ({err}){hint}") from err
    except NotImplementedError as err:
        shutil.rmtree(partial, ignore_errors=True)
        raise DataError(f"{zip_path}: uses a compression method Python cannot read ({err}); "
                         f"extract it with `7z x` into {target}") from err
    os.replace(partial, target)


def unpack_nested_zips(root: str, skip: tuple[str, ...] = (), log=None) -> list[str]:
    """Extracts every zip under `root` (recursively, zips inside zips too) next to itself.

    A zip whose target folder (its stem) already exists is taken as extracted, whether by an earlier run or
    by the user. `skip` holds file-name patterns (fnmatch, case-insensitive) of archives never to extract
    (e.g. Segthy's `MRI_data.zip`). Returns the zips extracted in this call.
    """
    extracted: list[str] = []
    while True:
        pending = []
        for directory, subdirs, files in os.walk(root):
            subdirs[:] = [d for d in subdirs if not d.endswith(".partial") and d != "__MACOSX"]
            for name in files:
                lower = name.lower()
                if not lower.endswith(ZIP_SUFFIXES) or _SPLIT_PART.search(lower):
                    continue
                if any(fnmatch.fnmatch(lower, pattern.lower()) for pattern in skip):
                    continue
                path = os.path.join(directory, name)
                if not os.path.exists(_target_dir(path)):
                    pending.append(path)
        if not pending:
            return extracted
        for path in sorted(pending):
            if log:
                log(f"unpacking {path}")
            _safe_extract(path, _target_dir(path))
            extracted.append(path)


def unsupported_archives(root: str) -> list[str]:
    """Extraction instructions for every RAR / 7z / tar / split-archive part under `root`.

    Whether such an archive was already extracted cannot be told from its name (Fast-U-Net's
    `AC_image1.rar` unpacks into `resized_data/image/`), so the converter reports these notes as an error
    only when a dataset yields no input file at all, and as a warning otherwise.
    """
    notes = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d != "__MACOSX")
        for name in sorted(files):
            note = archive_instructions(os.path.join(directory, name))
            if note is not None:
                notes.append(note)
    return notes
