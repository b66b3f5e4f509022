"""2-D still images (PNG, JPEG, BMP, TIFF, ...) -> uint8 arrays, whatever the file's pixel mode.

Public ultrasound datasets export frames in every mode PIL knows: 8- and 16-bit grayscale, palette images,
RGB screenshots of a grayscale scan, RGBA with an opaque alpha, and the occasional CMYK JPEG. `read_image`
turns all of them into one of two shapes, so the converters downstream handle exactly two cases:

* (H, W) uint8 for grayscale, including RGB/palette images whose three channels are equal;
* (H, W, 3) uint8 RGB for true colour (colour Doppler, CEUS, endoscopic photographs).

Sixteen-bit and floating-point images are rescaled to uint8 by their own range (min -> 0, max -> 255), since
ultrasound exports rarely use the full 16-bit range and a fixed `>> 8` would leave them nearly black. Alpha
is composited onto black, the colour outside an ultrasound scan region. Unreadable input raises a ValueError
that names the file and the problem, so a converter can record it as skipped and carry on.

No ultrasound frame comes near `MAX_PIXELS` (200 megapixels), so a bigger image is a mistake or a
decompression bomb. `check_pixel_count` reads only the header (PIL opens lazily: the size is known before any
pixel is decoded) and refuses such a file before it is decoded. PIL's own guard is not enough: it only warns
between `MAX_IMAGE_PIXELS` and twice that, and decodes anyway.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".pgm", ".ppm")

MAX_PIXELS = 200_000_000
# PIL's guard as a second line of defence (it raises only above twice this value).
Image.MAX_IMAGE_PIXELS = MAX_PIXELS


def _rescale_to_uint8(array: np.ndarray) -> np.ndarray:
    """Integer or float pixels -> uint8 by the image's own min/max (a constant image becomes all zeros)."""
    array = array.astype(np.float64)
    finite = np.isfinite(array)
    if not finite.any():
        return np.zeros(array.shape, np.uint8)
    lo, hi = float(array[finite].min()), float(array[finite].max())
    array = np.where(finite, array, lo)
    if hi <= lo:
        return np.zeros(array.shape, np.uint8)
    return np.round((array - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _collapse_gray(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) -> (H, W) when the three channels are identical, else unchanged."""
    if np.array_equal(rgb[:, :, 0], rgb[:, :, 1]) and np.array_equal(rgb[:, :, 0], rgb[:, :, 2]):
        return np.ascontiguousarray(rgb[:, :, 0])
    return rgb


def _to_array(image: Image.Image) -> np.ndarray:
    """A loaded PIL image of any mode -> (H, W) or (H, W, 3) uint8."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _rescale_to_uint8(np.asarray(image))
    if mode == "1":
        return np.asarray(image.convert("L"))
    if mode == "L":
        return np.asarray(image)
    if mode in ("LA", "RGBA", "PA", "P"):
        # Palette images are expanded through their palette; alpha is composited onto black.
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
        rgb = rgba[:, :, :3] * (rgba[:, :, 3:] / 255.0)
        return _collapse_gray(np.round(rgb).astype(np.uint8))
    if mode == "CMYK":
        return _collapse_gray(np.asarray(image.convert("RGB")))
    if mode == "RGB":
        return _collapse_gray(np.asarray(image))
    # Anything else PIL can represent (YCbCr, LAB, HSV, I;16 variants with other byte orders, ...).
    return _collapse_gray(np.asarray(image.convert("RGB")))


def check_pixel_count(path: str | os.PathLike) -> None:
    """Raises ValueError naming the file when its header announces more than `MAX_PIXELS` pixels.

    Only the header is read. A file PIL cannot identify passes: the caller's decoder reports it.
    """
    path = os.fspath(path)
    try:
        with warnings.catch_warnings():  # PIL warns above MAX_IMAGE_PIXELS; the refusal below says it once
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
    except Image.DecompressionBombError as e:
        raise ValueError(f"{path}: image too large ({e}); not decoded") from e
    except (OSError, SyntaxError, ValueError):
        return
    if width * height > MAX_PIXELS:
        raise ValueError(f"{path}: image too large ({width}x{height} = {width * height / 1e6:.0f} megapixels, "
                         f"above the {MAX_PIXELS / 1e6:.0f}-megapixel cap); not decoded")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Reads one still image -> uint8 (H, W) grayscale or (H, W, 3) RGB. Multi-frame files give frame 0.

    Raises ValueError("<path>: <problem>") for missing, empty, truncated or undecodable files, and for images
    above `MAX_PIXELS`, which are refused from their header before any pixel is decoded.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: file not found")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: empty file (0 bytes)")
    check_pixel_count(path)
    try:
        with Image.open(path) as image:
            image.load()
            array = _to_array(image)
    except Image.DecompressionBombError as e:
        raise ValueError(f"{path}: image too large ({e}); not decoded") from e
    except (OSError, SyntaxError, ValueError) as e:  # PIL reports truncation/corruption with these
        raise ValueError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e
    if array.ndim not in (2, 3) or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{path}: decoded to an unusable shape {array.shape}")
    return np.ascontiguousarray(array)
