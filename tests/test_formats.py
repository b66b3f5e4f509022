"""Readers of data_prep/formats (all but image2d) on files written here with SimpleITK, nibabel, PyAV, h5py
and pydicom, plus corrupt and truncated inputs, sampling rules and archive handling."""

from __future__ import annotations

import os
import re
import zipfile

import numpy as np
import pytest
from openus46_mocks import write_video

from data_prep.formats.archives import archive_instructions, unpack_nested_zips, unsupported_archives
from data_prep.formats.dicom import dicom_frames, read_dicom
from data_prep.formats.hdf5 import hdf5_frames
from data_prep.formats.sampling import FrameSampling, evenly_spaced, select_indices, to_uint8
from data_prep.formats.video import video_frames, video_info
from data_prep.formats.volumes import metaimage_as_2d, read_metaimage, read_nifti, volume_frames


def _ramp_volume(depth=6, height=8, width=10):
    return (np.arange(depth * height * width) % 200 + 20).astype(np.uint8).reshape(depth, height, width)


# ---- sampling -----------------------------------------------------------------------------------------

def test_select_indices_stride_cap_and_empty():
    assert select_indices(10, FrameSampling(stride=3)) == [0, 3, 6, 9]
    assert select_indices(10, FrameSampling(max_frames=4)) == [0, 3, 6, 9]
    assert select_indices(10, FrameSampling(rate_hz=3), fps=30.0) == [0]
    assert select_indices(31, FrameSampling(rate_hz=3), fps=30.0) == [0, 10, 20, 30]
    non_empty = np.array([False, True, True, False, True])
    assert select_indices(5, FrameSampling(), non_empty=non_empty) == [1, 2, 4]
    assert select_indices(5, FrameSampling(skip_empty=False), non_empty=non_empty) == [0, 1, 2, 3, 4]
    assert evenly_spaced(list(range(7)), 1) == [0]


def test_sampling_rejects_bad_values():
    with pytest.raises(ValueError, match="stride"):
        FrameSampling(stride=0)
    with pytest.raises(ValueError, match="max_frames"):
        FrameSampling(max_frames=0)


def test_to_uint8_ranges():
    assert to_uint8(np.array([0.0, 0.5, 1.0])).tolist() == [0, 128, 255]
    assert to_uint8(np.array([0, 1000, 2000], np.uint16)).tolist() == [0, 128, 255]
    assert to_uint8(np.array([3, 200], np.int32)).tolist() == [3, 200]
    assert to_uint8(np.array([-100.0, 100.0])).tolist() == [0, 255]
    assert to_uint8(np.array([True, False])).tolist() == [255, 0]


# ---- MetaImage / NIfTI --------------------------------------------------------------------------------

def test_metaimage_single_image_and_identical_channels(tmp_path):
    import SimpleITK as sitk

    image = _ramp_volume(1, 8, 10)[0]
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([image] * 3)), str(tmp_path / "fhps.mha"))
    array = read_metaimage(str(tmp_path / "fhps.mha"))
    assert array.shape == (3, 8, 10)
    np.testing.assert_array_equal(metaimage_as_2d(array), image)
    colour = np.stack([image, image // 2, image // 3])
    assert metaimage_as_2d(colour).shape == (8, 10, 3)
    with pytest.raises(ValueError, match="single 2-D image"):
        metaimage_as_2d(_ramp_volume(12), "x.mha")


def test_mhd_with_raw_sidecar(tmp_path):
    import SimpleITK as sitk

    volume = _ramp_volume()
    sitk.WriteImage(sitk.GetImageFromArray(volume), str(tmp_path / "cine.mhd"))
    assert os.path.exists(tmp_path / "cine.raw") or os.path.exists(tmp_path / "cine.zraw")
    frames = volume_frames(str(tmp_path / "cine.mhd"), FrameSampling(stride=2))
    assert [i for i, _ in frames] == [0, 2, 4]
    np.testing.assert_array_equal(frames[1][1], volume[2])


def test_nifti_axis_order_matches_simpleitk(tmp_path):
    import nibabel as nib
    import SimpleITK as sitk

    volume = _ramp_volume(5, 8, 10)  # SimpleITK order (T, H, W)
    sitk.WriteImage(sitk.GetImageFromArray(volume), str(tmp_path / "a.nii.gz"))
    np.testing.assert_array_equal(read_nifti(str(tmp_path / "a.nii.gz")), volume)
    nib.save(nib.Nifti1Image(np.transpose(volume), np.eye(4)), str(tmp_path / "b.nii"))
    np.testing.assert_array_equal(read_nifti(str(tmp_path / "b.nii")), volume)


def test_volume_slicing_axis_stride_empty_and_flip(tmp_path):
    import nibabel as nib

    volume = _ramp_volume(4, 8, 10)
    volume[:, :, 0] = 0  # slice 0 along axis 2 is empty
    nib.save(nib.Nifti1Image(np.transpose(volume), np.eye(4)), str(tmp_path / "v.nii.gz"))
    frames = volume_frames(str(tmp_path / "v.nii.gz"), FrameSampling(axis=2, stride=3, flip_diagonal=True))
    assert [i for i, _ in frames] == [3, 6, 9]  # 0 is empty
    np.testing.assert_array_equal(frames[0][1], volume[:, :, 3].T)
    assert frames[0][1].shape == (8, 4)


def test_volume_float_values_share_one_scale(tmp_path):
    import nibabel as nib

    volume = np.zeros((2, 4, 4), np.float32)
    volume[0] = 1000.0
    volume[1] = 500.0
    volume[:, 0, 0] = 0.0
    nib.save(nib.Nifti1Image(np.transpose(volume), np.eye(4)), str(tmp_path / "f.nii"))
    frames = volume_frames(str(tmp_path / "f.nii"), FrameSampling(skip_empty=False))
    assert frames[0][1].max() == 255 and frames[1][1].max() == 128


@pytest.mark.parametrize("name", ["bad.nii.gz", "bad.mha", "bad.nii"])
def test_corrupt_and_empty_volumes_raise_naming_the_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="empty file"):
        volume_frames(str(path), FrameSampling())
    path.write_bytes(b"this is not a medical image at all" * 20)
    with pytest.raises(ValueError, match=name):
        volume_frames(str(path), FrameSampling())


def test_truncated_nifti_raises(tmp_path):
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.transpose(_ramp_volume(6, 16, 16)), np.eye(4)), str(tmp_path / "t.nii"))
    data = (tmp_path / "t.nii").read_bytes()
    (tmp_path / "t.nii").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=re.escape("t.nii")):
        volume_frames(str(tmp_path / "t.nii"), FrameSampling())


# ---- video --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ext", [".avi", ".mp4", ".gif", ".webm"])
def test_video_rate_and_cap(tmp_path, ext):
    rng = np.random.default_rng(1)
    path = str(tmp_path / f"clip{ext}")
    write_video(path, [rng.integers(30, 220, (32, 32, 3), dtype=np.uint8) for _ in range(12)], fps=10)
    assert video_info(path) == (12, 10.0)
    frames = video_frames(path, FrameSampling(rate_hz=5))  # stride 2
    assert [i for i, _ in frames] == [0, 2, 4, 6, 8, 10]
    assert frames[0][1].shape == (32, 32, 3) and frames[0][1].dtype == np.uint8
    capped = video_frames(path, FrameSampling(rate_hz=5, max_frames=3))
    assert [i for i, _ in capped] == [0, 4, 10]  # 3 of the 6 candidates, evenly spaced


def test_video_decodes_the_right_frames(tmp_path):
    path = str(tmp_path / "levels.avi")
    write_video(path, [np.full((16, 16, 3), 20 * (i + 1), np.uint8) for i in range(6)], fps=6)
    frames = video_frames(path, FrameSampling(stride=2))
    means = [float(frame.mean()) for _, frame in frames]
    assert [i for i, _ in frames] == [0, 2, 4]
    assert means == pytest.approx([20, 60, 100], abs=4)


def test_video_skips_black_frames(tmp_path):
    path = str(tmp_path / "black.avi")
    frames = [np.zeros((16, 16, 3), np.uint8)] * 2 + [np.full((16, 16, 3), 90, np.uint8)] * 2
    write_video(path, frames, fps=4)
    assert [i for i, _ in video_frames(path, FrameSampling())] == [2, 3]


def test_truncated_and_corrupt_videos_raise(tmp_path):
    rng = np.random.default_rng(2)
    path = tmp_path / "clip.avi"
    write_video(str(path), [rng.integers(30, 220, (32, 32, 3), dtype=np.uint8) for _ in range(10)], fps=10)
    data = path.read_bytes()
    (tmp_path / "half.avi").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=re.escape("half.avi: video is truncated")):
        video_frames(str(tmp_path / "half.avi"), FrameSampling())
    (tmp_path / "junk.mp4").write_bytes(b"\x00junk" * 100)
    with pytest.raises(ValueError, match=re.escape("junk.mp4: not a readable video")):
        video_frames(str(tmp_path / "junk.mp4"), FrameSampling())
    (tmp_path / "zero.mp4").write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape("zero.mp4: empty file")):
        video_frames(str(tmp_path / "zero.mp4"), FrameSampling())


# ---- HDF5 ---------------------------------------------------------------------------------------------

def test_hdf5_grouped_sampling_reads_only_images(tmp_path):
    import h5py

    images = _ramp_volume(7, 8, 8)
    with h5py.File(tmp_path / "d.hdf5", "w") as handle:
        handle["image"] = images
        handle["mask"] = np.full((7, 8, 8), 255, np.uint8)
        handle["annot_id"] = np.array([b"n1", b"n2", b"n1", b"n1", b"n2", b"n1", b"n1"])
    out = hdf5_frames(str(tmp_path / "d.hdf5"), "image", FrameSampling(max_frames=2), "annot_id")
    # n1 at positions 0, 2, 3, 5, 6 -> cap 2 -> 0 and 6; n2 at 1, 4 -> both.
    assert [(g, i) for g, i, _ in out] == [("n1", 0), ("n1", 6), ("n2", 1), ("n2", 4)]
    for _, index, frame in out:
        np.testing.assert_array_equal(frame, images[index])
    with pytest.raises(ValueError, match="no dataset named 'images'"):
        hdf5_frames(str(tmp_path / "d.hdf5"), "images", FrameSampling())
    (tmp_path / "bad.h5").write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match=re.escape("bad.h5: not a readable HDF5")):
        hdf5_frames(str(tmp_path / "bad.h5"), "image", FrameSampling())


# ---- DICOM --------------------------------------------------------------------------------------------

def _write_dicom(path, pixels, photometric="MONOCHROME2"):
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.6.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    multiframe = pixels.ndim == (4 if pixels.shape[-1] == 3 else 3)
    if multiframe:
        ds.NumberOfFrames = pixels.shape[0]
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if pixels.shape[-1] == 3 else pixels.shape[-2:]
    ds.SamplesPerPixel = 3 if pixels.shape[-1] == 3 else 1
    if ds.SamplesPerPixel == 3:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def test_dicom_single_multiframe_colour_and_monochrome1(tmp_path):
    image = _ramp_volume(1, 8, 10)[0]
    _write_dicom(tmp_path / "one.dcm", image)
    assert dicom_frames(str(tmp_path / "one.dcm"), FrameSampling()) == [(-1, pytest.approx(image))]
    np.testing.assert_array_equal(dicom_frames(str(tmp_path / "one.dcm"), FrameSampling())[0][1], image)
    cine = _ramp_volume(5, 8, 10)
    _write_dicom(tmp_path / "cine.dcm", cine)
    frames = dicom_frames(str(tmp_path / "cine.dcm"), FrameSampling(stride=2))
    assert [i for i, _ in frames] == [0, 2, 4]
    np.testing.assert_array_equal(frames[2][1], cine[4])
    colour = np.stack([image, image // 2, image // 3], axis=-1)
    _write_dicom(tmp_path / "rgb.dcm", colour, "RGB")
    np.testing.assert_array_equal(read_dicom(str(tmp_path / "rgb.dcm"))[0], colour)
    _write_dicom(tmp_path / "inv.dcm", image, "MONOCHROME1")
    np.testing.assert_array_equal(read_dicom(str(tmp_path / "inv.dcm"))[0], 255 - image)


def test_corrupt_dicom_raises(tmp_path):
    (tmp_path / "bad.dcm").write_bytes(b"\x00" * 50)
    with pytest.raises(ValueError, match=re.escape("bad.dcm")):
        read_dicom(str(tmp_path / "bad.dcm"))


# ---- archives -----------------------------------------------------------------------------------------

def test_nested_zips_unpack_once_and_never_outside(tmp_path):
    inner = tmp_path / "inner.zip"
    with zipfile.ZipFile(inner, "w") as archive:
        archive.writestr("images/a.png", b"png")
    with zipfile.ZipFile(tmp_path / "outer.zip", "w") as archive:
        archive.write(inner, "inner.zip")
        archive.writestr("MRI_data.zip", b"never opened")
    inner.unlink()
    extracted = unpack_nested_zips(str(tmp_path), skip=("mri_*.zip",))
    assert [os.path.basename(p) for p in extracted] == ["outer.zip", "inner.zip"]
    assert (tmp_path / "outer" / "inner" / "images" / "a.png").read_bytes() == b"png"
    assert not (tmp_path / "outer" / "MRI_data").exists()
    assert unpack_nested_zips(str(tmp_path), skip=("mri_*.zip",)) == []  # idempotent
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as archive:
        archive.writestr("../escape.txt", b"x")
    with pytest.raises(ValueError, match="outside"):
        unpack_nested_zips(str(tmp_path), skip=("mri_*.zip",))
    assert not (tmp_path.parent / "escape.txt").exists()
    assert not (tmp_path / "evil").exists()


def test_corrupt_zip_raises_naming_it(tmp_path):
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match=re.escape("broken.zip: not a readable zip")):
        unpack_nested_zips(str(tmp_path))


def test_rar_and_split_archive_instructions(tmp_path):
    assert "unrar x" in archive_instructions("Dataset/AC/AC_image1.rar")
    assert "multi-part" in archive_instructions("cardiacUDC_dataset.z01")
    assert "multi-part" in archive_instructions("picture/trainval-image.part2.rar")
    assert archive_instructions("x.zip") is None
    (tmp_path / "a.rar").write_bytes(b"Rar!")
    (tmp_path / "b.png").write_bytes(b"")
    notes = unsupported_archives(str(tmp_path))
    assert len(notes) == 1 and "a.rar" in notes[0]
