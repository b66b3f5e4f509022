"""Segmentation masks of the benchmark converters: reading, rasterising and checking them.

A record's mask is a uint8 class map the size of its image: 0 is background and k > 0 the k-th entry of the
builder's mask class names (docs/segmentation.md, "Masks in the records"). Each `common.Item` of a dataset
with masks carries a `MaskSpec` that says how to build that map:

  * `binary`: a mask file whose foreground becomes `value` (BUS-BRA 0/255 -> 0/1; MMOTU-2D `N_binary.PNG`
    -> the image's class + 1). Palette PNGs are read as their indices, colour files by their brightest
    channel. A file with one non-zero value (0/1, 0/255, a palette's 0/1) is exact; any other is
    thresholded at 128 and reported, since it was probably resized with interpolation somewhere;
  * `index`: a mask file whose pixel values are the classes 0..`max_value` (a user's multi-class set); a
    larger value is an error naming the file;
  * `polygons`: COCO polygons (GIST514-DB), rasterised here; later polygons overwrite earlier ones.

Rasterisation rule: COCO coordinates are continuous with pixel (r, c) covering [c, c+1) x [r, r+1), and a
pixel belongs to a polygon when its centre (c + 0.5, r + 0.5) is inside by the even-odd rule. A centre exactly
on an edge counts on a left or top boundary and not on a right or bottom one (the half-open scanline rule), so
two polygons sharing an edge never share a pixel. A square with corners (2, 2) and (6, 6) is therefore exactly
rows and columns 2..5.

A mask whose size differs from its image is a `DataError` naming both files: it is never resized to fit.

MMOTU-2D also ships a colour-coded `N.PNG`. `colour_coding_warnings` checks it against the class lists: each
non-black colour must belong to one class, and each image must show one colour; disagreements become one
manifest warning listing the images.
"""

from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict

import numpy as np
from PIL import Image

from usf_mae_jax.cli import DataError

KINDS = ("binary", "index", "polygons")
BINARY_THRESHOLD = 128
MAX_LISTED = 20  # images named in one warning


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """How to build one record's mask; `source` is what errors and warnings name (a file, or a COCO file)."""

    kind: str
    source: str
    path: str = ""  # binary / index: the mask file on disk
    value: int = 1  # binary: the class written inside the mask
    max_value: int = 1  # index: the largest valid class value
    polygons: tuple = ()  # polygons: ((class value, (x0, y0, x1, y1, ...)), ...)
    size: tuple[int, int] | None = None  # polygons: (height, width) declared by the annotation

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown mask kind {self.kind!r}; choose one of {KINDS}")


def read_values(path: str, source: str) -> np.ndarray:
    """(H, W) uint8 values of a mask file: palette indices, gray levels, or the brightest colour channel."""
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            if mode in ("RGB", "RGBA", "CMYK", "YCbCr"):
                array = np.asarray(image.convert("RGB")).max(axis=2)
            elif mode == "LA":
                array = np.asarray(image.convert("L"))
            else:  # "P", "L", "1", "I", "I;16": the stored values themselves
                array = np.asarray(image)
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"cannot read the mask {source} ({err})") from None
    if array.ndim != 2:
        raise DataError(f"mask {source} has shape {array.shape}; expected a single-channel image")
    if array.dtype == bool:
        return array.astype(np.uint8)
    if array.max(initial=0) > 255 or array.min(initial=0) < 0:
        raise DataError(f"mask {source} holds values outside 0..255")
    return array.astype(np.uint8)


def binary_foreground(values: np.ndarray) -> tuple[np.ndarray, bool]:
    """(foreground bool, exact): exact when the mask holds at most one non-zero value, else thresholded."""
    nonzero = np.unique(values[values > 0])
    if nonzero.size <= 1:
        return values > 0, True
    return values >= BINARY_THRESHOLD, False


def rasterise(polygons, height: int, width: int) -> np.ndarray:
    """uint8 (height, width) class map of `((value, flat xy), ...)` by the pixel-centre rule (module doc)."""
    out = np.zeros((height, width), np.uint8)
    centres_x = np.arange(width) + 0.5
    for value, flat in polygons:
        xy = np.asarray(flat, np.float64).reshape(-1, 2)
        if len(xy) < 3:
            continue
        x0, y0 = xy[:, 0], xy[:, 1]
        x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
        top = max(0, int(np.floor(y0.min())))
        bottom = min(height, int(np.ceil(y0.max())) + 1)
        for row in range(top, bottom):
            y = row + 0.5
            crossing = (np.minimum(y0, y1) <= y) & (y < np.maximum(y0, y1))
            if not crossing.any():
                continue
            t = (y - y0[crossing]) / (y1[crossing] - y0[crossing])
            xs = np.sort(x0[crossing] + t * (x1[crossing] - x0[crossing]))
            inside = np.zeros(width, bool)
            for left, right in zip(xs[0::2], xs[1::2]):
                inside ^= (centres_x >= left) & (centres_x < right)
            out[row, inside] = value
    return out


def build(spec: MaskSpec, image_file: str, shape: tuple[int, int]) -> tuple[np.ndarray, str | None]:
    """(uint8 class map of `shape`, a note when a binary mask had to be thresholded) for one record.

    `image_file` names the image in the size-mismatch error; `shape` is the image's stored (height, width)
    before any resizing.
    """
    note = None
    if spec.kind == "polygons":
        declared = spec.size or shape
        if tuple(declared) != tuple(shape):
            raise DataError(f"{spec.source} declares {image_file} as {declared[0]}x{declared[1]} (height x width), "
                            f"but the image is {shape[0]}x{shape[1]}")
        return rasterise(spec.polygons, *shape), None
    values = read_values(spec.path, spec.source)
    if values.shape != tuple(shape):
        raise DataError(f"mask {spec.source} is {values.shape[0]}x{values.shape[1]} but its image {image_file} is "
                        f"{shape[0]}x{shape[1]} (height x width)")
    if spec.kind == "binary":
        foreground, exact = binary_foreground(values)
        if not exact:
            note = spec.source
        return (foreground * np.uint8(spec.value)).astype(np.uint8), note
    if values.max(initial=0) > spec.max_value:
        raise DataError(f"mask {spec.source} holds class value {int(values.max())}, but only 0..{spec.max_value} "
                        f"are named")
    return values, None


def thresholded_warning(files: list[str]) -> list[str]:
    """One manifest warning naming the binary masks that were not exactly two-valued."""
    if not files:
        return []
    return [f"{len(files)} binary masks hold more than one non-zero value and were thresholded at "
            f"{BINARY_THRESHOLD}: {sorted(files)[:MAX_LISTED]}"]


def dominant_colour(path: str) -> tuple[tuple[int, int, int] | None, int]:
    """(most frequent non-black RGB colour or None, number of distinct non-black colours) of a colour mask."""
    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB")).reshape(-1, 3)
    coloured = rgb[rgb.any(axis=1)]
    if coloured.size == 0:
        return None, 0
    colours, counts = np.unique(coloured, axis=0, return_counts=True)
    return tuple(int(v) for v in colours[counts.argmax()]), len(colours)


def colour_coding_warnings(entries: list[tuple[str, int, str]], class_names: list[str]) -> list[str]:
    """Checks colour-coded masks against class labels; `entries` are (image source, label, colour mask path).

    Each colour is assigned the class most of its images have; an image whose colour belongs to another
    class, whose mask shows several colours, or none, or cannot be read, is listed in one warning.
    """
    seen: dict[tuple[int, int, int], Counter] = defaultdict(Counter)
    colour_of: dict[str, tuple[int, int, int]] = {}
    several, blank, unreadable = [], [], []
    for source, label, path in entries:
        try:
            colour, count = dominant_colour(path)
        except (OSError, SyntaxError, ValueError):
            unreadable.append(source)
            continue
        if colour is None:
            blank.append(source)
            continue
        if count > 1:
            several.append(source)
        colour_of[source] = colour
        seen[colour][label] += 1
    owner = {colour: counts.most_common(1)[0][0] for colour, counts in seen.items()}
    disagree = sorted(s for s, label, _ in entries if s in colour_of and owner[colour_of[s]] != label)
    shared = {colour: sorted(class_names[c] for c in counts) for colour, counts in seen.items() if len(counts) > 1}
    warnings = []
    if disagree:
        warnings.append(f"colour-coded masks disagree with the class lists for {len(disagree)} images (their "
                        f"colour belongs to another class; colours shared by classes: {shared}): "
                        f"{disagree[:MAX_LISTED]}")
    for what, images in (("more than one colour", several), ("no coloured pixel", blank),
                         ("an unreadable file", unreadable)):
        if images:
            warnings.append(f"colour-coded masks with {what} for {len(images)} images: {sorted(images)[:MAX_LISTED]}")
    return warnings
