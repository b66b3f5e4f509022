"""De-duplication and hold-outs: exact content hashes and perceptual hashes, within and across datasets.

OpenUS-46 repeats itself (docs/openus46.md, "Cross-dataset duplicates"): Fast-U-Net's HC half, the Ultrasound
Fetus Dataset and DFHI's "Diverse" images are HC18 images (resized or recoloured); DFHI's Trans-* planes
come from FETAL_PLANES_DB; FH-PS-AOP was built from JNU-IFM. Inside datasets, consecutive video frames and
copied folders repeat too. The authors' "every PNG under a folder" kept all of these, and let benchmark test
images leak into pretraining.

`Deduplicator` sees every example in conversion order, in the main process, and drops an example when

  1. it matches a hold-out hash list (a benchmark's test split): exact content hash, or perceptual hash
     within the threshold;
  2. its content hash (pixels + shape, after grayscale collapse) was already kept: an exact duplicate;
  3. its perceptual hash (ImageHash pHash with hash_size 16, i.e. 256 bits) is within `phash_threshold` bits
     of a kept image: a near-duplicate (survives resizing, recolouring and re-encoding).

Why 256 bits: on 256-px synthetic ultrasound frames (shared black sector, similar speckle) the default
64-bit pHash put distinct images as close as 4 bits while resized copies reached 6, so no threshold
separated them. At 256 bits distinct frames were at least 40 bits apart and resized copies (down to 180 px
or up to 959 px) at most 20, hence the default threshold of 24.

The first copy kept wins, so `conversion_order` converts the canonical copy of each known group first
(HC18, FETAL_PLANES_DB, JNU-IFM). Every drop carries a reason naming the kept copy, which the writer
records in the dataset's manifest. Near-duplicate lookup uses multi-index hashing: with threshold t the
64 bits are cut into t + 1 bands and any two hashes within t bits agree on at least one whole band, so
a lookup only compares against the hashes sharing a band (no quadratic scan over 370k images).

Hashing is the expensive part (a pHash costs about as much as reading a frame), and the index lookups
need one process that sees every example. So the hashes are computed where the frames are read: the writer
runs `Deduplicator.fingerprinter()` in its worker processes and hands the resulting `Fingerprint` with each
example to `check`, which then only looks hashes up.

The three downstream benchmarks (BUS-BRA, MMOTU-2D, GIST514-DB) are held out of pretraining by default,
as the paper does (`BENCHMARK_HOLDOUTS`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import os
from collections.abc import Callable

import numpy as np

BENCHMARK_HOLDOUTS = ("bus_bra", "mmotu_2d", "gist514_db")

# canonical dataset -> datasets holding copies of (part of) it (docs/openus46.md, "Cross-dataset duplicates").
KNOWN_DUPLICATE_GROUPS = {
    "hc18": ("fast_u_net", "ultrasound_fetus", "dfhi"),
    "fetal_planes_db": ("dfhi",),
    "jnu_ifm": ("fh_ps_aop", "psfhs"),
}

PHASH_SIZE = 16  # ImageHash hash_size: a 16 x 16 = 256-bit hash
PHASH_BITS = PHASH_SIZE * PHASH_SIZE
DEFAULT_PHASH_THRESHOLD = 24
HASH_LIST_VERSION = 1
_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def conversion_order(keys: list[str]) -> list[str]:
    """`keys` with the canonical copy of every known duplicate group first, the rest in the given order."""
    canonical = [key for key in KNOWN_DUPLICATE_GROUPS if key in keys]
    return canonical + [key for key in keys if key not in canonical]


def _canonical_pixels(image: np.ndarray) -> np.ndarray:
    image = np.ascontiguousarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if (image.ndim == 3 and image.shape[2] == 3 and np.array_equal(image[..., 0], image[..., 1])
            and np.array_equal(image[..., 0], image[..., 2])):
        image = np.ascontiguousarray(image[..., 0])
    return image


def content_hash(image: np.ndarray) -> str:
    """Hex digest of the pixels and shape (grayscale stored as RGB hashes like the grayscale image)."""
    image = _canonical_pixels(image)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{image.dtype}{image.shape}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def perceptual_hash(image: np.ndarray) -> int:
    """ImageHash's DCT pHash (hash_size 16, 256 bits) of the grayscale image, as an int.

    ImageHash resizes to 64 x 64 first; doing that shrink with OpenCV's area filter beforehand gives it the
    same input at a fraction of the cost of PIL's antialiased resize of a full-size frame.
    """
    import cv2
    import imagehash
    from PIL import Image

    image = _canonical_pixels(image)
    if image.ndim == 3:
        image = cv2.cvtColor(image[..., :3], cv2.COLOR_RGB2GRAY)
    side = 4 * PHASH_SIZE
    if image.shape[0] > side or image.shape[1] > side:
        image = cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA)
    bits = imagehash.phash(Image.fromarray(image), hash_size=PHASH_SIZE).hash.ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


class PhashIndex:
    """Nearest stored `bits`-bit hash within `threshold` bits, by multi-index hashing (module docstring)."""

    def __init__(self, threshold: int, bits: int = PHASH_BITS):
        if not 0 <= threshold < bits // 2:
            raise ValueError(f"phash threshold must be in [0, {bits // 2 - 1}], got {threshold}")
        self.threshold = threshold
        bands = threshold + 1
        edges = np.linspace(0, bits, bands + 1).round().astype(int)
        self._bands = [(int(lo), int(hi)) for lo, hi in itertools.pairwise(edges)]
        self._tables: list[dict[int, list[int]]] = [{} for _ in self._bands]
        self._hashes: list[int] = []
        self._refs: list[str] = []

    def __len__(self) -> int:
        return len(self._hashes)

    def _keys(self, value: int):
        for lo, hi in self._bands:
            yield (value >> lo) & ((1 << (hi - lo)) - 1)

    def add(self, value: int, ref: str) -> None:
        position = len(self._hashes)
        self._hashes.append(value)
        self._refs.append(ref)
        for table, key in zip(self._tables, self._keys(value)):
            table.setdefault(key, []).append(position)

    def nearest(self, value: int) -> tuple[str, int] | None:
        """(ref, distance) of the closest stored hash within the threshold, or None."""
        best = None
        seen = set()
        for table, key in zip(self._tables, self._keys(value)):
            for position in table.get(key, ()):
                if position in seen:
                    continue
                seen.add(position)
                distance = (self._hashes[position] ^ value).bit_count()
                if distance <= self.threshold and (best is None or distance < best[1]):
                    best = (self._refs[position], distance)
        return best


@dataclasses.dataclass
class HashList:
    """Hashes of a set of images (e.g. a benchmark's test split) that must not enter pretraining."""

    name: str
    content: set[str]
    phash: list[int]

    def to_json(self) -> dict:
        return {"version": HASH_LIST_VERSION, "name": self.name, "content": sorted(self.content),
                "phash": [f"{value:064x}" for value in self.phash]}


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """What `Deduplicator.check` needs of an image: its content hash and, when asked for, its pHash."""

    content: str
    phash: int | None


def fingerprint(image: np.ndarray, phash: bool = True) -> Fingerprint:
    """The fingerprint of one image (top-level, so worker processes can run it)."""
    return Fingerprint(content_hash(image), perceptual_hash(image) if phash else None)


def hash_images(paths: list[str], name: str) -> HashList:
    """The hash list of image files (read like the converters read them)."""
    from data_prep.formats.image2d import read_image

    content, phashes = set(), []
    for path in paths:
        image = read_image(path)
        content.add(content_hash(image))
        phashes.append(perceptual_hash(image))
    return HashList(name, content, phashes)


def load_hash_list(path: str) -> HashList:
    """A hash list from a JSON file written by `save_hash_list`, or computed from a folder of images."""
    if os.path.isdir(path):
        files = sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names
                       if f.lower().endswith(_IMAGE_EXTENSIONS))
        if not files:
            raise ValueError(f"{path}: hold-out folder holds no image file")
        return hash_images(files, os.path.basename(os.path.normpath(path)))
    try:
        with open(path) as handle:
            data = json.load(handle)
        return HashList(str(data["name"]), set(data["content"]), [int(h, 16) for h in data["phash"]])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a hash list (JSON with name, content, phash): {err}") from err


def save_hash_list(hashes: HashList, path: str) -> None:
    with open(path, "w") as handle:
        json.dump(hashes.to_json(), handle)


class Deduplicator:
    """Stateful duplicate / hold-out filter shared by every dataset of one conversion run."""

    def __init__(self, phash_threshold: int | None = DEFAULT_PHASH_THRESHOLD, exact: bool = True,
                 holdouts: list[HashList] = ()):
        self.exact = exact
        self.phash_threshold = phash_threshold
        self._content: dict[str, str] = {}
        self._phash = PhashIndex(phash_threshold) if phash_threshold is not None else None
        self._holdout_content: dict[str, str] = {}
        # Hold-outs are matched perceptually even when near-duplicate removal is off (`--dedup exact`).
        self._holdout_phash = PhashIndex(DEFAULT_PHASH_THRESHOLD if phash_threshold is None else phash_threshold)
        for hashes in holdouts:
            for value in hashes.content:
                self._holdout_content[value] = hashes.name
            for value in hashes.phash:
                self._holdout_phash.add(value, hashes.name)
        self.kept: dict[str, list[list]] = {}
        self.removed: dict[str, list[dict]] = {}

    @property
    def needs_phash(self) -> bool:
        return self._phash is not None or len(self._holdout_phash) > 0

    def fingerprinter(self) -> Callable[[np.ndarray], Fingerprint]:
        """The picklable image -> `Fingerprint` function that `check` expects, for the writer's workers."""
        return functools.partial(fingerprint, phash=self.needs_phash)

    def check(self, dataset: str, ref: str, image: np.ndarray | None = None, *,
              fingerprint: Fingerprint | None = None) -> str | None:
        """The reason to drop this image, or None after registering it as kept.

        Pass the image, or its `fingerprint` computed elsewhere by `fingerprinter()` (then the image is unused).
        """
        if fingerprint is None:
            if image is None:
                raise ValueError(f"{ref}: check needs the image or its fingerprint")
            fingerprint = self.fingerprinter()(image)
        elif self.needs_phash and fingerprint.phash is None:
            raise ValueError(f"{ref}: this Deduplicator needs pHashes; compute fingerprints with fingerprinter()")
        digest, phash = fingerprint.content, fingerprint.phash if self.needs_phash else None
        reason = None
        if digest in self._holdout_content:
            reason = f"held out: identical to an image of {self._holdout_content[digest]}"
        elif phash is not None and (match := self._holdout_phash.nearest(phash)):
            reason = f"held out: near-duplicate (phash distance {match[1]}) of an image of {match[0]}"
        elif self.exact and digest in self._content:
            reason = f"exact duplicate of {self._content[digest]}"
        elif self._phash is not None and (match := self._phash.nearest(phash)):
            reason = f"near-duplicate (phash distance {match[1]}) of {match[0]}"
        if reason is not None:
            self.removed.setdefault(dataset, []).append({"ref": ref, "reason": reason})
            return reason
        self._register(dataset, ref, digest, phash)
        return None

    def _register(self, dataset: str, ref: str, digest: str, phash: int | None) -> None:
        self._content.setdefault(digest, ref)
        if self._phash is not None and phash is not None:
            self._phash.add(phash, ref)
        self.kept.setdefault(dataset, []).append([ref, digest, None if phash is None else f"{phash:064x}"])

    def for_dataset(self, dataset: str):
        """The writer's `dedup(example)` callable for one dataset (uses `example.fingerprint` when set)."""
        def dedup(example) -> str | None:
            ref = f"{dataset}:{example.source}" + (f"#{example.frame}" if example.frame >= 0 else "")
            return self.check(dataset, ref, example.image, fingerprint=getattr(example, "fingerprint", None))
        return dedup

    def export(self, dataset: str) -> dict:
        """What a resumed run needs to dedup against this finished dataset, plus what was removed."""
        return {"kept": self.kept.get(dataset, []), "removed": self.removed.get(dataset, [])}

    def restore(self, dataset: str, exported: dict) -> None:
        """Registers a finished dataset's kept images (from `export`) without converting it again."""
        for ref, digest, phash in exported.get("kept", []):
            self._register(dataset, ref, digest, None if phash is None else int(phash, 16))
        self.removed[dataset] = list(exported.get("removed", []))
