"""`python -m data_prep openus46`: list the 46 datasets, or convert some or all of them to shards.

    python -m data_prep openus46 --list --raw_dir RAW
    python -m data_prep openus46 --raw_dir RAW --out_dir OUT [--datasets a,b|all] [--workers N]

Each dataset is read from `RAW/<key>/` and written to `OUT/<key>/`. Finished datasets are skipped, so an
interrupted run resumes where it stopped. The run ends with a summary table (images written, frames sampled,
files skipped by reason, duplicates removed) printed as markdown and saved as `OUT/openus46_summary.md` and
`OUT/openus46_summary.json`.

Options are checked before any dataset is touched (unknown keys, a missing `--raw_dir`, non-positive sizes);
each is a one-line error. A dataset that fails (no input, an unreadable archive, no readable image) does not
stop the others: it is a `failed` / `no inputs` row, and the run then ends with one line naming the failed
datasets and a non-zero status. When none of the requested datasets is under `--raw_dir`, the run fails at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from data_prep import arguments, writer
from data_prep.clean import CleanOptions
from data_prep.dedup import BENCHMARK_HOLDOUTS, DEFAULT_PHASH_THRESHOLD, Deduplicator, conversion_order, load_hash_list
from data_prep.openus46.convert import ConvertOptions, convert_dataset
from data_prep.openus46.registry import REGISTRY, parse_datasets
from data_prep.openus46.spec import FAMILIES
from usf_mae_jax.cli import ConfigError, DataError, MissingInputError

FAILED_STATUSES = ("no inputs", "failed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--list", action="store_true", help="print the dataset table and exit")
    parser.add_argument("--raw_dir", help="root holding one extracted folder per dataset key, RAW/<key>/")
    parser.add_argument("--out_dir", help="output root; each dataset goes to OUT/<key>/")
    parser.add_argument("--datasets", default="all", help="'all' or comma-separated keys (see --list)")
    parser.add_argument("--workers", type=arguments.positive_int, default=1,
                        help="worker processes for reading and encoding")
    parser.add_argument("--overwrite", action="store_true", help="convert finished datasets again")
    parser.add_argument("--max_side", type=arguments.non_negative_int, default=512,
                        help="cap on the longest image side (0: none)")
    parser.add_argument("--nearest_size", type=arguments.non_negative_int, default=224,
                        help="also store the nearest resize of each original to this square size, the usf_mae "
                             "recipe's first step (0: none; docs/data_pipeline.md)")
    parser.add_argument("--max_frames", type=arguments.positive_int, default=None,
                        help="override every dataset's per-video / per-volume frame cap")
    parser.add_argument("--include_optional", action="store_true",
                        help="also convert optional inputs (Cactus and LUSS videos, which overlap the stills)")
    parser.add_argument("--include_holdouts", action="store_true",
                        help=f"also convert the downstream benchmarks ({', '.join(BENCHMARK_HOLDOUTS)})")
    parser.add_argument("--holdout_hashes", action="append", default=[], metavar="PATH",
                        help="hash list (JSON) or image folder of a benchmark test split; matching images are "
                             "dropped (repeatable)")
    parser.add_argument("--no_unpack", action="store_true", help="do not extract nested zip archives")
    cleaning = parser.add_argument_group("cleaning (data_prep/clean.py)")
    cleaning.add_argument("--no_grayscale", action="store_true",
                          help="keep RGB images whose three channels are equal as RGB")
    cleaning.add_argument("--crop", action="store_true", help="crop to the scan region")
    cleaning.add_argument("--inpaint", action="store_true",
                          help="remove burnt-in annotations by inpainting (the authors' recipe, no OCR)")
    dedup = parser.add_argument_group("de-duplication (data_prep/dedup.py)")
    dedup.add_argument("--dedup", choices=("phash", "exact", "none"), default="phash",
                       help="phash: exact + perceptual near-duplicates; exact: content hash only")
    dedup.add_argument("--phash_threshold", type=arguments.non_negative_int, default=DEFAULT_PHASH_THRESHOLD,
                       help="max Hamming distance (of 64 bits) for a near-duplicate")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")


def list_table(raw_dir: str | None) -> str:
    """The markdown table of --list: key, name, anatomy, format, licence and whether RAW/<key>/ exists."""
    lines = ["| key | dataset | anatomy | format | family | licence | raw folder |",
             "|---|---|---|---|---|---|---|"]
    for key, spec in REGISTRY.items():
        found = "-" if raw_dir is None else ("found" if os.path.isdir(os.path.join(raw_dir, key)) else "missing")
        name = spec.name + (" (held out)" if spec.holdout else "")
        lines.append(f"| {key} | {name} | {spec.anatomy} | {spec.format} | {spec.family} | {spec.licence} "
                     f"| {found} |")
    return "\n".join(lines)


def summary_markdown(rows: list[dict]) -> str:
    """One line per dataset: status, images written, frames sampled, files skipped by reason, duplicates."""
    lines = ["| key | status | images | frames sampled | inputs | excluded | skipped (by reason) "
             "| duplicates removed | held-out matches | note |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        skipped = "; ".join(f"{count}x {reason}" for reason, count in row["skipped"].items()) or "0"
        lines.append(f"| {row['key']} | {row['status']} | {row['images']} | {row['frames_sampled']} "
                     f"| {row['inputs']} | {row['excluded']} | {skipped} | {row['duplicates_removed']} "
                     f"| {row['held_out_matches']} | {row['message']} |")
    total = sum(row["images"] for row in rows)
    lines.append(f"| **total** | | {total} | {sum(r['frames_sampled'] for r in rows)} | | | "
                 f"| {sum(r['duplicates_removed'] for r in rows)} | {sum(r['held_out_matches'] for r in rows)} | |")
    return "\n".join(lines)


def _options(args: argparse.Namespace) -> ConvertOptions:
    clean = CleanOptions(grayscale=not args.no_grayscale, crop=args.crop, inpaint=args.inpaint)
    return ConvertOptions(raw_dir=args.raw_dir, out_dir=args.out_dir, workers=args.workers,
                          overwrite=args.overwrite, max_side=args.max_side, nearest_size=args.nearest_size,
                          clean=clean,
                          include_optional=args.include_optional, include_holdouts=args.include_holdouts,
                          unpack=not args.no_unpack, max_frames=args.max_frames,
                          progress=not args.no_progress)


def run(args: argparse.Namespace) -> int:
    if args.list:
        print(list_table(args.raw_dir))
        print("\nformat families: " + "; ".join(f"{k} = {v}" for k, v in FAMILIES.items()))
        return 0
    if not args.raw_dir or not args.out_dir:
        raise ConfigError("--raw_dir and --out_dir are required to convert (or pass --list)")
    arguments.existing_folder(args.raw_dir, "--raw_dir")
    try:
        keys = parse_datasets(args.datasets)
    except ValueError as err:
        raise ConfigError(f"--datasets: {err}") from err
    _check_something_to_convert(keys, args)
    holdouts = []
    for path in args.holdout_hashes:
        try:
            holdouts.append(load_hash_list(path))
        except ValueError as err:
            raise DataError(f"--holdout_hashes: {err}") from err
    dedup = None
    if args.dedup != "none" or holdouts:
        threshold = args.phash_threshold if args.dedup == "phash" else None
        dedup = Deduplicator(phash_threshold=threshold, exact=args.dedup != "none", holdouts=holdouts)
    options = _options(args)
    rows = []
    for key in conversion_order(keys):
        row = convert_dataset(REGISTRY[key], options, dedup)
        if row["status"] == "missing":
            print(f"openus46: {key}: RAW/{key}/ not found; {row['message']}", file=sys.stderr)
        rows.append(row)
    markdown = summary_markdown(rows)
    os.makedirs(args.out_dir, exist_ok=True)
    summary_path = os.path.join(args.out_dir, "openus46_summary.md")
    _write_text(summary_path, markdown + "\n")
    _write_text(os.path.join(args.out_dir, "openus46_summary.json"),
                json.dumps({"datasets": rows, "total_images": sum(r["images"] for r in rows)}, indent=2))
    print(markdown)
    _raise_for_failures(rows, summary_path)
    return 0


def _write_text(path: str, text: str) -> None:
    """Writes a summary file through a temporary name; a failed write is an OSError naming the file."""
    temp = path + ".tmp"
    with writer.writing(temp), open(temp, "w") as handle:
        handle.write(text)
    os.replace(temp, path)


def _check_something_to_convert(keys: list[str], args: argparse.Namespace) -> None:
    """Fails before anything is written when no requested dataset can be converted at all."""
    if not keys:
        raise ConfigError(f"--datasets {args.datasets!r} names no dataset; pass 'all' or keys from --list")
    wanted = [key for key in keys if args.include_holdouts or not REGISTRY[key].holdout]
    if not wanted:
        raise ConfigError(f"--datasets {args.datasets!r}: only held-out benchmarks, which are not converted "
                          "for pretraining unless --include_holdouts is given")
    if not any(os.path.isdir(os.path.join(args.raw_dir, key)) for key in wanted):
        shown = ", ".join(wanted[:5]) + (", ..." if len(wanted) > 5 else "")
        raise MissingInputError(f"--raw_dir {os.path.abspath(args.raw_dir)} holds none of the requested "
                                f"datasets (expected RAW/<key>/ folders such as {shown}; see --list)")


def _raise_for_failures(rows: list[dict], summary_path: str) -> None:
    """One DataError for the whole run, naming the datasets that failed."""
    failed = [row for row in rows if row["status"] in FAILED_STATUSES]
    if failed:
        details = "; ".join(f"{row['key']}: {row['status']}, {row['message']}" for row in failed)
        raise DataError(f"{len(failed)} of {len(rows)} datasets failed ({details}); see {summary_path}")
