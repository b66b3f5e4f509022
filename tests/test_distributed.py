"""Scale-out on CPU: two processes on 127.0.0.1 (steps, data, probes), FSDP, resharding restores, SIGTERM and
kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import portpicker
import pytest
from conftest import CACHE_DIR, ROOT

WORKER = os.path.join(ROOT, "tests", "multiprocess_worker.py")


def _env(devices: int) -> dict:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
           "JAX_COMPILATION_CACHE_DIR": CACHE_DIR, "PYTHONPATH": ROOT}
    return env


def run_processes(scenario: str, out: str, nproc: int, devices_per_process: int, timeout: int = 600) -> None:
    port = str(portpicker.pick_unused_port())
    procs = [subprocess.Popen([sys.executable, WORKER, scenario, str(pid), str(nproc), port, out], cwd=ROOT,
                              env=_env(devices_per_process), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for pid in range(nproc)]
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    for pid, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"process {pid} of {scenario} failed:\n{output[-4000:]}"


def test_two_processes_equal_one_process_with_eight_devices(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir(), one.mkdir()
    run_processes("steps", str(two), nproc=2, devices_per_process=4)
    run_processes("steps", str(one), nproc=1, devices_per_process=8)
    a, b = np.load(two / "params.npz"), np.load(one / "params.npz")
    assert sorted(a.files) == sorted(b.files) and "blocks_0/attn/qkv/kernel" in a.files
    for name in a.files:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_each_process_reads_disjoint_data(tmp_path):
    run_processes("disjoint", str(tmp_path), nproc=2, devices_per_process=4)
    rows = [set(json.loads((tmp_path / f"rows_{pid}.json").read_text())) for pid in range(2)]
    assert len(rows[0]) == len(rows[1]) == 12  # 3 batches x 4 rows per process, no repeats within an epoch
    assert not rows[0] & rows[1]


def test_probes_from_two_processes_equal_one_process(tmp_path):
    from helpers import converted_busbra

    converted_busbra(tmp_path / "data", patients=60, size=32, seed=0)
    os.rename(tmp_path / "data" / "out", tmp_path / "bench")
    run_processes("probes", str(tmp_path), nproc=2, devices_per_process=4)
    run_processes("probes", str(tmp_path), nproc=1, devices_per_process=8)
    two, one = np.load(tmp_path / "features_2.npy"), np.load(tmp_path / "features_1.npy")
    assert two.shape == one.shape and two.shape[0] > 8  # more rows than one global batch
    np.testing.assert_allclose(two, one, rtol=1e-5, atol=1e-5)
    scores = [json.loads((tmp_path / f"scores_{n}.json").read_text()) for n in (2, 1)]
    assert set(scores[0]) == {f"busbra_fold1/{p}_{m}" for p in ("ridge", "knn") for m in ("accuracy", "f1_macro")}
    assert scores[0] == scores[1]


def test_checkpoint_from_two_processes_restores_in_one_and_reshards(tmp_path, python_runner):
    run_processes("train", str(tmp_path), nproc=2, devices_per_process=4)
    workdir = tmp_path / "workdir"
    assert sorted(os.listdir(workdir / "checkpoints" / "2" / "data_iter")) == [
        "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
    code = f"""
        import jax, numpy as np, ml_collections
        import sys; sys.path.insert(0, "tests")
        from multiprocess_worker import tiny_config
        from helpers import pretrain_setup
        from usf_mae_jax.core import checkpoint, sharding
        config = tiny_config()
        saved, _ = checkpoint.load_params("{workdir}")
        for data, fsdp in (({{n}}, 1), (-1, min({{n}}, 2))):
            config.mesh.update(data=data, fsdp=fsdp)
            mesh = sharding.make_mesh(config.mesh)
            setup = pretrain_setup(config, mesh)
            restored = checkpoint.Checkpointer("{workdir}").restore_latest(setup.abstract_state, None, None)
            assert restored.step == 2
            kernel = restored.state["params"]["blocks_0"]["attn"]["qkv"]["kernel"]
            assert kernel.sharding.mesh.devices.size == {{n}}
            np.testing.assert_array_equal(np.asarray(kernel), saved["blocks_0"]["attn"]["qkv"]["kernel"])
            mu = [x for x in jax.tree.leaves(restored.state["opt_state"]) if getattr(x, "shape", ()) == kernel.shape][0]
            assert mu.sharding == kernel.sharding
        print("RESTORED", {{n}})
    """
    for devices in (4, 1):
        assert f"RESTORED {devices}" in python_runner(code.replace("{n}", str(devices)), devices=devices)


def test_fsdp_shards_params_and_optimizer_and_prints_sharding(python_runner):
    out = python_runner("""
        import jax, numpy as np, ml_collections
        import sys; sys.path.insert(0, "tests")
        from configs import pretrain as cfgs
        from helpers import pretrain_setup
        from usf_mae_jax.core import sharding
        config = cfgs.get_config("demo,runlocal")
        config.mesh.update(data=-1, fsdp=4, fsdp_min_size=1000)
        mesh = sharding.make_mesh(config.mesh)
        assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
        setup = pretrain_setup(config, mesh)
        st = setup.init()
        qkv = st["params"]["blocks_0"]["attn"]["qkv"]["kernel"]          # (32, 96): 3072 elements
        assert qkv.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp"), qkv.sharding.spec
        assert {s.data.shape for s in qkv.addressable_shards} == {(32, 24)}
        bias = st["params"]["blocks_0"]["attn"]["qkv"]["bias"]          # 96 elements < 1000: replicated
        assert bias.sharding.spec == jax.sharding.PartitionSpec()
        # Adam's mu and nu of the encoder's and the decoder's qkv kernels (both 32 wide in this config).
        moments = [x for x in jax.tree.leaves(st["opt_state"]) if getattr(x, "shape", None) == (32, 96)]
        assert len(moments) == 4 and all(m.sharding.spec == qkv.sharding.spec for m in moments)
        print("OK")
    """, devices=8)
    assert "OK" in out
    proc = subprocess.run([sys.executable, "launch.py", "--config=configs/pretrain.py:demo,runlocal",
                           "--config.mesh.fsdp=4", "--config.mesh.fsdp_min_size=1000", "--print_sharding"],
                          cwd=ROOT, env=_env(8), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "mesh {'data': 2, 'fsdp': 4}"
    qkv_line = next(line for line in lines if line.startswith("params/blocks_0/attn/qkv/kernel"))
    assert "(32, 96)" in qkv_line and "P(None, 'fsdp')" in qkv_line


def test_fsdp_divides_parameter_memory_per_device(python_runner):
    out = python_runner("""
        import ml_collections
        import jax, numpy as np
        import sys; sys.path.insert(0, "tests")
        from configs import pretrain as cfgs
        from helpers import pretrain_setup
        from usf_mae_jax.core import sharding
        from usf_mae_jax.trainers import loop
        config = cfgs.get_config("usf_mae,variant=large")
        config.model.update(img_size=32, depth=2, dtype="float32")
        config.input.source, config.batch_size = "synthetic", 8
        sizes = {}
        for fsdp in (1, 8):
            config.mesh.update(data=-1, fsdp=fsdp)
            mesh = sharding.make_mesh(config.mesh)
            setup = pretrain_setup(config, mesh)
            batch = {"image": jax.ShapeDtypeStruct((8, 32, 32, 1), np.uint8, sharding=sharding.batch_sharding(mesh))}
            _, report = loop.compile_step(setup.train_step, setup.abstract_state, batch)
            sizes[fsdp] = report["arguments_mib"]
        print("ARGS", sizes[1], sizes[8])
    """, devices=8)
    replicated, sharded = map(float, out.split("ARGS")[1].split())
    assert sharded < replicated / 5, (replicated, sharded)


def _launch(workdir, *overrides, env_devices=1):
    return subprocess.Popen([sys.executable, "-u", "launch.py", "--config=configs/pretrain.py:demo,runlocal",
                             f"--workdir={workdir}", "--config.vis_steps=0", "--config.log_steps=1", *overrides],
                            cwd=ROOT, env=_env(env_devices), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _reference_then_run(tmp_path, *overrides):
    """Runs an uninterrupted reference to completion, then starts the run under test with the same overrides."""
    reference = _launch(tmp_path / "reference", *overrides)
    assert reference.wait(timeout=600) == 0
    workdir = tmp_path / "run"
    return workdir, _launch(workdir, *overrides)


def _wait_for_checkpoints(workdir, count, proc, timeout=300):
    deadline = time.time() + timeout
    ckpt_dir = os.path.join(workdir, "checkpoints")
    while time.time() < deadline:
        steps = [d for d in os.listdir(ckpt_dir) if d.isdigit()] if os.path.isdir(ckpt_dir) else []
        if len(steps) >= count:
            return
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    raise AssertionError("no checkpoints appeared in time")


def _final_params(workdir):
    from usf_mae_jax.core import checkpoint

    return checkpoint.load_params(str(workdir))[0]


def _assert_same_params(a, b):
    import jax

    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_sigterm_saves_exits_zero_and_resumes(tmp_path):
    workdir, proc = _reference_then_run(tmp_path, "--config.total_steps=30", "--config.ckpt_steps=100")
    while True:  # wait until training is under way, then preempt
        line = proc.stdout.readline()
        assert line, "the run ended before it logged a step"
        if "step 3:" in line:
            break
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output[-3000:]
    assert "after a preemption request" in output
    steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
    # Every 3 steps (a tenth of the run) and the step at which SIGTERM was honoured, the newest.
    assert steps and 3 <= steps[-1] < 30 and f"saved step {steps[-1]} after a preemption request" in output
    resumed = _launch(workdir, "--config.total_steps=30", "--config.ckpt_steps=100")
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0 and f"resumed from step {steps[-1]}" in output
    _assert_same_params(_final_params(workdir), _final_params(tmp_path / "reference"))


@pytest.mark.slow
def test_kill_during_async_save_resumes_from_a_complete_checkpoint(tmp_path):
    workdir, proc = _reference_then_run(tmp_path, "--config.total_steps=24", "--config.ckpt_steps=1")
    _wait_for_checkpoints(str(workdir), 2, proc)  # saving every step: the kill lands in or near a save
    proc.kill()
    proc.wait()
    # A half-written step directory, as a kill in the middle of a save leaves behind, is skipped too.
    (workdir / "checkpoints" / "99.orbax-checkpoint-tmp-123").mkdir()
    resumed = _launch(workdir, "--config.total_steps=24", "--config.ckpt_steps=1")
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output[-3000:]
    assert "resumed from step" in output
    _assert_same_params(_final_params(workdir), _final_params(tmp_path / "reference"))


@pytest.mark.parametrize("env, expected", [
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}, "slurm"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, None),
    ({"SLURM_NTASKS": "16"}, None),  # not inside a job
    ({"TPU_WORKER_HOSTNAMES": "a,b"}, "tpu_pod"),
    ({"TPU_WORKER_HOSTNAMES": "a"}, None),
    ({}, None),
])
def test_multi_process_environments_are_detected(env, expected):
    from usf_mae_jax import distributed

    assert distributed.detected_environment(env) == expected


@pytest.mark.parametrize("env, expected", [
    ({"CUDA_VISIBLE_DEVICES": "5"}, [0]),  # SLURM bound this task to one GPU: it is local device 0
    ({"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}, None),  # all visible: JAX takes GPU SLURM_LOCALID
    ({}, None),
    ({"CUDA_VISIBLE_DEVICES": "5", "JAX_LOCAL_DEVICE_IDS": "0"}, None),  # given explicitly: JAX reads it
])
def test_one_process_per_gpu_under_slurm_picks_its_gpu(env, expected):
    from usf_mae_jax import distributed

    assert distributed.slurm_local_device_ids(env) == expected
