"""`convert(benchmark, raw_dir, out_dir, ...)`: builds the right TFDS builder(s) and runs the conversion."""

from __future__ import annotations

from data_prep.benchmarks import builder, common
from data_prep.benchmarks.busbra import Busbra
from data_prep.benchmarks.gist514 import SUBSETS, Gist514, layout
from data_prep.benchmarks.labelled import Labelled
from data_prep.benchmarks.mmotu import Mmotu
from usf_mae_jax.cli import ConfigError

BENCHMARKS = {"busbra": Busbra, "mmotu": Mmotu, "gist514": Gist514, "labelled": Labelled}


def _subset_present(raw_dir: str, subset: str) -> bool:
    folder, stem = SUBSETS[subset]
    try:
        common.find_root(raw_dir, f"annotations/val_{stem}_0.json", folder, layout(subset))
    except common.LayoutError:
        return False
    return True


def convert(benchmark: str, raw_dir: str, out_dir: str, *, subset: str | None = None,
            max_side: int | None = builder.DEFAULT_MAX_SIDE, overwrite: bool = False, **options) -> dict:
    """Converts one benchmark and returns its manifest (GIST514-DB `subset='both'`: {subset: manifest}).

    GIST514-DB's `both` converts every subset found under `raw_dir` (and fails if there is none); `roi`
    (the default) or `raw` insists on that one.

    `options` go to the builder (labelled: dataset, val_fraction, test_fraction, seed). Raises
    `common.LayoutError` for a wrong or partial layout, before anything is written.
    """
    if benchmark not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {benchmark!r}; choose one of {sorted(BENCHMARKS)}")
    cls = BENCHMARKS[benchmark]
    if benchmark == "gist514":
        subset = subset or "roi"
        if subset == "both":
            names = [v for v in sorted(SUBSETS) if _subset_present(raw_dir, v)]
            if not names:
                common.find_root(raw_dir, f"annotations/val_{SUBSETS['roi'][1]}_0.json", SUBSETS["roi"][0],
                                 layout("roi") + "\nand/or\n" + layout("raw"))
        elif subset in SUBSETS:
            names = [subset]
        else:
            raise ConfigError(f"unknown GIST514-DB subset {subset!r}; choose roi, raw or both")
        manifests = {v: builder.prepare(cls(raw_dir=raw_dir, data_dir=out_dir, config=v, max_side=max_side,
                                            file_format="array_record"), overwrite) for v in names}
        return manifests if subset == "both" else manifests[subset]
    if subset:
        raise ConfigError(f"{benchmark} has no subsets (got {subset!r})")
    return builder.prepare(cls(raw_dir=raw_dir, data_dir=out_dir, max_side=max_side, file_format="array_record",
                               **options), overwrite)
