"""The `usf_mae_us` augmentation preset: usaugment's ultrasound transforms after the USF-MAE geometry,
deterministic per example whichever thread runs it, acting inside the scan region only, leaving the global
random states alone, and failing in one line when the optional package is missing."""

from __future__ import annotations

import importlib.util
import random
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from usf_mae_jax.cli import ConfigError
from usf_mae_jax.data import augment, synthetic, us_augment

needs_usaugment = pytest.mark.skipif(importlib.util.find_spec("usaugment") is None,
                                     reason="optional: pip install usaugment (pinned in requirements-test.txt)")

SIZE = 48


def frame(index: int) -> np.ndarray:
    return synthetic.SyntheticUltrasound(16, SIZE, seed=4)[index]["image"]


@needs_usaugment
def test_preset_is_deterministic_per_example_across_threads():
    fn = augment.make_augment("usf_mae_us", SIZE)
    jobs = [(i % 8, seed) for i, seed in enumerate(range(40))]
    sequential = [fn(frame(i), np.random.default_rng(seed)) for i, seed in jobs]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda job: fn(frame(job[0]), np.random.default_rng(job[1])), jobs))
    for a, b in zip(sequential, threaded):
        np.testing.assert_array_equal(a, b)
    assert all(out.shape == (SIZE, SIZE, 1) and out.dtype == np.uint8 for out in sequential)
    # A different generator gives a different image (the draws come from the example's generator).
    assert not np.array_equal(fn(frame(0), np.random.default_rng(1)), fn(frame(0), np.random.default_rng(2)))


@needs_usaugment
def test_transforms_change_the_scan_region_only_and_restore_the_global_random_states():
    geometry = augment.make_augment("usf_mae", SIZE)
    np.random.seed(123)
    random.seed(123)
    before_np, before_py = np.random.get_state()[1].copy(), random.getstate()
    changed = 0
    for seed in range(30):
        plain = geometry(frame(seed % 16), np.random.default_rng(seed))
        # usf_mae_us draws the geometry first from the same generator, so `plain` is its input.
        out = augment.make_augment("usf_mae_us", SIZE)(frame(seed % 16), np.random.default_rng(seed))
        outside = plain == 0
        assert (out[outside] == 0).all()  # black (out of view) stays black
        changed += int(not np.array_equal(out, plain))
    assert 20 <= changed <= 30  # P(no transform) = 1/16; most images change
    np.testing.assert_array_equal(np.random.get_state()[1], before_np)
    assert random.getstate() == before_py


def test_missing_package_is_a_one_line_config_error(monkeypatch):
    monkeypatch.setattr(us_augment, "_transforms", None)
    monkeypatch.setitem(sys.modules, "usaugment", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=r"usf_mae_us needs the usaugment package.*pip install usaugment"):
        augment.make_augment("usf_mae_us", SIZE)
