"""OpenUS-46: the registry of the 46 public ultrasound datasets USF-MAE pretrains on, and their converter."""

from data_prep.openus46.registry import KEYS, REGISTRY, get_spec, parse_datasets
from data_prep.openus46.spec import DatasetSpec

__all__ = ["KEYS", "REGISTRY", "DatasetSpec", "get_spec", "parse_datasets"]
