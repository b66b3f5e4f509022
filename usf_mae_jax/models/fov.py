"""Field-of-view-aware MAE masking: patches outside the scan sector are never visible and never in the loss.

An ultrasound frame is black outside its scan sector (a convex fan or a linear rectangle, docs/transfer_study.md);
at 224 px a convex sector leaves a quarter to a third of the patches black. The reference MAE treats them like
any other patch: some become visible tokens (the encoder spends capacity on nothing) and the rest are
reconstruction targets that are trivially black (the loss rewards predicting the sector's outline).

The rule, computed on the device inside the jitted step from the uint8 batch (no host work, no data format
change):

  * a patch is **in view** when its largest uint8 value (over its pixels and channels) exceeds
    `threshold` (`model.fov_threshold`, 0 by default: a patch is out of view when it is entirely black;
    raise it for sources whose background carries noise or compression artefacts);
  * the masking noise of an out-of-view patch is raised by 1 (noise lies in [0, 1)), so the argsort of the
    reference's `random_masking` puts every in-view patch first, in the same random order as before: the
    `len_keep = int(L * (1 - mask_ratio))` visible tokens are drawn among the in-view patches only;
  * the loss weights are `mask * in_view`: every removed in-view patch is a target, no out-of-view patch is.

Fewer in-view patches than `len_keep`: shapes are static under jit, so the encoder still takes `len_keep`
tokens; all in-view patches are visible then, the rest of the slots go to out-of-view patches (in noise
order), and that image contributes no loss term (all its in-view patches are visible). A batch in which no
removed patch is in view at all falls back to the plain weights, so the loss stays finite (an all-black
batch). The effective mask ratio inside the sector is `1 - len_keep / n_in_view`, lower than `mask_ratio`
when part of the frame is black; raise `mask_ratio` to compensate if wanted.

Cost: one max-reduction over the uint8 patches and an add on the (N, L) noise; the model is unchanged, so the
compiled step has the same matmuls (measured in docs/transfer_study.md). Off (`model.fov_masking=False`, every
preset), none of this runs and the step is the reference's, bit for bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from usf_mae_jax.models import vit
from usf_mae_jax.models.mae import MaskedAutoencoder, masked_patch_loss


def view_mask(images: jax.Array, patch_size: int, threshold: int = 0) -> jax.Array:
    """(N, L) float32: 1 for a patch whose largest value exceeds `threshold`, 0 for an out-of-view patch."""
    return (vit.patchify(images, patch_size).max(axis=-1) > threshold).astype(jnp.float32)


def in_view_first(noise: jax.Array, in_view: jax.Array) -> jax.Array:
    """Masking noise whose ascending order lists every in-view patch before any out-of-view one."""
    return noise + (1.0 - in_view)


def masked_loss(model: MaskedAutoencoder, patches: jax.Array, mask_ratio: float, noise: jax.Array,
                in_view: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(loss, pred, mask, weights) of the MAE with field-of-view-aware masking (module docstring).

    `patches` are the network-input patch vectors (`vit.normalized_patches`), `noise` (N, L) uniform in [0, 1)
    as the reference draws it, `in_view` from `view_mask`. `mask` is the reference's (1 = removed), `weights`
    the loss weights (removed and in view).
    """
    _, pred, mask = model.forward_patches(patches, mask_ratio, noise=in_view_first(noise, in_view))
    weights = mask * in_view
    weights = jnp.where(weights.sum() > 0, weights, mask)  # no removed in-view patch at all: plain weights
    return masked_patch_loss(patches, pred, weights, model.config.norm_pix_loss), pred, mask, weights
