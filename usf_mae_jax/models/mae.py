"""The masked autoencoder: random masking, encoder on visible tokens, decoder, and the masked-patch loss.

This computes the same function as the reference `MaskedAutoencoderViT` (facebookresearch/mae `models_mae.py`,
described in docs/mae_fidelity.md). Given converted weights, the same images and the same
masking noise, loss, pred and mask match the PyTorch model to float32 precision (tests/test_torch_parity.py).

Public API (also what `usf_mae_jax.interop.torch_mae.load_torch_mae` returns):

    model = MaskedAutoencoder(model_config("base"), rngs=nnx.Rngs(0))
    loss, pred, mask = model(images_nhwc, mask_ratio=0.75, noise=noise)   # or rng=key instead of noise
    latent = model.encode(images_nhwc)   # (N, 1 + L, D): cls token, then every patch, after the final norm

`images_nhwc` are network inputs: ImageNet-normalised float images (see `vit.normalize_images`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from usf_mae_jax.models import pos_embed, vit
from usf_mae_jax.models.vit import ModelConfig


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """`int(L * (1 - mask_ratio))`, a floor, as the reference: 49 of 196 at ratio 0.75."""
    return int(num_patches * (1 - mask_ratio))


def validate_mask_ratio(mask_ratio: float) -> None:
    if not 0.0 < float(mask_ratio) < 1.0:
        raise ValueError(f"mask_ratio must lie in the open interval (0, 1), got {mask_ratio}")


def random_masking(tokens: jax.Array, mask_ratio: float, noise: jax.Array):
    """Per-sample random masking by argsort of uniform noise.

    Args:
      tokens: (N, L, D) patch tokens, position table already added.
      mask_ratio: fraction of patches removed.
      noise: (N, L) noise; one independent permutation per sample. Tests pass the reference's noise.

    Returns:
      x_masked (N, len_keep, D), mask (N, L) with 1 = removed in the original patch order, and
      ids_restore (N, L) which un-shuffles [kept, removed] back into patch order.
    """
    batch, length, _ = tokens.shape
    if noise.shape != (batch, length):
        raise ValueError(f"noise must have shape (N, L) = {(batch, length)}, got {noise.shape}")
    len_keep = num_kept(length, mask_ratio)
    ids_shuffle = jnp.argsort(noise, axis=1)  # ascending: the smallest noise values are kept
    ids_restore = jnp.argsort(ids_shuffle, axis=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = jnp.take_along_axis(tokens, ids_keep[:, :, None], axis=1)
    mask = jnp.ones((batch, length), jnp.float32).at[:, :len_keep].set(0.0)
    mask = jnp.take_along_axis(mask, ids_restore, axis=1)
    return x_masked, mask, ids_restore


def masked_patch_loss(target: jax.Array, pred: jax.Array, mask: jax.Array, norm_pix_loss: bool) -> jax.Array:
    """Mean squared error over the removed patches only, in float32.

    `target` holds the (N, L, p*p*C) patch vectors of the network input (`vit.patchify` order), the same array
    the patch embedding consumes. With `norm_pix_loss`, each target patch is standardised by its own mean and
    *unbiased* variance (torch's `var` default, ddof=1), plus 1e-6 inside the square root, as the reference does.
    """
    target = target.astype(jnp.float32)
    if norm_pix_loss:
        mean = target.mean(axis=-1, keepdims=True)
        var = target.var(axis=-1, ddof=1, keepdims=True)
        target = (target - mean) / jnp.sqrt(var + 1.0e-6)
    per_patch = jnp.mean((pred.astype(jnp.float32) - target) ** 2, axis=-1)
    return jnp.sum(per_patch * mask) / jnp.sum(mask)


class MaskedAutoencoder(vit.ViTEncoderBase):
    """ViT-MAE with the reference parameter names (see `vit.py` for the encoder part).

    Decoder names: `decoder_embed`, `mask_token`, `decoder_blocks_{j}`, `decoder_norm`, `decoder_pred`.
    The fixed sin-cos tables are computed from the config, never stored as parameters.
    """

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        super().__init__(config, rngs)
        dtype = config.compute_dtype
        self.norm = vit.layer_norm(config.width, dtype, rngs)
        self.decoder_embed = vit.dense(config.width, config.decoder_width, dtype, rngs)
        self.mask_token = nnx.Param(vit.token_init()(rngs.params(), (1, 1, config.decoder_width), jnp.float32))
        for j in range(config.decoder_depth):
            setattr(self, f"decoder_blocks_{j}", vit.Block(config.decoder_width, config.decoder_heads,
                                                           config.mlp_ratio, dtype, rngs, config.attention))
        self.decoder_norm = vit.layer_norm(config.decoder_width, dtype, rngs)
        patch_dim = config.patch_size**2 * config.in_chans
        self.decoder_pred = vit.dense(config.decoder_width, patch_dim, dtype, rngs)

    def decoder_blocks(self) -> list[vit.Block]:
        return [getattr(self, f"decoder_blocks_{j}") for j in range(self.config.decoder_depth)]

    def _patch_tokens(self, patches: jax.Array) -> jax.Array:
        """Patch embedding plus the position table without its cls row, added *before* masking."""
        table = pos_embed.sincos_2d(self.config.width, self.config.grid)
        return self.patch_embed.embed_patches(patches) + jnp.asarray(table[1:], self.config.compute_dtype)

    def _with_cls(self, tokens: jax.Array) -> jax.Array:
        # The table's cls row is all zeros, so the cls token enters as it is.
        cls = jnp.broadcast_to(self.cls_token[...].astype(tokens.dtype), (tokens.shape[0], 1, tokens.shape[-1]))
        return jnp.concatenate([cls, tokens], axis=1)

    def forward_encoder(self, images: jax.Array, mask_ratio: float, noise: jax.Array):
        return self._encode_patches(vit.patchify(images, self.config.patch_size), mask_ratio, noise)

    def _encode_patches(self, patches: jax.Array, mask_ratio: float, noise: jax.Array):
        tokens, mask, ids_restore = random_masking(self._patch_tokens(patches), mask_ratio, noise)
        x = self.run_blocks(self.encoder_blocks(), self._with_cls(tokens))
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, latent: jax.Array, ids_restore: jax.Array) -> jax.Array:
        c = self.config
        x = self.decoder_embed(latent)
        batch, length = ids_restore.shape
        mask_tokens = jnp.broadcast_to(self.mask_token[...].astype(x.dtype),
                                       (batch, length + 1 - x.shape[1], x.shape[-1]))
        patches = jnp.concatenate([x[:, 1:], mask_tokens], axis=1)
        patches = jnp.take_along_axis(patches, ids_restore[:, :, None], axis=1)
        x = jnp.concatenate([x[:, :1], patches], axis=1)
        x = x + jnp.asarray(pos_embed.sincos_2d(c.decoder_width, c.grid), x.dtype)
        x = self.run_blocks(self.decoder_blocks(), x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def __call__(self, images: jax.Array, mask_ratio: float = 0.75, *, noise: jax.Array | None = None,
                 rng: jax.Array | None = None):
        """Returns (loss, pred, mask). Give either `noise` (N, L) or an `rng` key to draw it from."""
        self._check_images(images)
        return self.forward_patches(vit.patchify(images, self.config.patch_size), mask_ratio, noise=noise, rng=rng)

    def forward_patches(self, patches: jax.Array, mask_ratio: float = 0.75, *, noise: jax.Array | None = None,
                        rng: jax.Array | None = None):
        """`__call__` on images already patchified (`vit.patchify`, or `vit.normalized_patches` from uint8).

        The one patch array feeds both the patch embedding and the loss target, as the reference's
        `patch_embed` conv and `patchify` read the same pixels; the train step passes it straight from uint8.
        """
        c = self.config
        expected = (c.num_patches, c.patch_size**2 * c.in_chans)
        if tuple(patches.shape[1:]) != expected:
            raise ValueError(f"patches must have shape (N, {expected[0]}, {expected[1]}), got {tuple(patches.shape)}")
        validate_mask_ratio(mask_ratio)
        if noise is None:
            if rng is None:
                raise ValueError("random masking needs either `noise` or an `rng` key; "
                                 "there is no fixed-order fallback")
            noise = jax.random.uniform(rng, (patches.shape[0], c.num_patches), jnp.float32)
        latent, mask, ids_restore = self._encode_patches(patches, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = masked_patch_loss(patches, pred, mask, c.norm_pix_loss)
        return loss, pred.astype(jnp.float32), mask

    def encode(self, images: jax.Array) -> jax.Array:
        """Encoder features of every patch, unmasked: (N, 1 + L, D) after the final norm."""
        self._check_images(images)
        patches = vit.patchify(images, self.config.patch_size)
        x = self.run_blocks(self.encoder_blocks(), self._with_cls(self._patch_tokens(patches)))
        return self.norm(x).astype(jnp.float32)
