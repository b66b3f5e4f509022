"""The launch recipes in scripts/, exercised as dry runs that print the commands they would execute."""

from __future__ import annotations

import os
import subprocess
import time

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


def test_slurm_recipe_runs_one_task_per_gpu():
    out = dry_run("slurm_gpu.sbatch", "--config.batch_size=512", DATA="/data/shards", WORKDIR="/runs/x",
                  SLURM_CPUS_PER_TASK="14")
    assert out.startswith("srun --kill-on-bad-exit=1 .venv/bin/python launch.py --config=configs/pretrain.py:usf_mae "
                          "--workdir=/runs/x --config.input.data_dir=/data/shards --config.input.num_threads=14")
    assert out.strip().endswith("--config.batch_size=512")
    assert "attention" not in out  # the model's default, auto, picks cuDNN flash attention on NVIDIA GPUs
    with open(os.path.join(ROOT, "scripts", "slurm_gpu.sbatch")) as f:
        header = f.read()
    assert "#SBATCH --ntasks-per-node=8\n#SBATCH --gpus-per-node=8\n" in header


def test_multi_gpu_recipe_runs_one_process_per_gpu():
    out = dry_run("multi_gpu.sh", "--config.batch_size=512", DATA="/data/shards", WORKDIR="/runs/x", NUM_GPUS="4",
                  PORT="1234", THREADS="6").splitlines()
    assert len(out) == 4
    for pid, line in enumerate(out):
        assert line.startswith(f"env JAX_LOCAL_DEVICE_IDS={pid} XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 .venv/bin/python "
                               "launch.py --config=configs/pretrain.py:usf_mae --workdir=/runs/x "
                               "--config.input.data_dir=/data/shards --config.input.num_threads=6 ")
        assert line.strip().endswith(f"--coordinator_address=127.0.0.1:1234 --num_processes=4 --process_id={pid} "
                                     "--config.batch_size=512")
    visible = dry_run("multi_gpu.sh", CUDA_VISIBLE_DEVICES="2,3", THREADS="1").splitlines()
    assert len(visible) == 2 and "--num_processes=2" in visible[1]


def test_multi_gpu_recipe_without_gpus_says_so():
    env = {k: v for k, v in os.environ.items() if k not in ("NUM_GPUS", "CUDA_VISIBLE_DEVICES")}
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "multi_gpu.sh")], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**env, "PATH": "/usr/bin:/bin", "DRY_RUN": "1"})
    assert proc.returncode == 2 and "no GPU found" in proc.stderr


FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for the venv's python: process 1 fails after a moment, process 0 would run for a minute.
for arg in "$@"; do case $arg in --process_id=*) pid=${arg#--process_id=};; esac; done
echo "process $pid started with JAX_LOCAL_DEVICE_IDS=$JAX_LOCAL_DEVICE_IDS"
if [[ $pid == 1 ]]; then sleep 1; exit 3; fi
trap 'kill $sleeper; echo "process $pid stopped"; exit 143' TERM
sleep 60 & sleeper=$!
wait
"""


def test_multi_gpu_recipe_stops_every_process_when_one_fails(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(FAKE_PYTHON)
    (venv / "bin" / "python").chmod(0o755)
    started = time.perf_counter()
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "multi_gpu.sh")], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "VENV": str(venv), "NUM_GPUS": "2",
                                                      "WORKDIR": str(tmp_path / "run")})
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert time.perf_counter() - started < 20
    assert "process 0 started with JAX_LOCAL_DEVICE_IDS=0" in proc.stdout and "process 0 stopped" in proc.stdout
    log = (tmp_path / "run" / "logs" / "process_1.log").read_text()
    assert "process 1 started with JAX_LOCAL_DEVICE_IDS=1" in log
