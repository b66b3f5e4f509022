"""Readers for medical-image containers: MetaImage (.mha / .mhd) and NIfTI (.nii / .nii.gz).

Both return arrays in SimpleITK's order, slowest axis first: (H, W) for a 2-D image, (T or D, H, W) for a
cine or volume. nibabel returns the opposite (x, y, z) order, so its arrays are reversed; after that the
frames of a 2-D+t cine are `array[t]` whichever library read the file (docs/openus46.md, F5: "SimpleITK array is
(T, H, W); nibabel gives (W, H, T)").

Used by FH-PS-AOP and PSFHS (single 2-D .mha), ACOUSLIC (.mha 2-D+t stacks), CAMUS, CardiacUDC and EchoCP
(NIfTI cines), MicroSeg, regPro and Segthy (NIfTI volumes).
"""

from __future__ import annotations

import os

import numpy as np

from data_prep.formats.sampling import FrameSampling, frames_of_volume, to_uint8

METAIMAGE_EXTENSIONS = (".mha", ".mhd")
NIFTI_EXTENSIONS = (".nii", ".nii.gz")


def _check_file(path: str) -> None:
    if not os.path.isfile(path):
        raise ValueError(f"{path}: file not found")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: empty file (0 bytes)")


def read_metaimage(path: str) -> np.ndarray:
    """The pixel array of a MetaImage file, in SimpleITK order; vector pixels keep a trailing channel axis."""
    import SimpleITK as sitk

    _check_file(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        first_line = str(err).strip().splitlines()[-1] if str(err).strip() else "unreadable"
        raise ValueError(f"{path}: not a readable MetaImage ({first_line})") from err
    return sitk.GetArrayFromImage(image)


def metaimage_as_2d(array: np.ndarray, path: str = "") -> np.ndarray:
    """A single 2-D uint8 image from a MetaImage array.

    FH-PS-AOP and PSFHS store one frame as a (3, H, W) "volume" of three identical channels; docs/openus46.md
    (F4) takes channel 0. Channels that differ are kept as colour (H, W, 3). A (1, H, W) stack is squeezed.
    """
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[1] > 4 and array.shape[2] > 4:
        channels = array[:3]
        if np.array_equal(channels[0], channels[1]) and np.array_equal(channels[0], channels[2]):
            return to_uint8(channels[0])
        return to_uint8(np.moveaxis(channels, 0, -1))
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        return to_uint8(array[..., :3])
    if array.ndim != 2:
        raise ValueError(f"{path}: expected a single 2-D image, got an array of shape {array.shape}; "
                         "configure this dataset as a stack (cine) instead")
    return to_uint8(array)


def read_nifti(path: str) -> np.ndarray:
    """The voxel array of a NIfTI file, reversed to SimpleITK order (slowest axis first)."""
    import nibabel as nib

    _check_file(path)
    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
    except Exception as err:  # nibabel raises many types for truncated / corrupt files
        raise ValueError(f"{path}: not a readable NIfTI file ({type(err).__name__}: {err})") from err
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim not in (2, 3):
        raise ValueError(f"{path}: expected a 2-D image, 2-D+t cine or 3-D volume, got shape {data.shape}")
    return np.ascontiguousarray(np.transpose(data))


def read_volume(path: str) -> np.ndarray:
    """A MetaImage or NIfTI array in SimpleITK order, dispatching on the extension."""
    lower = str(path).lower()
    if lower.endswith(METAIMAGE_EXTENSIONS):
        return read_metaimage(path)
    if lower.endswith(NIFTI_EXTENSIONS):
        return read_nifti(path)
    raise ValueError(f"{path}: not a MetaImage or NIfTI file")


def volume_frames(path: str, sampling: FrameSampling) -> list[tuple[int, np.ndarray]]:
    """(index, uint8 frame) pairs from a cine or volume file, sampled along `sampling.axis`.

    A 2-D file yields its one frame as index 0.
    """
    array = read_volume(path)
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        frame = to_uint8(array)
        return [(0, np.ascontiguousarray(frame.T if sampling.flip_diagonal else frame))]
    if array.ndim != 3:
        raise ValueError(f"{path}: expected a cine or volume, got an array of shape {array.shape}")
    return frames_of_volume(array, sampling)
