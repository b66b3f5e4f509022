"""What a person watches: TensorBoard history survives kill -9 and continues after the resume, and the log
lines and the progress bar share the terminal without interleaving."""

from __future__ import annotations

import glob
import logging
import os
import signal
import subprocess
import sys

from conftest import CACHE_DIR, ROOT
from helpers import read_events, scalar_steps
from tensorboardX.proto import event_pb2

from usf_mae_jax.core import checkpoint, reporting

KILLER = os.path.join(ROOT, "tests", "kill_at_step.py")


def test_tensorboard_history_survives_kill_9_and_continues_after_resume(tmp_path):
    workdir = str(tmp_path / "run")
    args = ["--config=configs/pretrain.py:demo,runlocal", f"--workdir={workdir}", "--config.total_steps=20",
            "--config.ckpt_steps=4", "--config.log_steps=1", "--config.vis_steps=0"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": CACHE_DIR, "USF_MAE_HOST_HUGEPAGES": "0"}
    killed = subprocess.run([sys.executable, KILLER, "15", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    files = glob.glob(os.path.join(workdir, "tensorboard", "events.*"))
    assert len(files) == 1 and os.path.getsize(files[0]) > 0
    # Flushed at every log step: every step whose metrics were fetched before the kill (step 15's are fetched
    # while step 16 runs, so the history ends at 14).
    assert scalar_steps(read_events(files[0]), "loss") == list(range(1, 15))
    resume = checkpoint.workdir_steps(workdir)[-1]  # 12, or 8 when the kill caught step 12's save in flight
    assert resume in (8, 12)

    rerun = subprocess.run([sys.executable, "launch.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0 and f"resumed from step {resume}" in rerun.stderr, rerun.stderr[-2000:]
    second = [f for f in glob.glob(os.path.join(workdir, "tensorboard", "events.*")) if f != files[0]]
    events = read_events(second[0])
    start = event_pb2.SessionLog.START
    starts = [e.step for e in events if e.HasField("session_log") and e.session_log.status == start]
    # TensorBoard drops the killed run's steps after the checkpoint (the purge step) and shows one line.
    assert starts == [resume + 1] and scalar_steps(events, "loss") == list(range(resume + 1, 21))


def test_log_records_go_through_the_progress_bar_once(capsys):
    root = logging.getLogger()
    before = list(root.handlers)
    progress = reporting.Progress(0, 3, enabled=True)
    with progress.logging():
        logging.getLogger("usf_mae_jax.test").warning("halfway there")
        progress.update(2, 0.5)
    progress.close()
    assert root.handlers == before
    err = capsys.readouterr().err
    assert err.count("halfway there") == 1
    assert "\rhalfway" not in err  # the bar is cleared before the line, not overwritten mid-line
