"""Platform settings (usf_mae_jax/accelerators.py): compile options per platform and device count, the persistent
compilation cache's folder and its lazy creation, and the exact-name peak FLOP/s table."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT

from usf_mae_jax import accelerators


@pytest.mark.parametrize("platform, devices, expected", [
    ("cpu", 1, {}),
    ("cpu", 8, {}),  # the CPU's program stays exactly what it was
    ("gpu", 1, {}),  # no collective to overlap
    ("gpu", 2, {"xla_gpu_enable_latency_hiding_scheduler": True}),
    ("gpu", 64, {"xla_gpu_enable_latency_hiding_scheduler": True}),
    ("tpu", 8, {}),  # the TPU compiler schedules for latency by default
])
def test_compile_options_per_platform_and_device_count(platform, devices, expected):
    assert accelerators.compiler_options(platform, devices) == expected


def test_the_step_of_this_machine_is_compiled_without_options():
    import jax

    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    assert accelerators.mesh_compiler_options(mesh) == {}


def test_gpu_options_are_accepted_by_the_compiler():
    """A misspelt option would fail every GPU compile; XLA's debug options are shared by all backends, so the CPU
    compiler checks the names and types here."""
    import jax
    import jax.numpy as jnp

    step = jax.jit(lambda x: x * 2, compiler_options=accelerators.compiler_options("gpu", 8))
    assert float(step(jnp.ones(()))) == 2.0
    with pytest.raises(Exception, match="xla_gpu_enable_latency_hiding_sheduler"):
        jax.jit(lambda x: x * 3, compiler_options={"xla_gpu_enable_latency_hiding_sheduler": True})(jnp.ones(()))


def test_cache_folder_default_override_and_off_switch(tmp_path):
    home_cache = {"XDG_CACHE_HOME": str(tmp_path)}
    assert accelerators.cache_dir("gpu", home_cache) == str(tmp_path / "usf_mae_jax" / "xla" / "gpu")
    assert accelerators.cache_dir("tpu", {}) == os.path.expanduser("~/.cache/usf_mae_jax/xla/tpu")
    cpu = accelerators.cache_dir("cpu", home_cache)
    assert cpu == str(tmp_path / "usf_mae_jax" / "xla" / f"cpu-{accelerators.cpu_signature()}")
    assert accelerators.cache_dir("gpu", {**home_cache, "USF_MAE_XLA_CACHE": "/scratch/xla"}) == "/scratch/xla/gpu"
    assert accelerators.cache_dir("gpu", {"JAX_COMPILATION_CACHE_DIR": "/mine"}) == "/mine"
    for off in ("0", "off", "False", " no "):
        assert accelerators.cache_dir("gpu", {"USF_MAE_XLA_CACHE": off, "JAX_COMPILATION_CACHE_DIR": "/x"}) is None


def test_cpu_signature_follows_the_instruction_set(tmp_path):
    avx2, avx512 = tmp_path / "avx2", tmp_path / "avx512"
    avx2.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2\n\nprocessor\t: 1\nflags\t\t: fpu sse2 avx2\n")
    avx512.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n")
    signatures = {accelerators.cpu_signature(str(path)) for path in (avx2, avx512)}
    assert len(signatures) == 2 and all(len(s) == 12 for s in signatures)
    assert accelerators.cpu_signature(str(tmp_path / "missing")) == "generic"


CACHE_PROBE = """
import os, sys
import jax, jax.numpy as jnp
from usf_mae_jax import accelerators
print(accelerators.enable_compilation_cache())
folder = accelerators.cache_dir("cpu")
print("before", os.path.exists(folder))
jax.jit(lambda x: x + 1)(jnp.ones(3))
print("after", os.path.isdir(folder))
"""


def test_the_cache_folder_is_created_by_the_first_compilation_only(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(USF_MAE_XLA_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", CACHE_PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"{tmp_path / 'cache'}/cpu-")
    assert lines[1:] == ["before False", "after True"]
    env["USF_MAE_XLA_CACHE"] = "0"
    proc = subprocess.run([sys.executable, "-c", CACHE_PROBE.replace('folder = accelerators.cache_dir("cpu")',
                                                                   'folder = "/nonexistent"')],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.stdout.splitlines()[0] == "off (USF_MAE_XLA_CACHE)"


@pytest.mark.parametrize("kind, peak", [
    ("NVIDIA H100 80GB HBM3", 989.4),  # H100 SXM5
    ("NVIDIA H100 NVL", 835.5),
    ("NVIDIA H100 PCIe", 756.5),
    ("NVIDIA H200", 989.4),
    ("NVIDIA H200 NVL", 835.5),
    ("NVIDIA B200", 2250.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100-SXM4-40GB", 312.0),
    ("NVIDIA A100-PCIE-40GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0),
    ("TPU v4", 275.0),
    ("TPU v5 lite", 197.0),  # v5e
    ("TPU v5", 459.0),  # v5p
    ("TPU v6 lite", 918.0),  # v6e
    (" NVIDIA H200 ", 989.4),
    # Near misses get no peak, hence no MFU, rather than a neighbour's figure.
    ("NVIDIA H800", None),
    ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", None),
    ("NVIDIA GH200 480GB", None),
    ("TPU v4 lite", None),
    ("TPU7x", None),
    ("Tesla V100-SXM2-16GB", None),
    ("cpu", None),
])
def test_peak_table_matches_device_kinds_exactly(kind, peak):
    assert accelerators.peak_bf16_tflops(kind) == peak


@pytest.mark.parametrize("platform, devices, expected", [
    ("cpu", 1, {"variant": None, "dtype": None, "batch_size": 32}),
    ("gpu", 1, {"variant": "base", "dtype": "bfloat16", "batch_size": 256}),
    ("gpu", 8, {"variant": "base", "dtype": "bfloat16", "batch_size": 2048}),
    ("tpu", 4, {"variant": "base", "dtype": "bfloat16", "batch_size": 1024}),
])
def test_benchmark_defaults_are_the_target_model_on_accelerators(platform, devices, expected):
    assert accelerators.benchmark_defaults(platform, devices) == expected
