"""HDF5 reader: 2-D frames stored flat in one dataset, optionally grouped by an id dataset.

Thyroid US Cineclip ships `dataset.hdf5` with `image` (N, H, W uint8), `mask`, `annot_id` and `frame_num`
(docs/openus46.md, F7). Only the named image dataset is read, never `mask`. When a group dataset is named
(`annot_id`, one nodule's cine per id), the sampling rule is applied per group, so every clip is thinned
the same way instead of the flat stack as a whole.
"""

from __future__ import annotations

import os

import numpy as np

from data_prep.formats.sampling import FrameSampling, frames_of_volume

HDF5_EXTENSIONS = (".h5", ".hdf5", ".hdf")


def _decode_id(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.item()
    return str(value.decode() if isinstance(value, bytes) else value)


def hdf5_frames(path: str, dataset: str, sampling: FrameSampling,
                group_by: str | None = None) -> list[tuple[str, int, np.ndarray]]:
    """(group id, index in the file, uint8 frame) triples from `dataset` in an HDF5 file.

    `group_by` names a 1-D dataset of the same length whose values split the frames into sequences
    (sampled independently, group id "" when not grouping). Raises ValueError naming the file and the
    dataset when the file is unreadable, a dataset is missing, or the shapes do not fit.
    """
    import h5py

    if not os.path.isfile(path):
        raise ValueError(f"{path}: file not found")
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise ValueError(f"{path}: not a readable HDF5 file ({err})") from err
    with handle:
        if dataset not in handle:
            raise ValueError(f"{path}: no dataset named {dataset!r} (found: {sorted(handle.keys())})")
        images = handle[dataset]
        if images.ndim not in (3, 4):
            raise ValueError(f"{path}: dataset {dataset!r} has shape {images.shape}, expected (N, H, W[, C])")
        if group_by is None:
            groups = {"": np.arange(images.shape[0])}
        else:
            if group_by not in handle:
                raise ValueError(f"{path}: no dataset named {group_by!r} to group frames by")
            ids = np.asarray(handle[group_by][()]).reshape(-1)
            if ids.shape[0] != images.shape[0]:
                raise ValueError(f"{path}: {group_by!r} has {ids.shape[0]} entries but {dataset!r} has "
                                 f"{images.shape[0]} frames")
            groups = {}
            for position, value in enumerate(ids):
                groups.setdefault(_decode_id(value), []).append(position)
        out: list[tuple[str, int, np.ndarray]] = []
        try:
            for group_id, positions in groups.items():
                positions = np.sort(np.asarray(positions))
                stack = images[positions] if len(positions) > 1 else images[positions[0]][None]
                if stack.ndim == 4 and stack.shape[-1] == 1:
                    stack = stack[..., 0]
                if stack.ndim == 4:
                    raise ValueError(f"{path}: colour frames in HDF5 are not supported ({stack.shape})")
                for local, frame in frames_of_volume(stack, sampling):
                    out.append((group_id, int(positions[local]), frame))
        except OSError as err:
            raise ValueError(f"{path}: HDF5 data is truncated or corrupt ({err})") from err
    return out
