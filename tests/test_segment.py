"""Segmentation fine-tuning on mock benchmarks whose masks are the true synthetic lesions (data_prep mock).

Fast tests use 32-48 px trees and the `runlocal` preset (a 2-block mu model, a few steps): the presets, the
run's files, the three benchmarks' data paths, init from a pretraining workdir and from a `.pth`, resume after
kill -9, the cross-validation table, and a short learning run that must beat the all-foreground baseline. The
learning target on 128 px images (8 minutes on 2 cores) is `@pytest.mark.target`, outside the default run:
`pytest -m target tests/test_segment.py` reproduces it.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys

import cv2
import jax
import numpy as np
import pytest
import torch
from helpers import converted_busbra, set_fields

from configs import pretrain as pretrain_config
from configs import segment as segment_config
from data_prep.benchmarks import builder, convert, load_split, mock
from usf_mae_jax.core import checkpoint
from usf_mae_jax.data import segmentation as segdata
from usf_mae_jax.evaluators import seg_baseline
from usf_mae_jax.evaluators import segmentation as metrics
from usf_mae_jax.models import pos_embed
from usf_mae_jax.trainers import crossval, loop, registry


def run(config, workdir):
    return loop.run(config, workdir, registry.create(config))


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return converted_busbra(tmp_path_factory.mktemp("busbra"), patients=12, size=32, seed=1, fat_lobules=True)


def local_config(data_dir: str, arg: str = "busbra,runlocal", **fields):
    config = segment_config.get_config(arg)
    config.input.data_dir = data_dir
    return set_fields(config, fields, "__")


# ------------------------------------------------------------------------------------------------ config


def test_config_presets():
    default = segment_config.get_config("busbra,fold=3")
    assert (default.task, default.dataset, default.fold, default.classes) == ("segment", "busbra", 3, "binary")
    assert (default.model.head, default.model.variant, default.model.img_size) == ("upernet", "base", 224)
    assert (default.batch_size, default.total_epochs, default.model.drop_path) == (16, 100.0, 0.1)
    assert default.optimizer.blr * 16 / 256 == pytest.approx(1e-4) and default.optimizer.wd_mask == "finetune"
    mmotu = segment_config.get_config("mmotu,classes=all,head=linear,variant=tiny,img_size=256,epochs=7")
    assert (mmotu.dataset, mmotu.classes, mmotu.model.head, mmotu.model.variant) == ("mmotu", "all", "linear", "tiny")
    assert (mmotu.model.img_size, mmotu.total_epochs) == (256, 7.0)
    gist = segment_config.get_config("gist514,subset=raw,fold=4")
    assert (gist.subset, gist.fold) == ("raw", 4)
    assert segment_config.get_config("labelled").dataset == "labelled"
    assert segment_config.get_config("busbra,runlocal").model.img_size == 32
    for bad, message in (("imagenet", "unknown segmentation dataset"), ("busbra,classes=some", "unknown classes"),
                         ("busbra,head=fcn", "unknown head"), ("busbra,epochs=3,runlocal", "runlocal sets its own")):
        with pytest.raises(ValueError, match=message):
            segment_config.get_config(bad)
    launch_help = subprocess.run([sys.executable, "launch.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                                 env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert "configs/segment.py" in launch_help.stdout and ":mmotu" in launch_help.stdout


# ------------------------------------------------------------------------------------------- end to end


def test_runlocal_writes_results_csv_overlays_and_a_reusable_checkpoint(bench, tmp_path):
    workdir = str(tmp_path / "run")
    summary = run(local_config(bench), workdir)
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    assert list(results) == list(metrics.RESULT_KEYS)
    assert results["split"] == "busbra/folddefault/test" and list(results["per_class"]) == ["lesion"]
    test_ids = load_split(bench, "busbra", "test", fold=1).ids
    assert results["n_test"] == len(test_ids) == summary["results"]["n_test"]
    with open(os.path.join(workdir, "per_image_metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == test_ids and all(r["class"] == "lesion" for r in rows)
    # Scored at the mask's own size: the ground-truth pixel counts are those of the stored masks.
    stored = {item["id"]: int((item["mask"] > 0).sum()) for item in load_split(bench, "busbra", "test", fold=1)}
    assert {r["id"]: int(r["gt_pixels"]) for r in rows} == stored
    overlay = cv2.imread(os.path.join(workdir, "test_overlays.png"))
    assert overlay is not None and overlay.shape[1] == 4 * 160
    with open(os.path.join(workdir, "splits.json")) as f:
        splits = json.load(f)
    assert splits["mask_class_names"] == ["background", "lesion"] and splits["test"]["ids"] == test_ids
    with open(os.path.join(workdir, "history.json")) as f:
        history = json.load(f)
    assert history["best"]["value"] == max(e["dice"] for e in history["evaluations"])
    params, fields = checkpoint.load_params(workdir)
    assert fields["depth"] == 2 and "decode_head" in params and params["pos_embed"].shape == (1 + 16, 32)
    again = run(local_config(bench), workdir)  # finished: nothing is trained or overwritten
    assert again["start_step"] == again["final_step"]


def test_small_data_recipe():
    small, reference = segment_config.get_config("busi,recipe=small_data"), segment_config.get_config("busi")
    assert (small.optimizer.lr, small.optimizer.scratch_layer_decay) == (5e-4, 1.0)
    assert (reference.optimizer.lr, reference.optimizer.scratch_layer_decay) == (None, None)
    with pytest.raises(ValueError, match="unknown recipe 'x'"):
        segment_config.get_config("busi,recipe=x")


def test_scratch_layer_decay_applies_without_an_init_only(bench, tmp_path):
    mesh = jax.make_mesh((1, 1), ("data", "fsdp"), devices=jax.devices()[:1])
    scratch = registry.create(local_config(bench, optimizer__scratch_layer_decay=1.0))
    scratch.prepare(mesh, "")
    assert scratch.decay == 1.0
    scratch.close()
    pre = str(tmp_path / "pretrain")
    run(pretrain_config.get_config("demo,runlocal"), pre)
    config = local_config(bench, optimizer__scratch_layer_decay=1.0, init=pre)
    config.model.depth = None  # the architecture comes from the init
    pretrained = registry.create(config)
    pretrained.prepare(mesh, "")
    assert pretrained.decay == 0.65  # the width's default: the init's blocks are shielded
    pretrained.close()


def test_the_label_budget_keeps_each_image_with_its_own_mask(bench):
    train = segdata.load_segmentation(bench, "busbra", 1, classes="binary").splits["train"]
    budget = segdata.label_subset(train, 0.3, seed=4)
    assert len(budget.ids) < len(train.ids) and len(budget.masks) == len(budget.ids)
    assert set(np.unique(budget.labels)) == set(np.unique(train.labels))  # every class keeps some images
    for record_id, image, mask in zip(budget.ids, budget.images, budget.masks):
        row = train.ids.index(record_id)
        assert image is train.images[row] and mask is train.masks[row]
    assert segdata.label_subset(train, 0.3, seed=4).ids == budget.ids != segdata.label_subset(train, 0.3, 5).ids
    assert segdata.label_subset(train, 1.0, seed=4) is train


@pytest.fixture(scope="module")
def mmotu(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmotu")
    mock.write_mmotu_tree(str(root / "raw"), count=28, size=32, seed=2)
    convert("mmotu", str(root / "raw"), str(root / "out"))
    return str(root / "out")


def test_mmotu_multiclass_run_scores_every_class_and_the_foreground(mmotu, tmp_path):
    config = local_config(mmotu, "mmotu,classes=all,runlocal")
    summary = run(config, str(tmp_path / "run"))
    results = summary["results"]
    assert list(results["per_class"]) == ["chocolate_cyst", "serous_cystadenoma", "teratoma", "theca_cell_tumour",
                                          "simple_cyst", "normal_ovary", "mucinous_cystadenoma", "high_grade_serous"]
    assert results["foreground"]["n_images"] == results["n_test"] == 7  # every 4th of 28 is a val image
    assert summary["state"]["params"]["decode_head"]["conv_seg"]["kernel"].shape == (1, 1, 16, 9)
    binary = segdata.load_segmentation(mmotu, "mmotu", classes="binary")
    assert binary.mask_class_names == ["background", "foreground"]
    assert all(set(np.unique(m)) <= {0, 1} for m in binary.splits["test"].masks)


def test_gist514_and_labelled_sets_load_for_segmentation(tmp_path):
    mock.write_gist514_tree(str(tmp_path / "gist"), count=10, size=24, seed=0, subset="raw")
    convert("gist514", str(tmp_path / "gist"), str(tmp_path / "out"), subset="raw")
    data = segdata.load_segmentation(str(tmp_path / "out"), "gist514", fold=2, subset="raw", classes="all")
    assert data.mask_class_names == ["background", "lmym", "GIST"] and data.channels == 3
    for label, mask in zip(data.splits["test"].labels, data.splits["test"].masks):
        assert set(np.unique(mask)) == {0, label + 1}
    convert("busbra", mock.write_busbra_tree(str(tmp_path / "b"), patients=10, size=16), str(tmp_path / "old"))
    splits = os.path.join(str(tmp_path / "old"), "busbra", builder.CONVERTER_VERSION, "splits.json")
    with open(splits) as f:
        payload = json.load(f)
    payload["mask_class_names"] = None  # as a conversion made before masks were kept
    with open(splits, "w") as f:
        json.dump(payload, f)
    with pytest.raises(ValueError, match=r"was converted without masks .* --overwrite"):
        segdata.load_segmentation(str(tmp_path / "old"), "busbra")


def test_a_validation_split_without_foreground_is_refused_before_compiling(tmp_path):
    rows = ["path,label,mask,split"]
    for i, split in enumerate(["train"] * 4 + ["validation"] * 2 + ["test"] * 2):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.full((16, 16), 100 + i, np.uint8))
        mask = np.zeros((16, 16), np.uint8)
        mask[4:8, 4:8] = 255 if split != "validation" else 0
        cv2.imwrite(str(tmp_path / f"{i}_m.png"), mask)
        rows.append(f"{i}.png,a,{i}_m.png,{split}")
    (tmp_path / "set.csv").write_text("\n".join(rows) + "\n")
    convert("labelled", str(tmp_path / "set.csv"), str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"no validation mask of fold None has a foreground pixel"):
        run(local_config(str(tmp_path / "out"), "labelled,runlocal"), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_init_from_a_pretraining_workdir_and_a_pth(bench, tmp_path):
    pre = str(tmp_path / "pretrain")
    run(pretrain_config.get_config("demo,runlocal"), pre)  # mu, 32 px, patch 8
    pretrained, _ = checkpoint.load_params(pre)
    config = local_config(bench, init=pre, model__img_size=48, total_epochs=None, total_steps=1)
    config.model.depth = None  # the architecture comes from the init
    run(config, str(tmp_path / "from_mae"))
    tuned, fields = checkpoint.load_params(str(tmp_path / "from_mae"))
    assert fields["img_size"] == 48 and tuned["pos_embed"].shape == (1 + 36, 32)
    # one step at warmup lr 0 leaves every weight at its initial value: the resized table, the MAE's blocks
    np.testing.assert_allclose(tuned["pos_embed"], pos_embed.resize_patch_table(pos_embed.sincos_2d(32, 4), (6, 6)),
                               atol=1e-6)
    np.testing.assert_array_equal(tuned["blocks_0"]["attn"]["qkv"]["kernel"],
                                  pretrained["blocks_0"]["attn"]["qkv"]["kernel"])
    from usf_mae_jax.torch_reference import build_reference_mae

    torch.manual_seed(0)
    reference = build_reference_mae(img_size=32, patch_size=8, in_chans=3, width=32, depth=1, heads=2,
                                    decoder_width=32, decoder_depth=1, decoder_heads=2, norm_pix_loss=False)
    path = str(tmp_path / "mae.pth")
    torch.save({"model": reference.state_dict()}, path)
    config = local_config(bench, "busbra,runlocal,head=linear", init=path, total_epochs=None, total_steps=1)
    config.model.depth = None
    run(config, str(tmp_path / "from_pth"))
    tuned, fields = checkpoint.load_params(str(tmp_path / "from_pth"))
    assert fields["depth"] == 1 and json.loads((tmp_path / "from_pth" / "provenance.json").read_text())["kind"] == \
        "torch_file"
    state = reference.state_dict()
    np.testing.assert_allclose(tuned["patch_embed"]["proj"]["kernel"],
                               state["patch_embed.proj.weight"].numpy().transpose(2, 3, 1, 0), atol=1e-7)
    np.testing.assert_allclose(tuned["norm"]["scale"], state["norm.weight"].numpy())  # the linear head's norm


def test_crossval_runs_segmentation_folds_and_prints_hd95_in_pixels(tmp_path):
    def fake(config, workdir):
        value = 0.6 + 0.1 * config.fold
        results = {k: value for k in metrics.SCALAR_KEYS}
        results.update(hd95=10.0 * config.fold, per_class={}, foreground=None, n_test=3, split="s")
        os.makedirs(workdir)
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f)

    out = crossval.sweep(segment_config.get_config("busbra"), str(tmp_path), [1, 2], [0], run_fn=fake)
    assert "| dice | 75.0 ± 7.1 |" in out["table"] and "| hd95 | 15.0 ± 7.1 |" in out["table"]
    assert "hd95 in pixels" in out["table"] and "paper" not in out["table"].split("\n")[2]
    assert json.loads((tmp_path / "crossval.json").read_text())["summary"]["hd95"] == pytest.approx([15.0, 7.0711],
                                                                                                   rel=1e-4)


def test_otsu_baseline_finds_a_clear_dark_blob_and_scores_like_the_task(bench, tmp_path, capsys):
    rows, cols = np.mgrid[0:64, 0:64]
    disc = (rows - 30) ** 2 + (cols - 36) ** 2 < 12**2
    noise = np.random.default_rng(0).integers(-20, 20, (64, 64))
    image = np.clip(np.where(disc, 60, 180) + noise, 1, 255).astype(np.uint8)
    found = seg_baseline.otsu_lesion(image).astype(bool)
    assert 2 * (found & disc).sum() / (found.sum() + disc.sum()) > 0.9
    assert seg_baseline.main(["--data_dir", bench, "--fold", "1", "--out", str(tmp_path / "otsu")]) == 0
    assert capsys.readouterr().out.startswith("otsu baseline on busbra/fold1/test (otsu baseline): Dice ")
    results = json.loads((tmp_path / "otsu" / "results.json").read_text())
    assert list(results) == list(metrics.RESULT_KEYS) and results["n_test"] == len(load_split(bench, "busbra", "test"))
    assert {"test_overlays.png", "per_image_metrics.csv"} <= set(os.listdir(tmp_path / "otsu"))
    assert seg_baseline.main(["--data_dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip() == (f"python -m usf_mae_jax.evaluators.seg_baseline: input.data_dir "
                                               f"{tmp_path / 'nowhere'} is not a directory")


# ----------------------------------------------------------------------------------- kill -9 and resume

KILLER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kill_at_step.py")
ROOT = os.path.dirname(os.path.dirname(KILLER))


def test_kill_9_at_60_percent_resumes_and_ends_equal(bench, tmp_path):
    """kill -9 after step 6 of 10, then the same command again: it resumes and ends with the params, the
    BatchNorm statistics (through the evaluations) and the results.json of an uninterrupted run."""
    from conftest import CACHE_DIR

    overrides = {"total_steps": 10, "ckpt_steps": 2, "eval_steps": 2, "batch_size": 4, "eval_batch_size": 8}
    reference = local_config(bench, total_epochs=None, eval_epochs=None, **overrides)
    run(reference, str(tmp_path / "reference"))
    workdir = str(tmp_path / "killed")
    args = ["--config=configs/segment.py:busbra,runlocal", f"--workdir={workdir}", f"--config.input.data_dir={bench}",
            *(f"--config.{k}={v}" for k, v in overrides.items())]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": CACHE_DIR, "USF_MAE_HOST_HUGEPAGES": "0"}
    killed = subprocess.run([sys.executable, KILLER, "6", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not os.path.exists(os.path.join(workdir, "results.json"))
    assert 2 <= max(checkpoint.workdir_steps(workdir)) <= 6
    rerun = subprocess.run([sys.executable, "launch.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from step" in rerun.stderr
    for name in ("results.json", "history.json", "per_image_metrics.csv"):
        with open(os.path.join(workdir, name)) as a, open(os.path.join(tmp_path / "reference", name)) as b:
            ours, theirs = a.read(), b.read()
        if name == "history.json":  # timings differ; the evaluations and the best step must not
            ours, theirs = ({k: v for k, v in json.loads(t).items() if k in ("evaluations", "best", "steps")}
                            for t in (ours, theirs))
        assert ours == theirs, name
    ours, _ = checkpoint.read_workdir_params(workdir, step=10)
    theirs, _ = checkpoint.read_workdir_params(str(tmp_path / "reference"), step=10)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(ours)[0], jax.tree.leaves(theirs)):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


# -------------------------------------------------------------------------------------------- learning


def all_foreground_dice(data_dir: str) -> float:
    """The threshold-free baseline: every pixel called lesion (its Dice is 2|G| / (|G| + HW) per image)."""
    test = segdata.load_segmentation(data_dir, "busbra").splits["test"]
    results, _ = metrics.segmentation_results([np.ones_like(m) for m in test.masks], test.masks, test.ids,
                                              ["background", "lesion"], "t", distances=False)
    return results["dice"]


def test_a_short_run_learns_more_than_the_all_foreground_baseline(tmp_path):
    mock.write_busbra_tree(str(tmp_path / "raw"), patients=40, size=48, seed=3, fat_lobules=True)
    convert("busbra", str(tmp_path / "raw"), str(tmp_path / "out"))
    config = local_config(str(tmp_path / "out"), "busbra,runlocal,fold=1", total_epochs=None, total_steps=60,
                          eval_epochs=None, eval_steps=20, batch_size=16, model__img_size=48, model__width=64,
                          model__heads=4, model__depth=4, model__head_channels=32, model__drop_path=0.0)
    config.optimizer.update(lr=2e-3, layer_decay=1.0)
    summary = run(config, str(tmp_path / "run"))
    baseline = all_foreground_dice(str(tmp_path / "out"))
    dice = summary["results"]["dice"]
    print(f"short run: test Dice {dice:.3f}; all-foreground baseline {baseline:.3f}")
    assert dice > baseline + 0.1
    evaluations = summary["record"]["evaluations"]  # steps 20, 40, 60: validation Dice rises
    assert max(e["dice"] for e in evaluations[1:]) > evaluations[0]["dice"]


@pytest.mark.target
def test_tiny_vit_from_scratch_reaches_dice_080_at_128_px(tmp_path):
    mock.write_busbra_tree(str(tmp_path / "raw"), patients=500, size=128, seed=0, fat_lobules=True)
    convert("busbra", str(tmp_path / "raw"), str(tmp_path / "out"))
    config = segment_config.get_config("busbra,fold=1,variant=tiny,img_size=128,epochs=40")
    config.input.data_dir = str(tmp_path / "out")
    config.model.update(depth=4, head_channels=64, drop_path=0.0)
    config.optimizer.update(lr=1e-3, layer_decay=1.0)
    config.update(warmup_epochs=2.0, log_steps=31)
    summary = run(config, str(tmp_path / "run"))
    print(f"tiny from scratch: test Dice {summary['results']['dice']:.3f}")
    assert summary["results"]["dice"] >= 0.80
