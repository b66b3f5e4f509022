"""Pretraining as a task of the loop: sharded steps, presets, the demo, init, and errors raised before compiling.

The loop's own guarantees (resume after a crash, SIGTERM, the non-finite guard, best-state selection) are
tested once, with a toy task, in test_loop.py; kill -9 and SIGTERM of a real pretraining process are in
test_distributed.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import assert_trees_equal, pretrain_setup, set_fields

from configs import pretrain as pretrain_configs
from usf_mae_jax.cli import ConfigError
from usf_mae_jax.core import checkpoint, sharding
from usf_mae_jax.models import vit
from usf_mae_jax.trainers import loop, pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
    config = pretrain_configs.get_config("demo,runlocal")
    config.total_steps, config.ckpt_steps, config.vis_steps, config.log_steps = 6, 2, 0, 100
    return set_fields(config, overrides)


def params_of(summary):
    return jax.tree.map(np.asarray, summary["state"]["params"])


def train(config, workdir):
    return loop.run(config, workdir, pretrain.PretrainTask(config))


def test_incompatible_workdir_fails_before_compiling(tmp_path):
    workdir = str(tmp_path / "run")
    train(tiny_config(total_steps=2), workdir)
    config_path = tmp_path / "run" / "config.json"
    saved = json.loads(config_path.read_text())
    assert saved["resolved_model"]["width"] == 32 and saved["resolved_plan"]["total_steps"] == 2
    expected = r"blocks_0/attn/qkv/kernel: checkpoint \(32, 96\), config \(64, 192\)"
    with pytest.raises(checkpoint.IncompatibleCheckpointError, match=expected):
        train(tiny_config(**{"model.width": 64}), workdir)
    # The failed attempt did not overwrite the workdir's config.
    assert json.loads(config_path.read_text())["resolved_model"]["width"] == 32


def test_errors_are_clear_and_early(tmp_path):
    with pytest.raises(ValueError, match="img_size 30 is not divisible by patch_size 8"):
        train(tiny_config(**{"model.img_size": 30}), str(tmp_path / "a"))
    with pytest.raises(ValueError, match=r"mask_ratio must lie in the open interval"):
        train(tiny_config(**{"model.mask_ratio": 0.0}), str(tmp_path / "b"))
    with pytest.raises(ConfigError, match="batch_size must be a positive integer, got 0"):
        train(tiny_config(batch_size=0), str(tmp_path / "c"))
    with pytest.raises(ConfigError, match="total_steps must not be negative, got -5"):
        train(tiny_config(total_steps=-5), str(tmp_path / "d"))
    with pytest.raises(ConfigError, match="set only one of total_steps / total_epochs"):
        train(tiny_config(total_epochs=2.0), str(tmp_path / "e"))
    for name in "abcde":
        assert not os.path.exists(tmp_path / name)


@pytest.mark.parametrize("arg", ["demo", "usf_mae", "mae_in1k", "usf_mae,variant=large", "mae_in1k,variant=huge",
                                 "usf_mae,runlocal", "demo,variant=small,img_size=96"])
def test_every_preset_builds(arg):
    config = pretrain_configs.get_config(arg)
    config.lock()
    model_config = vit.config_from_block(config.model)
    _, abstract = pretrain.abstract_mae(model_config)
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
    if "large" in arg:
        assert model_config.width == 1024 and model_config.depth == 24 and count > 300e6
    if "huge" in arg:
        assert model_config.patch_size == 14 and model_config.width == 1280
    if arg.startswith("usf_mae") and "runlocal" not in arg:
        assert config.optimizer.b2 == 0.999 and config.optimizer.wd_mask == "all" and not config.model.norm_pix_loss
    if arg == "mae_in1k":
        assert config.model.norm_pix_loss and config.optimizer.b2 == 0.95 and config.warmup_epochs == 40
    with pytest.raises(AttributeError):
        config.not_a_field = 1


def test_preset_arguments_are_checked():
    with pytest.raises(ValueError, match="unknown config argument 'varient'"):
        pretrain_configs.get_config("demo,varient=tiny")
    with pytest.raises(ValueError, match="unknown pretrain preset"):
        pretrain_configs.get_config("imagenet")
    with pytest.raises(ValueError, match="runlocal sets its own model size and duration; drop variant=base"):
        pretrain_configs.get_config("demo,variant=base,runlocal")


@pytest.mark.slow
def test_demo_runs_and_its_loss_decreases(tmp_path):
    config = pretrain_configs.get_config("demo")
    config.total_steps, config.vis_steps, config.ckpt_steps = 40, 40, 40
    summary = train(config, str(tmp_path))
    losses = summary["losses"]
    assert len(losses) == 40
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses
    assert os.path.exists(tmp_path / "vis" / "step_0000040.png")
    assert any(name.startswith("events") for name in os.listdir(tmp_path / "tensorboard"))


def test_launch_reports_a_mistyped_override_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "launch.py", "--config=configs/pretrain.py:demo,runlocal",
                           "--config.batch_sise=4", f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    assert "bad config" in proc.stderr and "batch_sise" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_eight_device_step_equals_one_device_step(python_runner):
    out = python_runner("""
        import sys; sys.path.insert(0, "tests")
        import jax, numpy as np
        from configs import pretrain as cfgs
        from helpers import pretrain_setup
        from usf_mae_jax.core import sharding
        import ml_collections
        jax.config.update("jax_threefry_partitionable", True)
        config = cfgs.get_config("demo,runlocal")
        config.mesh.fsdp_min_size = 64
        # The key half of the qkv bias has an exactly zero gradient (softmax ignores a per-query constant), so
        # its gradient is float noise that Adam's g / (sqrt(v) + eps) would blow up to full-size steps; a
        # larger eps keeps this a test of sharding, not of dividing noise by noise.
        config.optimizer.eps = 1e-3
        images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 1), dtype=np.uint8)

        def run(data, fsdp, devices):
            mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": data, "fsdp": fsdp}), devices)
            setup = pretrain_setup(config, mesh)
            st = setup.init()
            losses = []
            for _ in range(3):
                batch = {"image": jax.device_put(images, sharding.batch_sharding(mesh))}
                st, metrics = setup.train_step(st, batch)
                losses.append(float(metrics["loss"]))
            specs = {str(s.spec) for s in jax.tree.leaves(jax.tree.map(lambda x: x.sharding, st["params"]))}
            return jax.tree.map(np.asarray, st["params"]), losses, specs

        p1, l1, _ = run(1, 1, jax.devices()[:1])
        p8, l8, _ = run(8, 1, jax.devices())
        pf, lf, specs = run(2, 4, jax.devices())
        assert len(jax.devices()) == 8
        np.testing.assert_allclose(l1, l8, rtol=1e-5); np.testing.assert_allclose(l1, lf, rtol=1e-5)
        for a, b, c in zip(jax.tree.leaves(p1), jax.tree.leaves(p8), jax.tree.leaves(pf)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-6)
        assert any("fsdp" in s for s in specs), specs
        try:
            cfg = cfgs.get_config("demo,runlocal"); cfg.batch_size = 12
            pretrain_setup(cfg, sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1})))
        except ValueError as err:
            print("ERR", err)
        print("LOSSES", l1)
    """, devices=8)
    assert "global batch size 12 is not divisible by the data-parallel size 8" in out
    assert "LOSSES" in out


def test_init_from_a_torch_checkpoint_loads_weights_only(tmp_path):
    """`init` with a reference-format .pth (as USF-MAE continues from ImageNet MAE): every tensor is
    loaded, the optimizer starts fresh at step 0, and an encoder-only file keeps a fresh decoder."""
    torch = pytest.importorskip("torch")
    from usf_mae_jax.interop import torch_mae
    from usf_mae_jax.torch_reference import build_reference_mae

    torch.manual_seed(0)
    reference = build_reference_mae(img_size=32, patch_size=8, in_chans=3, width=32, depth=1, heads=2,
                                    decoder_width=32, decoder_depth=1, decoder_heads=2)
    with torch.no_grad():
        for tensor in reference.parameters():
            if tensor.requires_grad:
                tensor.add_(0.05 * torch.randn_like(tensor))
    state_dict = reference.state_dict()
    full, encoder_only = str(tmp_path / "full.pth"), str(tmp_path / "encoder.pth")
    torch.save({"model": state_dict, "epoch": 99}, full)
    torch.save({"model": {k: v for k, v in state_dict.items() if not k.startswith(("decoder", "mask_token"))}},
               encoder_only)
    expected, _ = torch_mae.torch_to_flax(torch_mae.load_torch_state_dict(full),
                                          torch_mae.infer_model_config(torch_mae.load_torch_state_dict(full)))

    # lr 0: AdamW (decay included) leaves the params where init put them.
    summary = train(tiny_config(init=full, total_steps=1, **{"optimizer.lr": 0.0}), str(tmp_path / "run"))
    assert summary["start_step"] == 0 and summary["final_step"] == 1
    assert_trees_equal(params_of(summary), expected)

    fresh = train(tiny_config(total_steps=1, **{"optimizer.lr": 0.0}), str(tmp_path / "fresh"))
    partial = train(tiny_config(init=encoder_only, total_steps=1, vis_steps=1, **{"optimizer.lr": 0.0}),
                    str(tmp_path / "partial"))
    got = params_of(partial)
    np.testing.assert_array_equal(got["blocks_0"]["attn"]["qkv"]["kernel"],
                                  expected["blocks_0"]["attn"]["qkv"]["kernel"])
    np.testing.assert_array_equal(got["decoder_pred"]["kernel"], params_of(fresh)["decoder_pred"]["kernel"])
    assert os.path.exists(tmp_path / "partial" / "vis" / "step_0000001.png")


def demo_train_setup(**build_options):
    """The demo model's train setup on one device: (setup, model_config)."""
    config = pretrain_configs.get_config("demo,runlocal")
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    return pretrain_setup(config, mesh, **build_options), vit.config_from_block(config.model)


def test_train_step_rejects_images_of_the_wrong_size_while_tracing():
    setup, model_config = demo_train_setup()
    side = model_config.img_size
    wrong = {"image": np.zeros((2, side * 2, side * 2, model_config.in_chans), np.uint8)}
    with pytest.raises(ValueError, match=rf"batch images have shape \(2, {2 * side}, {2 * side}, "
                                         rf"{model_config.in_chans}\) but the "
                                         rf"model takes {side}x{side} images"):
        setup.train_step.lower(setup.abstract_state, wrong)


def test_a_non_finite_step_leaves_params_and_optimizer_state_unchanged():
    setup, model_config = demo_train_setup()
    side = model_config.img_size
    batch = {"image": np.random.default_rng(0).integers(0, 256, (2, side, side, model_config.in_chans), np.uint8)}

    def run(tree):
        new, metrics = setup.train_step(jax.tree.map(jax.numpy.asarray, tree), batch)
        return jax.tree.map(np.asarray, new), metrics

    first, _ = run(setup.init())  # step 0 has a zero learning rate (warmup); step 1 moves the params
    second, metrics = run(first)
    assert not bool(metrics["nonfinite"]) and int(second["step"]) == 2
    assert not np.array_equal(second["params"]["decoder_pred"]["bias"], first["params"]["decoder_pred"]["bias"])

    poisoned = jax.tree.map(np.copy, first)
    poisoned["params"]["decoder_pred"]["bias"][0] = np.nan  # every prediction of patch value 0 becomes NaN
    kept, metrics = run(poisoned)
    assert bool(metrics["nonfinite"]) and not np.isfinite(float(metrics["loss"]))
    assert int(kept["step"]) == 2
    assert_trees_equal(kept["params"], poisoned["params"])
    assert_trees_equal(kept["opt_state"], poisoned["opt_state"])


def test_every_guard_gives_the_same_steps_on_the_cpu():
    """'auto' compiles to the CPU's conditional and is bit-identical to 'cond'. 'select', what GPUs and TPUs run,
    fuses differently, so only float32 rounding differs: the losses agree to 1e-6 and the states to 1e-6.

    The key part of each qkv bias is left out of the comparison: adding a constant to every key of a softmax row
    changes nothing, so its gradient is exactly zero and only rounding noise, which Adam scales up to lr-sized
    steps of arbitrary sign."""
    states, losses = {}, {}
    for guard in loop.GUARDS:
        setup, model_config = demo_train_setup(guard=guard)
        side = model_config.img_size
        state, losses[guard] = setup.init(), []
        for step in range(3):
            images = np.random.default_rng(step).integers(0, 256, (8, side, side, model_config.in_chans), np.uint8)
            state, metrics = setup.train_step(state, {"image": images})
            assert not bool(metrics["nonfinite"])
            losses[guard].append(float(metrics["loss"]))
        states[guard] = jax.tree.map(np.asarray, state)
    assert not np.array_equal(states["cond"]["params"]["decoder_pred"]["bias"], 0.0)
    assert_trees_equal(states["auto"], states["cond"])
    assert losses["auto"] == losses["cond"]
    np.testing.assert_allclose(losses["select"], losses["cond"], rtol=1e-6)
    for (path, got), expected in zip(jax.tree_util.tree_flatten_with_path(states["select"])[0],
                                     jax.tree.leaves(states["cond"])):
        name = jax.tree_util.keystr(path)
        if "['qkv']['bias']" in name:
            width = got.shape[0] // 3
            got, expected = np.delete(got, np.s_[width:2 * width]), np.delete(expected, np.s_[width:2 * width])
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=name)
