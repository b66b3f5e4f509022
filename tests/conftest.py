"""Test-suite setup shared by every module.

* A persistent XLA compilation cache under .pytest_cache, so the many tiny jitted steps compile once per
  machine rather than once per test (compile time dominates these tests on 2 cores). Subprocesses get it
  through USF_MAE_XLA_CACHE (usf_mae_jax/accelerators.py), so no test writes into the user's cache folder.
* absl flags marked as parsed: grain's multiprocessing path reads absl flags (jax_stack.md 2b).
* `run_python(code, devices=N)` runs a snippet in a fresh interpreter with N fake CPU devices, the way
  multi-device tests must run (XLA_FLAGS only takes effect before jax initialises).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import pytest
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE_DIR = os.path.join(ROOT, ".pytest_cache", "jax_compilation_cache")

jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
os.environ.setdefault("USF_MAE_XLA_CACHE", CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def run_python(code: str, devices: int = 1, timeout: int = 600, env: dict | None = None) -> str:
    """Runs `code` in a subprocess from the repo root with `devices` CPU devices; returns its stdout."""
    full_env = {**os.environ, **(env or {})}
    full_env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    full_env["JAX_PLATFORMS"] = "cpu"
    full_env["JAX_COMPILATION_CACHE_DIR"] = CACHE_DIR
    full_env["PYTHONPATH"] = ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc.stdout


@pytest.fixture
def python_runner():
    return run_python
