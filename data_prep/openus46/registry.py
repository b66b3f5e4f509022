"""The registry of the 46 OpenUS-46 dataset specs, keyed exactly as the `key` list of docs/openus46.md."""

from __future__ import annotations

from data_prep.openus46.spec import DatasetSpec
from data_prep.openus46.specs_2d import SPECS_2D
from data_prep.openus46.specs_sequences import SPECS_SEQUENCES

# The `key` list of docs/openus46.md, in its order.
KEYS = (
    "105us", "abdomenus", "acouslic", "aul", "blues", "bp", "brachial_plexus", "breast", "bus_b", "bus_uc",
    "bus_ucml", "bus_bra", "cactus", "camus", "cardiacudc", "ccaui", "dfhi", "echocp", "echonet_dynamic",
    "echonet_pediatric", "fallmud", "fass", "fast_u_net", "feft", "fetal_planes_db", "fh_ps_aop",
    "gist514_db", "hc18", "jnu_ifm", "kidneyus", "luss_phantom", "microseg", "mmotu_2d", "mmotu_3d", "pocus",
    "porcine", "psfhs", "regpro", "s1", "segthy", "stmus_nda", "stu_hospital", "thyroid_dataset",
    "thyroid_cineclip", "ultrasound_fetus", "upbd",
)


def _build() -> dict[str, DatasetSpec]:
    specs = {spec.key: spec for spec in SPECS_2D + SPECS_SEQUENCES}
    if len(specs) != len(SPECS_2D) + len(SPECS_SEQUENCES):
        raise RuntimeError("duplicate dataset key in the OpenUS-46 specs")
    if set(specs) != set(KEYS):
        raise RuntimeError(f"OpenUS-46 specs and keys differ: missing {sorted(set(KEYS) - set(specs))}, "
                           f"unexpected {sorted(set(specs) - set(KEYS))}")
    return {key: specs[key] for key in KEYS}


REGISTRY: dict[str, DatasetSpec] = _build()


def get_spec(key: str) -> DatasetSpec:
    """The spec of one dataset; an unknown key raises a ValueError listing the valid ones."""
    try:
        return REGISTRY[key]
    except KeyError:
        raise ValueError(f"unknown OpenUS-46 dataset {key!r}; valid keys: {', '.join(KEYS)}") from None


def parse_datasets(text: str) -> list[str]:
    """'all' or a comma-separated list of keys -> the keys, validated, in registry order."""
    if text.strip().lower() == "all":
        return list(KEYS)
    wanted = [part.strip() for part in text.split(",") if part.strip()]
    for key in wanted:
        get_spec(key)
    return [key for key in KEYS if key in wanted]
