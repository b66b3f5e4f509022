"""Every platform-specific setting of a run, in one place, each with the reason it exists.

  * XLA compile options for the train step (`compiler_options`), a pure function of the platform and the
    global device count, applied by the training loop's `jax.jit` (so launch.py, the benchmark and the tests get
    the same step).
  * The persistent compilation cache (`enable_compilation_cache`), switched on by launch.py and the benchmark.
  * Peak dense bf16 FLOP/s per device kind (`peak_bf16_tflops`), for MFU, and the benchmark's defaults
    (`benchmark_defaults`).

Environment variables that must be set before the process starts (XLA_PYTHON_CLIENT_MEM_FRACTION, NCCL_*) are
set by the launch scripts, and documented with the NCCL notes in docs/accelerators.md. Nothing here touches the
CPU: its compile options are empty, and the cache only skips recompiling the same program.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping

import jax

# XLA:GPU compile options for a step that runs on more than one device (one host or several).
GPU_MULTI_DEVICE_OPTIONS: dict[str, bool | int | str] = {
    # The latency-hiding scheduler orders the step so that the data-parallel gradient all-reduce (ViT-B: 426 MiB
    # of float32 gradients per step) runs while the backward pass still computes, instead of after it. XLA:GPU
    # leaves it off unless this option (or exec_time_optimization_effort >= 0.2) asks for it; the TPU compiler
    # schedules for latency by default. On one device there is no collective to hide, so it is not set there.
    "xla_gpu_enable_latency_hiding_scheduler": True,
}


def compiler_options(platform: str, device_count: int) -> dict[str, bool | int | str]:
    """XLA compile options for the train step on `device_count` devices of `platform` (jax's name: 'cpu', 'gpu',
    'tpu'). Empty on the CPU and TPU, so their programs are compiled exactly as before."""
    if platform == "gpu" and device_count > 1:
        return dict(GPU_MULTI_DEVICE_OPTIONS)
    return {}


def mesh_compiler_options(mesh: jax.sharding.Mesh) -> dict[str, bool | int | str]:
    """`compiler_options` for a step that runs on `mesh`."""
    return compiler_options(mesh.devices.flat[0].platform, mesh.devices.size)


# The persistent compilation cache. Compiling the ViT-B step takes tens of seconds on a GPU (with autotuning)
# and about 10 s for the tiny CPU step (docs/jax_stack.md section 3); a restarted or resumed run, a second
# process on the same host and every benchmark repeat then load the executable instead.
CACHE_VARIABLE = "USF_MAE_XLA_CACHE"  # a folder, or 0 / off / false / no to switch the cache off
CACHE_OFF = ("0", "off", "false", "no")


def cpu_signature(cpuinfo: str = "/proc/cpuinfo") -> str:
    """A short hash of the host CPU's feature flags ('generic' when unknown).

    XLA:CPU compiles for the host's instruction set, and jax's cache key names the CPU only as 'cpu': a home
    folder shared by nodes of different CPU generations must not hand an AVX-512 executable to an AVX2 node.
    """
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1] for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    if not flags.strip():
        return "generic"
    return hashlib.sha256(" ".join(sorted(flags.split())).encode()).hexdigest()[:12]


def cache_dir(platform: str, environ: Mapping[str, str] | None = None) -> str | None:
    """Where the compilation cache of `platform` lives, or None when it is switched off.

    `USF_MAE_XLA_CACHE` names the folder (or switches the cache off); otherwise a folder already given to jax
    (`JAX_COMPILATION_CACHE_DIR`) is kept; otherwise `$XDG_CACHE_HOME/usf_mae_jax/xla` (default
    `~/.cache/usf_mae_jax/xla`), with one subfolder per platform and, on the CPU, per instruction set.
    """
    environ = os.environ if environ is None else environ
    chosen = environ.get(CACHE_VARIABLE, "").strip()
    if chosen.lower() in CACHE_OFF:
        return None
    if not chosen and environ.get("JAX_COMPILATION_CACHE_DIR"):
        return environ["JAX_COMPILATION_CACHE_DIR"]
    if chosen:
        root = os.path.expanduser(chosen)
    else:
        base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "usf_mae_jax", "xla")
    leaf = f"cpu-{cpu_signature()}" if platform == "cpu" else platform
    return os.path.join(root, leaf)


def enable_compilation_cache(environ: Mapping[str, str] | None = None) -> str:
    """Points jax's persistent compilation cache at `cache_dir` for the default backend; says where, for the log.

    The folder is not created here: jax creates it when it first writes an entry. Entries are programs that
    took at least jax's default 1 s to compile. A cache folder already configured in this process (a test
    suite's, say) is left as it is.
    """
    if jax.config.jax_compilation_cache_dir:
        return f"{jax.config.jax_compilation_cache_dir} (set before)"
    path = cache_dir(jax.default_backend(), environ)
    if path is None:
        return f"off ({CACHE_VARIABLE})"
    jax.config.update("jax_compilation_cache_dir", path)
    return f"{path} (off with {CACHE_VARIABLE}=0)"


# Peak dense (non-sparse) bf16 tensor throughput per device, TFLOP/s, keyed by jax's exact `device_kind`. Only
# exact names: a near miss (H800, a MIG slice, a v4 lite) prints no MFU rather than a wrong one. Sources: the
# NVIDIA H100 whitepaper (H100 SXM5, named "NVIDIA H100 80GB HBM3": 989.4 dense, 1,978.9 with 2:4 sparsity;
# H100 PCIe 756.5); the H200 data sheet (SXM 1,979 sparse, the H100 SXM5 figure; NVL 1,671 sparse -> 835.5);
# the H100 NVL data sheet (1,671 sparse -> 835.5); the HGX B200 data sheet (4.5 PFLOP/s sparse per GPU -> 2,250
# dense); the A100 data sheet (312, SXM4 and PCIe, 40 and 80 GB); the Cloud TPU system-architecture pages
# (per chip: v4 275, v5e 197, v5p 459, v6e Trillium 918). jax names v5e "TPU v5 lite", v5p "TPU v5" and v6e
# "TPU v6 lite"; the other spelling of each is listed too.
PEAK_BF16_TFLOPS: dict[str, float] = {
    "NVIDIA H100 80GB HBM3": 989.4,
    "NVIDIA H100 NVL": 835.5,
    "NVIDIA H100 PCIe": 756.5,
    "NVIDIA H200": 989.4,
    "NVIDIA H200 NVL": 835.5,
    "NVIDIA B200": 2250.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5": 459.0,
    "TPU v5p": 459.0,
    "TPU v6 lite": 918.0,
    "TPU v6e": 918.0,
}


def peak_bf16_tflops(device_kind: str) -> float | None:
    """The peak of a device kind, or None when it is not in the table (exact match, surrounding spaces aside)."""
    return PEAK_BF16_TFLOPS.get(device_kind.strip())


def benchmark_defaults(platform: str, device_count: int) -> dict:
    """`python -m usf_mae_jax.bench` defaults (None: the config's value). Accelerators measure the target model,
    ViT-B/16 in bf16, at 256 images per device: MAE's encoder sees only 50 tokens per image, so a GPU needs
    large batches to fill its matmuls (docs/accelerators.md). The CPU keeps a global batch of 32, what its
    figures in docs/performance.md were measured with."""
    if platform == "cpu":
        return {"variant": None, "dtype": None, "batch_size": 32}
    return {"variant": "base", "dtype": "bfloat16", "batch_size": 256 * device_count}
