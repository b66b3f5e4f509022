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

from typing import NamedTuple

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


def train_flops_per_image(config: ModelConfig, mask_ratio: float) -> float:
    """Model FLOPs of one pretraining image, forward and backward: the number MFU divides by.

    Counted as MFU conventionally counts (PaLM, Chowdhery et al. 2022, appendix B): matmuls only, 2 FLOPs per
    multiply-add, and the backward pass twice the forward (the input and the weight gradient of every matmul).
    With K = len_keep kept patches, L patches, widths D / Dd, MLP widths M / Md, patch vector size P = p*p*C:

      block(n, w, m) = 2 n (4 w^2 + 2 w m)  [qkv, proj, fc1, fc2]  +  4 n^2 w  [q k^T and weights @ v]
      forward = 2 K P D  [patch embedding of the kept patches]  +  depth * block(K + 1, D, M)
              + 2 (K + 1) D Dd  [decoder_embed]  +  decoder_depth * block(L + 1, Dd, Md)
              + 2 (L + 1) Dd P  [decoder_pred]
      train = 3 * forward

    ViT-B/16 MAE at 224 px, ratio 0.75 (K = 49, L = 196): 58.2 GFLOP per image (embedding all 196 patches, as
    the reference does, would add 0.5). Elementwise work (LayerNorm, softmax, GELU, AdamW) is not counted.
    """
    length, kept = config.num_patches, num_kept(config.num_patches, mask_ratio)
    patch_vector = config.patch_size**2 * config.in_chans

    def block(tokens: int, width: int) -> int:
        hidden = int(width * config.mlp_ratio)
        return 2 * tokens * (4 * width**2 + 2 * width * hidden) + 4 * tokens**2 * width

    forward = (2 * kept * patch_vector * config.width + config.depth * block(kept + 1, config.width)
               + 2 * (kept + 1) * config.width * config.decoder_width
               + config.decoder_depth * block(length + 1, config.decoder_width)
               + 2 * (length + 1) * config.decoder_width * patch_vector)
    return 3.0 * forward


class Masking(NamedTuple):
    """One sample-wise random masking, as the reference's `random_masking` draws it (docs/mae_fidelity.md).

    ids_shuffle (N, L): patch indices by ascending noise; ids_keep (N, len_keep) its head, the kept patches;
    ids_restore (N, L) = argsort(ids_shuffle), which un-shuffles [kept, removed] back into patch order;
    mask (N, L): 1 for a removed patch, 0 for a kept one, in patch order.
    """

    ids_shuffle: jax.Array
    ids_keep: jax.Array
    ids_restore: jax.Array
    mask: jax.Array


def random_masking(noise: jax.Array, mask_ratio: float) -> Masking:
    """Per-sample random masking by argsort of uniform noise (N, L); tests pass the reference's noise.

    The reference builds `mask` as ones with the first `len_keep` columns zeroed, gathered with ids_restore;
    that is exactly `ids_restore >= len_keep`, computed here without a scatter.
    """
    len_keep = num_kept(noise.shape[1], mask_ratio)
    ids_shuffle = jnp.argsort(noise, axis=1)  # ascending: the smallest noise values are kept
    ids_restore = jnp.argsort(ids_shuffle, axis=1)
    mask = (ids_restore >= len_keep).astype(jnp.float32)
    return Masking(ids_shuffle, ids_shuffle[:, :len_keep], ids_restore, mask)


@jax.custom_vjp
def take_rows(x: jax.Array, ids: jax.Array, inverse: jax.Array) -> jax.Array:
    """`take_along_axis(x, ids[..., None], axis=1)` for (N, L, D) `x`, where `ids` (N, K) is the head of a
    permutation of range(L) and `inverse` (N, L) is that permutation's inverse.

    Both masking steps are such gathers: keeping tokens (`ids_keep`, inverse `ids_restore`) and un-shuffling
    the decoder tokens (`ids_restore`, inverse `ids_shuffle`). Autodiff would turn the gather into a
    scatter-add with possibly repeated indices (atomics on GPUs, a serial scatter on TPUs). Because the rows are
    a permutation, the gradient is a gather instead: row j of dx is row `inverse[j]` of dy, or zero when that
    row was not taken. Same values as autodiff's.
    """
    return jnp.take_along_axis(x, ids[:, :, None], axis=1, mode="promise_in_bounds")


def _take_rows_forward(x, ids, inverse):
    return take_rows(x, ids, inverse), inverse


def _take_rows_backward(inverse, dy):
    dropped = inverse.shape[1] - dy.shape[1]
    if dropped:
        dy = jnp.concatenate([dy, jnp.zeros((dy.shape[0], dropped, dy.shape[2]), dy.dtype)], axis=1)
    return jnp.take_along_axis(dy, inverse[:, :, None], axis=1, mode="promise_in_bounds"), None, None


take_rows.defvjp(_take_rows_forward, _take_rows_backward)


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

    def _position_table(self) -> jax.Array:
        """The encoder's fixed (L, D) position table without its cls row, in the compute dtype."""
        table = pos_embed.sincos_2d(self.config.width, self.config.grid)
        return jnp.asarray(table[1:], self.config.compute_dtype)

    def _patch_tokens(self, patches: jax.Array) -> jax.Array:
        """Patch embedding of every patch plus the position table without its cls row."""
        return self.patch_embed.embed_patches(patches) + self._position_table()

    def _with_cls(self, tokens: jax.Array) -> jax.Array:
        # The table's cls row is all zeros, so the cls token enters as it is.
        cls = jnp.broadcast_to(self.cls_token[...].astype(tokens.dtype), (tokens.shape[0], 1, tokens.shape[-1]))
        return jnp.concatenate([cls, tokens], axis=1)

    def forward_encoder(self, images: jax.Array, mask_ratio: float, noise: jax.Array):
        """The reference's `forward_encoder`: (latent (N, 1 + len_keep, D), mask, ids_restore)."""
        latent, masking = self._encode_patches(vit.patchify(images, self.config.patch_size), mask_ratio, noise)
        return latent, masking.mask, masking.ids_restore

    def _encode_patches(self, patches: jax.Array, mask_ratio: float, noise: jax.Array):
        """Masks, then embeds only the kept patches.

        The reference embeds all L patches, adds the position table and then keeps len_keep tokens. The
        embedding is a per-patch matmul and the table a per-position constant, so gathering the kept patch
        vectors and their table rows first gives the same tokens (within float32 rounding of the matmul) for a
        quarter of the work at ratio 0.75, in the forward pass and in the weight gradient.
        """
        if noise.shape != patches.shape[:2]:
            raise ValueError(f"noise must have shape (N, L) = {patches.shape[:2]}, got {noise.shape}")
        masking = random_masking(noise, mask_ratio)
        kept = take_rows(patches, masking.ids_keep, masking.ids_restore)
        positions = jnp.take(self._position_table(), masking.ids_keep, axis=0, mode="clip")  # always in bounds
        tokens = self.patch_embed.embed_patches(kept) + positions
        x = self.run_blocks(self.encoder_blocks(), self._with_cls(tokens))
        return self.norm(x), masking

    def forward_decoder(self, latent: jax.Array, ids_restore: jax.Array,
                        ids_shuffle: jax.Array | None = None) -> jax.Array:
        """The reference's `forward_decoder`; `ids_shuffle`, the inverse of ids_restore, is recomputed when not
        given (it is only needed for the gradient of the un-shuffle, see `take_rows`)."""
        c = self.config
        if ids_shuffle is None:
            ids_shuffle = jnp.argsort(ids_restore, axis=1)
        x = self.decoder_embed(latent)
        batch, length = ids_restore.shape
        mask_tokens = jnp.broadcast_to(self.mask_token[...].astype(x.dtype),
                                       (batch, length + 1 - x.shape[1], x.shape[-1]))
        patches = take_rows(jnp.concatenate([x[:, 1:], mask_tokens], axis=1), ids_restore, ids_shuffle)
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
        latent, masking = self._encode_patches(patches, mask_ratio, noise)
        pred = self.forward_decoder(latent, masking.ids_restore, masking.ids_shuffle)
        loss = masked_patch_loss(patches, pred, masking.mask, c.norm_pix_loss)
        return loss, pred.astype(jnp.float32), masking.mask

    def encode(self, images: jax.Array) -> jax.Array:
        """Encoder features of every patch, unmasked: (N, 1 + L, D) after the final norm."""
        self._check_images(images)
        patches = vit.patchify(images, self.config.patch_size)
        x = self.run_blocks(self.encoder_blocks(), self._with_cls(self._patch_tokens(patches)))
        return self.norm(x).astype(jnp.float32)

    def encode_block_average(self, images: jax.Array) -> jax.Array:
        """(N, D): every block's mean patch token, unmasked, averaged over the blocks (`block_average`)."""
        self._check_images(images)
        return self.block_average(self._with_cls(self._patch_tokens(vit.patchify(images, self.config.patch_size))))
