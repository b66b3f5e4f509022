"""What a person watches during training: stdout logs, TensorBoard scalars, a progress bar and
reconstruction grids.

Only process 0 writes (DESIGN.md, "Multi-host"); the other processes get no-op writers.

Reconstruction grids follow the reference's advice on what users trip over (mae_fidelity.md): with
`norm_pix_loss` the prediction is in per-patch normalised units, so each predicted patch is de-normalised with
the mean and std of its target patch before drawing; a raw picture of it would look like coloured noise.
"""

from __future__ import annotations

import logging
import os
import time

import cv2
import jax
import jax.numpy as jnp
import numpy as np
from tensorboardX import SummaryWriter
from tqdm import tqdm

from usf_mae_jax.models import vit

log = logging.getLogger(__name__)


class MetricWriter:
    """TensorBoard scalars/images plus one log line per write, from process 0 only."""

    def __init__(self, workdir: str, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard")) if self.enabled else None

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for name, value in values.items():
            self._tb.add_scalar(name, float(value), step)
        log.info("step %d: %s", step, ", ".join(f"{k}={_fmt(v)}" for k, v in values.items()))

    def image(self, step: int, name: str, image: np.ndarray) -> None:
        if self.enabled:
            self._tb.add_image(name, image, step, dataformats="HWC")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _fmt(value: float) -> str:
    value = float(value)
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"


class Progress:
    """A tqdm bar (step, ETA, loss) on process 0, and an images/s meter between log points."""

    def __init__(self, start_step: int, total_steps: int, enabled: bool | None = None):
        enabled = jax.process_index() == 0 if enabled is None else enabled
        self._bar = tqdm(total=total_steps, initial=start_step, disable=not enabled, unit="step",
                         dynamic_ncols=True, mininterval=1.0)
        self._mark_time, self._mark_step = time.perf_counter(), start_step

    def update(self, step: int, loss: float | None = None) -> None:
        self._bar.update(step - self._bar.n)
        if loss is not None:
            self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def images_per_second(self, step: int, batch_size: int) -> float:
        now = time.perf_counter()
        rate = (step - self._mark_step) * batch_size / max(now - self._mark_time, 1e-9)
        self._mark_time, self._mark_step = now, step
        return rate

    def close(self) -> None:
        self._bar.close()


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
