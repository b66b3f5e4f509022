"""DICOM reader (pydicom), single- and multi-frame.

No OpenUS-46 dataset ships DICOM (EchoNet and FASS were converted from it by their authors), but users'
own ultrasound exports do. Colour ultrasound DICOM is usually YBR_FULL(_422) and is converted to RGB;
MONOCHROME1 is inverted so that bright means echogenic. Compressed transfer syntaxes need an image handler
plugin (pylibjpeg or GDCM); the error says so instead of failing obscurely.
"""

from __future__ import annotations

import os

import numpy as np

from data_prep.formats.sampling import FrameSampling, evenly_spaced, to_uint8

DICOM_EXTENSIONS = (".dcm", ".dicom")


def read_dicom(path: str) -> tuple[np.ndarray, bool]:
    """(pixel array, is_multiframe). Multi-frame arrays are (N, H, W) or (N, H, W, 3)."""
    import pydicom

    if not os.path.isfile(path):
        raise ValueError(f"{path}: file not found")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: empty file (0 bytes)")
    try:
        dataset = pydicom.dcmread(path)
    except Exception as err:  # pydicom raises InvalidDicomError, EOFError, ...
        raise ValueError(f"{path}: not a readable DICOM file ({type(err).__name__}: {err})") from err
    if "PixelData" not in dataset:
        raise ValueError(f"{path}: DICOM file holds no pixel data")
    try:
        pixels = dataset.pixel_array
    except Exception as err:
        syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise ValueError(f"{path}: cannot decode DICOM pixel data (transfer syntax {syntax}; compressed "
                         f"DICOM needs pylibjpeg or GDCM installed): {err}") from err
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric.startswith("YBR") and pixels.shape[-1] == 3:
        from pydicom.pixels import convert_color_space

        pixels = convert_color_space(pixels, photometric, "RGB")
    pixels = to_uint8(pixels)
    if photometric == "MONOCHROME1":
        pixels = 255 - pixels
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    return pixels, frames > 1


def dicom_frames(path: str, sampling: FrameSampling) -> list[tuple[int, np.ndarray]]:
    """(frame index, uint8 frame) pairs; a single-frame file yields index -1 (a still image)."""
    pixels, multiframe = read_dicom(path)
    if not multiframe:
        return [(-1, pixels)]
    candidates = list(range(0, pixels.shape[0], sampling.stride))
    if sampling.skip_empty:
        candidates = [i for i in candidates
                      if np.count_nonzero(pixels[i]) > sampling.empty_fraction * pixels[i].size]
    return [(i, pixels[i]) for i in evenly_spaced(candidates, sampling.max_frames)]
