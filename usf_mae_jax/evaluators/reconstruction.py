"""Pictures of what the MAE reconstructs: input | masked input | reconstruction | visible patches pasted back.

Drawing follows the advice on what users trip over (docs/mae_fidelity.md): with `norm_pix_loss` the
prediction is in per-patch normalised units, so each predicted patch is de-normalised with the mean and std
of its target patch before drawing; a raw picture of it would look like coloured noise. A model whose decoder
was freshly initialised (an encoder-only init) is labelled as such on the grid.
"""

from __future__ import annotations

import os

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from usf_mae_jax.models import vit


def reconstruction_panels(model, images: jax.Array, mask_ratio: float, rng: jax.Array) -> jax.Array:
    """Traced helper: (N, H, W, C) uint8 inputs -> (N, 4, H, W, 3) uint8 panels:
    input, masked input, reconstruction, reconstruction with the visible patches pasted back."""
    cfg = model.config
    x = vit.normalize_images(images, cfg.in_chans)
    _, pred, mask = model(x, mask_ratio, rng=rng)
    target = vit.patchify(x, cfg.patch_size)
    if cfg.norm_pix_loss:
        mean = target.mean(-1, keepdims=True)
        std = jnp.sqrt(target.var(-1, ddof=1, keepdims=True) + 1e-6)
        pred = pred * std + mean
    keep = (1.0 - mask)[:, :, None]
    masked = target * keep + jnp.where(keep > 0, 0.0, -10.0)  # removed patches drawn black
    pasted = target * keep + pred * (1.0 - keep)

    def to_uint8(patches):
        img = vit.unpatchify(patches, cfg.patch_size, cfg.in_chans)
        if cfg.in_chans == 3:
            img = img * np.asarray(vit.IMAGENET_STD, np.float32) + np.asarray(vit.IMAGENET_MEAN, np.float32)
        else:
            img = img * float(np.mean(vit.IMAGENET_STD)) + float(np.mean(vit.IMAGENET_MEAN))
            img = jnp.repeat(img[..., :1], 3, axis=-1)
        return jnp.clip(img * 255.0 + 0.5, 0, 255).astype(jnp.uint8)

    return jnp.stack([to_uint8(p) for p in (target, masked, pred, pasted)], axis=1)


def save_grid(panels: np.ndarray, path: str, note: str = "") -> np.ndarray:
    """Writes an (N rows x 4 columns) PNG grid with a 2-px separator; returns the grid (HWC uint8)."""
    scale = max(1, 128 // panels.shape[2])  # small demo images are enlarged (nearest) to stay legible
    panels = panels.repeat(scale, axis=2).repeat(scale, axis=3)
    n, cols, h, w, _ = panels.shape
    pad = 2
    grid = np.full((n * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for r in range(n):
        for c in range(cols):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            grid[y:y + h, x:x + w] = panels[r, c]
    if note:
        banner = np.full((18, grid.shape[1], 3), 255, np.uint8)
        cv2.putText(banner, note, (2, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        grid = np.concatenate([banner, grid], axis=0)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cv2.imwrite(path, cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    return grid
