"""Host-side augmentations on uint8 images with OpenCV/numpy, each driven by an explicit per-example RNG.

Presets (`make_augment(preset, size)` returns `fn(image, rng) -> image`):

* `usf_mae` — the USF-MAE authors' pretraining transform, in their order (torchvision on PIL images):
    1. `Resize((size, size), NEAREST)`;
    2. `RandomRotation((0, 90))`: angle uniform in [0°, 90°], counter-clockwise, about the image centre,
       nearest neighbour, same canvas (corners filled with 0);
    3. `RandomHorizontalFlip(0.5)`, 4. `RandomVerticalFlip(0.5)`;
    5. `RandomResizedCrop(size, scale=(0.5, 2.0), ratio=(3/4, 4/3), BILINEAR)`.
  What scale > 1 does there: torchvision draws the crop *area* as `scale * H * W`, so for scale in (1, 2] the
  crop would be larger than the image; such a draw is rejected (its width or height exceeds the image) and
  drawn again, up to 10 attempts, after which the transform falls back to a centre crop clamped to the ratio
  range — for the square input here, the whole image, i.e. no crop at all. The net effect is that about
  two thirds of the draws are wasted, the crops that happen have area in [0.5, 1] of the image, and some
  images (about 6 % for a square input, measured over 20,000 draws) are not cropped at all.
  `random_resized_crop_box` reproduces that loop draw for draw (with numpy's generator instead of torch's),
  so the distribution of crops matches.
  The ImageNet normalisation (step 6) and the grayscale -> RGB replication run on the device
  (`vit.normalize_images`); every op here is channel-wise, so doing them on one channel is identical.
* `usf_mae_us` — `usf_mae`, then the ultrasound transforms of the `usaugment` package (depth attenuation,
  Gaussian shadow, haze, speckle reduction; each with p = 0.5, inside the scan region), deterministic per
  example like every preset here (data/us_augment.py). An option of the transfer study
  (docs/transfer_study.md), not part of the authors' recipe; the package is optional.
* `mae` — the reference MAE recipe: `RandomResizedCrop(size, scale=(0.2, 1.0), ratio=(3/4, 4/3), BICUBIC)`
  then `RandomHorizontalFlip(0.5)`. PIL's bicubic resize antialiases when it shrinks; OpenCV's does not, so a
  crop larger than the output in both sides is shrunk with area interpolation instead (the antialiased
  equivalent) and bicubic is used otherwise.
* `eval` — the authors' evaluation transform: only the nearest resize to (size, size).
* `none` — no change; the image must already be (size, size).

Every random decision is drawn from the `np.random.Generator` passed in; the pipeline derives it from
(seed, dataset, epoch, record), so a resumed run, or the same record on another host, sees the same crop.
Pixel conventions follow OpenCV: pixel centres at integer coordinates, so the image centre is
((W - 1) / 2, (H - 1) / 2), which is the same point as PIL's (W / 2, H / 2) in its corner-based convention.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import cv2
import numpy as np

from usf_mae_jax.cli import ConfigError

PRESETS = ("usf_mae", "usf_mae_us", "mae", "eval", "none")
USF_MAE_ROTATION = (0.0, 90.0)
USF_MAE_SCALE = (0.5, 2.0)
MAE_SCALE = (0.2, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
_CROP_ATTEMPTS = 10  # torchvision RandomResizedCrop.get_params

Box = tuple[int, int, int, int]  # top, left, height, width


def _keep_channels(result: np.ndarray, like: np.ndarray) -> np.ndarray:
    """OpenCV drops a trailing singleton channel; put it back so shapes stay (H, W, C)."""
    return result[:, :, None] if like.ndim == 3 and result.ndim == 2 else result


def resize_nearest(image: np.ndarray, size: int) -> np.ndarray:
    """Resize to (size, size) with PIL's nearest rule (source pixel floor((x + 0.5) * in / out))."""
    if image.shape[:2] == (size, size):
        return image
    return _keep_channels(cv2.resize(image, (size, size), interpolation=cv2.INTER_NEAREST_EXACT), image)


def rotate(image: np.ndarray, degrees: float) -> np.ndarray:
    """Counter-clockwise rotation about the image centre, nearest neighbour, same size, zero fill."""
    height, width = image.shape[:2]
    matrix = cv2.getRotationMatrix2D(((width - 1) / 2, (height - 1) / 2), degrees, 1.0)
    rotated = cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_NEAREST,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return _keep_channels(rotated, image)


def set_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """(H, W, 1|3) -> (H, W, channels): grayscale is repeated, colour converted with the ITU-R 601 luma."""
    if image.shape[2] == channels:
        return image
    if channels == 3:
        return np.repeat(image, 3, axis=2)
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[:, :, None]


def hflip(image: np.ndarray) -> np.ndarray:
    return image[:, ::-1]


def vflip(image: np.ndarray) -> np.ndarray:
    return image[::-1]


def random_resized_crop_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                            rng: np.random.Generator) -> Box:
    """torchvision's RandomResizedCrop.get_params: up to 10 (area, aspect) draws, else a centre crop.

    The area fraction is uniform in `scale`, the aspect ratio log-uniform in `ratio`; a draw whose box does
    not fit inside the image (always the case for an area fraction well above 1) is rejected.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(_CROP_ATTEMPTS):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target_area * aspect))  # Python's round, as torchvision uses
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(image: np.ndarray, box: Box, size: int, interpolation: str) -> np.ndarray:
    """Crops `box` and resizes it to (size, size) with 'bilinear' or 'bicubic' (antialiased when shrinking)."""
    top, left, h, w = box
    crop = image[top:top + h, left:left + w]
    if (h, w) == (size, size):
        return np.ascontiguousarray(crop)
    if h >= size and w >= size:
        flag = cv2.INTER_AREA  # PIL antialiases when it shrinks; area averaging is OpenCV's equivalent
    else:
        flag = cv2.INTER_LINEAR if interpolation == "bilinear" else cv2.INTER_CUBIC
    return _keep_channels(cv2.resize(np.ascontiguousarray(crop), (size, size), interpolation=flag), image)


def usf_mae(image: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """The authors' order: nearest resize, rotation [0, 90], h-flip, v-flip, RandomResizedCrop(0.5-2)."""
    image = resize_nearest(image, size)
    image = rotate(image, rng.uniform(*USF_MAE_ROTATION))
    if rng.random() < 0.5:
        image = hflip(image)
    if rng.random() < 0.5:
        image = vflip(image)
    box = random_resized_crop_box(size, size, USF_MAE_SCALE, CROP_RATIO, rng)
    return resized_crop(image, box, size, "bilinear")


def usf_mae_us(image: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """`usf_mae`, then the usaugment transforms drawn from the same generator (data/us_augment.py)."""
    from usf_mae_jax.data import us_augment

    return us_augment.apply_transforms(usf_mae(image, rng, size), rng)


def mae(image: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """Reference MAE pretraining: RandomResizedCrop(0.2-1, bicubic) on the stored image, then h-flip."""
    box = random_resized_crop_box(image.shape[0], image.shape[1], MAE_SCALE, CROP_RATIO, rng)
    image = resized_crop(image, box, size, "bicubic")
    if rng.random() < 0.5:
        image = hflip(image)
    return np.ascontiguousarray(image)


def evaluate(image: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    del rng  # deterministic
    return resize_nearest(image, size)


def identity_size_advice(size: int, height: int, width: int, where: str = "got") -> str:
    """The one-line advice when `none` meets a frame that is not size x size: what to set instead."""
    return (f"input.augment='none' feeds frames unchanged to a {size}x{size} model, but {where} {height}x{width} "
            f"frames: set --config.input.augment=eval (nearest resize to {size}) or "
            f"--config.model.img_size={height if height == width else 'N'}")


def identity(image: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    del rng
    if image.shape[:2] != (size, size):
        raise ConfigError(identity_size_advice(size, image.shape[0], image.shape[1]))
    return image


_PRESET_FUNCTIONS = {"usf_mae": usf_mae, "usf_mae_us": usf_mae_us, "mae": mae, "eval": evaluate, "none": identity}


def make_augment(preset: str, size: int) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    """`fn(image uint8 (H, W, C), rng) -> uint8 (size, size, C)` for a preset name (see the module doc)."""
    if preset not in _PRESET_FUNCTIONS:
        raise ValueError(f"unknown augmentation preset {preset!r}; choose one of {PRESETS}")
    function = _PRESET_FUNCTIONS[preset]
    if preset == "usf_mae_us":
        from usf_mae_jax.data import us_augment

        us_augment.require()  # a missing optional package fails here, when the preset is chosen

    def augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return np.ascontiguousarray(function(image, rng, size))

    return augment
