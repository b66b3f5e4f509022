"""Fault injection for the robustness tests: a full disk, a decompression-bomb header, odd symlinks.

* `fill_disk_on_shard_write(monkeypatch)`: every ArrayRecord write fails the way array_record reports a full
  disk (a RuntimeError carrying the OS message, as seen when writing to /dev/full).
* `fill_disk_on_text_write(monkeypatch)`: `Path.write_text` fails with ENOSPC and no file name, as a failed
  `write()` does (the manifest is written this way).
* `huge_png_header(path, width, height)`: a PNG whose header announces `width x height` pixels but whose
  pixel data is garbage; a reader that decodes it fails with a decoding error, one that checks the header
  first refuses it for its size, so the reason tells the two apart.
* `one_error_line(stderr)`: the single non-empty stderr line of a one-line error, asserting there is one.
"""

from __future__ import annotations

import errno
import os
import pathlib
import struct
import zlib

from array_record.python import array_record_module

from data_prep import writer

ARRAY_RECORD_FULL_DISK = "write() failed: No space left on device; writing {path}; at byte 0"


class _FullDiskWriter:
    """Stands in for ArrayRecordWriter: opening works, the first write fails like a full disk."""

    def __init__(self, path, options):
        del options
        self.path = path
        pathlib.Path(path).write_bytes(b"partial")  # the real writer creates the file before failing

    def write(self, record):
        raise RuntimeError(ARRAY_RECORD_FULL_DISK.format(path=self.path))

    def close(self):
        pass


def fill_disk_on_shard_write(monkeypatch) -> None:
    assert writer.ArrayRecordWriter is array_record_module.ArrayRecordWriter
    monkeypatch.setattr(writer, "ArrayRecordWriter", _FullDiskWriter)


def fill_disk_on_text_write(monkeypatch) -> None:
    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pathlib.Path, "write_text", full)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def huge_png_header(path, width: int, height: int) -> None:
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    data = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", b"not zlib data") + _chunk(b"IEND", b"")
    pathlib.Path(path).write_bytes(data)


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got {len(lines)}:\n{stderr}"
    return lines[0]
