"""`python -m usf_mae_jax.interop import/export` on a small checkpoint built here, and its one-line errors:
unsafe, missing and truncated checkpoints, an existing export target, a full disk."""

from __future__ import annotations

import errno
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from faults import one_error_line

from usf_mae_jax.interop import __main__ as cli
from usf_mae_jax.interop import torch_mae, torch_pickle
from usf_mae_jax.torch_reference import build_reference_mae

ARCH = dict(img_size=32, patch_size=8, in_chans=3, width=32, depth=2, heads=4, decoder_width=32,
            decoder_depth=1, decoder_heads=2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A perturbed mu-width MAE with 4 heads (not the preset's 2), saved as a training checkpoint."""
    torch.manual_seed(0)
    model = build_reference_mae(**ARCH)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "pos_embed" not in name:
                param.add_(torch.randn_like(param) * 0.05)
    path = tmp_path_factory.mktemp("ckpt") / "mae.pth"
    torch.save({"model": model.state_dict(), "epoch": 7}, path)
    return path, {k: v.numpy() for k, v in model.state_dict().items()}


def test_import_writes_orbax_dir_that_load_pretrained_reads(tmp_path, checkpoint, capsys):
    path, state_dict = checkpoint
    out = tmp_path / "imported"
    assert cli.main(["import", "--checkpoint", str(path), "--out", str(out), "--heads", "4"]) == 0
    printed = capsys.readouterr().out
    assert "verified (2): decoder_pos_embed, pos_embed" in printed and "unexpected (0)" in printed
    assert "wrote" in printed and " s" in printed
    assert sorted(os.listdir(out)) == ["conversion_report.json", "model_config.json", "params"]
    saved_config = json.loads((out / "model_config.json").read_text())
    assert (saved_config["heads"], saved_config["width"], saved_config["depth"]) == (4, 32, 2)
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["source"] == str(path) and report["missing"] == [] and len(report["used"]) == len(state_dict) - 2

    params, config, _ = torch_mae.load_pretrained(out)
    expected, _ = torch_mae.torch_to_flax(state_dict, config)
    flat, flat_expected = torch_mae.flatten(params), torch_mae.flatten(expected)
    assert flat.keys() == flat_expected.keys()
    assert all(np.array_equal(flat[p], flat_expected[p]) for p in flat)
    capsys.readouterr()
    assert cli.main(["import", "--checkpoint", str(path), "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"python -m usf_mae_jax.interop import: {out}/params already exists; "
                                       "choose another --out or remove it\n")


def test_export_round_trips_to_the_original_keys(tmp_path, checkpoint):
    path, state_dict = checkpoint
    out = tmp_path / "imported"
    cli.main(["import", "--checkpoint", str(path), "--out", str(out), "--heads", "4"])
    mae_file = tmp_path / "mae.safetensors"
    assert cli.main(["export", "--checkpoint", str(out), "--out", str(mae_file)]) == 0
    tensors, metadata = torch_pickle.read_safetensors(mae_file)
    assert sorted(tensors) == sorted(state_dict)
    assert all(np.array_equal(tensors[k], v) for k, v in state_dict.items())
    assert metadata["format"] == "mae" and json.loads(metadata["model_config"])["heads"] == 4
    # Our own export records the heads, so re-importing it needs no --heads.
    _, config, _ = torch_mae.load_pretrained(mae_file)
    assert config.heads == 4

    timm_file = tmp_path / "timm.safetensors"
    cli.main(["export", "--checkpoint", str(path), "--out", str(timm_file), "--format", "timm_vit",
              "--heads", "4"])
    tensors, metadata = torch_pickle.read_safetensors(timm_file)
    assert metadata["format"] == "timm_vit" and json.loads(metadata["model_config"])["heads"] == 4
    encoder_keys = {k for k in state_dict if not k.startswith(("decoder", "mask_token"))}
    assert set(tensors) == encoder_keys


def test_cli_errors_are_clear(tmp_path, checkpoint, capsys):
    _, state_dict = checkpoint
    with_extra = tmp_path / "extra.pth"
    torch.save({**{k: torch.from_numpy(v) for k, v in state_dict.items()}, "dist_token": torch.zeros(1, 1, 32)},
               with_extra)
    assert cli.main(["import", "--checkpoint", str(with_extra), "--out", str(tmp_path / "a")]) == 2
    assert "unexpected checkpoint keys ['dist_token']" in capsys.readouterr().err
    with pytest.raises(torch_mae.UnexpectedKeysError, match="dist_token"):  # --verbose: the exception itself
        cli.main(["--verbose", "import", "--checkpoint", str(with_extra), "--out", str(tmp_path / "a")])
    cli.main(["import", "--checkpoint", str(with_extra), "--out", str(tmp_path / "b"), "--allow_unexpected"])
    report = json.loads((tmp_path / "b" / "conversion_report.json").read_text())
    assert report["unexpected"] == ["dist_token"]
    with pytest.raises(FileNotFoundError, match=r"no model_config\.json"):
        torch_mae.load_pretrained(tmp_path)


def test_module_entry_point(tmp_path, checkpoint):
    path, _ = checkpoint
    result = subprocess.run([sys.executable, "-m", "usf_mae_jax.interop", "export", "--checkpoint", str(path),
                             "--out", str(tmp_path / "x.safetensors")], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), check=False)
    assert result.returncode == 0, result.stderr
    assert "exported" in result.stdout and (tmp_path / "x.safetensors").is_file()


def _interop(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "usf_mae_jax.interop", *args], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), check=False)


class _RunsShell:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_unsafe_pickle_is_one_line_and_never_runs(tmp_path):
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"model": _RunsShell()}, protocol=2))
    result = _interop("import", "--checkpoint", str(evil), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "pwned" not in result.stdout
    assert one_error_line(result.stderr) == (
        f"python -m usf_mae_jax.interop import: {evil}: refusing to load global 'posix.system'; only tensors, "
        "storages, OrderedDict and plain containers are allowed (the pickle was not executed)")
    assert not (tmp_path / "out").exists()
    verbose = _interop("--verbose", "import", "--checkpoint", str(evil), "--out", str(tmp_path / "out"))
    assert verbose.returncode != 0 and "Traceback" in verbose.stderr and "UnsafeCheckpointError" in verbose.stderr


@pytest.mark.parametrize("name, content, message", [
    ("missing.pth", None, "checkpoint {path} does not exist"),
    ("truncated.pth", pickle.dumps({"a": 1}, protocol=2)[:-3],
     "{path}: corrupt or truncated checkpoint (UnpicklingError: pickle data was truncated)"),
])
def test_unreadable_checkpoints_are_one_line(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    assert cli.main(["export", "--checkpoint", str(path), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        "python -m usf_mae_jax.interop export: " + message.format(path=path))


def test_export_refuses_to_overwrite(tmp_path, checkpoint, capsys):
    path, _ = checkpoint
    out = tmp_path / "mine.safetensors"
    out.write_bytes(b"precious")
    assert cli.main(["export", "--checkpoint", str(path), "--out", str(out), "--heads", "4"]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        f"python -m usf_mae_jax.interop export: {out} already exists; pass --overwrite to replace it")
    assert out.read_bytes() == b"precious"
    assert cli.main(["export", "--checkpoint", str(path), "--out", str(out), "--heads", "4", "--overwrite"]) == 0
    assert len(torch_pickle.read_safetensors(out)[0]) > 10


def test_export_on_a_full_disk_leaves_no_file(tmp_path, checkpoint, monkeypatch, capsys):
    path, _ = checkpoint
    out = tmp_path / "x.safetensors"

    def full_disk(target, tensors, metadata=None):
        with open(target, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # a failed write() names no file

    monkeypatch.setattr(torch_pickle, "write_safetensors", full_disk)
    assert cli.main(["export", "--checkpoint", str(path), "--out", str(out), "--heads", "4"]) == 1
    assert one_error_line(capsys.readouterr().err) == (
        "python -m usf_mae_jax.interop export: No space left on device (the disk is full: free space or choose "
        f"another output folder): {tmp_path / '.x.safetensors.tmp'}")
    assert os.listdir(tmp_path) == []


def test_export_of_a_pretraining_workdir_loads_into_a_timm_layout_vit(tmp_path, capsys):
    """The workdir is the main thing a user exports: read-only, its newest or a chosen step."""
    from configs import pretrain as pretrain_configs
    from usf_mae_jax.core import checkpoint as ckpt
    from usf_mae_jax.torch_reference import TimmStyleViT
    from usf_mae_jax.trainers import loop
    from usf_mae_jax.trainers.pretrain import PretrainTask

    config = pretrain_configs.get_config("demo,runlocal")  # mu: width 32, 1 block, 2 heads, 32 px, patch 8
    workdir = str(tmp_path / "pretrain")
    loop.run(config, workdir, PretrainTask(config))
    listing = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    out = tmp_path / "vit.safetensors"
    assert cli.main(["export", "--checkpoint", workdir, "--out", str(out), "--format", "timm_vit"]) == 0
    assert "exported" in capsys.readouterr().out
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == listing  # nothing written to the workdir
    tensors, _ = torch_pickle.read_safetensors(str(out))
    vit = TimmStyleViT(32, 8, 3, 32, 1, 2).eval()
    vit.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in tensors.items()}, strict=True)
    params, _ = ckpt.load_params(workdir)
    np.testing.assert_array_equal(tensors["blocks.0.attn.qkv.weight"], params["blocks_0"]["attn"]["qkv"]["kernel"].T)

    older = tmp_path / "step2.safetensors"
    assert cli.main(["export", "--checkpoint", workdir, "--out", str(older), "--step", "2"]) == 0
    step2, _ = ckpt.read_workdir_params(workdir, step=2)
    exported_2, _ = torch_pickle.read_safetensors(str(older))
    np.testing.assert_array_equal(exported_2["decoder_pred.weight"], step2["decoder_pred"]["kernel"].T)
    capsys.readouterr()
    # The 4-step runlocal run checkpoints every step (a tenth of it, rounded up) and keeps 3: steps 2, 3, 4.
    assert cli.main(["export", "--checkpoint", workdir, "--out", str(tmp_path / "s1.safetensors"), "--step", "1"]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        f"python -m usf_mae_jax.interop export: {workdir} has no checkpoint of step 1; it has steps [2, 3, 4]")
