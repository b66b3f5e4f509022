"""Synthetic B-mode ultrasound images, for the demo, the tests and the smoke runs.

Real ultrasound data cannot be shipped, so the demo and the tests train on images that share the statistics
that matter to an MAE on ultrasound:

  * fully developed speckle: complex Gaussian (Rayleigh-amplitude) scatterers, weighted by a tissue
    reflectivity map, convolved with an anisotropic point-spread function (narrow axially, wide laterally),
    then envelope-detected and log-compressed to a 50 dB dynamic range;
  * depth attenuation with partial time-gain compensation;
  * a convex (curvilinear) or linear field of view, black outside the scan region;
  * optional lesions with a learnable label: benign lesions are round, smooth and hypoechoic with mild
    posterior enhancement; malignant ones are irregular (spiculated), taller-than-wide and cast a posterior
    acoustic shadow. These are the classic BI-RADS cues, so a classifier can learn them;
  * controllable cues (`Cues`): the strength of each class difference (margin, orientation, posterior
    feature, echogenicity, internal texture) from 0 (a malignant lesion is drawn exactly like a benign one
    for that cue) to 1, so the difficulty of the downstream task is a parameter (docs/transfer_study.md).
    The default, `Cues()`, is the three cues above at full strength and draws the same random numbers as
    before, so it gives the same images;
  * optional fat lobules (`fat_lobules=True`): flat, smooth, hypoechoic ovals in the superficial tissue, the
    classic mimics of a breast lesion. They are *not* lesions, so a segmenter has to tell them apart from
    the lesion by shape and context, while a dark-blob threshold cannot (docs/segmentation.md).

`synthesize_with_mask` also returns the lesion's mask (the exact region whose echoes were darkened; the
shadow or enhancement below it and the lobules are background): the ground truth of the segmentation demo.
With `fat_lobules=False` no extra random number is drawn, so the images are those of earlier versions.

Every image is a pure function of (seed, index): a data source built on this is random-access and
deterministic, which the resumable pipeline relies on.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

NO_LESION, BENIGN, MALIGNANT = -1, 0, 1
LABEL_NAMES = ("benign", "malignant")


@dataclasses.dataclass(frozen=True)
class Cues:
    """Strength in [0, 1] of each cue that separates a malignant lesion from a benign one.

    At 0 a malignant lesion draws that property from the benign distribution (the cue carries no label); at 1
    from the malignant one; in between, the malignant draw range is the blend `(1 - s) * benign + s * malignant`
    of the two ranges. Benign lesions never change. The BI-RADS cues (ACR BI-RADS ultrasound lexicon):

      margin       spiculated (4 random harmonics, amplitude 0.08-0.18) vs smooth (one gentle 2nd harmonic)
      orientation  taller-than-wide (rx 0.7-0.9, ry 1.0-1.3 radii) vs wider-than-tall (rx 1.1-1.5, ry 0.7-0.9)
      posterior    acoustic shadow (x 0.15-0.35) vs enhancement (x 1.2-1.5) below the lesion
      echo         markedly hypoechoic interior (x 0.02-0.06) vs hypoechoic (x 0.08-0.25)
      texture      heterogeneous interior (log-normal blobs, sigma 1.2 * s) vs homogeneous

    Two settings act on both classes alike (they make lesions more or less conspicuous, not distinguishable):
    `lesion_scale` multiplies the lesion radius (0.09-0.16 of the image side at 1), and `lesion_contrast` is an
    exponent on the interior's reflectivity factor (at 2 a factor 0.1 becomes 0.01: -20 dB instead of -10 dB).
    """

    margin: float = 1.0
    orientation: float = 1.0
    posterior: float = 1.0
    echo: float = 0.0
    texture: float = 0.0
    lesion_scale: float = 1.0
    lesion_contrast: float = 1.0

    def __post_init__(self):
        for name, value in dataclasses.asdict(self).items():
            if not name.startswith("lesion_") and not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"cue {name} must lie in [0, 1], got {value}")
        if not (0.0 < self.lesion_scale <= 4.0 and 0.0 < self.lesion_contrast <= 4.0):
            raise ValueError(f"lesion_scale and lesion_contrast must lie in (0, 4], got {self.lesion_scale} and "
                             f"{self.lesion_contrast}")

    @classmethod
    def parse(cls, text: str | None) -> Cues:
        """'margin=0.5,posterior=0' -> Cues; unnamed cues keep their default, `all=S` sets every cue first.

        '' or None is the default; e.g. 'all=0,margin=1' leaves the margin as the only cue.
        """
        values = dataclasses.asdict(cls())
        for item in filter(None, (t.strip() for t in str(text or "").split(","))):
            name, _, value = item.partition("=")
            name = name.strip()
            try:
                strength = float(value)
            except ValueError:
                strength = None
            if (name not in values and name != "all") or strength is None:
                raise ValueError(f"cue {item!r} is not NAME=STRENGTH with NAME one of all, {', '.join(values)}")
            for key in ([k for k in values if not k.startswith("lesion_")] if name == "all" else [name]):
                values[key] = strength
        return cls(**values)

    def describe(self) -> str:
        return ",".join(f"{k}={v:g}" for k, v in dataclasses.asdict(self).items())


DEFAULT_CUES = Cues()


def _blend(benign: tuple[float, float], malignant: tuple[float, float], strength: float) -> tuple[float, float]:
    """The draw range at a cue strength; exact at 0 and 1 ((1 - s) * a + s * b, not a + s * (b - a))."""
    return tuple((1.0 - strength) * b + strength * m for b, m in zip(benign, malignant))


def _field_of_view(height: int, width: int, rng: np.random.Generator,
                   probe: str) -> tuple[np.ndarray, np.ndarray]:
    """Returns (inside mask, depth in [0, 1]) for a convex or linear probe geometry."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    if probe == "linear":
        margin = rng.uniform(0.05, 0.15) * width
        inside = (xx >= margin) & (xx <= width - margin) & (yy >= 0.04 * height)
        depth = np.clip((yy - 0.04 * height) / (0.96 * height), 0, 1)
        return inside, depth
    apex_y = -rng.uniform(0.15, 0.4) * height
    half_angle = np.deg2rad(rng.uniform(30, 40))
    radius = np.hypot(xx - width / 2, yy - apex_y)
    angle = np.arctan2(xx - width / 2, yy - apex_y)
    r_min, r_max = -apex_y + 0.04 * height, height * 0.98 - apex_y
    inside = (np.abs(angle) <= half_angle) & (radius >= r_min) & (radius <= r_max)
    depth = np.clip((radius - r_min) / (r_max - r_min), 0, 1)
    return inside, depth


def _lesion_mask(height: int, width: int, rng: np.random.Generator, kind: int,
                 cues: Cues = DEFAULT_CUES) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A lesion mask and its (centre x, centre y, lateral radius), with a boundary shape that depends on kind."""
    cx = rng.uniform(0.35, 0.65) * width
    cy = rng.uniform(0.35, 0.6) * height
    radius = rng.uniform(0.09, 0.16) * min(height, width)
    if cues.lesion_scale != 1.0:
        radius *= cues.lesion_scale
    theta = np.linspace(0, 2 * np.pi, 180, endpoint=False)
    # Benign: round to oval, wider than tall, smooth boundary. Malignant: irregular, spiculated, taller than wide.
    orientation = 0.0 if kind == BENIGN else cues.orientation
    rx = radius * rng.uniform(*_blend((1.1, 1.5), (0.7, 0.9), orientation))
    ry = radius * rng.uniform(*_blend((0.7, 0.9), (1.0, 1.3), orientation))
    margin = 0.0 if kind == BENIGN else cues.margin
    if margin < 1:
        smooth = 1.0 + 0.03 * np.sin(2 * theta + rng.uniform(0, 2 * np.pi))
    if margin > 0:
        spiculated = np.ones_like(theta)
        for harmonic in rng.integers(5, 14, size=4):
            spiculated += rng.uniform(0.08, 0.18) * np.sin(harmonic * theta + rng.uniform(0, 2 * np.pi))
        spiculated = np.clip(spiculated, 0.55, None)
    r = smooth if margin == 0 else spiculated if margin == 1 else (1 - margin) * smooth + margin * spiculated
    pts = np.stack([cx + rx * r * np.cos(theta), cy + ry * r * np.sin(theta)], axis=1)
    mask = np.zeros((height, width), np.uint8)
    cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
    return mask.astype(bool), (cx, cy, rx)


def _add_fat_lobules(reflectivity: np.ndarray, rng: np.random.Generator) -> None:
    """Darkens 1-3 flat smooth ovals in the upper half (fat lobules), in place."""
    height, width = reflectivity.shape
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for _ in range(rng.integers(1, 4)):
        cx, cy = rng.uniform(0.15, 0.85) * width, rng.uniform(0.12, 0.45) * height
        rx, ry = rng.uniform(0.08, 0.16) * width, rng.uniform(0.03, 0.06) * height
        tilt = rng.uniform(-0.3, 0.3)
        u = ((xx - cx) * np.cos(tilt) + (yy - cy) * np.sin(tilt)) / rx
        v = (-(xx - cx) * np.sin(tilt) + (yy - cy) * np.cos(tilt)) / ry
        reflectivity[u * u + v * v <= 1.0] *= rng.uniform(0.1, 0.3)


def synthesize(size: int | tuple[int, int], rng: np.random.Generator, lesion: int = NO_LESION,
               probe: str | None = None, fat_lobules: bool = False, cues: Cues | None = None) -> np.ndarray:
    """One synthetic B-mode image, uint8 (size, size) or (height, width) for size=(height, width), black
    outside the field of view. `cues` sets how strongly a malignant lesion differs (default `Cues()`)."""
    return synthesize_with_mask(size, rng, lesion, probe, fat_lobules, cues)[0]


def synthesize_with_mask(size: int | tuple[int, int], rng: np.random.Generator, lesion: int = NO_LESION,
                         probe: str | None = None, fat_lobules: bool = False,
                         cues: Cues | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8, lesion mask bool), both (size, size) or (height, width); the mask is all False without a
    lesion."""
    cues = cues or DEFAULT_CUES
    height, width = (size, size) if isinstance(size, int) else size
    probe = probe or ("convex" if rng.random() < 0.6 else "linear")
    inside, depth = _field_of_view(height, width, rng, probe)
    yy = np.arange(height, dtype=np.float32)[:, None] / height

    # Tissue reflectivity: a few horizontal layers with smooth boundaries, plus fine texture.
    reflectivity = np.full((height, width), rng.uniform(0.6, 1.0), np.float32)
    for _ in range(rng.integers(2, 5)):
        boundary = rng.uniform(0.1, 0.9) + 0.05 * np.sin(
            np.linspace(0, rng.uniform(1, 4) * np.pi, width) + rng.uniform(0, 6))[None, :]
        reflectivity = np.where(yy > boundary, reflectivity * rng.uniform(0.5, 1.6), reflectivity)
    noise = rng.standard_normal((height, width)).astype(np.float32)
    reflectivity *= 1.0 + 0.3 * cv2.GaussianBlur(noise, (0, 0), 4)
    reflectivity = np.clip(reflectivity, 0.05, None)
    if fat_lobules:
        _add_fat_lobules(reflectivity, rng)

    mask = np.zeros((height, width), bool)
    if lesion != NO_LESION:
        mask, (cx, _, rx) = _lesion_mask(height, width, rng, lesion, cues)
        malignant = lesion == MALIGNANT
        interior = rng.uniform(*_blend((0.08, 0.25), (0.02, 0.06), cues.echo if malignant else 0.0))
        reflectivity[mask] *= interior if cues.lesion_contrast == 1.0 else interior**cues.lesion_contrast
        if malignant and cues.texture > 0:  # heterogeneous interior: log-normal blobs about 1/30 of the image
            blobs = cv2.GaussianBlur(rng.standard_normal((height, width)).astype(np.float32), (0, 0),
                                     max(height, width) / 30)
            reflectivity[mask] *= np.exp(1.2 * cues.texture * blobs[mask] / (blobs.std() + 1e-6))
        below = np.zeros_like(mask)
        cols = np.abs(np.arange(width) - cx) <= rx * 0.9
        bottom = np.max(np.where(mask.any(axis=1))[0])
        below[bottom:, cols] = True
        below &= ~mask
        # Malignant: posterior acoustic shadow; benign: mild posterior enhancement.
        reflectivity[below] *= rng.uniform(*_blend((1.2, 1.5), (0.15, 0.35), cues.posterior if malignant else 0.0))

    # Speckle: complex Gaussian scatterers through an anisotropic PSF, then the envelope.
    scatter = (rng.standard_normal((height, width)) + 1j * rng.standard_normal((height, width))).astype(np.complex64)
    scatter *= np.sqrt(reflectivity)
    sigma_lateral, sigma_axial = rng.uniform(1.2, 2.2), rng.uniform(0.5, 0.9)
    real = cv2.GaussianBlur(scatter.real.copy(), (0, 0), sigmaX=sigma_lateral, sigmaY=sigma_axial)
    imag = cv2.GaussianBlur(scatter.imag.copy(), (0, 0), sigmaX=sigma_lateral, sigmaY=sigma_axial)
    envelope = np.hypot(real, imag)

    # Depth attenuation (dB/depth) with incomplete time-gain compensation.
    envelope *= np.exp(-rng.uniform(0.8, 2.0) * depth)

    # Log compression to a 50 dB dynamic range.
    db = 20 * np.log10(envelope / (np.percentile(envelope[inside], 99.5) + 1e-12) + 1e-6)
    image = np.clip((db + 50.0) / 50.0, 0, 1) * 255
    image[~inside] = 0
    return image.astype(np.uint8), mask & inside


class SyntheticUltrasound:
    """A deterministic random-access source: item i is a dict with `image` uint8 (size, size, 1) and `label`.

    `lesion_fraction` of the images carry a lesion, half benign and half malignant (label 0 / 1); the rest
    have label -1. With `lesion_fraction=1` this is a balanced binary classification set.
    """

    def __init__(self, count: int, size: int = 224, seed: int = 0, lesion_fraction: float = 0.5,
                 cues: Cues | None = None):
        if count <= 0:
            raise ValueError(f"count must be positive, got {count}")
        self.count, self.size, self.seed, self.lesion_fraction = count, size, seed, lesion_fraction
        self.cues = cues or DEFAULT_CUES

    def __len__(self) -> int:
        return self.count

    def label(self, index: int) -> int:
        rng = np.random.default_rng([self.seed, index, 1])
        if rng.random() >= self.lesion_fraction:
            return NO_LESION
        return BENIGN if rng.random() < 0.5 else MALIGNANT

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.count:
            raise IndexError(f"index {index} out of range for {self.count} synthetic images")
        label = self.label(index)
        image = synthesize(self.size, np.random.default_rng([self.seed, index, 0]), label, cues=self.cues)
        return {"image": image[:, :, None], "label": label, "source": f"synthetic/{index:07d}.png"}

    def materialize(self) -> tuple[np.ndarray, np.ndarray]:
        """All images as one (count, size, size, 1) uint8 array and their labels, for in-memory training."""
        items = [self[i] for i in range(self.count)]
        return np.stack([it["image"] for it in items]), np.array([it["label"] for it in items], np.int32)
