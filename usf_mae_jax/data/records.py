"""The on-disk record: one 2-D ultrasound frame, encoded and decoded by exactly one function pair.

Every ArrayRecord shard written by `data_prep` holds records in this format, and every reader (pretraining,
fine-tuning, the benchmark builders) goes through `decode`. Pickle is deliberately not used: a record is data,
never code, so a shard from an untrusted source cannot execute anything when it is read.

Layout of format version 2 (all integers little-endian)::

    offset  size  content
    0       4     magic b"USFR"
    4       1     format version (2)
    5       4     header length N (uint32)
    9       N     UTF-8 JSON header, an object with exactly these keys:
                    height   int   image rows
                    width    int   image columns
                    channels int   1 (grayscale) or 3 (colour Doppler, CEUS, colour photographs)
                    dataset  str   dataset name (the shard folder's name)
                    source   str   path of the raw file relative to the raw dataset root
                    subject  str   patient or case id, "" if unknown
                    frame    int   frame or slice index inside `source`, -1 for a still image
                    label    int   class index, -1 if unlabelled
                    codec    str   how the payload stores the pixels: "png" or "raw"
    9+N     rest  the image: uint8, 8 bits per sample, grayscale or RGB (never palette or alpha), either
                  as PNG bytes ("png") or as the H * W * C bytes of the (H, W, C) array in C order ("raw")

Version 1 is version 2 without `codec` (always PNG); `decode` reads both. The codec exists for the stored
image variants (docs/data_pipeline.md): the full frame is PNG (compact, decoded only by the `mae` preset),
the 224-px nearest-resized copy that the `usf_mae` preset trains on is raw, because decoding it must cost
nothing next to the augmentation (a PNG decode of even that small image costs more than the whole
augmentation). A corrupt raw payload is still detected: ArrayRecord's chunk hash covers every record.

Grayscale stays one channel on disk and after `decode` (shape (H, W, 1)); replicating it to three channels is
the device's job when the model has `in_chans=3` (docs/design.md, "Batches"). Colour images decode as RGB
(H, W, 3). `decode_header` reads the metadata without touching the pixels, which is what the corrupt-record
log and the dataset statistics need; `image_bytes` returns the PNG payload alone.

A change to the layout bumps `FORMAT_VERSION`; `decode` keeps reading every older version it knows and rejects
newer ones with a clear error instead of guessing.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import cv2
import numpy as np

MAGIC = b"USFR"
FORMAT_VERSION = 2
_PREFIX = struct.Struct("<4sBI")  # magic, version, header length
HEADER_FIELDS = ("height", "width", "channels", "dataset", "source", "subject", "frame", "label")
CODECS = ("png", "raw")
# Fast PNG settings: level 1 deflate costs ~10 % in size against level 9 and is several times faster to write;
# zlib's run-length strategy then encodes speckle frames 1.5x faster and 3-18 % smaller than the default
# strategy (docs/data_pipeline.md, section 3).
_PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]


class CorruptRecordError(ValueError):
    """A record that cannot be decoded; `header` holds the metadata that could still be read (maybe none)."""

    def __init__(self, message: str, header: dict[str, Any] | None = None):
        super().__init__(message)
        self.header = header or {}


def as_hwc(image: np.ndarray) -> np.ndarray:
    """Validates a uint8 image and returns it as (H, W, 1) or (H, W, 3), collapsing equal RGB channels to one.

    Grayscale frames saved as RGB are common in ultrasound exports; storing them once keeps shards a third of
    the size and lets the model see them as the grayscale images they are.
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ValueError(f"image must be a uint8 numpy array, got {getattr(image, 'dtype', type(image))}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"image must be (H, W), (H, W, 1) or (H, W, 3), got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image is empty, shape {image.shape}")
    if image.shape[2] == 3 and np.array_equal(image[:, :, 0], image[:, :, 1]) and np.array_equal(
            image[:, :, 0], image[:, :, 2]):
        image = image[:, :, :1]
    return image


def encode(image: np.ndarray, *, dataset: str, source: str, subject: str = "", frame: int = -1,
           label: int = -1, codec: str = "png") -> bytes:
    """One frame and its metadata -> record bytes (format `FORMAT_VERSION`). See the module docstring."""
    if codec not in CODECS:
        raise ValueError(f"unknown record codec {codec!r}; choose one of {CODECS}")
    image = as_hwc(image)
    height, width, channels = image.shape
    if codec == "raw":
        payload = np.ascontiguousarray(image).tobytes()
    else:
        pixels = image[:, :, 0] if channels == 1 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)  # OpenCV: BGR
        ok, png = cv2.imencode(".png", np.ascontiguousarray(pixels), _PNG_PARAMS)
        if not ok:
            raise ValueError(f"PNG encoding failed for {dataset}/{source}")
        payload = png.tobytes()
    header = {"height": int(height), "width": int(width), "channels": int(channels), "dataset": str(dataset),
              "source": str(source), "subject": str(subject), "frame": int(frame), "label": int(label),
              "codec": codec}
    header_bytes = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header_bytes)) + header_bytes + payload


def _split(record: bytes) -> tuple[dict[str, Any], memoryview]:
    """record -> (header, PNG bytes), validating the prefix and the header."""
    view = memoryview(record)
    if len(view) < _PREFIX.size:
        raise CorruptRecordError(f"{len(view)}-byte record is shorter than its {_PREFIX.size}-byte prefix")
    magic, version, header_len = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise CorruptRecordError(f"bad magic {bytes(magic)!r}: not a usf-mae-jax record")
    if version > FORMAT_VERSION:
        raise CorruptRecordError(f"record format {version} is newer than this reader's {FORMAT_VERSION}")
    end = _PREFIX.size + header_len
    if end > len(view):
        raise CorruptRecordError(f"{header_len}-byte header runs past the end of the {len(view)}-byte record")
    try:
        header = json.loads(bytes(view[_PREFIX.size:end]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptRecordError(f"unreadable header: {e}") from e
    if not isinstance(header, dict):
        raise CorruptRecordError(f"header is a JSON {type(header).__name__}, not an object")
    missing = [k for k in HEADER_FIELDS if k not in header]
    if missing:
        raise CorruptRecordError(f"header lacks fields {missing}", header)
    header.setdefault("codec", "png")  # format 1
    if header["codec"] not in CODECS:
        raise CorruptRecordError(f"unknown codec {header['codec']!r}", header)
    return header, view[end:]


def decode_header(record: bytes) -> dict[str, Any]:
    """The metadata of a record (every field but the image), without decoding the pixels."""
    return _split(record)[0]


def find_header(data: bytes) -> dict[str, Any] | None:
    """The header of the first record found in `data` (e.g. the raw bytes of a damaged shard chunk), or None.

    Lets the pipeline name the source of a record that ArrayRecord refuses to read: the header usually
    survives a damaged byte elsewhere in the record.
    """
    start = data.find(MAGIC)
    while start >= 0:
        try:
            return _split(data[start:])[0]
        except CorruptRecordError:
            start = data.find(MAGIC, start + 1)
    return None


def image_bytes(record: bytes) -> bytes:
    """The record's PNG payload, for readers that decode it themselves (e.g. the PIL baseline benchmark)."""
    header, payload = _split(record)
    if header["codec"] != "png":
        raise ValueError(f"{header['dataset']}/{header['source']}: the record stores {header['codec']} pixels, "
                         "not PNG")
    return bytes(payload)


def decode(record: bytes) -> dict[str, Any]:
    """record bytes -> {'image': uint8 (H, W, C), 'height', 'width', 'dataset', 'source', 'subject', 'frame',
    'label'}. Raises `CorruptRecordError` (a ValueError) naming the record's dataset/source when it can.

    A raw payload comes back as a read-only view of `record` (no copy); a PNG payload is decoded.
    """
    header, payload = _split(record)
    where = f"{header.get('dataset', '?')}/{header.get('source', '?')}"
    expected = (header["height"], header["width"], header["channels"])
    if header["codec"] == "raw":
        if len(payload) != expected[0] * expected[1] * expected[2]:
            raise CorruptRecordError(f"{where}: the raw payload has {len(payload)} bytes, header says "
                                     f"{expected}", header)
        pixels = np.frombuffer(payload, np.uint8).reshape(expected)
    else:
        flags = cv2.IMREAD_GRAYSCALE if header["channels"] == 1 else cv2.IMREAD_COLOR
        pixels = cv2.imdecode(np.frombuffer(payload, np.uint8), flags) if len(payload) else None
        if pixels is None:
            raise CorruptRecordError(f"{where}: the PNG payload ({len(payload)} bytes) does not decode", header)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        else:
            pixels = cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)
        if pixels.shape != expected:
            raise CorruptRecordError(f"{where}: image is {pixels.shape}, header says {expected}", header)
    return {**{k: header[k] for k in HEADER_FIELDS if k != "channels"}, "image": pixels}
