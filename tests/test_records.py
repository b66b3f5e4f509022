"""Record format: round trip for every image mode, header-only reads, and clear errors on corrupt bytes."""

import json
import struct

import numpy as np
import pytest

from usf_mae_jax.data import records


def _image(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


@pytest.mark.parametrize("shape, stored_channels", [((17, 23), 1), ((17, 23, 1), 1), ((9, 31, 3), 3)])
def test_round_trip_per_mode(shape, stored_channels):
    image = _image(shape)
    record = records.encode(image, dataset="ds", source="a/b.png", subject="p7", frame=4, label=2)
    out = records.decode(record)
    assert out["image"].dtype == np.uint8
    assert out["image"].shape == (shape[0], shape[1], stored_channels)
    np.testing.assert_array_equal(out["image"], image.reshape(out["image"].shape))
    assert {k: out[k] for k in ("height", "width", "dataset", "source", "subject", "frame", "label")} == {
        "height": shape[0], "width": shape[1], "dataset": "ds", "source": "a/b.png", "subject": "p7",
        "frame": 4, "label": 2}


def test_colour_channel_order_is_rgb():
    image = np.zeros((4, 5, 3), np.uint8)
    image[..., 0] = 200  # pure red
    out = records.decode(records.encode(image, dataset="d", source="s"))["image"]
    assert out[0, 0].tolist() == [200, 0, 0]


def test_grayscale_stored_as_rgb_collapses_to_one_channel():
    gray = _image((8, 8))
    out = records.decode(records.encode(np.repeat(gray[:, :, None], 3, axis=2), dataset="d", source="s"))
    assert out["image"].shape == (8, 8, 1)
    np.testing.assert_array_equal(out["image"][:, :, 0], gray)


def test_defaults_and_unicode_metadata():
    out = records.decode(records.encode(_image((3, 3)), dataset="d", source="dossier/échographie 1.png"))
    assert (out["subject"], out["frame"], out["label"]) == ("", -1, -1)
    assert out["source"] == "dossier/échographie 1.png"


def test_header_is_readable_without_the_pixels():
    record = records.encode(_image((6, 7, 3)), dataset="d", source="x.png", frame=3)
    header = records.decode_header(record)
    assert header == {"height": 6, "width": 7, "channels": 3, "dataset": "d", "source": "x.png", "subject": "",
                      "frame": 3, "label": -1, "codec": "png"}
    assert record[:4] == records.MAGIC and record[4] == records.FORMAT_VERSION == 2


@pytest.mark.parametrize("shape", [(17, 23, 1), (9, 31, 3)])
def test_raw_codec_round_trip_is_a_view_of_the_payload(shape):
    image = _image(shape, seed=3)
    record = records.encode(image, dataset="ds", source="a.png", label=1, codec="raw")
    header_len = struct.unpack_from("<I", record, 5)[0]
    assert len(record) == 9 + header_len + image.size  # the pixels, nothing else
    out = records.decode(record)
    np.testing.assert_array_equal(out["image"], image)
    assert out["label"] == 1 and not out["image"].flags.writeable  # no copy of the record's bytes
    with pytest.raises(records.CorruptRecordError, match=r"ds/a\.png: the raw payload has 10 bytes"):
        records.decode(record[:9 + header_len + 10])
    with pytest.raises(ValueError, match="not PNG"):
        records.image_bytes(record)
    with pytest.raises(ValueError, match="unknown record codec 'jpeg'"):
        records.encode(image, dataset="d", source="s", codec="jpeg")


def test_format_1_records_still_decode():
    """Version 1 had no codec field and always PNG: rebuild such a record byte by byte and read it."""
    image = _image((12, 10))
    record = records.encode(image, dataset="old", source="v1.png")
    header_len = struct.unpack_from("<I", record, 5)[0]
    header = json.loads(record[9:9 + header_len])
    del header["codec"]
    old_header = json.dumps(header).encode()
    v1 = b"USFR" + bytes([1]) + struct.pack("<I", len(old_header)) + old_header + record[9 + header_len:]
    out = records.decode(v1)
    np.testing.assert_array_equal(out["image"][:, :, 0], image)
    assert records.decode_header(v1)["codec"] == "png"


def test_find_header_in_damaged_bytes():
    record = records.encode(_image((8, 8)), dataset="busi", source="case9.png", frame=2, codec="raw")
    damaged = bytearray(b"\x01riegeli chunk prefix" + record)
    damaged[-5] ^= 0xFF  # a flipped pixel byte leaves the header intact
    assert records.find_header(bytes(damaged))["source"] == "case9.png"
    assert records.find_header(b"no record here") is None


@pytest.mark.parametrize("bad, message", [
    (np.zeros((4, 4), np.uint16), "uint8"),
    (np.zeros((4, 4, 2), np.uint8), "shape"),
    (np.zeros((0, 4), np.uint8), "empty"),
])
def test_encode_rejects_invalid_images(bad, message):
    with pytest.raises(ValueError, match=message):
        records.encode(bad, dataset="d", source="s")


def test_corrupt_records_raise_with_dataset_and_source():
    record = records.encode(_image((10, 10)), dataset="busi", source="case1.png")
    header_len = struct.unpack_from("<I", record, 5)[0]
    png_start = 9 + header_len
    damaged = record[:png_start] + b"\x00" * (len(record) - png_start)
    with pytest.raises(records.CorruptRecordError, match=r"busi/case1\.png") as info:
        records.decode(damaged)
    assert info.value.header["source"] == "case1.png"
    with pytest.raises(records.CorruptRecordError, match="magic"):
        records.decode(b"JUNK" + record[4:])
    with pytest.raises(records.CorruptRecordError, match="shorter"):
        records.decode(record[:5])
    with pytest.raises(records.CorruptRecordError, match="runs past"):
        records.decode(record[:20])
    newer = record[:4] + bytes([records.FORMAT_VERSION + 1]) + record[5:]
    with pytest.raises(records.CorruptRecordError, match="newer"):
        records.decode(newer)


def test_header_size_mismatch_is_detected():
    record = records.encode(_image((10, 12)), dataset="d", source="s")
    header_len = struct.unpack_from("<I", record, 5)[0]
    header = json.loads(record[9:9 + header_len])
    header["height"] = 11
    forged = json.dumps(header).encode()
    bad = record[:5] + struct.pack("<I", len(forged)) + forged + record[9 + header_len:]
    with pytest.raises(records.CorruptRecordError, match="header says"):
        records.decode(bad)
