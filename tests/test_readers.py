"""Readers of a workdir never disturb the run that writes it: a live pretraining run, with `embed --init W`
and a fine-tune from W running at the same time, ends with the params of an undisturbed run."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
from conftest import CACHE_DIR, ROOT
from helpers import assert_trees_equal

from configs import finetune as finetune_configs
from data_prep.benchmarks import convert, mock
from usf_mae_jax.core import checkpoint
from usf_mae_jax.trainers import loop, registry

ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": CACHE_DIR, "USF_MAE_HOST_HUGEPAGES": "0"}
TOTAL = 60


def pretrain_command(workdir: str) -> list[str]:
    return [sys.executable, "launch.py", "--config=configs/pretrain.py:demo", f"--workdir={workdir}",
            f"--config.total_steps={TOTAL}", "--config.ckpt_steps=2", "--config.keep_ckpts=2", "--config.vis_steps=0",
            "--config.batch_size=16"]


@pytest.mark.slow
def test_concurrent_embed_and_finetune_from_a_live_workdir_leave_it_undisturbed(tmp_path):
    mock.write_busbra_tree(str(tmp_path / "raw"), patients=12, size=64, seed=0)
    convert("busbra", str(tmp_path / "raw"), str(tmp_path / "bench"))
    reference = str(tmp_path / "reference")
    subprocess.run(pretrain_command(reference), cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=900)

    live = str(tmp_path / "live")
    writer = subprocess.Popen(pretrain_command(live), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not checkpoint.workdir_steps(live):
        assert writer.poll() is None and time.time() < deadline, "the run made no checkpoint"
        time.sleep(0.05)
    embed = subprocess.Popen([sys.executable, "-m", "usf_mae_jax.embed", f"--init={live}",
                              f"--data_dir={tmp_path / 'bench'}", f"--out={tmp_path / 'features.npz'}"],
                             cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reads_while_live, reader_errors = [], []

    def read_until_the_writer_ends() -> None:  # a third reader, in this process, as fast as it can
        try:
            while writer.poll() is None:
                checkpoint.load_params(live)
                reads_while_live.append(writer.poll() is None)
        except Exception as err:  # a thread's exception would otherwise only be printed
            reader_errors.append(err)

    reader = threading.Thread(target=read_until_the_writer_ends)
    reader.start()
    config = finetune_configs.get_config("busbra,runlocal")
    config.input.data_dir, config.init = str(tmp_path / "bench"), live
    config.model.update(depth=None, img_size=64)
    tuned = loop.run(config, str(tmp_path / "finetune"), registry.create(config))
    reader.join(timeout=900)
    assert writer.wait() == 0, writer.stderr.read()[-3000:]
    assert embed.wait(timeout=600) == 0, embed.stderr.read()[-3000:]
    assert not reader_errors and tuned["results"]["n_test"] > 0 and any(reads_while_live)
    assert not [d for d in os.listdir(os.path.join(live, "checkpoints")) if "tmp" in d]
    ours, _ = checkpoint.read_workdir_params(live, step=TOTAL)
    theirs, _ = checkpoint.read_workdir_params(reference, step=TOTAL)
    assert_trees_equal(ours, theirs)
