"""Parity of our Flax MAE with a plain-torch reference, through the checkpoint converter and safe loader.

Every reference weight is perturbed (LayerNorm scales and biases included), so a swapped or untransposed
mapping cannot hide behind an initial value of 1 or 0. The reference is saved as `{'model': state_dict}`
with torch.save and loaded back through our torch-free reader.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from usf_mae_jax.interop import torch_mae, torch_pickle
from usf_mae_jax.models import vit
from usf_mae_jax.models.mae import MaskedAutoencoder
from usf_mae_jax.torch_reference import TimmStyleViT, build_reference_mae

TOLERANCE = 1e-5
# Architectures given to the reference; heads must match the preset of that width (mu: 2, small: 6).
MU_8PX = dict(img_size=32, patch_size=8, in_chans=3, width=32, depth=1, heads=2, decoder_width=32,
              decoder_depth=1, decoder_heads=2)
SMALL_2BLOCK = dict(img_size=64, patch_size=16, in_chans=3, width=384, depth=2, heads=6, decoder_width=256,
                    decoder_depth=1, decoder_heads=8)
BASE = dict(img_size=224, patch_size=16, in_chans=3, width=768, depth=12, heads=12, decoder_width=512,
            decoder_depth=8, decoder_heads=16)


def perturbed_reference(arch: dict, seed: int = 0, norm_pix_loss: bool = False):
    """The reference MAE with every trainable tensor moved away from its initial value."""
    torch.manual_seed(seed)
    model = build_reference_mae(**arch, norm_pix_loss=norm_pix_loss).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "pos_embed" not in name:  # matrices and tokens by 0.02 (trained-ViT scale), 1-D by 0.1
                param.add_(torch.randn_like(param) * (0.1 if param.ndim == 1 else 0.02))
    return model


def save_checkpoint(path, state_dict, **extra) -> str:
    torch.save({"model": state_dict, **extra}, path)
    return str(path)


def to_nhwc(images: torch.Tensor) -> jnp.ndarray:
    return jnp.asarray(images.permute(0, 2, 3, 1).numpy())


def max_difference(ours, theirs: torch.Tensor) -> float:
    return float(np.max(np.abs(np.asarray(ours, np.float64) - theirs.detach().double().numpy())))


@nnx.jit(static_argnums=3)
def run_ours(model: MaskedAutoencoder, images, noise, mask_ratio: float):
    """One compiled call for all outputs: far cheaper on CPU than op-by-op eager dispatch."""
    loss, pred, mask = model(images, mask_ratio=mask_ratio, noise=noise)
    latent, _, _ = model.forward_encoder(images, mask_ratio, noise)
    return loss, pred, mask, latent, model.encode(images)


@nnx.jit
def encode(model: MaskedAutoencoder, images):
    return model.encode(images)


def compare_with_reference(reference, model: MaskedAutoencoder, arch: dict, seed: int = 1) -> dict[str, float]:
    """Max abs differences of loss, pred, mask, masked latent and unmasked latent for the same inputs."""
    generator = torch.Generator().manual_seed(seed)
    num_patches = (arch["img_size"] // arch["patch_size"]) ** 2
    images = torch.randn(2, arch["in_chans"], arch["img_size"], arch["img_size"], generator=generator)
    noise = torch.rand(2, num_patches, generator=generator)
    with torch.no_grad():
        loss, pred, mask = reference(images, mask_ratio=0.75, noise=noise)
        latent, _, _ = reference.forward_encoder(images, 0.75, noise)
        features = reference.forward_features(images)
    our_loss, our_pred, our_mask, our_latent, our_features = run_ours(model, to_nhwc(images),
                                                                      jnp.asarray(noise.numpy()), 0.75)
    assert our_pred.shape == tuple(pred.shape) and our_latent.shape == tuple(latent.shape)
    return {"loss": max_difference(our_loss, loss), "pred": max_difference(our_pred, pred),
            "mask": max_difference(our_mask, mask), "latent": max_difference(our_latent, latent),
            "features": max_difference(our_features, features)}


@pytest.mark.parametrize("norm_pix_loss", [False, True])
@pytest.mark.parametrize("arch", [MU_8PX, SMALL_2BLOCK], ids=["mu-32px", "small2-64px"])
def test_parity_with_reference(tmp_path, arch, norm_pix_loss):
    reference = perturbed_reference(arch, norm_pix_loss=norm_pix_loss)
    path = save_checkpoint(tmp_path / "mae.pth", reference.state_dict(), epoch=3)
    model = torch_mae.load_torch_mae(path, norm_pix_loss=norm_pix_loss)
    assert model.config.norm_pix_loss is norm_pix_loss and model.config.heads == arch["heads"]
    differences = compare_with_reference(reference, model, arch)
    assert max(differences.values()) < TOLERANCE, differences


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_gradient_parity_with_reference(norm_pix_loss):
    """The gradient of the loss with respect to every parameter equals the reference's autograd gradient.

    Our masking gathers and the decoder's un-shuffle have hand-written gradients (gathers by the inverse
    permutation, `mae.take_rows`) and only the kept patches are embedded; this pins those to torch's autograd
    through the reference's `gather`s and full-length patch embedding.
    """
    arch = SMALL_2BLOCK
    reference = perturbed_reference(arch, seed=3, norm_pix_loss=norm_pix_loss)
    generator = torch.Generator().manual_seed(4)
    images = torch.randn(2, 3, arch["img_size"], arch["img_size"], generator=generator)
    noise = torch.rand(2, (arch["img_size"] // arch["patch_size"]) ** 2, generator=generator)
    reference.zero_grad()
    reference(images, mask_ratio=0.75, noise=noise)[0].backward()
    tables = {k: v.numpy() for k, v in reference.state_dict().items() if k in ("pos_embed", "decoder_pos_embed")}
    torch_grads = {name: p.grad.numpy() for name, p in reference.named_parameters() if p.requires_grad}
    config = torch_mae.infer_model_config({**torch_grads, **tables}, norm_pix_loss=norm_pix_loss)
    expected, report = torch_mae.torch_to_flax({**torch_grads, **tables}, config)
    assert report["missing"] == []
    params, _ = torch_mae.torch_to_flax({k: v.numpy() for k, v in reference.state_dict().items()}, config)
    graphdef, _ = nnx.split(MaskedAutoencoder(config, rngs=nnx.Rngs(0)))

    @jax.jit
    def grads(params, images, noise):
        return jax.grad(lambda p: nnx.merge(graphdef, p)(images, 0.75, noise=noise)[0])(params)

    ours = torch_mae.flatten(grads(jax.tree.map(jnp.asarray, params), to_nhwc(images), jnp.asarray(noise.numpy())))
    theirs = torch_mae.flatten(expected)
    assert ours.keys() == theirs.keys()
    # Absolute, as the other parity checks, and relative to each tensor's largest gradient entry.
    worst = max((float(np.max(np.abs(np.asarray(ours[p]) - theirs[p]))), "/".join(p)) for p in ours)
    assert worst[0] < TOLERANCE, worst
    relative = max((float(np.max(np.abs(np.asarray(ours[p]) - theirs[p])) / np.max(np.abs(theirs[p]))),
                    "/".join(p)) for p in ours)
    assert relative[0] < 1e-5, relative
    assert float(np.max(np.abs(theirs[("patch_embed", "proj", "kernel")]))) > 1e-3  # a gradient, not zeros


@pytest.mark.slow
def test_parity_base_224(tmp_path, capsys):
    reference = perturbed_reference(BASE, norm_pix_loss=True)
    path = save_checkpoint(tmp_path / "base.pth", reference.state_dict())
    start = time.perf_counter()
    state_dict = torch_mae.load_torch_state_dict(path)
    config = torch_mae.infer_model_config(state_dict, norm_pix_loss=True)
    torch_mae.torch_to_flax(state_dict, config)
    convert_s = time.perf_counter() - start
    start = time.perf_counter()
    model = torch_mae.load_torch_mae(path, norm_pix_loss=True)
    load_s = time.perf_counter() - start
    assert (config.width, config.depth, config.heads, config.decoder_width, config.decoder_depth,
            config.decoder_heads) == (768, 12, 12, 512, 8, 16)
    differences = compare_with_reference(reference, model, BASE)
    with capsys.disabled():
        print(f"\nbase parity max abs differences: {differences}; read+torch_to_flax {convert_s:.2f} s, "
              f"load_torch_mae {load_s:.2f} s")
    assert max(differences.values()) < TOLERANCE, differences


@pytest.fixture(scope="module")
def mu_reference():
    return perturbed_reference(MU_8PX, seed=5)


def test_key_report_lists_every_key(mu_reference):
    state_dict = {k: v.numpy() for k, v in mu_reference.state_dict().items()}
    config = torch_mae.infer_model_config(state_dict)
    params, report = torch_mae.torch_to_flax(state_dict, config)
    assert report["kind"] == "pretrain" and report["num_classes"] is None
    assert report["verified"] == ["decoder_pos_embed", "pos_embed"]
    assert sorted(report["used"]) == sorted(set(state_dict) - {"pos_embed", "decoder_pos_embed"})
    assert report["missing"] == [] and report["unexpected"] == [] and report["ignored"] == []
    # Spot-check the transforms: Linear kernel = W.T, conv (D, C, p, p) -> (p, p, C, D), LayerNorm weight.
    np.testing.assert_array_equal(params["blocks_0"]["attn"]["qkv"]["kernel"], state_dict["blocks.0.attn.qkv.weight"].T)
    np.testing.assert_array_equal(params["patch_embed"]["proj"]["kernel"][2, 5, 1],
                                  state_dict["patch_embed.proj.weight"][:, 1, 2, 5])
    np.testing.assert_array_equal(params["decoder_blocks_0"]["norm2"]["scale"],
                                  state_dict["decoder_blocks.0.norm2.weight"])
    text = torch_mae.format_report(report)
    assert "verified (2): decoder_pos_embed, pos_embed" in text and "unexpected (0)" in text


def test_param_shapes_match_the_model():
    config = vit.model_config("mu", depth=2, decoder_depth=3, patch_size=8, img_size=32)
    abstract = nnx.eval_shape(lambda: MaskedAutoencoder(config, rngs=nnx.Rngs(0)))
    traced = torch_mae.flatten(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
    assert {path: tuple(leaf.shape) for path, leaf in traced.items()} == torch_mae.mae_param_shapes(config)


def test_infer_config_heads_from_preset_or_argument():
    shapes = {"patch_embed.proj.weight": (768, 3, 16, 16), "pos_embed": (1, 197, 768),
              "blocks.0.mlp.fc1.weight": (3072, 768), "blocks.11.norm1.weight": (768,),
              "decoder_embed.weight": (512, 768), "decoder_blocks.0.mlp.fc1.weight": (2048, 512),
              "decoder_blocks.7.norm1.weight": (512,)}
    state_dict = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    config = torch_mae.infer_model_config(state_dict)
    assert (config.img_size, config.patch_size, config.width, config.depth, config.heads) == (224, 16, 768, 12, 12)
    assert (config.decoder_width, config.decoder_depth, config.decoder_heads, config.mlp_ratio) == (512, 8, 16, 4.0)
    state_dict = {"patch_embed.proj.weight": np.zeros((96, 3, 16, 16), np.float32),
                  "blocks.0.mlp.fc1.weight": np.zeros((384, 96), np.float32)}
    with pytest.raises(ValueError, match="no size preset has width 96; pass heads="):
        torch_mae.infer_model_config(state_dict)
    assert torch_mae.infer_model_config(state_dict, heads=4).heads == 4


def test_export_round_trip_is_bit_exact(tmp_path, mu_reference):
    state_dict = {k: v.numpy() for k, v in mu_reference.state_dict().items()}
    config = torch_mae.infer_model_config(state_dict)
    params, _ = torch_mae.torch_to_flax(state_dict, config)
    exported = torch_mae.flax_to_torch(params, config, "mae")
    assert sorted(exported) == sorted(state_dict)
    for key, value in state_dict.items():
        assert exported[key].dtype == value.dtype and np.array_equal(exported[key], value), key
    again, _ = torch_mae.torch_to_flax(exported, config)
    flat, flat_again = torch_mae.flatten(params), torch_mae.flatten(again)
    assert flat.keys() == flat_again.keys()
    assert all(np.array_equal(flat[p], flat_again[p]) for p in flat)
    # The export loads strictly into the reference model.
    reloaded = build_reference_mae(**MU_8PX)
    reloaded.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)


def test_missing_decoder_is_tolerated(tmp_path, mu_reference):
    full = mu_reference.state_dict()
    encoder_only = {k: v for k, v in full.items() if not k.startswith(("decoder", "mask_token"))}
    path = save_checkpoint(tmp_path / "encoder.pth", encoder_only)
    state_dict = torch_mae.load_torch_state_dict(path)
    config = torch_mae.infer_model_config(state_dict)
    _, report = torch_mae.torch_to_flax(state_dict, config)
    decoder_keys = sorted(k for k in full if k.startswith(("decoder", "mask_token")) and "pos_embed" not in k)
    assert sorted(report["missing"]) == decoder_keys and report["verified"] == ["pos_embed"]
    assert "decoder is not in the checkpoint" in torch_mae.format_report(report)
    model = torch_mae.load_torch_mae(path)
    assert model.config.decoder_width == vit.SIZES["mu"]["decoder_width"]
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = mu_reference.forward_features(images)
    assert max_difference(encode(model, to_nhwc(images)), features) < TOLERANCE


def perturbed_timm_vit(arch: dict, num_classes=0, global_pool=False, seed=0) -> TimmStyleViT:
    torch.manual_seed(seed)
    model = TimmStyleViT(arch["img_size"], arch["patch_size"], arch["in_chans"], arch["width"], arch["depth"],
                         arch["heads"], num_classes=num_classes, global_pool=global_pool).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * (0.1 if param.ndim == 1 else 0.02))
    return model


def test_finetuned_checkpoint_is_accepted(tmp_path):
    classifier = perturbed_timm_vit(MU_8PX, num_classes=5, global_pool=True)
    path = save_checkpoint(tmp_path / "finetuned.pth", classifier.state_dict())
    params, config, report = torch_mae.load_pretrained(path)
    state_dict = {k: v.numpy() for k, v in classifier.state_dict().items()}
    assert report["kind"] == "finetune" and report["num_classes"] == 5 and report["unexpected"] == []
    assert "norm.weight" in report["missing"] and "decoder_pred.weight" in report["missing"]
    np.testing.assert_array_equal(params["head"]["kernel"], state_dict["head.weight"].T)
    np.testing.assert_array_equal(params["fc_norm"]["scale"], state_dict["fc_norm.weight"])
    # Fine-tuning trains the position table: it is returned as a parameter, not checked against ours.
    np.testing.assert_array_equal(params["pos_embed"], state_dict["pos_embed"])
    exported = torch_mae.flax_to_torch(params, config, "timm_vit")
    assert sorted(exported) == sorted(state_dict)


def test_linear_probe_checkpoint_is_accepted(mu_reference):
    state_dict = {k: v.numpy() for k, v in mu_reference.state_dict().items()
                  if not k.startswith(("decoder", "mask_token"))}
    rng = np.random.default_rng(0)
    state_dict.update({"head.0.running_mean": rng.normal(size=32).astype(np.float32),
                       "head.0.running_var": rng.uniform(1, 2, size=32).astype(np.float32),
                       "head.0.num_batches_tracked": np.array(100, np.int64),
                       "head.1.weight": rng.normal(size=(7, 32)).astype(np.float32),
                       "head.1.bias": rng.normal(size=7).astype(np.float32)})
    config = torch_mae.infer_model_config(state_dict)
    params, report = torch_mae.torch_to_flax(state_dict, config)
    assert report["kind"] == "linprobe" and report["num_classes"] == 7
    assert report["ignored"] == ["head.0.num_batches_tracked"] and report["unexpected"] == []
    np.testing.assert_array_equal(params["head_bn"]["var"], state_dict["head.0.running_var"])
    np.testing.assert_array_equal(params["head"]["kernel"], state_dict["head.1.weight"].T)
    exported = torch_mae.flax_to_torch(params, config, "mae")
    assert {"head.0.running_mean", "head.0.running_var", "head.1.weight", "head.1.bias"} <= exported.keys()


@pytest.mark.parametrize("key", ["pos_embed", "decoder_pos_embed"])
def test_position_table_mismatch_is_refused(mu_reference, key):
    state_dict = {k: v.numpy().copy() for k, v in mu_reference.state_dict().items()}
    state_dict[key][0, 3, 5] += 1e-3
    config = torch_mae.infer_model_config(state_dict)
    with pytest.raises(torch_mae.PositionTableError, match=f"{key}: differs from our fixed 2-D sin-cos table"):
        torch_mae.torch_to_flax(state_dict, config)


def test_unexpected_key_is_refused_unless_allowed(mu_reference):
    state_dict = {k: v.numpy() for k, v in mu_reference.state_dict().items()}
    state_dict["dist_token"] = np.zeros((1, 1, 32), np.float32)
    config = torch_mae.infer_model_config(state_dict)
    with pytest.raises(torch_mae.UnexpectedKeysError, match=r"\['dist_token'\].*allow_unexpected"):
        torch_mae.torch_to_flax(state_dict, config)
    params, report = torch_mae.torch_to_flax(state_dict, config, allow_unexpected=True)
    assert report["unexpected"] == ["dist_token"] and "dist_token" not in params


def test_shape_mismatch_names_the_key(mu_reference):
    state_dict = {k: v.numpy() for k, v in mu_reference.state_dict().items()}
    state_dict["blocks.0.mlp.fc2.bias"] = np.zeros(31, np.float32)
    with pytest.raises(ValueError, match=r"blocks.0.mlp.fc2.bias: shape \(31,\)"):
        torch_mae.torch_to_flax(state_dict, torch_mae.infer_model_config(state_dict))


class _WritesMarker:
    """Unpickling this runs os.system, as a malicious checkpoint would."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.ones(2)}, "args": _WritesMarker(marker)}, path)
    with pytest.raises(torch_pickle.UnsafeCheckpointError, match=r"refusing to load global '(posix|nt|os)\.system'"):
        torch_mae.load_torch_state_dict(path)
    legacy = tmp_path / "evil_legacy.pth"
    torch.save({"model": {"w": torch.ones(2)}, "args": _WritesMarker(marker)}, legacy,
               _use_new_zipfile_serialization=False)
    with pytest.raises(torch_pickle.UnsafeCheckpointError, match="system"):
        torch_mae.load_torch_state_dict(legacy)
    assert not marker.exists()
    # The fixture is really malicious: torch's own unrestricted loader runs the command.
    naive_marker = tmp_path / "naive"
    torch.save({"model": {"w": torch.ones(2)}, "args": _WritesMarker(naive_marker)}, tmp_path / "naive.pth")
    torch.load(tmp_path / "naive.pth", weights_only=False)
    assert naive_marker.exists() and not marker.exists()


def test_out_of_bounds_tensor_view_is_refused():
    storage = torch_pickle.Storage(np.dtype(np.float32), 4, lambda: np.arange(4, dtype=np.float32).tobytes())
    assert np.array_equal(torch_pickle.TensorRef(storage, 1, (3,), (1,)).numpy(), [1.0, 2.0, 3.0])
    with pytest.raises(torch_pickle.CheckpointFormatError, match="runs past its storage"):
        torch_pickle.TensorRef(storage, 1, (4,), (1,)).numpy()
    with pytest.raises(torch_pickle.CheckpointFormatError, match="runs past its storage"):
        torch_pickle.TensorRef(storage, 3, (2,), (-1,)).numpy()


def test_training_checkpoint_extras_are_ignored(tmp_path, mu_reference):
    import argparse

    optimizer = torch.optim.AdamW(mu_reference.parameters())
    path = save_checkpoint(tmp_path / "train.pth", mu_reference.state_dict(), optimizer=optimizer.state_dict(),
                           args=argparse.Namespace(lr=1e-4, output_dir="x"), epoch=99)
    state_dict = torch_mae.load_torch_state_dict(path)
    assert sorted(state_dict) == sorted(mu_reference.state_dict())
    wrapped = save_checkpoint(tmp_path / "ddp.pth", {f"module.{k}": v for k, v in mu_reference.state_dict().items()})
    assert sorted(torch_mae.load_torch_state_dict(wrapped)) == sorted(mu_reference.state_dict())
    torch.save({"epoch": 1, "args": argparse.Namespace(a=1)}, tmp_path / "no_model.pth")
    with pytest.raises(torch_pickle.CheckpointFormatError, match=r"no_model\.pth: not a state dict"):
        torch_mae.load_torch_state_dict(tmp_path / "no_model.pth")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_storages(tmp_path, mu_reference, dtype):
    half = {k: v.to(dtype) for k, v in mu_reference.state_dict().items()}
    path = save_checkpoint(tmp_path / "half.pth", half)
    state_dict = torch_mae.load_torch_state_dict(path)
    for key, value in half.items():
        assert np.array_equal(state_dict[key].astype(np.float32), value.float().numpy()), key
    assert str(state_dict["blocks.0.attn.qkv.weight"].dtype) == str(dtype).removeprefix("torch.")
    params, report = torch_mae.torch_to_flax(state_dict, torch_mae.infer_model_config(state_dict))
    assert report["verified"] == ["decoder_pos_embed", "pos_embed"]
    assert params["norm"]["scale"].dtype == np.float32
    np.testing.assert_array_equal(params["norm"]["scale"], half["norm.weight"].float().numpy())


def test_legacy_format_and_views(tmp_path, mu_reference):
    state_dict = dict(mu_reference.state_dict())
    state_dict["transposed_view"] = torch.arange(12.0).reshape(3, 4).t()
    path = tmp_path / "legacy.pth"
    torch.save(state_dict, path, _use_new_zipfile_serialization=False)
    loaded = torch_mae.load_torch_state_dict(path)
    for key, value in state_dict.items():
        assert np.array_equal(loaded[key], value.numpy()), key


def test_safetensors_read_write(tmp_path, mu_reference):
    from safetensors.numpy import load_file
    from safetensors.torch import save_file

    state_dict = {k: v.contiguous() for k, v in mu_reference.state_dict().items()}
    theirs = tmp_path / "theirs.safetensors"
    save_file({**state_dict, "bf16": torch.arange(5.0).bfloat16()}, theirs)
    ours, _ = torch_pickle.read_safetensors(theirs)
    assert np.array_equal(ours["bf16"].astype(np.float32), np.arange(5.0)) and ours["bf16"].itemsize == 2
    mine = tmp_path / "mine.safetensors"
    torch_pickle.write_safetensors(mine, {k: v.numpy() for k, v in state_dict.items()}, {"format": "mae"})
    read_back = load_file(mine)
    assert all(np.array_equal(read_back[k], v.numpy()) for k, v in state_dict.items())
    model = torch_mae.load_torch_mae(mine)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = mu_reference.forward_features(images)
    assert max_difference(encode(model, to_nhwc(images)), features) < TOLERANCE


def test_safetensors_header_errors(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(torch_pickle.CheckpointFormatError, match=r"bad\.safetensors: header size"):
        torch_pickle.read_safetensors(bad)


def test_timm_layout_with_plain_torch_vit(mu_reference):
    state_dict = {k: v.numpy() for k, v in mu_reference.state_dict().items()}
    config = torch_mae.infer_model_config(state_dict)
    params, _ = torch_mae.torch_to_flax(state_dict, config)
    exported = torch_mae.flax_to_torch(params, config, "timm_vit")
    timm_like = TimmStyleViT(32, 8, 3, 32, 1, 2).eval()
    timm_like.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    model = MaskedAutoencoder(config, rngs=nnx.Rngs(0))
    torch_mae.load_params_into(model, params)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = timm_like.forward_features(images)
    assert max_difference(encode(model, to_nhwc(images)), features) < TOLERANCE


# Why this test does not run in CI (checked next to CI's torch 2.13.0+cpu): timm (1.0.31, the newest on the
# package index) imports torchvision when it is imported (timm/layers/create_norm.py), and the index's
# torchvision wheels are CUDA builds whose torchvision/_C.so links libtorch_cuda.so and libc10_cuda.so, which
# the CPU torch lacks. torchvision 0.28.0 (it requires torch==2.13.0) and 0.27.1 (installed with --no-deps)
# both fail at `import torchvision` with "operator torchvision::nms does not exist". The CPU wheels of
# download.pytorch.org are not reachable from CI, and torch 2.14.1 + torchvision 0.29.1 (on this disk) is a
# 5.5 GB CUDA build that would replace CI's torch. Run it by hand where a matching torch/torchvision exists.
TIMM_UNAVAILABLE = ("timm imports torchvision, and this index's torchvision 0.28.0 / 0.27.1 are CUDA builds that "
                    "fail to load next to torch 2.13.0+cpu ('operator torchvision::nms does not exist'); see the "
                    "comment above test_timm_export_loads_into_timm_strictly")


@pytest.mark.timm
def test_timm_export_loads_into_timm_strictly():
    try:
        import timm
    except (ImportError, RuntimeError) as err:  # no timm/torchvision, or a torchvision whose C++ ops fail
        pytest.skip(f"{TIMM_UNAVAILABLE} ({type(err).__name__}: {err})")
    reference = perturbed_reference(BASE)
    state_dict = {k: v.numpy() for k, v in reference.state_dict().items()}
    config = torch_mae.infer_model_config(state_dict)
    params, _ = torch_mae.torch_to_flax(state_dict, config)
    exported = torch_mae.flax_to_torch(params, config, "timm_vit")
    vit_b = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0).eval()
    vit_b.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
    model = MaskedAutoencoder(config, rngs=nnx.Rngs(0))
    torch_mae.load_params_into(model, params)
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        features = vit_b.forward_features(images)
    assert max_difference(encode(model, to_nhwc(images)), features) < TOLERANCE
