"""Frame / slice sampling for videos, cines and volumes, and the cast of any pixel array to uint8.

Consecutive frames of a cine or neighbouring slices of a volume are near-duplicates; emitting all of them
would let a few video datasets dominate the pretraining mix (docs/openus46.md, family F5: "never emit every frame
of EchoNet / ACOUSLIC / BLUES / brachial plexus"). Every sequence reader therefore takes a `FrameSampling`
rule and applies it the same way:

  1. candidates = every `stride`-th index, starting at 0 (a `rate_hz` turns into a stride from the fps);
  2. empty frames (almost all zero, e.g. outside the scanned part of a volume) are dropped when
     `skip_empty` is on;
  3. when more than `max_frames` remain, `max_frames` of them are kept, evenly spaced (first and last
     included), so a cap thins the whole sequence instead of keeping only its beginning.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class FrameSampling:
    """How to turn one sequence (video, 2-D+t cine, 3-D volume, HDF5 stack) into 2-D frames.

    stride: keep every `stride`-th frame or slice.
    rate_hz: for videos with a known frame rate, keep about `rate_hz` frames per second (overrides stride).
    max_frames: at most this many frames per sequence (evenly spaced); None = no cap.
    axis: slice axis of a volume, in the array order SimpleITK returns (slowest axis first, so 0 = the
      frames of a 2-D+t cine, or UltraSam's "axial"; 2 = its "sagittal").
    flip_diagonal: transpose every frame (rows <-> columns). Some cines are stored transposed (CardiacUDC,
      EchoCP) and UltraSam applies this flip to the MicroSeg / regPro / Segthy slices.
    skip_empty: drop frames whose non-zero pixels are at most `empty_fraction` of the frame.
    """

    stride: int = 1
    rate_hz: float | None = None
    max_frames: int | None = None
    axis: int = 0
    flip_diagonal: bool = False
    skip_empty: bool = True
    empty_fraction: float = 0.0

    def __post_init__(self):
        if self.stride < 1:
            raise ValueError(f"FrameSampling.stride must be >= 1, got {self.stride}")
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"FrameSampling.max_frames must be >= 1 or None, got {self.max_frames}")
        if self.rate_hz is not None and self.rate_hz <= 0:
            raise ValueError(f"FrameSampling.rate_hz must be > 0, got {self.rate_hz}")

    def stride_for(self, fps: float | None) -> int:
        """The effective stride: from `rate_hz` when the frame rate is known, else `stride`."""
        if self.rate_hz is not None and fps and fps > 0:
            return max(1, round(fps / self.rate_hz))
        return self.stride


def evenly_spaced(items: list, cap: int | None) -> list:
    """`cap` items of `items`, evenly spaced with first and last kept; all of them if they fit."""
    if cap is None or len(items) <= cap:
        return list(items)
    if cap == 1:
        return [items[0]]
    picks = np.linspace(0, len(items) - 1, cap).round().astype(int)
    return [items[i] for i in picks]


def is_empty(frame: np.ndarray, empty_fraction: float = 0.0) -> bool:
    """True when at most `empty_fraction` of the pixels are non-zero (a blank slice or frame)."""
    return np.count_nonzero(frame) <= empty_fraction * frame.size


def select_indices(n_frames: int, sampling: FrameSampling, fps: float | None = None,
                   non_empty: np.ndarray | None = None) -> list[int]:
    """Frame indices kept out of `n_frames` by `sampling` (see the module docstring for the rule).

    `non_empty`, when given, is a boolean array (one per frame) used by the empty-frame step.
    """
    candidates = list(range(0, n_frames, sampling.stride_for(fps)))
    if sampling.skip_empty and non_empty is not None:
        candidates = [i for i in candidates if non_empty[i]]
    return evenly_spaced(candidates, sampling.max_frames)


def to_uint8(array: np.ndarray) -> np.ndarray:
    """Casts a pixel array to uint8 without clipping information away.

    uint8 passes through; booleans become 0/255; integers already inside [0, 255] are cast; floats inside
    [0, 1] are scaled by 255 and floats inside [0, 255] rounded; anything else (16-bit, signed, HU-like or
    arbitrary float ranges) is min-max scaled over the whole array, so all frames of one volume share a
    scale.
    """
    array = np.asarray(array)
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if array.size == 0:
        return array.astype(np.uint8)
    lo, hi = float(np.min(array)), float(np.max(array))
    if np.issubdtype(array.dtype, np.integer) and lo >= 0 and hi <= 255:
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(lo) or not np.isfinite(hi):
            array = np.nan_to_num(array, nan=0.0, posinf=0.0, neginf=0.0)
            lo, hi = float(np.min(array)), float(np.max(array))
        if lo >= 0 and hi <= 1:
            return np.round(array * 255).astype(np.uint8)
        if lo >= 0 and hi <= 255:
            return np.round(array).astype(np.uint8)
    if hi == lo:
        return np.zeros(array.shape, np.uint8)
    scaled = (array.astype(np.float64) - lo) * (255.0 / (hi - lo))
    return np.round(scaled).astype(np.uint8)


def frames_of_volume(volume: np.ndarray, sampling: FrameSampling) -> list[tuple[int, np.ndarray]]:
    """(index, uint8 2-D frame) pairs sampled from a 3-D array along `sampling.axis`.

    The volume is cast to uint8 once (shared scale), moved so the slice axis comes first, sampled, and each
    kept frame is transposed when `flip_diagonal` is set.
    """
    if volume.ndim != 3:
        raise ValueError(f"expected a 3-D array (frames or slices), got shape {volume.shape}")
    if not 0 <= sampling.axis < 3:
        raise ValueError(f"slice axis must be 0, 1 or 2, got {sampling.axis}")
    stack = np.moveaxis(to_uint8(volume), sampling.axis, 0)
    non_empty = np.array([not is_empty(f, sampling.empty_fraction) for f in stack])
    kept = select_indices(stack.shape[0], sampling, non_empty=non_empty)
    return [(i, np.ascontiguousarray(stack[i].T if sampling.flip_diagonal else stack[i])) for i in kept]
