"""The prepared device check (scripts/accelerator_check.py), run end to end as its CPU dry run: every part
runs, cuDNN is reported as skipped rather than failing, and the JSON and markdown hold the figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.slow
def test_the_dry_run_runs_every_part_and_writes_the_report(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "accelerator_check.py"), "--out_dir",
                           str(tmp_path), "--dry_run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "accelerator_check.json").read_text())
    assert report["dry_run"] and report["host"]["platform"] == "cpu"
    statuses = {part["name"]: part["status"] for part in report["parts"]}
    assert statuses == {name: "ok" for name in (
        "probe", "step auto/auto", "attention kernels", "step auto/cond", "loader shards", "loader 1 threads",
        "loader 2 threads" if report["host"]["cores"] > 1 else "loader 1 threads", "step custom/select",
        "step xla/select", "step auto/auto on 1 device", "step auto/auto on 2 devices")}
    assert report["seconds"] < report["budget_s"]
    kernels = {(r["where"], r["kernel"]): r["status"] for r in report["attention"]}
    assert kernels == {(where, kernel): "skipped" if kernel == "cudnn" else "ok"
                       for where in ("encoder", "decoder") for kernel in ("custom", "xla", "cudnn")}
    summary = report["summary"]
    assert summary["images_per_s_per_device"] > 0 and summary["mfu"] is None  # no peak for a CPU
    assert summary["model_flops_per_image"] > 0 and summary["loader_images_per_s_per_core"] > 0
    assert summary["cores_per_device_basis"] == "measured" and summary["cores_per_device_at_measured_step"] > 0
    assert summary["scaling_efficiency"] > 0 and summary["select_over_cond"] > 0
    table = (tmp_path / "accelerator_check.md").read_text()
    assert table.startswith("# Accelerator check (dry run)")
    assert "| step xla/select | ok |" in table and "| decoder | cudnn | 5 | skipped" in table
    assert (tmp_path / "logs" / "step_auto_auto.log").read_text().startswith("$ ")


def test_without_an_accelerator_the_full_check_stops_after_the_probe(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "accelerator_check.py"), "--out_dir",
                           str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "jax sees no accelerator (cpu)" in proc.stderr
    report = json.loads((tmp_path / "accelerator_check.json").read_text())
    assert [part["name"] for part in report["parts"]] == ["probe"] and report["host"]["platform"] == "cpu"
