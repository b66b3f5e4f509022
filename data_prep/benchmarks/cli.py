"""Command-line front end of the benchmark converters, wired into `python -m data_prep`.

    python -m data_prep busbra|mmotu|gist514|busi --raw_dir DIR --out_dir OUT [--max_side 512] [--overwrite]
                                                  [--resize_mismatched_masks]
    python -m data_prep gist514 ... [--subset roi|raw|both]
    python -m data_prep busi ... [--subset three_class|benign_malignant|both] [--folds 5] [--seed 0]
    python -m data_prep labelled --src DIR_or_CSV --out_dir OUT [--name NAME] [--val_fraction 0.1]
                                 [--test_fraction 0.2] [--seed 0] [--masks DIR] [--mask_classes lesion]

The one-screen summary printed per conversion gives the records, the splits, the masks, and names every mask
dropped or resized and, for BUSI, the duplicates removed (all of it, in full, in manifest.json).

The dispatcher calls `add_arguments(subparser, benchmark)` once per sub-command and `run(args, benchmark)`
with the parsed arguments; `run` returns 0 when done. A wrong layout (`LayoutError`), a malformed label file
or a source without any decodable image raises a `UserError`, which `python -m data_prep` reports in one line.
"""

from __future__ import annotations

import argparse

from data_prep import arguments
from data_prep.benchmarks import builder, busi
from data_prep.benchmarks.convert import BENCHMARKS, convert

SUMMARY_NAMES = 5  # files named per summary line; manifest.json lists them all


def _folds(text: str) -> int:
    value = arguments.positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected at least 2 folds, got {text!r}")
    return value


def _names(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names or len(set(names)) != len(names) or "background" in names:
        raise argparse.ArgumentTypeError(f"expected distinct class names other than 'background', got {text!r}")
    return names


def add_arguments(parser: argparse.ArgumentParser, benchmark: str) -> None:
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose one of {sorted(BENCHMARKS)}")
    if benchmark == "labelled":
        parser.add_argument("--src", required=True, help="folder with one sub-folder per class, or a CSV "
                            "with a header path,label[,subject,split]")
        parser.add_argument("--name", default=None, type=arguments.dataset_name,
                            help="dataset name in the records (default: --src's name)")
        parser.add_argument("--val_fraction", type=arguments.fraction_below_one, default=0.1,
                            help="validation fraction of subjects per class when there is no split column")
        parser.add_argument("--test_fraction", type=arguments.fraction_below_one, default=0.2,
                            help="test fraction of subjects per class when there is no split column")
        parser.add_argument("--seed", type=int, default=0, help="seed of the subject-level split")
        parser.add_argument("--folds", type=arguments.non_negative_int, default=0,
                            help="K >= 2: K subject-level, class-stratified folds (rounds 1..K, each testing on "
                                 "one fold) instead of one train/validation/test split; 0 (default): one split")
        parser.add_argument("--masks", default=None, help="folder of segmentation masks: the mask of image "
                            "<relative path>.<ext> is <relative path>.<any image ext> in it (a CSV can name them "
                            "in a 'mask' column instead)")
        parser.add_argument("--mask_classes", default="lesion", type=_names,
                            help="comma-separated mask class names: one = binary masks (0/255 or 0/1); "
                                 "several = masks whose pixel values 1..K are those classes (0 background)")
    else:
        parser.add_argument("--raw_dir", required=True,
                            help="the manually downloaded, extracted dataset folder, or its parent")
    if benchmark == "gist514":
        parser.add_argument("--subset", choices=["roi", "raw", "both"], default="both",
                            help="roi: lesion crops (the usual subset); raw: full frames; both (default): "
                                 "every subset found under --raw_dir")
    if benchmark == "busi":
        parser.add_argument("--subset", choices=[*busi.SUBSETS, "both"], default="both",
                            help="three_class: benign, malignant, normal; benign_malignant: normal left out; "
                                 "both (default)")
        parser.add_argument("--folds", type=_folds, default=busi.DEFAULT_FOLDS,
                            help="number of class-stratified, image-level folds (BUSI has no patient ids)")
        parser.add_argument("--seed", type=arguments.non_negative_int, default=0, help="seed of the folds")
    parser.add_argument("--resize_mismatched_masks", action="store_true",
                        help="resize a mask whose size differs from its image's by nearest neighbour (when you "
                             "know it is only scaled) instead of dropping it; either way it is listed in the "
                             "manifest")
    parser.add_argument("--out_dir", required=True, help="output root; TFDS writes <name>/[<config>/]<version>/")
    parser.add_argument("--max_side", type=arguments.non_negative_int, default=builder.DEFAULT_MAX_SIDE,
                        help="cap on the longest image side in pixels (0: keep the original size)")
    parser.add_argument("--overwrite", action="store_true", help="redo a finished conversion")


def _summary(manifest: dict) -> str:
    lines = [f"{manifest['dataset']}{'/' + manifest['config'] if manifest.get('config') else ''}: "
             f"{manifest['status']}, {manifest['records']} records, classes {manifest['class_names']}"]
    for fold, splits in manifest["counts"]["splits"].items():
        lines.append(f"  fold {fold}: " + ", ".join(f"{name} {n}" for name, n in splits.items()))
    if manifest.get("masks"):
        lines.append(f"  masks: {manifest['masks']['records_with_mask']} records with a mask, mask classes "
                     f"{manifest['masks']['class_names']}")
        lines += _mask_lines(manifest["masks"])
    lines += _busi_lines(manifest)
    lines.append(f"  skipped {len(manifest['skipped'])} files, {len(manifest['warnings'])} warnings "
                 f"(all listed in manifest.json)")
    lines += [f"  warning: {w}" for w in manifest["warnings"][:20]]
    if len(manifest["warnings"]) > 20:
        lines.append(f"  ... {len(manifest['warnings']) - 20} more warnings in manifest.json")
    return "\n".join(lines)


def _first(entries: list[str]) -> str:
    more = f"; ... {len(entries) - SUMMARY_NAMES} more" if len(entries) > SUMMARY_NAMES else ""
    return "; ".join(entries[:SUMMARY_NAMES]) + more


def _mask_lines(masks: dict) -> list[str]:
    """Summary lines naming the masks dropped or resized (converter 1.2.0+)."""
    lines = []
    dropped, resized = masks.get("dropped") or [], masks.get("resized") or []
    if dropped:
        lines.append(f"  masks dropped: {len(dropped)}, their images kept without a mask (in classification, not "
                     f"in segmentation): " + _first([f"{e['mask']} ({e['reason']})" for e in dropped]))
    if resized:
        lines.append(f"  masks resized to their images (nearest neighbour): {len(resized)}: "
                     + _first([f"{e['mask']} {e['from']} -> {e['to']}" for e in resized]))
    return lines


def _busi_lines(manifest: dict) -> list[str]:
    """Summary lines of BUSI's duplicates and multi-lesion images."""
    lines = []
    duplicates = manifest.get("duplicates")
    if duplicates:
        groups, conflicts = duplicates["groups"], duplicates["label_conflicts"]
        if groups:
            lines.append(f"  exact duplicates within a class, first copy kept: {len(groups)}: "
                         + _first([f"{g['kept']} = {', '.join(g['dropped'])}" for g in groups]))
        if conflicts:
            lines.append(f"  exact duplicates with different classes, every copy left out: {len(conflicts)}: "
                         + _first([" = ".join(c["files"]) for c in conflicts]))
        if not groups and not conflicts:
            lines.append("  exact duplicates: none")
    if manifest.get("multi_mask_images"):
        lines.append(f"  images with several lesion masks (united): {len(manifest['multi_mask_images'])}")
    return lines


def run(args: argparse.Namespace, benchmark: str) -> int:
    options = {}
    if benchmark == "labelled":
        raw_dir = args.src
        options = dict(dataset=args.name, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                       seed=args.seed, masks_dir=args.masks, mask_classes=args.mask_classes, folds=args.folds)
    else:
        raw_dir = args.raw_dir
    if benchmark == "busi":
        options = dict(folds=args.folds, seed=args.seed)
    result = convert(benchmark, raw_dir, args.out_dir, subset=getattr(args, "subset", None),
                     max_side=args.max_side or None, overwrite=args.overwrite,
                     resize_mismatched_masks=args.resize_mismatched_masks, **options)
    manifests = result.values() if getattr(args, "subset", None) == "both" else [result]
    for manifest in manifests:
        print(_summary(manifest))
    return 0
