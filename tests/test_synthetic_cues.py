"""The synthetic generator's cue controls (data/synthetic.py `Cues`): the default reproduces the images of
the generator before cues existed, a cue switched off removes the class difference it carries, each cue on its
own makes the classes differ where it should, and bad cue text is a one-line error."""

from __future__ import annotations

import numpy as np
import pytest

from usf_mae_jax.data import synthetic
from usf_mae_jax.data.synthetic import BENIGN, MALIGNANT, Cues

# sha256 of 12 images from the generator before cues existed (main at 7cb1aad): 3 labels x 2 seeds x 2 sizes.
GOLDEN = "f29495e7"


def pair(seed: int, cues: Cues, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A benign and a malignant image drawn from the same generator state."""
    return (synthetic.synthesize(size, np.random.default_rng([seed, 9]), BENIGN, cues=cues),
            synthetic.synthesize(size, np.random.default_rng([seed, 9]), MALIGNANT, cues=cues))


def digest(cues: Cues | None) -> str:
    import hashlib

    h = hashlib.sha256()
    for size in (32, (40, 56)):
        for label in (-1, BENIGN, MALIGNANT):
            for seed in (0, 1):
                rng = np.random.default_rng([seed, label + 1])
                h.update(synthetic.synthesize(size, rng, label, cues=cues).tobytes())
    return h.hexdigest()[:8]


def test_default_cues_give_the_images_of_the_generator_before_cues():
    assert Cues() == synthetic.DEFAULT_CUES == Cues.parse("")
    assert digest(None) == digest(Cues()) == GOLDEN


def test_all_cues_off_makes_both_classes_the_same_image():
    off = Cues.parse("all=0")
    for seed in range(6):
        benign, malignant = pair(seed, off)
        np.testing.assert_array_equal(benign, malignant)


@pytest.mark.parametrize("cue", ["margin", "orientation", "posterior", "echo", "texture"])
def test_each_cue_alone_carries_a_class_difference(cue):
    """With only this cue on, a benign and a malignant image of the same generator state differ (and with it
    off too, the test above shows they are the same image): the cue carries the whole difference."""
    only = Cues.parse(f"all=0,{cue}=1")
    assert sum(not np.array_equal(*pair(seed, only)) for seed in range(4)) == 4


def lesion_statistics(cues: Cues, label: int, count: int = 80) -> dict[str, float]:
    """Mean height/width and boundary length / sqrt(area) of `count` lesion masks at 96 px."""
    stats = {"aspect": [], "roughness": []}
    for seed in range(count):
        mask, _ = synthetic._lesion_mask(96, 96, np.random.default_rng([seed, 6]), label, cues)
        ys, xs = np.nonzero(mask)
        stats["aspect"].append((np.ptp(ys) + 1) / (np.ptp(xs) + 1))
        edges = np.count_nonzero(mask ^ np.roll(mask, 1, 0)) + np.count_nonzero(mask ^ np.roll(mask, 1, 1))
        stats["roughness"].append(edges / np.sqrt(mask.sum()))
    return {k: float(np.mean(v)) for k, v in stats.items()}


def test_cue_strength_moves_the_malignant_statistic_from_the_benign_value():
    benign = lesion_statistics(Cues(), BENIGN)
    full = lesion_statistics(Cues(), MALIGNANT)
    off = lesion_statistics(Cues.parse("orientation=0,margin=0"), MALIGNANT)
    half = lesion_statistics(Cues.parse("orientation=0.5,margin=0.5"), MALIGNANT)
    assert full["aspect"] > half["aspect"] > off["aspect"] and off["aspect"] == benign["aspect"]
    assert full["roughness"] > half["roughness"] > off["roughness"] == benign["roughness"]


def test_bad_cue_text_is_a_one_line_error():
    with pytest.raises(ValueError, match="is not NAME=STRENGTH"):
        Cues.parse("margins=1")
    with pytest.raises(ValueError, match="must lie in"):
        Cues.parse("posterior=2")
    assert Cues.parse("all=0.5,margin=1") == Cues(1.0, 0.5, 0.5, 0.5, 0.5)


def test_data_prep_commands_take_and_record_the_cues(tmp_path):
    import argparse
    import json

    from data_prep import synthetic as synthetic_command
    from data_prep.benchmarks import mock_cli

    assert synthetic_command.cue_text("") == "" and synthetic_command.cue_text("margin=1") == ""  # the default
    assert synthetic_command.cue_text("all=0,margin=1").startswith("margin=1,orientation=0")
    with pytest.raises(argparse.ArgumentTypeError, match="is not NAME=STRENGTH"):
        synthetic_command.cue_text("shadow=1")
    task = synthetic_command.make_tasks(3, 32, 0, 1.0, 0.0, "all=0")[1]
    item = next(synthetic_command.load(task))
    np.testing.assert_array_equal(item.image[:, :, 0], synthetic.SyntheticUltrasound(
        3, 32, seed=0, lesion_fraction=1.0, cues=Cues.parse("all=0"))[1]["image"][:, :, 0])
    args = argparse.Namespace(out_dir=str(tmp_path), patients=10, size=32, seed=0, malignant_fraction=0.4,
                              cues="all=0,orientation=1")
    assert mock_cli.run(args) == 0
    with open(tmp_path / "raw" / "mock.json") as f:
        assert json.load(f)["cues"] == Cues.parse("all=0,orientation=1").describe()
    args.cues = ""
    with pytest.raises(ValueError, match="already holds a mock benchmark with other settings"):
        mock_cli.run(args)
