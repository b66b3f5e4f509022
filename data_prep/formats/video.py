"""Video reader (PyAV): AVI, MP4, MOV, MPEG, GIF and WebM, sampled at a stride or a rate with a cap.

EchoNet-Dynamic / -Pediatric (AVI), BLUES and brachial plexus (MP4), POCUS (mixed, GIF included), LUSS
(WebM) and Cactus (MP4) ship videos. Frames are decoded in order and only the sampled indices are kept
(`FrameSampling`; ultrabench samples POCUS at 3 Hz with at most 30 frames, which is `rate_hz=3,
max_frames=30`). Colour frames stay RGB; the cleaning step collapses them to grayscale when the channels
are equal.
"""

from __future__ import annotations

import os

import numpy as np

from data_prep.formats.sampling import FrameSampling, select_indices

# A file decoding fewer than this share of the frames its header announces is reported as truncated; headers
# of intact files can be off by a frame or two (edit lists, B-frame delay), hence not an exact comparison.
TRUNCATION_RATIO = 0.9
VIDEO_EXTENSIONS = (".avi", ".mp4", ".mov", ".mpeg", ".mpg", ".m4v", ".gif", ".webm", ".mkv", ".ogv", ".wmv")


def _open(path: str):
    import av

    if not os.path.isfile(path):
        raise ValueError(f"{path}: file not found")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: empty file (0 bytes)")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as err:
        raise ValueError(f"{path}: not a readable video ({err})") from err
    if not container.streams.video:
        container.close()
        raise ValueError(f"{path}: contains no video stream")
    return container


def _frame_rate(stream) -> float | None:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else None


def _scan(path: str, stride: int, empty_fraction: float) -> tuple[int, dict[int, bool]]:
    """One decoding pass: (number of frames, {candidate index: has content}) for every `stride`-th frame.

    Container headers (GIF, some AVI/WebM) often do not state the frame count, so it is counted here.
    """
    import av

    container = _open(path)
    non_empty: dict[int, bool] = {}
    n_frames = 0
    try:
        for index, frame in enumerate(container.decode(video=0)):
            n_frames = index + 1
            if index % stride == 0:
                luma = frame.to_ndarray(format="gray")
                non_empty[index] = np.count_nonzero(luma) > empty_fraction * luma.size
    except av.FFmpegError as err:
        raise ValueError(f"{path}: video is truncated or corrupt ({err})") from err
    finally:
        container.close()
    return n_frames, non_empty


def video_info(path: str) -> tuple[int, float | None]:
    """(number of decodable frames, frames per second or None)."""
    container = _open(path)
    try:
        fps = _frame_rate(container.streams.video[0])
    finally:
        container.close()
    return _scan(path, 1 << 30, 0.0)[0], fps


def video_frames(path: str, sampling: FrameSampling) -> list[tuple[int, np.ndarray]]:
    """(frame index, uint8 frame) pairs sampled from a video; frames are (H, W, 3) RGB or (H, W) gray.

    Two decoding passes keep memory bounded for long videos: the first counts the frames and flags empty
    candidates, the second converts only the kept frames. Raises ValueError naming the file when it cannot
    be opened, holds no decodable frame, breaks part-way, or decodes far fewer frames than its header
    announces (a truncated file never passes silently).
    """
    import av

    container = _open(path)
    try:
        fps = _frame_rate(container.streams.video[0])
        announced = container.streams.video[0].frames
    finally:
        container.close()
    stride = sampling.stride_for(fps)
    n_frames, flags = _scan(path, stride, sampling.empty_fraction)
    if n_frames == 0:
        raise ValueError(f"{path}: video holds no decodable frame")
    if announced and n_frames < TRUNCATION_RATIO * announced:
        raise ValueError(f"{path}: video is truncated: the header announces {announced} frames but only "
                         f"{n_frames} decode")
    non_empty = np.array([flags.get(i, True) for i in range(n_frames)])
    wanted = select_indices(n_frames, sampling, fps=fps, non_empty=non_empty)
    if not wanted:
        return []
    keep = set(wanted)
    out: list[tuple[int, np.ndarray]] = []
    container = _open(path)
    try:
        for index, frame in enumerate(container.decode(video=0)):
            if index in keep:
                fmt = "gray" if frame.format.name in ("gray", "gray8") else "rgb24"
                image = frame.to_ndarray(format=fmt)
                if sampling.flip_diagonal:
                    image = np.ascontiguousarray(np.swapaxes(image, 0, 1))
                out.append((index, image))
            if index >= wanted[-1]:
                break
    except av.FFmpegError as err:
        raise ValueError(f"{path}: video is truncated or corrupt ({err})") from err
    finally:
        container.close()
    return out
