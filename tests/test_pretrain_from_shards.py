"""End to end: synthetic shards from `python -m data_prep synthetic` -> grain pipeline -> a few MAE steps."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from configs import pretrain as pretrain_configs
from usf_mae_jax.trainers import loop
from usf_mae_jax.trainers.pretrain import PretrainTask


def train(config, workdir):
    return loop.run(config, workdir, PretrainTask(config))

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_pretraining_runs_from_synthetic_shards_and_resumes(tmp_path, caplog):
    data = tmp_path / "shards"
    subprocess.run([sys.executable, "-m", "data_prep", "synthetic", "--out_dir", str(data), "--count", "24",
                    "--size", "48", "--nearest_size", "32", "--workers", "1", "--no_progress"], cwd=REPO,
                   check=True, capture_output=True)
    manifest = json.loads((data / "synthetic" / "manifest.json").read_text())
    assert manifest["variants"]["nearest32"]["size"] == 32  # what usf_mae at 32 px reads

    def config(total_steps):
        c = pretrain_configs.get_config("demo")
        c.unlock()
        c.input.source = "shards"
        c.input.data_dir = str(data)
        c.input.augment = "usf_mae"
        c.model.variant, c.model.img_size, c.model.patch_size = "mu", 32, 8
        c.batch_size = 4
        c.total_steps = total_steps
        c.ckpt_steps = 3
        c.lock()
        return c

    workdir = str(tmp_path / "work")
    with caplog.at_level(logging.WARNING, logger="usf_mae_jax.data.pipeline"):
        first = train(config(3), workdir)
    assert "no stored nearest" not in caplog.text
    assert first["final_step"] == 3
    assert len(first["losses"]) == 3 and all(np.isfinite(loss) for loss in first["losses"])
    saved = sorted((Path(workdir) / "checkpoints").glob("*/data_iter/process_0-of-1.json"))
    assert saved, "the iterator state is saved next to the train state"
    assert json.loads(saved[-1].read_text())["pipeline"]["data_dir"] == str(data)
    resumed = train(config(5), workdir)
    assert resumed["start_step"] == 3 and resumed["final_step"] == 5
