"""Train-step throughput benchmark (not a test): images/s, step time, FLOPs per image and MFU.

    python -m usf_mae_jax.bench --config=configs/pretrain.py:usf_mae --variant tiny --batch_size 32 \
        --steps 10 --dtype float32 [--torch] [--profile DIR] [--fsdp N]

It times the full jitted train step (forward, backward, AdamW update, donated state) on random uint8 batches
after compiling and warming up, over all local devices (data parallel, or FSDP with --fsdp). FLOPs come from
XLA's cost analysis of the compiled step. MFU is reported against the device's peak dense bf16 FLOP/s from
PEAK_BF16_TFLOPS. `--torch` also times the plain-PyTorch reference MAE (tests/torch_reference.py, same
architecture, torch.optim.AdamW) in the same process, for a same-run CPU comparison.

The last line is machine-parseable: `images_per_s=<float>`.
"""

from __future__ import annotations

import os
import sys
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from usf_mae_jax.train import sharding
from usf_mae_jax.train.state import build_model_config, create_train_setup

# Peak dense bf16 matrix throughput per chip, TFLOP/s, from the vendors' data sheets: NVIDIA H100 SXM5 and H200
# (989.4 without sparsity), H100 PCIe (756), A100 (312), L4 (121), V100 (125, fp16 tensor cores); Google Cloud
# TPU v4 (275), v5e (197), v5p (459), v6e / Trillium (918).
PEAK_BF16_TFLOPS = {
    "H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0, "L4": 121.0, "V100": 125.0,
    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0, "TPU v6": 918.0,
}

config_flags.DEFINE_config_file("config", "configs/pretrain.py:usf_mae", "Pretraining config.", lock_config=True)
flags.DEFINE_string("variant", None, "Model size preset (mu, tiny, small, base, large, huge).")
flags.DEFINE_integer("batch_size", 32, "Global batch size.")
flags.DEFINE_integer("img_size", None, "Image size (default: the config's).")
flags.DEFINE_integer("steps", 10, "Timed steps.")
flags.DEFINE_integer("warmup", 2, "Untimed steps after compiling.")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype (default: the config's).")
flags.DEFINE_string("attention", None, "Attention implementation: xla or cudnn.")
flags.DEFINE_integer("fsdp", 1, "Size of the fsdp mesh axis (the rest is data parallel).")
flags.DEFINE_bool("torch", False, "Also time the PyTorch reference MAE (CPU) in the same run.")
flags.DEFINE_integer("torch_steps", 0, "Timed torch steps (default: --steps).")
flags.DEFINE_string("profile", None, "Write a jax.profiler trace of 3 steps to this directory.")
FLAGS = flags.FLAGS


def peak_tflops(device) -> float | None:
    kind = getattr(device, "device_kind", "")
    for name in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if name.lower() in kind.lower():
            return PEAK_BF16_TFLOPS[name]
    return None


def bench_jax(config: ml_collections.ConfigDict, batch_size: int, steps: int, warmup: int, fsdp: int,
              profile_dir: str | None) -> dict:
    model_config = build_model_config(config.model)
    mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": fsdp}))
    setup = create_train_setup(model_config, config.optimizer, mesh, seed=0, mask_ratio=config.model.mask_ratio,
                               peak_lr=1e-4, total_updates=10_000, warmup_updates=100,
                               fsdp_min_size=config.mesh.fsdp_min_size)
    state = setup.init()
    images = np.random.default_rng(0).integers(0, 256, (batch_size, model_config.img_size, model_config.img_size,
                                                        model_config.in_chans), dtype=np.uint8)
    batch = {"image": jax.device_put(images, sharding.batch_sharding(mesh))}
    start = time.perf_counter()
    compiled = setup.train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops_per_device = float(cost.get("flops", 0.0)) if cost else 0.0
    memory = compiled.memory_analysis()
    for _ in range(warmup):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    elapsed = time.perf_counter() - start
    if profile_dir:
        with jax.profiler.trace(profile_dir):
            for _ in range(3):
                state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
    devices = mesh.devices.size
    result = {"compile_s": compile_s, "step_ms": 1000 * elapsed / steps, "images_per_s": steps * batch_size / elapsed,
              "devices": devices, "loss": float(metrics["loss"]),
              "params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))}
    result["images_per_s_per_device"] = result["images_per_s"] / devices
    if flops_per_device:
        result["model_flops_per_image"] = flops_per_device * devices / batch_size
        peak = peak_tflops(jax.devices()[0])
        if peak:
            result["mfu"] = result["model_flops_per_image"] * result["images_per_s"] / (peak * 1e12 * devices)
    if memory is not None:
        result["temp_mib_per_device"] = getattr(memory, "temp_size_in_bytes", 0) / 2**20
        result["argument_mib_per_device"] = getattr(memory, "argument_size_in_bytes", 0) / 2**20
    return result


def bench_torch(model_config, opt_cfg, batch_size: int, steps: int, warmup: int) -> dict:
    """The reference MAE in plain PyTorch: forward, backward and torch.optim.AdamW, on CPU."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    try:
        import torch
        from torch_reference import build_reference_mae
    except ImportError as err:
        raise SystemExit(f"--torch needs the test requirements (torch) and tests/torch_reference.py: {err}") from err
    torch.manual_seed(0)
    c = model_config
    model = build_reference_mae(c.img_size, c.patch_size, c.in_chans, c.width, c.depth, c.heads, c.decoder_width,
                                c.decoder_depth, c.decoder_heads, c.mlp_ratio, c.norm_pix_loss)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(opt_cfg.b1, opt_cfg.b2),
                                  weight_decay=opt_cfg.weight_decay)
    images = torch.randn(batch_size, c.in_chans, c.img_size, c.img_size)

    def step():
        loss, _, _ = model(images, 0.75)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    elapsed = time.perf_counter() - start
    return {"torch_step_ms": 1000 * elapsed / steps, "torch_images_per_s": steps * batch_size / elapsed,
            "torch_threads": torch.get_num_threads()}


def main(argv):
    del argv
    config = FLAGS.config
    with config.unlocked():
        if FLAGS.variant:
            config.model.variant = FLAGS.variant
            for field in ("patch_size", "width", "depth", "heads", "decoder_width", "decoder_depth", "decoder_heads"):
                config.model[field] = None
        if FLAGS.img_size:
            config.model.img_size = FLAGS.img_size
        if FLAGS.dtype:
            config.model.dtype = FLAGS.dtype
        if FLAGS.attention:
            config.model.attention = FLAGS.attention
    model_config = build_model_config(config.model)
    device = jax.devices()[0]
    print(f"device={device.platform}:{device.device_kind} devices={jax.device_count()} variant={config.model.variant} "
          f"img_size={model_config.img_size} batch_size={FLAGS.batch_size} dtype={model_config.dtype}", flush=True)
    result = bench_jax(config, FLAGS.batch_size, FLAGS.steps, FLAGS.warmup, FLAGS.fsdp, FLAGS.profile)
    if FLAGS.torch:
        result.update(bench_torch(model_config, config.optimizer, FLAGS.batch_size,
                                  FLAGS.torch_steps or FLAGS.steps, FLAGS.warmup))
        result["jax_over_torch"] = result["images_per_s"] / result["torch_images_per_s"]
    for key, value in result.items():
        print(f"{key}={value:.6g}" if isinstance(value, float) else f"{key}={value}")
    print(f"images_per_s={result['images_per_s']:.3f}")


if __name__ == "__main__":
    app.run(main)
