"""Segmentation masks of the benchmark converters: reading, rasterising and checking them.

A record's mask is a uint8 class map the size of its image: 0 is background and k > 0 the k-th entry of the
builder's mask class names (docs/segmentation.md, "Masks in the records"). Each `common.Item` of a dataset
with masks carries a `MaskSpec` that says how to build that map:

  * `binary`: a mask file whose foreground becomes `value` (BUS-BRA 0/255 -> 0/1; MMOTU-2D `N_binary.PNG`
    -> the image's class + 1), united with the foreground of any `extra` files (BUSI ships one file per
    lesion: `_mask`, `_mask_1`, `_mask_2`). Palette PNGs are read as their indices, colour files by their
    brightest channel. A file with one non-zero value (0/1, 0/255, a palette's 0/1) is exact; any other is
    thresholded at 128 and reported, since it was probably resized with interpolation somewhere;
  * `index`: a mask file whose pixel values are the classes 0..`max_value` (a user's multi-class set);
  * `polygons`: COCO polygons (GIST514-DB), rasterised here; later polygons overwrite earlier ones.

Rasterisation rule: COCO coordinates are continuous with pixel (r, c) covering [c, c+1) x [r, r+1), and a
pixel belongs to a polygon when its centre (c + 0.5, r + 0.5) is inside by the even-odd rule. A centre exactly
on an edge counts on a left or top boundary and not on a right or bottom one (the half-open scanline rule), so
two polygons sharing an edge never share a pixel. A square with corners (2, 2) and (6, 6) is therefore exactly
rows and columns 2..5.

Unusable masks. Real releases hold odd mask files (MMOTU-2D's `598_binary.PNG` is 256x256 for a 604x566
image), and one odd file must never abort a conversion (docs/benchmarks.md, "Masks"). `check` compares a
spec's files with its image from the file headers alone (PIL reads the size without decoding), so the plan
stage finds every size mismatch and unreadable header before any record is written; the converter then drops
that mask (the image is kept with `has_mask` false) or, when the user asks for it, marks the spec `resize`.
`build` raises a `MaskError` naming the file for anything that only shows when decoding (a truncated file,
a class value beyond the named ones); the builder drops that mask the same way. With `resize`, a mask file of
another size is resized to its image by nearest neighbour and declared polygons are scaled to it.

MMOTU-2D also ships a colour-coded `N.PNG`. `colour_coding_warnings` checks it against the class lists: each
non-black colour must belong to one class, and each image must show one colour; disagreements become one
manifest warning listing the images.
"""

from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict

import cv2
import numpy as np
from PIL import Image

from usf_mae_jax.cli import DataError

KINDS = ("binary", "index", "polygons")
BINARY_THRESHOLD = 128
MAX_LISTED = 20  # images named in one warning
# What PIL raises for a missing, truncated, foreign or absurdly large file.
READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class MaskError(DataError):
    """A mask that cannot be used as it is; `file` names the mask file (or COCO file), `reason` says why."""

    def __init__(self, file: str, reason: str):
        super().__init__(f"mask {file}: {reason}")
        self.file, self.reason = file, reason


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
    extra: tuple[tuple[str, str], ...] = ()  # binary: more (source, path) files united with the first
    resize: bool = False  # a file (or declared size) of another size than the image is resized to it

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown mask kind {self.kind!r}; choose one of {KINDS}")
        if self.extra and self.kind != "binary":
            raise ValueError("only binary masks can unite several files")

    def files(self) -> list[tuple[str, str]]:
        """(source, path) of every mask file the spec reads; none for polygons."""
        return [] if self.kind == "polygons" else [(self.source, self.path), *self.extra]


@dataclasses.dataclass(frozen=True)
class Quirk:
    """A mask file that does not fit its image as it is. `shape` is the mask's (height, width) when the file is
    readable and only of another size (so resizing can fix it); None when it cannot be read."""

    file: str
    reason: str
    shape: tuple[int, int] | None = None


def shape_text(shape: tuple[int, int]) -> str:
    return f"{shape[0]}x{shape[1]}"


def size_reason(mask_shape: tuple[int, int], image_shape: tuple[int, int]) -> str:
    return f"size {shape_text(mask_shape)} differs from the image's {shape_text(image_shape)} (height x width)"


def declared_reason(declared: tuple[int, int], image_shape: tuple[int, int]) -> str:
    return f"declares the image as {shape_text(declared)}, but it is {shape_text(image_shape)} (height x width)"


def header_shape(path: str) -> tuple[int, int]:
    """(height, width) of an image file from its header, without decoding the pixels."""
    with Image.open(path) as image:
        width, height = image.size
    return height, width


def check(spec: MaskSpec, image_shape: tuple[int, int]) -> list[Quirk]:
    """Every file of `spec` (or its declared polygon size) that does not fit an image of `image_shape`,
    read from the file headers only."""
    image_shape = tuple(image_shape)
    if spec.kind == "polygons":
        if spec.size and tuple(spec.size) != image_shape:
            return [Quirk(spec.source, declared_reason(spec.size, image_shape), tuple(spec.size))]
        return []
    quirks = []
    for source, path in spec.files():
        try:
            shape = header_shape(path)
        except READ_ERRORS as err:
            quirks.append(Quirk(source, f"cannot be read ({err})"))
            continue
        if shape != image_shape:
            quirks.append(Quirk(source, size_reason(shape, image_shape), shape))
    return quirks


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
    except READ_ERRORS as err:
        raise MaskError(source, f"cannot be read ({err})") from None
    if array.ndim != 2:
        raise MaskError(source, f"has shape {array.shape}; expected a single-channel image")
    if array.dtype == bool:
        return array.astype(np.uint8)
    if array.max(initial=0) > 255 or array.min(initial=0) < 0:
        raise MaskError(source, "holds values outside 0..255")
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


def _fit(values: np.ndarray, spec: MaskSpec, source: str, shape: tuple[int, int]) -> np.ndarray:
    """A mask file's values at the image's `shape`: unchanged, resized by nearest neighbour when the spec
    allows it, or a MaskError."""
    if values.shape == tuple(shape):
        return values
    if not spec.resize:
        raise MaskError(source, size_reason(values.shape, shape))
    return cv2.resize(values, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST_EXACT)


def _scaled(polygons, declared: tuple[int, int], shape: tuple[int, int]) -> tuple:
    """Polygons drawn on a `declared` canvas, scaled to one of `shape` (height, width)."""
    sy, sx = shape[0] / declared[0], shape[1] / declared[1]
    return tuple((value, tuple(v * (sx if i % 2 == 0 else sy) for i, v in enumerate(flat)))
                 for value, flat in polygons)


def build(spec: MaskSpec, shape: tuple[int, int]) -> tuple[np.ndarray, list[str]]:
    """(uint8 class map of `shape`, the binary mask files that had to be thresholded) for one record.

    `shape` is the image's stored (height, width) before any resizing. Raises `MaskError` naming the file when
    the mask cannot be used: unreadable, of another size (unless `spec.resize`), or a class value beyond
    `max_value`.
    """
    if spec.kind == "polygons":
        declared = tuple(spec.size or shape)
        if declared == tuple(shape):
            return rasterise(spec.polygons, *shape), []
        if not spec.resize:
            raise MaskError(spec.source, declared_reason(declared, shape))
        return rasterise(_scaled(spec.polygons, declared, shape), *shape), []
    if spec.kind == "index":
        values = _fit(read_values(spec.path, spec.source), spec, spec.source, shape)
        if values.max(initial=0) > spec.max_value:
            raise MaskError(spec.source, f"holds class value {int(values.max())}, but only 0..{spec.max_value} "
                                         f"are named")
        return values, []
    foreground, thresholded = np.zeros(shape, bool), []
    for source, path in spec.files():
        part, exact = binary_foreground(_fit(read_values(path, source), spec, source, shape))
        foreground |= part
        if not exact:
            thresholded.append(source)
    return (foreground * np.uint8(spec.value)).astype(np.uint8), thresholded


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
        except READ_ERRORS:
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
