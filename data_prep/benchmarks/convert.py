"""`convert(benchmark, raw_dir, out_dir, ...)`: builds the right TFDS builder(s) and runs the conversion."""

from __future__ import annotations

from data_prep.benchmarks import builder, busi, common
from data_prep.benchmarks.busbra import Busbra
from data_prep.benchmarks.busi import Busi
from data_prep.benchmarks.gist514 import SUBSETS, Gist514, layout
from data_prep.benchmarks.labelled import Labelled
from data_prep.benchmarks.mmotu import Mmotu
from usf_mae_jax.cli import ConfigError

BENCHMARKS = {"busbra": Busbra, "mmotu": Mmotu, "gist514": Gist514, "labelled": Labelled, "busi": Busi}
# Benchmarks whose builder configs are subsets: their names, and the one converted when none is asked for.
SUBSET_NAMES = {"gist514": tuple(sorted(SUBSETS)), "busi": tuple(busi.SUBSETS)}
DEFAULT_SUBSETS = {"gist514": "roi", "busi": busi.DEFAULT_SUBSET}


def _subset_present(raw_dir: str, subset: str) -> bool:
    folder, stem = SUBSETS[subset]
    try:
        common.find_root(raw_dir, f"annotations/val_{stem}_0.json", folder, layout(subset))
    except common.LayoutError:
        return False
    return True


def _subset_names(benchmark: str, raw_dir: str, subset: str) -> list[str]:
    """The builder configs to convert: one, or for `both` every subset (GIST514-DB: every one found, and a
    LayoutError if there is none)."""
    if subset != "both":
        if subset not in SUBSET_NAMES[benchmark]:
            raise ConfigError(f"unknown {benchmark} subset {subset!r}; choose one of "
                              f"{', '.join(SUBSET_NAMES[benchmark])} or both")
        return [subset]
    if benchmark == "busi":
        return list(SUBSET_NAMES["busi"])
    names = [v for v in sorted(SUBSETS) if _subset_present(raw_dir, v)]
    if not names:
        common.find_root(raw_dir, f"annotations/val_{SUBSETS['roi'][1]}_0.json", SUBSETS["roi"][0],
                         layout("roi") + "\nand/or\n" + layout("raw"))
    return names


def convert(benchmark: str, raw_dir: str, out_dir: str, *, subset: str | None = None,
            max_side: int | None = builder.DEFAULT_MAX_SIDE, overwrite: bool = False,
            resize_mismatched_masks: bool = False, **options) -> dict:
    """Converts one benchmark and returns its manifest (a subset benchmark's `subset='both'`: {subset: manifest}).

    GIST514-DB's `both` converts every subset found under `raw_dir` (and fails if there is none); `roi` (the
    default) or `raw` insists on that one. BUSI's `both` converts `three_class` (the default) and
    `benign_malignant` from one survey of the raw folder.

    `resize_mismatched_masks` resizes a mask of another size than its image by nearest neighbour instead of
    dropping it (docs/benchmarks.md, "Masks"). `options` go to the builder (labelled: dataset, val_fraction,
    test_fraction, seed, masks_dir, mask_classes; busi: folds, seed). Raises `common.LayoutError` for a wrong
    or partial layout, before anything is written.
    """
    if benchmark not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {benchmark!r}; choose one of {sorted(BENCHMARKS)}")
    cls = BENCHMARKS[benchmark]
    common_kwargs = dict(raw_dir=raw_dir, data_dir=out_dir, max_side=max_side, file_format="array_record",
                         resize_mismatched_masks=resize_mismatched_masks)
    if benchmark in SUBSET_NAMES:
        subset = subset or DEFAULT_SUBSETS[benchmark]
        names = _subset_names(benchmark, raw_dir, subset)
        if benchmark == "busi":
            options["shared"] = busi.SurveyOnce(raw_dir, options.get("folds", busi.DEFAULT_FOLDS),
                                                options.get("seed", 0))
        manifests = {v: builder.prepare(cls(config=v, **common_kwargs, **options), overwrite) for v in names}
        return manifests if subset == "both" else manifests[subset]
    if subset:
        raise ConfigError(f"{benchmark} has no subsets (got {subset!r})")
    return builder.prepare(cls(**common_kwargs, **options), overwrite)
