"""Hugging Face `transformers` ViTMAE interop (usf_mae_jax/interop/hf_vitmae.py) against the real library.

Our params (every tensor perturbed, so a swapped mapping cannot hide behind a LayerNorm's 1 or 0) are exported
with `export_hf_dir`, loaded by `ViTMAEForPreTraining` / `ViTMAEModel.from_pretrained`, and both models get the
same images and the same masking noise. Import reads what transformers itself writes (`save_pretrained`, a
pickled `pytorch_model.bin`, an encoder-only `ViTMAEModel`) back to bit-identical params.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import pickle
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from faults import one_error_line
from flax import nnx
from PIL import Image
from transformers import AutoImageProcessor, ViTMAEConfig, ViTMAEForPreTraining, ViTMAEModel
from transformers.models.vit_mae import modeling_vit_mae

from usf_mae_jax.cli import CheckpointError
from usf_mae_jax.core import checkpoint as ckpt
from usf_mae_jax.data import augment
from usf_mae_jax.interop import __main__ as cli
from usf_mae_jax.interop import hf_vitmae, torch_mae, torch_pickle, weights
from usf_mae_jax.models import pos_embed, vit
from usf_mae_jax.models.mae import MaskedAutoencoder

TOLERANCE = 1e-5  # as tests/test_torch_parity.py
# 4 encoder heads and 2 decoder heads: a wrong head order in the q/k/v split changes the outputs.
CONFIG = vit.ModelConfig(img_size=32, patch_size=8, in_chans=3, width=32, depth=2, heads=4, decoder_width=32,
                         decoder_depth=1, decoder_heads=2)
PROG = "python -m usf_mae_jax.interop"


def perturbed_params(config: vit.ModelConfig, seed: int = 0) -> dict:
    """Our MAE's params (NumPy), matrices and tokens moved by 0.02, vectors (LayerNorms, biases) by 0.1."""
    model = MaskedAutoencoder(config, rngs=nnx.Rngs(seed))
    flat = torch_mae.flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    rng = np.random.default_rng(seed)
    return torch_mae.unflatten({path: (np.asarray(v) + rng.normal(size=v.shape) * (0.1 if v.ndim == 1 else 0.02))
                                .astype(np.float32) for path, v in flat.items()})


def our_model(config: vit.ModelConfig, params: dict) -> MaskedAutoencoder:
    model = MaskedAutoencoder(config, rngs=nnx.Rngs(0))
    torch_mae.load_params_into(model, jax.tree.map(jnp.asarray, params))
    return model


@nnx.jit(static_argnums=3)
def run_ours(model: MaskedAutoencoder, images, noise, mask_ratio: float):
    loss, pred, mask = model(images, mask_ratio=mask_ratio, noise=noise)
    latent, _, ids_restore = model.forward_encoder(images, mask_ratio, noise)
    return loss, pred, mask, latent, ids_restore, model.encode(images)


def max_difference(ours, theirs: torch.Tensor) -> float:
    return float(np.max(np.abs(np.asarray(ours, np.float64) - theirs.detach().double().numpy())))


def assert_same_params(ours: dict, expected: dict) -> None:
    flat, flat_expected = torch_mae.flatten(ours), torch_mae.flatten(expected)
    assert flat.keys() == flat_expected.keys()
    for path, value in flat_expected.items():
        assert np.asarray(flat[path]).dtype == np.float32 and np.array_equal(flat[path], value), path


@pytest.fixture(scope="module")
def params():
    return perturbed_params(CONFIG)


def test_transformers_builds_our_position_tables():
    """HF's own table builders (used by its `initialize_weights`) give our sin-cos tables, bit for bit."""
    config = ViTMAEConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128,
                          image_size=32, patch_size=8, decoder_hidden_size=16, decoder_num_hidden_layers=1,
                          decoder_num_attention_heads=2, decoder_intermediate_size=64)
    model = ViTMAEForPreTraining(config)
    # transformers 5.25.0 marks the patch projection initialised after `post_init` and then skips the
    # embeddings' initialize_weights, leaving zero tables; clear the mark to run HF's own initialisation.
    model.vit.embeddings.patch_embeddings.projection._is_hf_initialized = False
    model.vit.embeddings.initialize_weights()
    model.decoder.initialize_weights(16)
    np.testing.assert_array_equal(model.vit.embeddings.position_embeddings[0].detach().numpy(),
                                  pos_embed.sincos_2d(32, 4))
    np.testing.assert_array_equal(model.decoder.decoder_pos_embed[0].detach().numpy(), pos_embed.sincos_2d(16, 4))
    base = modeling_vit_mae.build_2d_sinusoidal_position_embedding(14, 14, 768, cls_token=True)
    swapped = torch.cat([base[:, 384:], base[:, :384]], dim=1).numpy()  # the halves swap initialize_weights does
    np.testing.assert_array_equal(swapped, pos_embed.sincos_2d(768, 14))
    assert not np.array_equal(base.numpy(), pos_embed.sincos_2d(768, 14))  # unswapped, it is another table


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_export_loads_in_transformers_and_computes_the_same(tmp_path, params, norm_pix_loss, capsys):
    config = dataclasses.replace(CONFIG, norm_pix_loss=norm_pix_loss)
    out = tmp_path / "hf"
    tensors = hf_vitmae.export_hf_dir(params, config, str(out), mask_ratio=0.75)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    assert os.listdir(tmp_path) == ["hf"]  # the temporary folder was renamed
    # The hub layout of facebook/vit-mae-*: what transformers 4 reads as it is.
    assert {"vit.encoder.layer.1.attention.attention.query.weight", "decoder.decoder_layers.0.output.dense.bias",
            "vit.embeddings.position_embeddings", "decoder.decoder_pos_embed"} <= set(tensors)
    saved = json.loads((out / "config.json").read_text())
    assert (saved["layer_norm_eps"], saved["norm_pix_loss"], saved["mask_ratio"]) == (1e-6, norm_pix_loss, 0.75)

    pretraining, info = ViTMAEForPreTraining.from_pretrained(out, output_loading_info=True)
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    assert pretraining.config.norm_pix_loss is norm_pix_loss and pretraining.config.layer_norm_eps == 1e-6
    for table in (pretraining.vit.embeddings.position_embeddings, pretraining.decoder.decoder_pos_embed):
        np.testing.assert_array_equal(table[0].detach().numpy(), pos_embed.sincos_2d(32, 4))
    # The base model loads the encoder; the file's decoder is all it leaves unused.
    encoder, info = ViTMAEModel.from_pretrained(out, output_loading_info=True, mask_ratio=0.0)
    assert info["missing_keys"] == set() and info["mismatched_keys"] == set()
    decoder_keys = [k for k in tensors if k.startswith("decoder.")]
    assert all(k.startswith("decoder.") for k in info["unexpected_keys"])
    assert len(info["unexpected_keys"]) == len(decoder_keys) == 24
    masked_encoder = ViTMAEModel.from_pretrained(out)  # the config's mask ratio, 0.75

    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 32, 32, generator=generator)
    noise = torch.rand(2, 16, generator=generator)
    ours = run_ours(our_model(config, params), jnp.asarray(images.permute(0, 2, 3, 1).numpy()),
                    jnp.asarray(noise.numpy()), 0.75)
    our_loss, our_pred, our_mask, our_latent, our_restore, our_features = ours
    with torch.no_grad():
        theirs = pretraining(pixel_values=images, noise=noise)
        masked = masked_encoder(pixel_values=images, noise=noise)
        # With mask ratio 0 HF still orders the tokens by argsort(noise): ascending noise keeps patch order, so
        # its output lines up with our unmasked `encode`.
        unmasked = encoder(pixel_values=images, noise=torch.arange(16.0).expand(2, 16))
    assert np.array_equal(np.asarray(our_mask), theirs.mask.numpy()) and float(np.sum(our_mask)) == 24
    assert np.array_equal(np.asarray(our_restore), masked.ids_restore.numpy())
    differences = {"loss": max_difference(our_loss, theirs.loss), "pred": max_difference(our_pred, theirs.logits),
                   "masked latent": max_difference(our_latent, masked.last_hidden_state),
                   "features": max_difference(our_features, unmasked.last_hidden_state)}
    with capsys.disabled():
        print(f"\nhf_vitmae parity (norm_pix_loss={norm_pix_loss}) max abs differences: {differences}")
    assert max(differences.values()) < TOLERANCE, differences
    assert float(theirs.loss) > 0.1  # a real loss, not two zeros agreeing


def test_preprocessor_matches_our_evaluation_input(tmp_path, params):
    hf_vitmae.export_hf_dir(params, CONFIG, str(tmp_path / "hf"))
    processor = AutoImageProcessor.from_pretrained(tmp_path / "hf")
    rng = np.random.default_rng(3)
    grey = rng.integers(0, 256, (45, 61), dtype=np.uint8)
    colour = rng.integers(0, 256, (40, 29, 3), dtype=np.uint8)
    for frame in (grey, colour):
        theirs = processor(images=Image.fromarray(frame), return_tensors="np")["pixel_values"]
        resized = augment.resize_nearest(frame if frame.ndim == 3 else frame[:, :, None], 32)
        ours = np.asarray(vit.normalize_images(jnp.asarray(resized[None])))
        assert theirs.shape == (1, 3, 32, 32)
        np.testing.assert_allclose(theirs.transpose(0, 2, 3, 1), ours, rtol=0, atol=1e-6)


def test_import_reads_what_transformers_writes(tmp_path, params):
    exported = tmp_path / "ours"
    hf_vitmae.export_hf_dir(params, CONFIG, str(exported))
    model = ViTMAEForPreTraining.from_pretrained(exported)

    # transformers 5.25.0's save_pretrained: the decoder blocks as `decoder.decoder_encoder.layer.N`.
    model.save_pretrained(tmp_path / "saved")
    saved = torch_pickle.read_safetensors(tmp_path / "saved" / "model.safetensors")[0]
    assert "decoder.decoder_encoder.layer.0.attention.attention.query.weight" in saved
    loaded, config, report = hf_vitmae.load_hf_dir(str(tmp_path / "saved"))
    assert_same_params(loaded, params)
    assert config == CONFIG and report["missing"] == report["unexpected"] == [] and report["notes"] == []
    assert report["verified"] == ["decoder.decoder_pos_embed", "vit.embeddings.position_embeddings"]

    # A pickled state dict with transformers 5's module names, read by the refusing unpickler.
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((exported / "config.json").read_text())
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    assert "vit.layers.0.attention.q_proj.weight" in model.state_dict()
    assert_same_params(weights.load_weights(str(pickled))[0], params)  # the `init` path

    # An encoder-only ViTMAEModel (no `vit.` prefix), from a config with HF's default layer_norm_eps.
    encoder = ViTMAEModel.from_pretrained(exported, layer_norm_eps=1e-12)
    encoder.save_pretrained(tmp_path / "encoder")
    loaded, fields = weights.load_weights(str(tmp_path / "encoder"))
    assert_same_params(loaded, {k: v for k, v in params.items() if not k.startswith(("decoder", "mask_token"))})
    assert fields["depth"] == 2 and fields["heads"] == 4
    report = hf_vitmae.load_hf_dir(str(tmp_path / "encoder"))[2]
    assert len(report["missing"]) == 23 and all(k.startswith("decoder.") for k in report["missing"])
    assert report["notes"] == [f"{tmp_path / 'encoder' / 'config.json'} sets layer_norm_eps 1e-12; our "
                               "LayerNorms use 1e-06, the reference MAE's"]
    assert "the decoder is not in the checkpoint" in torch_mae.format_report(report)


def test_encoder_only_export_is_a_vitmae_model(tmp_path, params):
    encoder_params = {k: v for k, v in params.items() if not k.startswith(("decoder", "mask_token"))}
    tensors = hf_vitmae.export_hf_dir(encoder_params, CONFIG, str(tmp_path / "hf"))
    assert not any(k.startswith("decoder.") for k in tensors)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["ViTMAEModel"]
    _, info = ViTMAEModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert info["missing_keys"] == info["unexpected_keys"] == set()
    with pytest.raises(CheckpointError, match=r"classifier entries \['fc_norm', 'head'\].*--format timm_vit"):
        hf_vitmae.export_hf_dir({**encoder_params, "fc_norm": {}, "head": {}}, CONFIG, str(tmp_path / "x"))


def test_workdir_export_and_import_through_the_cli(tmp_path, capsys):
    """A pretraining workdir -> hf_vitmae folder -> `init` and `interop import`: bit-identical params."""
    from configs import pretrain as pretrain_configs
    from usf_mae_jax.trainers import loop
    from usf_mae_jax.trainers.pretrain import PretrainTask

    start = time.perf_counter()
    config = pretrain_configs.get_config("demo,runlocal")  # mu: width 32, 1 block, 2 heads, 32 px, patch 8
    config.model.mask_ratio = 0.6
    workdir = str(tmp_path / "pretrain")
    loop.run(config, workdir, PretrainTask(config))
    listing = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    trained_s = time.perf_counter() - start
    out = tmp_path / "hf"
    assert cli.main(["export", "--checkpoint", workdir, "--out", str(out), "--format", "hf_vitmae"]) == 0
    assert "exported" in capsys.readouterr().out
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == listing  # read-only
    assert json.loads((out / "config.json").read_text())["mask_ratio"] == 0.6
    model, info = ViTMAEForPreTraining.from_pretrained(out, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    assert model.config.mask_ratio == 0.6

    params, fields = ckpt.load_params(workdir)
    loaded, loaded_fields = weights.load_weights(str(out))
    assert_same_params(loaded, params)
    architecture = ("img_size", "patch_size", "width", "depth", "heads", "decoder_width", "decoder_heads")
    assert {k: loaded_fields[k] for k in architecture} == {k: fields[k] for k in architecture}
    from usf_mae_jax.trainers import initialization

    provenance = initialization.init_provenance(str(out))
    assert provenance["kind"] == "hf_vitmae_dir" and set(provenance["files"]) == {
        "config.json", "model.safetensors", "preprocessor_config.json"}
    assert cli.main(["import", "--checkpoint", str(out), "--out", str(tmp_path / "imported")]) == 0
    assert "unexpected (0)" in capsys.readouterr().out
    assert_same_params(torch_mae.load_pretrained(tmp_path / "imported")[0], params)

    assert cli.main(["export", "--checkpoint", workdir, "--out", str(out), "--format", "hf_vitmae"]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        f"{PROG} export: {out} already exists; pass --overwrite to replace it")
    assert cli.main(["export", "--checkpoint", workdir, "--out", str(out), "--format", "hf_vitmae", "--step", "2",
                     "--overwrite"]) == 0
    step2, _ = ckpt.read_workdir_params(workdir, step=2)
    assert_same_params(weights.load_weights(str(out))[0], step2)
    assert sorted(os.listdir(tmp_path)) == ["hf", "imported", "pretrain"]
    with capsys.disabled():
        print(f"\npretraining workdir built in {trained_s:.1f} s, exports and imports in "
              f"{time.perf_counter() - start - trained_s:.1f} s")


def test_export_never_replaces_a_foreign_folder_nor_leaves_a_partial_one(tmp_path, params, monkeypatch, capsys):
    source = tmp_path / "source"
    hf_vitmae.export_hf_dir(params, CONFIG, str(source))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    args = ["export", "--checkpoint", str(source), "--format", "hf_vitmae", "--overwrite"]
    assert cli.main([*args, "--out", str(mine)]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        f"{PROG} export: --out {mine} is not a folder written by this export (it holds other files); "
        "refusing to replace it")
    assert (mine / "notes.txt").read_text() == "precious"

    def full_disk(target, tensors, metadata=None):
        with open(target, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch_pickle, "write_safetensors", full_disk)
    assert cli.main([*args, "--out", str(tmp_path / "new")]) == 1
    assert "No space left on device" in one_error_line(capsys.readouterr().err)
    assert sorted(os.listdir(tmp_path)) == ["mine", "source"]


class _RunsShell:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _broken_dir(tmp_path, source, name: str) -> str:
    """A copy of the exported folder `source`, spoilt as `name` says."""
    folder = tmp_path / name
    folder.mkdir()
    config = json.loads((source / "config.json").read_text())
    tensors, metadata = torch_pickle.read_safetensors(source / "model.safetensors")
    if name == "deeper_config":
        config["num_hidden_layers"] = 3
    elif name == "shallower_config":
        config["num_hidden_layers"] = 1
    elif name == "wider_config":
        config.update(hidden_size=64, intermediate_size=256)
    elif name == "not_vitmae":
        config["model_type"] = "vit"
    elif name == "moved_table":
        tensors["vit.embeddings.position_embeddings"] = tensors["vit.embeddings.position_embeddings"] + 1e-3
    (folder / "config.json").write_text(json.dumps(config))
    if name == "unsafe_pickle":
        (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"model": _RunsShell(tmp_path / "pwned")}, 2))
    elif name == "truncated":
        (folder / "model.safetensors").write_bytes((source / "model.safetensors").read_bytes()[:1000])
    else:
        torch_pickle.write_safetensors(folder / "model.safetensors", tensors, metadata)
    return str(folder)


@pytest.mark.parametrize("name, message", [
    ("deeper_config", "{dir}/model.safetensors: lacks ['vit.encoder.layer.2.attention.attention.key.bias', "),
    ("shallower_config", "{dir}/model.safetensors: keys ['vit.encoder.layer.1.attention.attention.key.bias', "),
    ("wider_config", "{dir}/model.safetensors: shapes do not fit the model {dir}/config.json describes (2 "
                     "blocks of width 64"),
    ("not_vitmae", "{dir}/config.json: model_type 'vit' is not 'vit_mae'; only ViTMAE directories are read"),
    ("moved_table", "{dir}/model.safetensors: vit.embeddings.position_embeddings: differs from our fixed 2-D "
                    "sin-cos table by up to 0.001"),
    ("unsafe_pickle", "{dir}/pytorch_model.bin: refusing to load global 'posix.system'"),
    ("truncated", "{dir}/model.safetensors: header size"),
])
def test_bad_directories_are_one_line_errors_naming_the_file(tmp_path, params, capsys, name, message):
    source = tmp_path / "source"
    hf_vitmae.export_hf_dir(params, CONFIG, str(source))
    folder = _broken_dir(tmp_path, source, name)
    expected = message.format(dir=folder)
    assert cli.main(["import", "--checkpoint", folder, "--out", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"{PROG} import: {expected}"), line
    with pytest.raises(CheckpointError) as raised:  # the `init` path: the same message
        weights.load_weights(folder)
    assert str(raised.value).startswith(expected)
    assert not (tmp_path / "out").exists() and not (tmp_path / "pwned").exists()
