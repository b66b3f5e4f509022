"""Every training command line meets an expected user error with one line on stderr and a non-zero exit;
`--verbose` shows the traceback instead (launch.py, embed, crossval; data_prep and interop have their own
tests in test_data_prep_cli.py and test_interop_cli.py)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest
from conftest import CACHE_DIR, ROOT

ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": CACHE_DIR, "USF_MAE_HOST_HUGEPAGES": "0"}


def run(*args: str) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stderr


def error_line(stderr: str) -> str:
    """The one line an expected error prints (absl's own start-up chatter aside)."""
    lines = [line for line in stderr.splitlines() if line.strip() and "absl::InitializeLog" not in line
             and not line.startswith(("I1", "W1", "WARNING: All log"))]
    assert len(lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr
    return lines[0]


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.fixture(scope="module")
def evil_pth(tmp_path_factory):
    path = tmp_path_factory.mktemp("evil") / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": _Evil()}, f)
    return str(path)


def test_launch_with_an_unsafe_init_checkpoint_prints_one_line(evil_pth, tmp_path):
    workdir = tmp_path / "run"
    code, err = run("launch.py", "--config=configs/pretrain.py:demo,runlocal", f"--workdir={workdir}",
                    f"--config.init={evil_pth}")
    assert code == 2
    assert error_line(err).startswith("launch.py: ") and "refusing to load global" in err and "pwned" not in err
    assert not workdir.exists()  # the init is read before anything is written


@pytest.mark.parametrize(("override", "message"), [
    ("--config.total_steps=-5", "total_steps must not be negative, got -5"),
    ("--config.batch_size=0", "batch_size must be a positive integer, got 0"),
    ("--config.init=/no/such/file.pth", "checkpoint path /no/such/file.pth does not exist"),
    ("--config.input.source=shards", "input.data_dir is empty"),
])
def test_launch_config_errors_are_one_line(tmp_path, override, message):
    code, err = run("launch.py", "--config=configs/pretrain.py:demo,runlocal", f"--workdir={tmp_path}/w", override)
    assert code == 2 and message in error_line(err)


@pytest.fixture(scope="module")
def shards_96(tmp_path_factory):
    """Synthetic 96x96 frames as `python -m data_prep synthetic` writes them: not the demo's 64 px."""
    out = tmp_path_factory.mktemp("shards96")
    code, err = run("-m", "data_prep", "synthetic", f"--out_dir={out}", "--count=40", "--size=96", "--no_progress")
    assert code == 0, err
    return str(out)


def test_demo_trains_on_shards_of_another_frame_size(shards_96, tmp_path):
    code, err = run("launch.py", "--config=configs/pretrain.py:demo", f"--workdir={tmp_path}/w",
                    "--config.input.source=shards", f"--config.input.data_dir={shards_96}", "--config.total_steps=2")
    assert code == 0, err[-3000:]
    assert "pretrain finished at step 2" in err and "nearest64" not in err


def test_augment_none_on_frames_of_another_size_is_one_line(shards_96, tmp_path):
    code, err = run("launch.py", "--config=configs/pretrain.py:demo", f"--workdir={tmp_path}/w",
                    "--config.input.source=shards", f"--config.input.data_dir={shards_96}",
                    "--config.input.augment=none")
    assert code == 2
    assert error_line(err) == (f"launch.py: input.augment='none' feeds frames unchanged to a 64x64 model, but "
                               f"{shards_96}/synthetic holds 96x96 frames: set --config.input.augment=eval (nearest "
                               f"resize to 64) or --config.model.img_size=96")


def test_launch_verbose_shows_the_traceback(tmp_path):
    code, err = run("launch.py", "--config=configs/pretrain.py:demo,runlocal", f"--workdir={tmp_path}/w",
                    "--config.batch_size=0", "--verbose")
    assert code != 0 and "Traceback" in err and "batch_size must be a positive integer" in err


def test_finetune_without_data_is_one_line(tmp_path):
    code, err = run("launch.py", "--config=configs/finetune.py:busbra,runlocal", f"--workdir={tmp_path}/w",
                    f"--config.input.data_dir={tmp_path}/missing")
    assert code == 2 and f"input.data_dir {tmp_path}/missing is not a directory" in error_line(err)


def test_embed_and_crossval_errors_are_one_line(evil_pth, tmp_path):
    code, err = run("-m", "usf_mae_jax.embed", f"--data_dir={tmp_path}")
    assert code == 2 and error_line(err) == "embed: --init is required (a workdir, an interop import dir or a .pth)"
    code, err = run("-m", "usf_mae_jax.embed", f"--init={evil_pth}", f"--data_dir={tmp_path}")
    assert code == 2 and "refusing to load global" in error_line(err)
    code, err = run("-m", "usf_mae_jax.trainers.crossval", "--config=configs/finetune.py:busbra,runlocal",
                    f"--workdir={tmp_path}/cv", "--folds=1,two")
    assert code == 2 and error_line(err) == "crossval: --folds must be comma-separated integers, got '1,two'"
