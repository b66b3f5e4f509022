"""Ultrasound-specific augmentations from the `usaugment` package, deterministic per example.

`usaugment` (MIT; Tupper & Gagné, "Revisiting Data Augmentation for Ultrasound Images") implements four
transforms as albumentations `ImageOnlyTransform`s that act inside the scan region only:

  * `DepthAttenuation`  intensity decaying with the distance from the probe (top centre), rate 0-3;
  * `GaussianShadow`    a Gaussian-shaped dark region (an acoustic shadow), strength 0.25-0.8;
  * `HazeArtifact`      a noisy band at a random depth (reverberation haze);
  * `SpeckleReduction`  a bilateral filter (scikit-image) with random spatial and intensity sigmas.

`apply_transforms(image, rng)` runs each with probability 0.5 (the package's default), in that order, with the
package's default parameter ranges, on a uint8 (H, W, C) image; the scan mask the transforms need is the
image's non-black pixels (`image.max(-1) > 0`), i.e. the field of view after the geometric augmentation. The
augmentation preset `usf_mae_us` (data/augment.py) applies them after the USF-MAE geometry.

Determinism. The pipeline hands every example its own `np.random.Generator`, so a resumed run sees the same
images. `usaugment` draws its parameters from the *global* `random` and `np.random` states instead. This
module therefore decides each transform's application with the example's generator and, under one lock,
seeds both global states from that generator, applies the transforms, and restores the global states. The
result is a pure function of (image, generator state), whichever thread runs it; the lock serialises only
this step (about 0.3 ms per 64 px image without the bilateral filter, a few ms with it at 224 px).

The package and its dependencies (albumentations, scikit-image) are optional: `require()` raises a one-line
ConfigError naming the package when the preset is chosen without them.
"""

from __future__ import annotations

import random
import threading

import numpy as np

from usf_mae_jax.cli import ConfigError

PROBABILITY = 0.5  # usaugment's default p for every transform
TRANSFORMS = ("DepthAttenuation", "GaussianShadow", "HazeArtifact", "SpeckleReduction")
INSTALL = "pip install usaugment==1.0.1 albumentations==2.0.8 scikit-image==0.26.0"

_GLOBAL_RNG_LOCK = threading.Lock()
_transforms: list | None = None


def require() -> list:
    """The four transform objects (built once); a ConfigError naming the package when it is not installed."""
    global _transforms
    if _transforms is None:
        try:
            from usaugment import albumentations as usa
        except ImportError as err:
            raise ConfigError(f"the augmentation preset usf_mae_us needs the usaugment package ({err}); "
                              f"install it with `{INSTALL}`") from None
        _transforms = [getattr(usa, name)(p=1.0) for name in TRANSFORMS]
    return _transforms


def apply_transforms(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 (H, W, C) -> uint8 (H, W, C): each usaugment transform with probability 0.5, inside the scan region."""
    transforms = require()
    chosen = [t for t, draw in zip(transforms, rng.random(len(transforms))) if draw < PROBABILITY]
    seed = int(rng.integers(2**31))
    if not chosen:
        return image
    scan_mask = (image.max(axis=-1) > 0).astype(np.uint8)
    # A gray image goes in as (H, W): the package's bilateral filter takes 2-D or RGB images only.
    pixels = (image[:, :, 0] if image.shape[-1] == 1 else image).astype(np.float32) / 255.0
    with _GLOBAL_RNG_LOCK:
        saved_np, saved_py = np.random.get_state(), random.getstate()
        np.random.seed(seed)
        random.seed(seed)
        try:
            for transform in chosen:
                pixels = transform.apply(pixels, scan_mask=scan_mask)
        finally:
            np.random.set_state(saved_np)
            random.setstate(saved_py)
    return np.clip(np.rint(np.asarray(pixels, np.float32) * 255.0), 0, 255).astype(np.uint8).reshape(image.shape)
