"""The launch recipes in scripts/, exercised as dry runs that print the commands they would execute."""

from __future__ import annotations

import os
import subprocess

import pytest
from conftest import ROOT


def dry_run(script: str, *args: str, **env: str) -> str:
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", script), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "DRY_RUN": "1", **env})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_tpu_pod_recipe_runs_launch_on_every_worker():
    out = dry_run("tpu_pod.sh", "my-pod", "us-central2-b", "--config.batch_size=1024", BUCKET="my-bucket")
    assert out.startswith("gcloud compute tpus tpu-vm ssh my-pod --zone=us-central2-b --worker=all")
    assert "gcsfuse --implicit-dirs -o allow_other my-bucket /gcs" in out
    assert "jax[tpu]==0.10.2" in out
    assert ("launch.py --config=configs/pretrain.py:usf_mae --workdir=/gcs/runs/usf_mae_pod "
            "--config.input.data_dir=/gcs/data/openus46 --config.batch_size=1024") in out


def test_tpu_pod_recipe_needs_a_bucket_and_arguments():
    proc = subprocess.run(["bash", "scripts/tpu_pod.sh", "pod", "zone"], cwd=ROOT, capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "BUCKET"} | {"DRY_RUN": "1"})
    assert proc.returncode != 0 and "BUCKET" in proc.stderr
    proc = subprocess.run(["bash", "scripts/tpu_pod.sh"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr


@pytest.mark.parametrize("script, launcher", [("slurm_gpu.sbatch", "srun --kill-on-bad-exit=1 .venv/bin/python"),
                                              ("multi_gpu.sh", ".venv/bin/python")])
def test_gpu_recipes(script, launcher):
    out = dry_run(script, "--config.batch_size=512", DATA="/data/shards", WORKDIR="/runs/x")
    assert out.startswith(f"{launcher} launch.py --config=configs/pretrain.py:usf_mae --workdir=/runs/x")
    assert "--config.input.data_dir=/data/shards" in out and out.strip().endswith("--config.batch_size=512")
    assert "--config.model.attention=cudnn" in out
