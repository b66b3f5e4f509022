"""Image cleaning before encoding: scan-region crop, burnt-in annotation removal, grayscale, size cap.

Each step is a switch in `CleanOptions` and is applied in this order by `clean_image`:

1. `grayscale`: an (H, W, 3) image whose three channels are equal becomes (H, W). Colour Doppler and CEUS
   images have unequal channels and stay in colour (docs/openus46.md, F1).
2. `crop`: crop to the scan region, dropping black borders and the UI margins around it (`scan_region`).
3. `inpaint`: remove burnt-in annotations by inpainting, after the USF-MAE preprocessing notebook
   (the USF-MAE code release, arXiv 2510.22990). The authors inpaint the union of three masks:
     * OCR text boxes. Not reproduced: it needs an OCR model that this project does not ship. Text is
       still partly caught by the grayscale-mark mask below (glyphs are small high-contrast contours).
     * colour marks: CLAHE on the L channel, HSV, k-means (k = 3) over the saturated pixels (S > 40),
       keeping clusters whose centre has S > 40 and V > 20, dropping components under 20 px;
     * grayscale marks: CLAHE, Canny(50, 150), 3x3 dilation, external contours with area in [30, 2000].
   The union is closed then opened with a 5x5 kernel and inpainted with OpenCV's Navier-Stokes method,
   radius 3. Datasets whose colour is content (Doppler, CEUS) skip the colour-mark mask.
4. `max_side`: cap the longest side (INTER_AREA), bounding storage; None keeps the size.

The heuristics are the authors'; on clean B-mode images the grayscale-mark mask also fires on strong
speckle edges, which is why inpainting is off by default in the converter and documented as such.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

# Thresholds of the authors' preprocessing notebook (USF-MAE code release, arXiv 2510.22990).
SATURATION_MIN = 40
VALUE_MIN = 20
COLOUR_CLUSTERS = 3
COLOUR_MIN_COMPONENT = 20
CANNY_LOW, CANNY_HIGH = 50, 150
CONTOUR_AREA_RANGE = (30, 2000)
MORPH_KERNEL = 5
INPAINT_RADIUS = 3


@dataclasses.dataclass(frozen=True)
class CleanOptions:
    """Which cleaning steps run. `colour_is_content` protects Doppler / CEUS colour from the colour mask."""

    grayscale: bool = True
    crop: bool = False
    inpaint: bool = False
    max_side: int | None = None
    colour_is_content: bool = False


# A frame whose pixels are nearly all black or white is a segmentation mask (0/255, JPEG masks with a few grey
# edge pixels) or a blank frame, never an ultrasound image. Measured on five real releases (BUSI, HC18, DDTI,
# TG3K, C-TRUS; 150 files each, docs/real_data.md): masks 0.998-1.000 of pixels <= 16 or >= 239, images at
# most 0.85 (HC18 frames, with their wide black margins).
MASK_LIKE_FRACTION = 0.98
MASK_LIKE_DARK, MASK_LIKE_BRIGHT = 16, 239


def mask_like_fraction(image: np.ndarray) -> float:
    """The share of pixels (of every channel) that are near black or near white."""
    return float(np.mean((image <= MASK_LIKE_DARK) | (image >= MASK_LIKE_BRIGHT)))


def mask_like_reason(image: np.ndarray) -> str | None:
    """Why a frame must not be a pretraining input (a mask or a blank frame), or None for an image."""
    fraction = mask_like_fraction(image)
    if fraction < MASK_LIKE_FRACTION:
        return None
    return (f"mask-like content: {fraction:.1%} of its pixels are near 0 or 255 (a segmentation mask or a blank "
            f"frame, not an ultrasound image)")


def collapse_equal_channels(image: np.ndarray) -> np.ndarray:
    """(H, W) when the three channels of an (H, W, 3) image are identical; the image unchanged otherwise."""
    if image.ndim == 3 and image.shape[2] == 1:
        return image[..., 0]
    if (image.ndim == 3 and image.shape[2] == 3 and np.array_equal(image[..., 0], image[..., 1])
            and np.array_equal(image[..., 0], image[..., 2])):
        return np.ascontiguousarray(image[..., 0])
    return image


def _gray(image: np.ndarray) -> np.ndarray:
    return image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)


def scan_region(image: np.ndarray, threshold: int = 8,
                min_fraction: float = 0.1) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the scan region: the bounding box of the largest bright component.

    Pixels brighter than `threshold` are opened with a 7x7 kernel, which removes thin text, rulers and
    calipers in the margins while the sector or rectangle of the scan stays one large blob. When no blob
    covers `min_fraction` of the image (e.g. a dark, sparse image) the whole image is returned.
    """
    gray = _gray(image)
    height, width = gray.shape
    whole = (0, height, 0, width)
    content = (gray > threshold).astype(np.uint8)
    content = cv2.morphologyEx(content, cv2.MORPH_OPEN, np.ones((7, 7), np.uint8))
    count, _, stats, _ = cv2.connectedComponentsWithStats(content, connectivity=8)
    if count <= 1:
        return whole
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    left, top, box_w, box_h, area = stats[largest]
    if box_w * box_h < min_fraction * height * width or area == 0:
        return whole
    return int(top), int(top + box_h), int(left), int(left + box_w)


def crop_to_scan_region(image: np.ndarray) -> np.ndarray:
    """The image cropped to `scan_region`."""
    top, bottom, left, right = scan_region(image)
    return np.ascontiguousarray(image[top:bottom, left:right])


def _clahe(gray: np.ndarray) -> np.ndarray:
    return cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(gray)


def _drop_small_components(mask: np.ndarray, min_area: int) -> np.ndarray:
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    keep = np.zeros(count, bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_area
    return (keep[labels] * 255).astype(np.uint8)


def colour_mark_mask(image: np.ndarray) -> np.ndarray:
    """uint8 {0, 255} mask of saturated marks (coloured calipers, arrows, labels); all zero for grayscale."""
    mask = np.zeros(image.shape[:2], np.uint8)
    if image.ndim != 3:
        return mask
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB)
    lab[..., 0] = _clahe(lab[..., 0])
    hsv = cv2.cvtColor(cv2.cvtColor(lab, cv2.COLOR_LAB2RGB), cv2.COLOR_RGB2HSV)
    saturated = hsv[..., 1] > SATURATION_MIN
    pixels = hsv[saturated].astype(np.float32)
    if len(pixels) < COLOUR_CLUSTERS:
        return mask
    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 20, 1.0)
    cv2.setRNGSeed(0)
    _, labels, centres = cv2.kmeans(pixels, COLOUR_CLUSTERS, None, criteria, 3, cv2.KMEANS_PP_CENTERS)
    keep_cluster = (centres[:, 1] > SATURATION_MIN) & (centres[:, 2] > VALUE_MIN)
    mask[saturated] = np.where(keep_cluster[labels.ravel()], 255, 0).astype(np.uint8)
    return _drop_small_components(mask, COLOUR_MIN_COMPONENT)


def grayscale_mark_mask(image: np.ndarray) -> np.ndarray:
    """uint8 {0, 255} mask of small high-contrast shapes (calipers, crosses, text glyphs)."""
    edges = cv2.Canny(_clahe(_gray(image)), CANNY_LOW, CANNY_HIGH)
    edges = cv2.dilate(edges, np.ones((3, 3), np.uint8))
    contours, _ = cv2.findContours(edges, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    low, high = CONTOUR_AREA_RANGE
    kept = [c for c in contours if low <= cv2.contourArea(c) <= high]
    mask = np.zeros(image.shape[:2], np.uint8)
    cv2.drawContours(mask, kept, -1, 255, thickness=cv2.FILLED)
    return mask


def annotation_mask(image: np.ndarray, colour_is_content: bool = False) -> np.ndarray:
    """The union of the colour- and grayscale-mark masks, closed then opened with a 5x5 kernel."""
    mask = grayscale_mark_mask(image)
    if not colour_is_content:
        mask = cv2.bitwise_or(mask, colour_mark_mask(image))
    kernel = np.ones((MORPH_KERNEL, MORPH_KERNEL), np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel)
    return cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)


def remove_annotations(image: np.ndarray, colour_is_content: bool = False) -> np.ndarray:
    """The image with `annotation_mask` inpainted (Navier-Stokes, radius 3); unchanged if nothing found."""
    mask = annotation_mask(image, colour_is_content)
    if not mask.any():
        return image
    return cv2.inpaint(image, mask, INPAINT_RADIUS, cv2.INPAINT_NS)


def cap_longest_side(image: np.ndarray, max_side: int | None) -> np.ndarray:
    """The image shrunk (INTER_AREA) so its longest side is at most `max_side`; never enlarged."""
    if not max_side or max(image.shape[:2]) <= max_side:
        return image
    height, width = image.shape[:2]
    scale = max_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def clean_image(image: np.ndarray, options: CleanOptions) -> np.ndarray:
    """Applies the enabled steps in the documented order; the input array is never modified."""
    if image.dtype != np.uint8:
        raise ValueError(f"clean_image expects uint8 pixels, got {image.dtype}")
    if options.grayscale:
        image = collapse_equal_channels(image)
    if options.crop:
        image = crop_to_scan_region(image)
    if options.inpaint:
        image = remove_annotations(image, options.colour_is_content)
    if options.max_side:
        image = cap_longest_side(image, options.max_side)
    return image
