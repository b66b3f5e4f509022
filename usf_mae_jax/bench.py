"""Train-step throughput benchmark (not a test): images/s, step time, FLOPs per image and MFU.

    python -m usf_mae_jax.bench                       # on a GPU/TPU: ViT-B/16, bf16, batch 256 per device
    python -m usf_mae_jax.bench --config=configs/pretrain.py:usf_mae --variant tiny --batch_size 32 \
        --steps 10 --dtype float32 [--torch] [--rounds 3] [--profile DIR] [--fsdp N] \
        [--attention auto|custom|xla|cudnn] [--guard auto|cond|select]

It times the full jitted train step (forward, backward, AdamW update, donated state: the training loop's own
step, guard and compile options included) on random uint8 batches after compiling and warming up, over all
local devices (data parallel, or FSDP with --fsdp), and reports the median over `--rounds` rounds of `--steps`
steps. Defaults: on accelerators the target model (ViT-B/16 at 224 px, bf16, 256 images per device); on the
CPU the config's model (the usf_mae preset: ViT-B/16, bf16) at a global batch of 32.

FLOPs: `model_flops_per_image` is the analytic count (`mae.train_flops_per_image`: matmuls, backward twice the
forward), which MFU divides by, against the device's peak dense bf16 FLOP/s (`accelerators.PEAK_BF16_TFLOPS`,
exact device names; an unknown device gets no MFU). `xla_flops_per_image` is XLA's cost analysis of the
compiled step, printed next to it; it counts elementwise work too, and a fused cuDNN attention as nothing.

`--torch` also times the plain-PyTorch reference MAE (usf_mae_jax/torch_reference.py, same architecture,
torch.optim.AdamW) in a worker process (`usf_mae_jax/torch_bench.py`), the two taking turns in every round;
`jax_over_torch` is the median of the per-round speed ratios.

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

from usf_mae_jax import accelerators, host_memory
from usf_mae_jax.core import sharding
from usf_mae_jax.models import attention, mae, vit
from usf_mae_jax.torch_bench import TorchProcess, minor_faults
from usf_mae_jax.trainers import loop
from usf_mae_jax.trainers.pretrain import PretrainTask

config_flags.DEFINE_config_file("config", "configs/pretrain.py:usf_mae", "Pretraining config.", lock_config=True)
flags.DEFINE_string("variant", None, "Model size preset (mu, tiny, small, base, large, huge); default: base on "
                    "accelerators, the config's on the CPU.")
flags.DEFINE_integer("batch_size", None, "Global batch size (default: 256 per device on accelerators, 32 on "
                     "the CPU).")
flags.DEFINE_integer("img_size", None, "Image size (default: the config's).")
flags.DEFINE_integer("steps", 10, "Timed steps per round.")
flags.DEFINE_integer("warmup", 2, "Untimed steps after compiling.")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype (default: bfloat16 on accelerators, "
                  "the config's on the CPU).")
flags.DEFINE_enum("attention", None, list(attention.IMPLEMENTATIONS), "Attention kernel (default: the config's, "
                  "auto).")
flags.DEFINE_enum("guard", "auto", ["auto", "cond", "select"], "Non-finite guard of the step (trainers/loop.py).")
flags.DEFINE_integer("fsdp", 1, "Size of the fsdp mesh axis (the rest is data parallel).")
flags.DEFINE_bool("torch", False, "Also time the PyTorch reference MAE (CPU) in the same run.")
flags.DEFINE_integer("torch_steps", 0, "Timed torch steps per round (default: --steps).")
flags.DEFINE_integer("rounds", 3, "Timing rounds; with --torch the two frameworks take turns in each round.")
flags.DEFINE_string("profile", None, "Write a jax.profiler trace of 3 steps to this directory.")
FLAGS = flags.FLAGS


class JaxStep:
    """The compiled, donated train step on random uint8 batches, ready to be timed in rounds."""

    def __init__(self, config: ml_collections.ConfigDict, batch_size: int, fsdp: int, guard: str = "auto"):
        config = bench_config(config, batch_size, fsdp)
        model_config = vit.config_from_block(config.model)
        self.model_flops_per_image = mae.train_flops_per_image(model_config, float(config.model.mask_ratio))
        self.mesh = sharding.make_mesh(config.mesh)
        task = PretrainTask(config)
        task.prepare(self.mesh, "")
        setup = loop.build(config, task, self.mesh, guard=guard)  # the training loop's own step
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
        result["model_flops_per_image"] = self.model_flops_per_image
        cost = self.compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        flops_per_device = float(cost.get("flops", 0.0)) if cost else 0.0
        if flops_per_device:
            result["xla_flops_per_image"] = flops_per_device * devices / batch_size
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
          with_torch: bool, torch_steps: int, profile_dir: str | None, guard: str = "auto") -> dict:
    """Compiles, warms up and times the JAX step (and the torch reference), returning the printed figures."""
    jax_step = JaxStep(config, batch_size, fsdp, guard)
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
    peak = accelerators.peak_bf16_tflops(jax.devices()[0].device_kind)
    if peak:
        result["peak_bf16_tflops_per_device"] = peak
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
    device = jax.devices()[0]
    defaults = accelerators.benchmark_defaults(device.platform, jax.device_count())
    variant = FLAGS.variant or defaults["variant"]
    dtype = FLAGS.dtype or defaults["dtype"]
    batch_size = FLAGS.batch_size or defaults["batch_size"]
    with config.unlocked():
        if variant:
            config.model.variant = variant
            for field in ("patch_size", "width", "depth", "heads", "decoder_width", "decoder_depth", "decoder_heads"):
                config.model[field] = None
        if FLAGS.img_size:
            config.model.img_size = FLAGS.img_size
        if dtype:
            config.model.dtype = dtype
        if FLAGS.attention:
            config.model.attention = FLAGS.attention
    model_config = vit.config_from_block(config.model)
    cache = accelerators.enable_compilation_cache()
    kernels = {name: attention.resolve(model_config.attention, model_config.compute_dtype, width // heads)
               for name, width, heads in (("encoder", model_config.width, model_config.heads),
                                          ("decoder", model_config.decoder_width, model_config.decoder_heads))}
    print(f"device={device.platform}:{device.device_kind} devices={jax.device_count()} variant={config.model.variant} "
          f"img_size={model_config.img_size} batch_size={batch_size} dtype={model_config.dtype}", flush=True)
    setting = {"attention": model_config.attention, "encoder_kernel": kernels["encoder"],
               "decoder_kernel": kernels["decoder"], "guard": FLAGS.guard,
               "compile_options": accelerators.compiler_options(device.platform, jax.device_count()),
               "compilation_cache": cache}
    for key, value in setting.items():
        print(f"{key}={value}", flush=True)
    result = bench(config, batch_size, FLAGS.steps, FLAGS.warmup, FLAGS.fsdp, FLAGS.rounds, FLAGS.torch,
                   FLAGS.torch_steps, FLAGS.profile, FLAGS.guard)
    for key, value in result.items():
        print(f"{key}={value:.6g}" if isinstance(value, float) else f"{key}={value}")
    print(f"images_per_s={result['images_per_s']:.3f}")


if __name__ == "__main__":
    host_memory.reexec_with_huge_page_malloc()
    app.run(main)
