"""The CPU host-memory setting (`usf_mae_jax.host_memory`) and the train-step benchmark with its torch worker."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from usf_mae_jax import host_memory
from usf_mae_jax.models import mae, vit


@pytest.mark.parametrize("environ, glibc, thp, applies, reason", [
    ({}, (2, 36), "madvise", True, "transparent huge pages requested"),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, (2, 36), "madvise", False, "already sets glibc.malloc.hugetlb=0"),
    ({"USF_MAE_HOST_HUGEPAGES": "0"}, (2, 36), "madvise", False, "huge pages off"),
    ({}, None, "madvise", False, "not glibc"),
    ({}, (2, 31), "madvise", False, "glibc 2.31 predates the hugetlb tunable"),
    ({}, (2, 36), "always", False, "transparent huge pages are always"),
    ({}, (2, 36), "never", False, "transparent huge pages are never"),
    ({}, (2, 36), None, False, "transparent huge pages are unavailable"),
])
def test_plan_applies_only_where_the_tunable_helps(environ, glibc, thp, applies, reason):
    got, why = host_memory.plan(environ, glibc, thp)
    assert got is applies
    assert reason in why


def test_tunable_is_appended_to_existing_tunables_and_marks_the_reexec():
    env = host_memory.with_tunable({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "KEEP": "x"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert env["KEEP"] == "x" and env[host_memory.REEXEC_MARKER] == "1"
    assert host_memory.with_tunable({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


def test_thp_mode_is_the_bracketed_word(tmp_path):
    sysfs = tmp_path / "enabled"
    sysfs.write_text("always [madvise] never\n")
    assert host_memory.transparent_huge_page_mode(str(sysfs)) == "madvise"
    sysfs.write_text("garbage\n")
    assert host_memory.transparent_huge_page_mode(str(sysfs)) is None
    assert host_memory.transparent_huge_page_mode(str(tmp_path / "missing")) is None


def _run(code: str, env: dict) -> str:
    full_env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_memory.REEXEC_MARKER,
                                                               host_memory.OPT_OUT_VARIABLE)}
    full_env.update(env, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


REEXEC_PROBE = ("import os\nfrom usf_mae_jax import host_memory\n"
                "print('start', os.environ.get('GLIBC_TUNABLES'))\n"
                "host_memory.reexec_with_huge_page_malloc()\n"
                "print('running', os.environ.get('GLIBC_TUNABLES'), host_memory.status())\n")


def test_entry_point_reexecs_once_with_the_tunable_or_runs_on_unchanged():
    out = _run(REEXEC_PROBE, {}).splitlines()
    applies, _ = host_memory.plan({}, host_memory.glibc_version(), host_memory.transparent_huge_page_mode())
    if applies:  # this machine: Linux, glibc 2.36, THP in madvise mode
        assert out == ["start None", "start glibc.malloc.hugetlb=1",
                       "running glibc.malloc.hugetlb=1 host malloc: transparent huge pages on (set by re-exec)"]
    else:
        assert out[0] == "start None" and out[1].startswith("running None host malloc:")
    opted_out = _run(REEXEC_PROBE, {host_memory.OPT_OUT_VARIABLE: "0"}).splitlines()
    assert opted_out == ["start None", "running None host malloc: huge pages off (USF_MAE_HOST_HUGEPAGES=0)"]


def test_benchmark_times_jax_and_the_torch_worker_in_turns():
    pytest.importorskip("torch")
    proc = subprocess.run(
        [sys.executable, "-m", "usf_mae_jax.bench", "--config=configs/pretrain.py:demo", "--variant", "mu",
         "--img_size", "32", "--batch_size", "4", "--steps", "2", "--rounds", "2", "--warmup", "1", "--torch"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    values = dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("device="))
    assert lines[-1].startswith("images_per_s=") and float(lines[-1].split("=")[1]) > 0
    assert "variant=mu" in lines[0] and "batch_size=4" in lines[0]
    assert len(values["jax_over_torch_per_round"].split()) == 2
    assert float(values["torch_step_ms"]) > 0 and int(values["torch_threads"]) >= 1
    ratios = [float(r) for r in values["jax_over_torch_per_round"].split()]
    assert float(values["jax_over_torch"]) == pytest.approx(sum(ratios) / 2, rel=2e-3)  # median of two rounds
    assert values["host_malloc"].startswith("host malloc:")
    assert int(values["params"]) > 0 and float(values["xla_flops_per_image"]) > 0
    mu = vit.model_config("mu", img_size=32)  # --variant resets the size fields to the preset: patch 16
    assert float(values["model_flops_per_image"]) == pytest.approx(mae.train_flops_per_image(mu, 0.75), rel=1e-5)
    assert (values["attention"], values["encoder_kernel"], values["guard"]) == ("auto", "custom", "auto")
    assert "mfu" not in values  # no peak for a CPU
    assert values["compilation_cache"].startswith(os.environ["USF_MAE_XLA_CACHE"])
