"""data_prep/dedup.py: content and perceptual hashes, the banded near-duplicate index, hold-out hash lists,
and the conversion order that makes the canonical copy of each known duplicate group win."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from data_prep.dedup import (
    BENCHMARK_HOLDOUTS,
    Deduplicator,
    Fingerprint,
    HashList,
    PhashIndex,
    content_hash,
    conversion_order,
    load_hash_list,
    perceptual_hash,
    save_hash_list,
)


def smooth_image(seed: int, height=64, width=80) -> np.ndarray:
    """Blurred noise: structure at several scales, like an ultrasound frame seen at 32 px."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (8, 10)).astype(np.float32)
    image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    return np.clip(image, 0, 255).astype(np.uint8)


def test_content_hash_ignores_rgb_storage_of_gray():
    gray = smooth_image(0)
    assert content_hash(gray) == content_hash(np.stack([gray] * 3, -1)) == content_hash(gray[..., None])
    other = gray.copy()
    other[0, 0] ^= 1
    assert content_hash(other) != content_hash(gray)
    assert content_hash(gray[:, :40]) != content_hash(gray[:, 40:])


def test_perceptual_hash_survives_resize_and_recolour_but_separates_images():
    image = smooth_image(1)
    resized = cv2.resize(image, (120, 90), interpolation=cv2.INTER_LINEAR)
    rgb = np.stack([image, image, image], -1).copy()
    rgb[..., 0] = np.clip(rgb[..., 0].astype(int) + 3, 0, 255)
    reference = perceptual_hash(image)
    assert 0 <= reference < 2**256
    assert (reference ^ perceptual_hash(resized)).bit_count() <= 12
    assert (reference ^ perceptual_hash(rgb)).bit_count() <= 12
    distances = [(reference ^ perceptual_hash(smooth_image(seed))).bit_count() for seed in range(2, 12)]
    assert min(distances) > 48


def test_phash_index_matches_brute_force():
    rng = np.random.default_rng(0)
    stored = [int.from_bytes(rng.bytes(32), "big") for _ in range(300)]
    index = PhashIndex(threshold=24)
    for position, value in enumerate(stored):
        index.add(value, str(position))
    outcomes = set()
    for position in range(0, 300, 3):
        flipped = stored[position]
        for bit in rng.choice(256, size=position % 40, replace=False):
            flipped ^= 1 << int(bit)
        expected = min((v ^ flipped).bit_count() for v in stored)
        found = index.nearest(flipped)
        outcomes.add(found is None)
        if expected <= 24:
            assert found is not None and found[1] == expected
        else:
            assert found is None
    assert outcomes == {True, False}
    with pytest.raises(ValueError, match="threshold"):
        PhashIndex(128)


def test_deduplicator_reasons_and_export_restore():
    image, other = smooth_image(3), smooth_image(4)
    dedup = Deduplicator()
    assert dedup.check("hc18", "hc18:a.png", image) is None
    assert dedup.check("ultrasound_fetus", "uf:a.png", image) == "exact duplicate of hc18:a.png"
    reason = dedup.check("fast_u_net", "fun:a.png", cv2.resize(image, (100, 70)))
    assert reason.startswith("near-duplicate (phash distance") and reason.endswith("of hc18:a.png")
    assert dedup.check("fast_u_net", "fun:b.png", other) is None
    assert dedup.removed["ultrasound_fetus"] == [{"ref": "uf:a.png", "reason": "exact duplicate of hc18:a.png"}]
    restored = Deduplicator()
    restored.restore("hc18", dedup.export("hc18"))
    assert restored.check("dfhi", "dfhi:x.png", image) == "exact duplicate of hc18:a.png"


def test_fingerprints_computed_elsewhere_give_the_same_verdicts():
    """The writer's workers run `fingerprinter()`; `check` with those fingerprints decides as with the images."""
    image, other = smooth_image(8), smooth_image(9)
    by_image, by_fingerprint = Deduplicator(), Deduplicator()
    fingerprinter = by_fingerprint.fingerprinter()
    assert fingerprinter(image) == Fingerprint(content_hash(image), perceptual_hash(image))
    for ref, candidate in (("a", image), ("b", cv2.resize(image, (100, 70))), ("c", image), ("d", other)):
        assert by_fingerprint.check("x", ref, fingerprint=fingerprinter(candidate)) == by_image.check("x", ref,
                                                                                                     candidate)
    assert by_fingerprint.export("x") == by_image.export("x")
    exact_only = Deduplicator(phash_threshold=None)
    assert exact_only.fingerprinter()(image).phash is None  # no pHash work when nothing uses it
    with pytest.raises(ValueError, match="needs pHashes"):
        Deduplicator().check("x", "e", fingerprint=exact_only.fingerprinter()(image))


def test_exact_only_mode_keeps_near_duplicates():
    image = smooth_image(5)
    dedup = Deduplicator(phash_threshold=None)
    assert dedup.check("a", "a:1", image) is None
    assert dedup.check("b", "b:1", cv2.resize(image, (100, 70))) is None
    assert dedup.check("b", "b:2", image) == "exact duplicate of a:1"


def test_holdout_hash_lists(tmp_path):
    test_image, unrelated = smooth_image(6), smooth_image(7)
    folder = tmp_path / "bus_bra_test"
    folder.mkdir()
    cv2.imwrite(str(folder / "bus_0001-l.png"), test_image)
    hashes = load_hash_list(str(folder))
    assert hashes.name == "bus_bra_test" and hashes.content == {content_hash(test_image)}
    save_hash_list(hashes, str(tmp_path / "bus_bra_test.json"))
    loaded = load_hash_list(str(tmp_path / "bus_bra_test.json"))
    assert loaded == hashes
    dedup = Deduplicator(phash_threshold=None, holdouts=[loaded])
    assert dedup.check("breast", "breast:c.png", test_image) == "held out: identical to an image of bus_bra_test"
    near = dedup.check("breast", "breast:d.png", cv2.resize(test_image, (120, 90)))
    assert near.startswith("held out: near-duplicate")
    assert dedup.check("breast", "breast:e.png", unrelated) is None
    with pytest.raises(ValueError, match="not a hash list"):
        (tmp_path / "bad.json").write_text("{}")
        load_hash_list(str(tmp_path / "bad.json"))


def test_conversion_order_puts_canonical_copies_first():
    keys = ["dfhi", "fast_u_net", "fetal_planes_db", "hc18", "upbd", "fh_ps_aop", "jnu_ifm"]
    assert conversion_order(keys) == ["hc18", "fetal_planes_db", "jnu_ifm", "dfhi", "fast_u_net", "upbd",
                                      "fh_ps_aop"]
    assert BENCHMARK_HOLDOUTS == ("bus_bra", "mmotu_2d", "gist514_db")
    assert HashList("x", set(), []).to_json()["name"] == "x"
