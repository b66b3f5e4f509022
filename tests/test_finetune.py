"""Fine-tuning and linear probing on a synthetic BUS-BRA-layout benchmark (data_prep.benchmarks.mock).

The fast tests use a 12-patient tree at 32 px and the `runlocal` preset (mu model, a few steps); they check
the plumbing: files, split membership, provenance, init from a pretraining workdir and from a `.pth`, the
position-table resize, the loss against torch and the mixing rules. The learning smoke tests are
`@pytest.mark.slow` and carry their CPU budget.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import converted_busbra, read_text, set_fields

from configs import finetune as finetune_config
from configs import pretrain as pretrain_config
from data_prep.benchmarks import load_split
from usf_mae_jax.core import checkpoint
from usf_mae_jax.data import downstream
from usf_mae_jax.evaluators import metrics
from usf_mae_jax.models import pos_embed
from usf_mae_jax.trainers import finetune, initialization, loop, registry


def run(config, workdir):
    return loop.run(config, workdir, registry.create(config))


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return converted_busbra(tmp_path_factory.mktemp("busbra"), patients=12, size=32, seed=1)


def local_config(data_dir: str, arg: str = "busbra,runlocal", **fields):
    config = finetune_config.get_config(arg)
    config.input.data_dir = data_dir
    return set_fields(config, fields, "__")


# ------------------------------------------------------------------------------------------------ config


def test_config_presets_and_recipe_values():
    full = finetune_config.get_config("busbra,mode=full,fold=3,img_size=384,epochs=50")
    assert (full.task, full.dataset, full.fold) == ("finetune", "busbra", 3)
    assert full.model.img_size == 384 and full.total_epochs == 50.0
    assert full.model.drop_path == 0.1 and full.label_smoothing == 0.1 and full.warmup_epochs == 5.0
    assert (full.optimizer.b1, full.optimizer.b2, full.optimizer.weight_decay) == (0.9, 0.999, 0.05)
    assert full.optimizer.blr == 5e-4 and full.optimizer.min_lr == 1e-6 and full.init is None
    assert full.mixup.mixup_alpha == 0.0 and full.mixup.cutmix_alpha == 0.0 and full.class_balance == "none"
    linear = finetune_config.get_config("dataset=gist514,mode=linear,subset=raw")
    assert (linear.task, linear.dataset, linear.subset, linear.fold) == ("linear_probe", "gist514", "raw", None)
    assert (linear.optimizer.name, linear.optimizer.blr, linear.optimizer.weight_decay) == ("lars", 0.1, 0.0)
    assert (linear.total_epochs, linear.warmup_epochs, linear.model.global_pool) == (90.0, 10.0, False)
    with pytest.raises(ValueError, match="unknown fine-tune dataset 'imagenet'"):
        finetune_config.get_config("imagenet")
    with pytest.raises(ValueError, match="unknown mode 'half'"):
        finetune_config.get_config("busbra,mode=half")
    with pytest.raises(AttributeError):
        full.lock().optimizer.learning_rat = 1.0  # locked: a typo is an error
    # `variant` is the model size in every config; runlocal refuses a duration it would override.
    assert finetune_config.get_config("busbra,variant=tiny").model.variant == "tiny"
    with pytest.raises(ValueError, match="runlocal sets its own model size and duration; drop epochs=3"):
        finetune_config.get_config("busbra,epochs=3,runlocal")


def test_small_data_recipe_values_and_the_reference_default():
    reference, small = finetune_config.get_config("busi"), finetune_config.get_config("busi,recipe=small_data")
    assert reference.select_metric == "f1_macro" and reference.optimizer.lr is None
    assert reference.class_balance == "none" and reference.optimizer.scratch_layer_decay is None
    assert (small.batch_size, small.optimizer.lr, small.optimizer.scratch_layer_decay) == (32, 5e-4, 1.0)
    assert (small.class_balance, small.select_metric, small.total_epochs) == ("loss", "f1_macro_guarded", 100.0)
    linear = finetune_config.get_config("busi,recipe=small_data,mode=linear")
    assert linear.optimizer.name == "lars" and linear.select_metric == "f1_macro"  # the probe keeps its recipe
    with pytest.raises(ValueError, match="unknown recipe 'fast'"):
        finetune_config.get_config("busi,recipe=fast")


def test_guarded_selection_ranks_a_single_class_state_last_and_scratch_has_its_own_layer_decay(bench, monkeypatch):
    import jax

    config = local_config(bench, "busbra,runlocal,recipe=small_data")
    task = registry.create(config)
    task.prepare(jax.make_mesh((1, 1), ("data", "fsdp"), devices=jax.devices()[:1]), "")
    assert task.select_metric == "f1_macro_guarded" and task.decay == 1.0  # no init: scratch_layer_decay
    labels = task.data.splits["validation"].labels
    collapsed = np.eye(2)[np.zeros_like(labels)]
    monkeypatch.setattr(task, "probabilities", lambda variables, split: collapsed)
    one_class = task.evaluate({}, 1)
    assert one_class["predicted_classes"] == 1
    assert one_class["f1_macro_guarded"] == pytest.approx(one_class["f1_macro"] - 1.0)
    alternating = np.eye(2)[np.arange(len(labels)) % 2]  # both classes predicted, right or wrong
    monkeypatch.setattr(task, "probabilities", lambda variables, split: alternating)
    two_classes = task.evaluate({}, 2)
    assert two_classes["predicted_classes"] == 2 and two_classes["f1_macro_guarded"] == two_classes["f1_macro"]
    assert two_classes["f1_macro_guarded"] > one_class["f1_macro_guarded"]
    assert len(labels) >= 2
    task.close()
    reference = registry.create(local_config(bench, "busbra,runlocal"))
    reference.prepare(jax.make_mesh((1, 1), ("data", "fsdp"), devices=jax.devices()[:1]), "")
    assert reference.decay == 0.65 and reference.select_metric == "f1_macro"
    reference.close()


def test_layer_decay_default_follows_model_width():
    from usf_mae_jax.models import vit

    opt = finetune_config.get_config("busbra").optimizer
    assert initialization.layer_decay_for(opt, vit.model_config("base")) == 0.65
    assert initialization.layer_decay_for(opt, vit.model_config("large")) == 0.75
    opt.layer_decay = 0.5
    assert initialization.layer_decay_for(opt, vit.model_config("large")) == 0.5


# ------------------------------------------------------------------------------------------ loss, mixing


def test_weighted_cross_entropy_matches_torch():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 3)).astype(np.float32)
    labels = np.array([0, 1, 2, 2, 1, 2])
    weights = downstream.class_loss_weights(np.array([0, 0, 0, 1, 2, 2]), 3)
    np.testing.assert_allclose(weights, [6 / 9, 2.0, 1.0], rtol=1e-6)  # N / (C * n_c)
    hard = finetune.soft_targets(jnp.asarray(labels), 3, 0.0)
    ours = finetune.weighted_cross_entropy(jnp.asarray(logits), hard, jnp.asarray(weights))
    torch_logits, torch_labels = torch.tensor(logits), torch.tensor(labels)
    theirs = torch.nn.CrossEntropyLoss(weight=torch.tensor(weights))(torch_logits, torch_labels)
    np.testing.assert_allclose(float(ours), float(theirs), rtol=1e-5)
    soft = finetune.soft_targets(jnp.asarray(labels), 3, 0.1)
    smoothed = finetune.weighted_cross_entropy(jnp.asarray(logits), soft, jnp.ones(3))
    reference = torch.nn.CrossEntropyLoss(label_smoothing=0.1)(torch_logits, torch_labels)
    np.testing.assert_allclose(float(smoothed), float(reference), rtol=1e-5)


def test_mixing_is_off_by_default_and_convex_when_on():
    config = finetune_config.get_config("busbra")
    images = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
    targets = finetune.soft_targets(jnp.array([0, 0, 1, 1]), 2, 0.0)  # each row's partner has the other label
    same_images, same_targets = finetune.mix_batch(images, targets, jax.random.key(1), config.mixup)
    assert same_images is images and same_targets is targets
    def mixed_with(mix_cfg, seed):  # one compiled call: far cheaper than op-by-op dispatch on CPU
        return jax.jit(lambda x, t: finetune.mix_batch(x, t, jax.random.key(seed), mix_cfg))(images, targets)

    config.mixup.mixup_alpha = 0.8
    mixed, mixed_targets = mixed_with(config.mixup, 1)
    lam = float(mixed_targets[0, 0])
    assert 0.0 < lam < 1.0
    np.testing.assert_allclose(mixed, lam * images + (1 - lam) * images[::-1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mixed_targets.sum(-1), 1.0, rtol=1e-6)
    config.mixup.update(mixup_alpha=0.0, cutmix_alpha=1.0)
    cut, cut_targets = mixed_with(config.mixup, 2)
    pasted = np.asarray(jnp.any(cut != images, axis=(0, 3)))  # pixels taken from the partner
    assert 0.0 < pasted.mean() < 1.0
    np.testing.assert_allclose(float(cut_targets[0, 0]), 1 - pasted.mean(), rtol=1e-6)


def test_epoch_indices_are_seeded_and_balanced_sampling_equalises_classes():
    first = downstream.epoch_indices(10, 3, 4, seed=0, epoch=2)
    np.testing.assert_array_equal(first, downstream.epoch_indices(10, 3, 4, seed=0, epoch=2))
    assert not np.array_equal(first, downstream.epoch_indices(10, 3, 4, seed=0, epoch=3))
    assert len(set(first.reshape(-1)[:10].tolist())) == 10  # a permutation first
    labels = np.array([0] * 90 + [1] * 10)
    probs = downstream.class_probabilities(labels, 2)
    np.testing.assert_allclose([probs[labels == 0].sum(), probs[labels == 1].sum()], [0.5, 0.5])
    drawn = downstream.epoch_indices(100, 50, 40, 0, 0, probs)
    assert 0.45 < labels[drawn].mean() < 0.55


# ------------------------------------------------------------------------------------------- end to end


def test_runlocal_writes_results_membership_and_a_reusable_checkpoint(bench, tmp_path):
    workdir = str(tmp_path / "run")
    summary = run(local_config(bench), workdir)
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    assert list(results) == list(metrics.RESULT_KEYS)
    assert results["split"] == "busbra/folddefault/test" and os.path.isfile(f"{workdir}/confusion_matrix.png")
    with open(os.path.join(workdir, "splits.json")) as f:
        splits = json.load(f)
    for split in ("train", "validation", "test"):
        assert splits[split]["ids"] == load_split(bench, "busbra", split, fold=1).ids
    assert results["n_test"] == len(splits["test"]["ids"])
    assert not set(splits["test"]["ids"]) & set(splits["train"]["ids"])
    with open(os.path.join(workdir, "provenance.json")) as f:
        assert json.load(f) == {"init": None, "kind": "random", "pretraining_manifests": []}
    assert results["f1_binary"] is not None  # two classes: the positive-class F1 is reported too
    assert summary["final_step"] == len(splits["train"]["ids"]) // 8  # one epoch of batch 8
    params, fields = checkpoint.load_params(workdir)  # the best state, usable as an init
    assert fields["width"] == 32 and params["pos_embed"].shape == (1 + 16, 32) and "head" in params
    before = read_text(os.path.join(workdir, "results.json"))
    again = run(local_config(bench), workdir)  # a finished run: nothing is trained or overwritten
    assert again["start_step"] == again["final_step"]
    assert read_text(os.path.join(workdir, "results.json")) == before


def test_bad_data_dir_and_fold_fail_clearly(bench, tmp_path):
    with pytest.raises(ValueError, match=r"input\.data_dir is empty"):
        run(local_config(""), str(tmp_path / "a"))
    with pytest.raises(FileNotFoundError, match="no converted mmotu"):
        run(local_config(bench, "mmotu,runlocal"), str(tmp_path / "b"))
    with pytest.raises(ValueError, match="has no fold 9"):
        run(local_config(bench, fold=9), str(tmp_path / "c"))


def test_init_from_pretraining_workdir_resizes_the_position_table(bench, tmp_path):
    pre = str(tmp_path / "pretrain")
    run(pretrain_config.get_config("demo,runlocal"), pre)  # mu, 32 px, patch 8, 4 steps
    pretrained, _ = checkpoint.load_params(pre)
    workdir = str(tmp_path / "ft")
    config = local_config(bench, init=pre, model__img_size=48, total_epochs=None, total_steps=1)
    config.model.depth = None  # the architecture comes from the init
    run(config, workdir)
    with open(os.path.join(workdir, "provenance.json")) as f:
        provenance = json.load(f)
    assert provenance["kind"] == "workdir" and provenance["init"] == os.path.abspath(pre)
    assert provenance["checkpoint_step"] == 4  # the pretraining step the init was read at
    assert provenance["pretraining_config"]["input_source"] == "synthetic"
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["resolved_model"]["img_size"] == 48
    tuned, _ = checkpoint.load_params(workdir)
    assert tuned["pos_embed"].shape == (1 + 36, 32)  # 6x6 grid at 48 px, learned
    expected = pos_embed.resize_patch_table(pos_embed.sincos_2d(32, 4), (6, 6))
    # one step at warmup lr 0 (warmup_steps=1) leaves every weight at its initial value
    np.testing.assert_allclose(tuned["pos_embed"], expected, atol=1e-6)
    np.testing.assert_allclose(tuned["blocks_0"]["attn"]["qkv"]["kernel"],
                               pretrained["blocks_0"]["attn"]["qkv"]["kernel"], atol=1e-7)


def test_init_from_pth_loads_the_reference_weights(bench, tmp_path):
    from usf_mae_jax.torch_reference import build_reference_mae

    torch.manual_seed(0)
    reference = build_reference_mae(img_size=32, patch_size=8, in_chans=3, width=32, depth=1, heads=2,
                                    decoder_width=32, decoder_depth=1, decoder_heads=2, norm_pix_loss=False)
    path = str(tmp_path / "mae.pth")
    torch.save({"model": reference.state_dict()}, path)
    workdir = str(tmp_path / "ft")
    config = local_config(bench, init=path, total_epochs=None, total_steps=1)
    config.model.depth = None
    run(config, workdir)
    with open(os.path.join(workdir, "provenance.json")) as f:
        provenance = json.load(f)
    assert provenance["kind"] == "torch_file" and len(provenance["sha256"]) == 64
    tuned, fields = checkpoint.load_params(workdir)
    assert fields["depth"] == 1
    weight = reference.state_dict()["patch_embed.proj.weight"].numpy()
    kernel = tuned["patch_embed"]["proj"]["kernel"]
    np.testing.assert_allclose(kernel, weight.transpose(2, 3, 1, 0), atol=1e-7)


def test_architecture_conflict_with_init_is_an_error(bench, tmp_path):
    from usf_mae_jax.torch_reference import build_reference_mae

    reference = build_reference_mae(img_size=32, patch_size=8, in_chans=3, width=32, depth=1, heads=2,
                                    decoder_width=32, decoder_depth=1, decoder_heads=2, norm_pix_loss=False)
    path = str(tmp_path / "mae.pth")
    torch.save({"model": reference.state_dict()}, path)
    config = local_config(bench, init=path)  # runlocal sets depth=2, the checkpoint has 1
    with pytest.raises(ValueError, match=r"another architecture.*'depth': \(2, 1\)"):
        run(config, str(tmp_path / "ft"))


def test_linear_probe_runlocal_caches_features(bench, tmp_path):
    workdir = str(tmp_path / "lin")
    summary = run(local_config(bench, "busbra,mode=linear,runlocal"), workdir)
    cached = np.load(os.path.join(workdir, "features.npz"))
    test_ids = load_split(bench, "busbra", "test", fold=1).ids
    assert cached["test_features"].shape == (len(test_ids), 32)
    assert cached["test_ids"].tolist() == test_ids
    assert summary["results"]["n_test"] == len(test_ids)
    with open(os.path.join(workdir, "results.json")) as f:
        assert set(json.load(f)) == set(metrics.RESULT_KEYS)


# ----------------------------------------------------------------------------------- kill -9 and resume

KILLER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kill_at_step.py")
ROOT = os.path.dirname(os.path.dirname(KILLER))


@pytest.mark.parametrize("mode", ["full", "linear"])
def test_kill_9_at_60_percent_resumes_and_ends_equal(bench, tmp_path, mode):
    """kill -9 after step 6 of 10, then the same command again: it resumes (does not start over) and ends
    with the params and results.json of an uninterrupted run (the probe reuses its cached features)."""
    from conftest import CACHE_DIR

    overrides = {"total_steps": 10, "ckpt_steps": 2, "eval_steps": 2, "batch_size": 4, "eval_batch_size": 8}
    reference = local_config(bench, f"busbra,mode={mode},runlocal", total_epochs=None, eval_epochs=None,
                             **overrides)
    run(reference, str(tmp_path / "reference"))
    workdir = str(tmp_path / "killed")
    args = [f"--config=configs/finetune.py:busbra,mode={mode},runlocal", f"--workdir={workdir}",
            f"--config.input.data_dir={bench}", *(f"--config.{k}={v}" for k, v in overrides.items())]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": CACHE_DIR, "USF_MAE_HOST_HUGEPAGES": "0"}
    killed = subprocess.run([sys.executable, KILLER, "6", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not os.path.exists(os.path.join(workdir, "results.json"))
    assert 2 <= max(checkpoint.workdir_steps(workdir)) <= 6  # asynchronous saves: the newest may be in flight
    rerun = subprocess.run([sys.executable, "launch.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from step" in rerun.stderr
    if mode == "linear":
        assert "features read from" in rerun.stderr
    for name in ("results.json", "splits.json"):
        with open(os.path.join(workdir, name)) as a, open(os.path.join(tmp_path / "reference", name)) as b:
            assert json.load(a) == json.load(b), name
    ours, _ = checkpoint.read_workdir_params(workdir, step=10)
    theirs, _ = checkpoint.read_workdir_params(str(tmp_path / "reference"), step=10)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(ours)[0], jax.tree.leaves(theirs)):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def test_a_short_fine_tune_with_the_preset_cadence_resumes_after_kill_9(bench, tmp_path):
    """The preset checkpoints every 200 steps; a 150-step fine-tune still saves every 15 (a tenth of the run), so a
    kill -9 at step 90 (60%) resumes from a checkpoint near it, not from step 0, and ends with the results of an
    uninterrupted run. Before the tenth rule this run had no checkpoint until it ended."""
    from conftest import CACHE_DIR

    assert finetune_config.get_config("busbra").ckpt_steps == 200
    overrides = {"total_steps": 150, "eval_steps": 15, "batch_size": 4, "eval_batch_size": 8, "log_steps": 10}
    reference = local_config(bench, "busbra,runlocal", total_epochs=None, eval_epochs=None, ckpt_steps=200,
                             **overrides)
    run(reference, str(tmp_path / "reference"))
    workdir = str(tmp_path / "killed")
    args = ["--config=configs/finetune.py:busbra,runlocal", f"--workdir={workdir}", f"--config.input.data_dir={bench}",
            "--config.ckpt_steps=200", *(f"--config.{k}={v}" for k, v in overrides.items())]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": CACHE_DIR, "USF_MAE_HOST_HUGEPAGES": "0"}
    killed = subprocess.run([sys.executable, KILLER, "90", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    # Saves every 15 steps; asynchronous, so the newest (75, even 90) may still have been in flight.
    newest = max(checkpoint.workdir_steps(workdir))
    assert newest in (45, 60, 75, 90), checkpoint.workdir_steps(workdir)
    rerun = subprocess.run([sys.executable, "launch.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from step {newest}" in rerun.stderr
    with open(os.path.join(workdir, "results.json")) as a, open(tmp_path / "reference" / "results.json") as b:
        assert json.load(a) == json.load(b)


# ------------------------------------------------------------------------------------- learning (slow)

# Budget for the learning smoke tests, on the 2 shared CPU cores this project is developed on (load average
# 2.7-4.6 while measuring): the full fine-tune of a 4-block, 64-wide ViT from scratch on ~900 synthetic images
# at 64 px (45 epochs, 405 steps of 64) took 230-300 s and reached test macro-F1 0.952; the linear probe on
# its frozen encoder took 7-9 s and reached 0.964. The asserts leave room for a more loaded machine.
FULL_BUDGET_S = 900
LINEAR_BUDGET_S = 180
SMOKE_MODEL = dict(variant="mu", img_size=64, patch_size=8, width=64, heads=4, depth=4, global_pool=False,
                   drop_path=0.0)


@pytest.fixture(scope="module")
def lesion_bench(tmp_path_factory):
    """600 patients (~900 images) at 64 px: lesions are a few patches wide, as at 224 px in real data."""
    return converted_busbra(tmp_path_factory.mktemp("lesions"), patients=600, size=64, seed=0)


@pytest.fixture(scope="module")
def full_run(lesion_bench, tmp_path_factory):
    config = finetune_config.get_config("busbra,mode=full,fold=1,epochs=45")
    config.input.data_dir = lesion_bench
    config.model.update(SMOKE_MODEL)
    config.input.update(augment="flip_crop", crop_scale_min=0.8)
    config.optimizer.update(lr=2e-3, layer_decay=1.0)  # from scratch: no pretrained lower layers to protect
    config.update(batch_size=64, eval_batch_size=128, warmup_epochs=3.0, class_balance="loss", log_steps=50)
    workdir = str(tmp_path_factory.mktemp("full") / "run")
    started = time.perf_counter()
    summary = run(config, workdir)
    return workdir, summary, time.perf_counter() - started


@pytest.mark.slow
def test_full_finetune_from_scratch_learns_the_lesions(full_run):
    workdir, summary, seconds = full_run
    print(f"full fine-tune: test macro-F1 {summary['results']['f1_macro']:.3f}, {seconds:.0f} s wall, "
          f"{summary['images_per_s']:.0f} training images/s")
    assert seconds < FULL_BUDGET_S
    assert summary["results"]["f1_macro"] >= 0.9
    with open(os.path.join(workdir, "history.json")) as f:
        history = json.load(f)
    assert history["best"]["value"] == max(e["f1_macro"] for e in history["evaluations"])


@pytest.mark.slow
def test_linear_probe_on_the_finetuned_encoder(full_run, lesion_bench, tmp_path):
    """The probe trains only BN + Linear on frozen cached features; its init is the fine-tune workdir."""
    full_workdir, _, _ = full_run
    config = finetune_config.get_config("busbra,mode=linear,fold=1")
    config.update(init=full_workdir, eval_batch_size=128)
    config.input.data_dir = lesion_bench
    config.model.update(img_size=64, global_pool=False)
    # LARS moves a weight by about lr * 0.001 * |w| per step (trust ratio), so the reference lr (blr 0.1 at
    # batch 16384 -> 6.4) needs its thousands of steps; a ~600-image train split gives 3 steps per epoch.
    config.optimizer.lr = 50.0
    started = time.perf_counter()
    summary = run(config, str(tmp_path / "lin"))
    seconds = time.perf_counter() - started
    with open(str(tmp_path / "lin" / "config.json")) as f:
        rate = json.load(f)["resolved_plan"]["feature_images_per_s"]
    print(f"linear probe: test macro-F1 {summary['results']['f1_macro']:.3f}, {seconds:.0f} s wall, "
          f"features at {rate:.0f} images/s")
    assert seconds < LINEAR_BUDGET_S
    assert summary["results"]["f1_macro"] >= 0.9
    tuned, _ = checkpoint.load_params(full_workdir)
    cached = np.load(str(tmp_path / "lin" / "features.npz"))
    assert cached["train_features"].shape[1] == tuned["norm"]["scale"].shape[0] == 64
