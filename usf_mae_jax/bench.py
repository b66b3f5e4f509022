"""Train-step throughput benchmark (not a test): images/s, step time, FLOPs per image and MFU.

    python -m usf_mae_jax.bench --config=configs/pretrain.py:usf_mae --variant tiny --batch_size 32 \
        --steps 10 --dtype float32 [--torch] [--rounds 3] [--profile DIR] [--fsdp N]

It times the full jitted train step (forward, backward, AdamW update, donated state) on random uint8 batches
after compiling and warming up, over all local devices (data parallel, or FSDP with --fsdp), and reports the
median over `--rounds` rounds of `--steps` steps. FLOPs come from XLA's cost analysis of the compiled step. MFU
is reported against the device's peak dense bf16 FLOP/s from PEAK_BF16_TFLOPS. `--torch` also times the
plain-PyTorch reference MAE (usf_mae_jax/torch_reference.py, same architecture, torch.optim.AdamW) in a worker
process (`usf_mae_jax/torch_bench.py`), the two taking turns in every round; `jax_over_torch` is the median of
the per-round speed ratios.

Run as a module, it first re-executes itself with glibc's transparent-huge-page tunable where that helps
(`usf_mae_jax/host_memory.py`; the `host_malloc=` line says what applied). The torch worker inherits the same
environment; the setting does not change the torch step's speed (it reuses its memory).

The last line is machine-parseable: `images_per_s=<float>`.
"""

from __future__ import annotations

import time

import jax
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from usf_mae_jax import host_memory
from usf_mae_jax.core import sharding
from usf_mae_jax.models import vit
from usf_mae_jax.torch_bench import TorchProcess, minor_faults
from usf_mae_jax.trainers import loop
from usf_mae_jax.trainers.pretrain import PretrainTask

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
flags.DEFINE_integer("steps", 10, "Timed steps per round.")
flags.DEFINE_integer("warmup", 2, "Untimed steps after compiling.")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype (default: the config's).")
flags.DEFINE_string("attention", None, "Attention implementation: xla or cudnn.")
flags.DEFINE_integer("fsdp", 1, "Size of the fsdp mesh axis (the rest is data parallel).")
flags.DEFINE_bool("torch", False, "Also time the PyTorch reference MAE (CPU) in the same run.")
flags.DEFINE_integer("torch_steps", 0, "Timed torch steps per round (default: --steps).")
flags.DEFINE_integer("rounds", 3, "Timing rounds; with --torch the two frameworks take turns in each round.")
flags.DEFINE_string("profile", None, "Write a jax.profiler trace of 3 steps to this directory.")
FLAGS = flags.FLAGS


def peak_tflops(device) -> float | None:
    kind = getattr(device, "device_kind", "")
    for name in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if name.lower() in kind.lower():
            return PEAK_BF16_TFLOPS[name]
    return None


class JaxStep:
    """The compiled, donated train step on random uint8 batches, ready to be timed in rounds."""

    def __init__(self, config: ml_collections.ConfigDict, batch_size: int, fsdp: int):
        config = bench_config(config, batch_size, fsdp)
        model_config = vit.config_from_block(config.model)
        self.mesh = sharding.make_mesh(config.mesh)
        task = PretrainTask(config)
        task.prepare(self.mesh, "")
        setup = loop.build(config, task, self.mesh)  # the training loop's own step, guard included
        self.state = setup.init()
        images = np.random.default_rng(0).integers(
            0, 256, (batch_size, model_config.img_size, model_config.img_size, model_config.in_chans), np.uint8)
        self.batch = {"image": jax.device_put(images, sharding.batch_sharding(self.mesh))}
        start = time.perf_counter()
        self.compiled = setup.train_step.lower(self.state, self.batch).compile()
        self.compile_s = time.perf_counter() - start
        self.metrics = None

    def run(self, steps: int) -> tuple[float, float | None]:
        """Runs `steps` steps; returns (wall seconds, minor page faults), waiting for the device at the end only."""
        before = minor_faults()
        start = time.perf_counter()
        for _ in range(steps):
            self.state, self.metrics = self.compiled(self.state, self.batch)
        jax.block_until_ready((self.state, self.metrics))
        seconds = time.perf_counter() - start
        return seconds, None if before is None else minor_faults() - before

    def describe(self, batch_size: int) -> dict:
        devices = self.mesh.devices.size
        result = {"compile_s": self.compile_s, "devices": devices, "loss": float(self.metrics["loss"]),
                  "params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.state["params"]))}
        cost = self.compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        flops_per_device = float(cost.get("flops", 0.0)) if cost else 0.0
        if flops_per_device:
            result["model_flops_per_image"] = flops_per_device * devices / batch_size
        memory = self.compiled.memory_analysis()
        if memory is not None:
            result["temp_mib_per_device"] = getattr(memory, "temp_size_in_bytes", 0) / 2**20
            result["argument_mib_per_device"] = getattr(memory, "argument_size_in_bytes", 0) / 2**20
        return result

    def profile(self, directory: str) -> None:
        with jax.profiler.trace(directory):
            self.run(3)


def bench_config(config: ml_collections.ConfigDict, batch_size: int, fsdp: int) -> ml_collections.ConfigDict:
    """The pretraining config with the data, duration and mesh of a benchmark: the step is what a run
    compiles, with the lr schedule mid-warmup (random uint8 batches stand in for the data)."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.input.update(source="synthetic", synthetic_count=batch_size * 10_000)
        for field in ("total_epochs", "warmup_epochs", "warmup_fraction"):
            config[field] = None
        config.update(total_steps=10_000, warmup_steps=100, batch_size=batch_size, grad_accum_steps=1,
                      init=None, preset="bench")
        config.optimizer.lr = 1e-4
        config.mesh.update(data=-1, fsdp=fsdp)
    return config


def timed_rounds(runners: dict, steps: dict, rounds: int, warmup: int) -> tuple[dict, dict]:
    """Seconds per step for each runner, `rounds` times, the runners taking turns within each round.

    Taking turns puts both frameworks under the same background load: on a shared 2-core VM the speed drifts
    by 10-20% over a minute, which would bias two back-to-back measurements but cancels in the per-round ratio.
    Also returns each runner's minor page faults per timed step (None where getrusage is unavailable).
    """
    for runner in runners.values():
        runner.run(warmup)
    per_step = {name: [] for name in runners}
    faults = {name: 0.0 for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            seconds, count = runner.run(steps[name])
            per_step[name].append(seconds / steps[name])
            faults[name] = None if count is None or faults[name] is None else \
                faults[name] + count / (steps[name] * rounds)
    return per_step, faults


def bench(config: ml_collections.ConfigDict, batch_size: int, steps: int, warmup: int, fsdp: int, rounds: int,
          with_torch: bool, torch_steps: int, profile_dir: str | None) -> dict:
    """Compiles, warms up and times the JAX step (and the torch reference), returning the printed figures."""
    jax_step = JaxStep(config, batch_size, fsdp)
    runners, counts = {"jax": jax_step}, {"jax": steps}
    if with_torch:
        runners["torch"] = TorchProcess(vit.config_from_block(config.model), config.optimizer, batch_size,
                                        config.model.mask_ratio)
        counts["torch"] = torch_steps or steps
    try:
        per_step, faults = timed_rounds(runners, counts, rounds, warmup)
    finally:
        if with_torch:
            runners["torch"].close()
    result = jax_step.describe(batch_size)
    step_s = float(np.median(per_step["jax"]))
    result.update(step_ms=1000 * step_s, images_per_s=batch_size / step_s)
    result["images_per_s_per_device"] = result["images_per_s"] / result["devices"]
    peak = peak_tflops(jax.devices()[0])
    if peak and "model_flops_per_image" in result:
        result["mfu"] = result["model_flops_per_image"] * result["images_per_s"] / (peak * 1e12 * result["devices"])
    if with_torch:
        torch_s = float(np.median(per_step["torch"]))
        ratios = [t / j for j, t in zip(per_step["jax"], per_step["torch"])]
        result.update(torch_step_ms=1000 * torch_s, torch_images_per_s=batch_size / torch_s,
                      torch_threads=runners["torch"].threads,
                      jax_over_torch_per_round=" ".join(f"{r:.3f}" for r in ratios),
                      jax_over_torch=float(np.median(ratios)))
    for name, count in faults.items():
        if count is not None:
            result[f"{name}_minor_page_faults_per_step" if name != "jax" else "minor_page_faults_per_step"] = count
    result["host_malloc"] = host_memory.status()
    if profile_dir:
        jax_step.profile(profile_dir)
    return result


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
    model_config = vit.config_from_block(config.model)
    device = jax.devices()[0]
    print(f"device={device.platform}:{device.device_kind} devices={jax.device_count()} variant={config.model.variant} "
          f"img_size={model_config.img_size} batch_size={FLAGS.batch_size} dtype={model_config.dtype}", flush=True)
    result = bench(config, FLAGS.batch_size, FLAGS.steps, FLAGS.warmup, FLAGS.fsdp, FLAGS.rounds, FLAGS.torch,
                   FLAGS.torch_steps, FLAGS.profile)
    for key, value in result.items():
        print(f"{key}={value:.6g}" if isinstance(value, float) else f"{key}={value}")
    print(f"images_per_s={result['images_per_s']:.3f}")


if __name__ == "__main__":
    host_memory.reexec_with_huge_page_malloc()
    app.run(main)
