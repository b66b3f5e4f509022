"""`python -m data_prep folder`: any tree of still images -> one dataset folder of shards.

The generic path to real data before (or besides) the dataset-specific converters: every file under `--src`
that matches `--include` and none of `--exclude` is read with `formats.image2d.read_image` (16-bit, palette,
RGBA, CMYK and RGB-stored grayscale are all normalised there) and written with `writer.write_dataset`.
Nothing is dropped silently: unreadable files are listed in the manifest's `skipped` with the reason, and
every other file under `--src` that is not converted is listed in `not_converted` by why: `excluded` (the
filters), `not_an_image_extension`, `hidden` (dot files and folders; a hidden folder is listed, not entered),
and the symlinks `data_prep.walk` could not follow (`broken_symlink`, `symlink_loop`, ...). Symlinked files
and folders are followed.

A source without any image to convert is an error, not an empty dataset: the run fails with one line and
writes no manifest, so a wrong `--src` is never sealed as "already converted".

Segmentation masks share folders with their images in most ultrasound datasets, and ingesting them as
images would teach the MAE to reconstruct binary blobs. By default (`--keep_masks` turns both off):
  * names containing "mask" or "annotation" (HC18's `NNN_HC_Annotation.png`), ending in "_seg", or under a
    `labels/` or `gt/` folder (C-TRUS keeps its masks in `labels/` with the images' own names) are excluded;
  * a file that passes the names but whose pixels are nearly all black or white (`clean.mask_like_reason`:
    a mask with an innocent name, or a blank frame) is skipped with that reason in the manifest.
"""

from __future__ import annotations

import argparse
import fnmatch
import os

from data_prep import arguments, clean, writer
from data_prep.formats.image2d import IMAGE_EXTENSIONS, read_image
from data_prep.walk import walk
from usf_mae_jax.cli import DataError

MASK_PATTERNS = ("*mask*", "*annotation*", "*_seg.*", "*_seg_*", "labels/*", "*/labels/*", "gt/*", "*/gt/*")
CONVERTER_VERSION = "folder 1.0"


def _matches(relative: str, patterns: list[str]) -> bool:
    lowered = relative.lower()
    return any(fnmatch.fnmatch(relative, p) or fnmatch.fnmatch(lowered, p.lower()) for p in patterns)


def find_inputs(src: str | os.PathLike, include: list[str] | None, exclude: list[str] | None,
                keep_masks: bool = False) -> tuple[list[str], dict[str, list[str]]]:
    """Relative POSIX paths of the files to convert (sorted), and the files left out grouped by why.

    Without `include`, every file with an image extension is taken; with it, exactly the matching files
    (fnmatch on the relative path; `*` also crosses folders). Only non-empty categories are returned.
    """
    arguments.existing_folder(os.fspath(src), "--src")
    exclude = list(exclude or []) + ([] if keep_masks else list(MASK_PATTERNS))
    tree = walk(src, prune=lambda relative: "hidden" if _is_hidden(relative) else None)
    selected, left_out = [], tree.left_out
    for relative in tree.files:
        if _is_hidden(relative):
            why = "hidden"  # .DS_Store and the like are not data
        elif (include and not _matches(relative, include)) or _matches(relative, exclude):
            why = "excluded"
        elif not include and os.path.splitext(relative)[1].lower() not in IMAGE_EXTENSIONS:
            why = "not_an_image_extension"
        else:
            selected.append(relative)
            continue
        left_out.setdefault(why, []).append(relative)
    return selected, {why: sorted(files) for why, files in sorted(left_out.items())}


def _is_hidden(relative: str) -> bool:
    return relative.rsplit("/", 1)[-1].startswith(".")


def load(task: tuple[str, str], keep_masks: bool = False):
    """Task (absolute path, path relative to --src) -> one Example; read errors propagate as the reason, and a
    mask-like frame is skipped unless `keep_masks` (module docstring)."""
    path, relative = task
    image = read_image(path)
    reason = None if keep_masks else clean.mask_like_reason(image)
    if reason:
        raise writer.SkipFile(reason)
    yield writer.Example(image=image, source=relative)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--src", required=True, help="root of the image tree")
    parser.add_argument("--out_dir", required=True, help="output root; the dataset goes to OUT_DIR/NAME")
    parser.add_argument("--name", required=True, type=arguments.dataset_name,
                        help="dataset name (folder name under --out_dir)")
    parser.add_argument("--include", action="append", help="glob on the relative path; repeatable")
    parser.add_argument("--exclude", action="append", help="glob on the relative path; repeatable")
    parser.add_argument("--keep_masks", action="store_true",
                        help="do not exclude mask-named files (*mask*, *annotation*, *_seg, labels/, gt/) nor "
                             "mask-like frames (nearly all pixels black or white)")
    parser.add_argument("--split", default="train", type=arguments.split_name,
                        help="split written for every image, a lowercase name (default train)")
    parser.add_argument("--workers", type=arguments.positive_int, default=os.cpu_count() or 1)
    parser.add_argument("--records_per_shard", type=arguments.positive_int,
                        default=writer.DEFAULT_RECORDS_PER_SHARD)
    parser.add_argument("--max_side", type=arguments.non_negative_int, default=512,
                        help="cap on the longest side, 0 = no cap")
    parser.add_argument("--nearest_size", type=arguments.non_negative_int, default=writer.DEFAULT_NEAREST_SIZE,
                        help="also store the nearest resize of each original to this square size, the usf_mae "
                             "recipe's first step (0: none; docs/data_pipeline.md)")
    parser.add_argument("--overwrite", action="store_true", help="redo a dataset that is already finished")
    parser.add_argument("--no_progress", action="store_true")


def _load_split(task: tuple[str, str, str, bool]):
    path, relative, split, keep_masks = task
    for example in load((path, relative), keep_masks):
        example.split = split
        yield example


def run(args: argparse.Namespace) -> int:
    selected, left_out = find_inputs(args.src, args.include, args.exclude, args.keep_masks)
    root = os.path.abspath(args.src)
    if not selected:
        found = ", ".join(f"{len(files)} {why}" for why, files in left_out.items()) or "it is empty"
        raise DataError(f"--src {root}: no image file to convert ({found})")
    tasks = [(os.path.join(root, rel), rel, args.split, args.keep_masks) for rel in selected]
    manifest = writer.write_dataset(
        args.out_dir, args.name, tasks, _load_split, workers=args.workers,
        records_per_shard=args.records_per_shard, overwrite=args.overwrite, max_side=args.max_side,
        nearest_size=args.nearest_size, progress=not args.no_progress, not_converted=left_out,
        manifest_extra={"converter_version": CONVERTER_VERSION, "src": root, "include": args.include or [],
                        "exclude": args.exclude or [], "masks_excluded": not args.keep_masks})
    return report(manifest)


def report(manifest: dict) -> int:
    """Prints what was written and what was skipped, with reasons; returns 0 (the writer refuses to finish a
    dataset without records)."""
    print(f"{manifest['dataset']}: {manifest['total']} records {manifest['counts']} "
          f"from {manifest['inputs']} inputs; channels {manifest['channels']}")
    for entry in manifest["skipped"]:
        print(f"  skipped {entry['input']}: {entry['reason']}")
    for entry in manifest.get("dropped", []):
        print(f"  dropped {entry['source']}: {entry['reason']}")
    for why, files in manifest.get("not_converted", {}).items():
        if files:
            print(f"  not converted ({why}): {len(files)} files, e.g. {files[:3]}")
    return 0
