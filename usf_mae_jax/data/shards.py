"""Random access to one dataset's ArrayRecord shards, with every unreadable record named.

grain's `ArrayRecordDataSource` surfaces a damaged record as ArrayRecord's own error ("Corrupted
Riegeli/records file: chunk data hash mismatch ...") that names no file and happens before any decoder
runs, so a single flipped byte stops a run, and every resume of it, without saying where. `RecordReader`
reads the same shards (the writer uses group_size:1, so one chunk is one record) one record at a time and
turns any read failure into `UnreadableRecordError`, which carries the shard file, the record's index in
that shard and, when they can still be found, the record's header fields (dataset, source, frame):

* from the damaged chunk itself: the error gives the chunk's byte range, and the record header usually
  survives a damaged byte elsewhere in the record (`records.find_header`);
* else from the same record of an aligned shard set, i.e. another stored variant of the same dataset
  (`aligned`; data_prep writes the frames and the nearest-resized copies record for record).

A damaged shard fails only its damaged records: the reader stays usable for the others.
"""

from __future__ import annotations

import bisect
import itertools
import re
import threading
from typing import Any

from array_record.python.array_record_module import ArrayRecordReader

from usf_mae_jax.data import records

_READER_OPTIONS = "readahead_buffer_size:0"  # random access: no read-ahead (as grain's ArrayRecordDataSource)
_CHUNK_RANGE = re.compile(r"chunk at (\d+) with length (\d+)")


class UnreadableRecordError(Exception):
    """A record ArrayRecord cannot read: `shard` file, `position` in it, `reason`, recovered `header`."""

    def __init__(self, shard: str, position: int, reason: str, header: dict[str, Any] | None = None):
        super().__init__(f"{shard} record {position}: {reason}")
        self.shard, self.position, self.reason, self.header = shard, position, reason, header or {}


def _unreadable_shard(path: str, error: Exception) -> ValueError:
    reason = (str(error) or type(error).__name__).splitlines()[0]
    return ValueError(f"{path}: not a readable ArrayRecord shard: {reason}")


def _open(path: str) -> ArrayRecordReader:
    try:
        return ArrayRecordReader(path, _READER_OPTIONS, file_reader_buffer_size=32768)
    except Exception as e:  # ArrayRecord raises a bare RuntimeError/ValueError without the path
        raise _unreadable_shard(path, e) from None


def _count(path: str) -> int:
    reader = _open(path)
    try:
        count = reader.num_records()
        reader.close()  # reports a damaged file too
    except Exception as e:
        raise _unreadable_shard(path, e) from None
    return count


class RecordReader:
    """Global index -> record bytes over `paths` (in order); thread-safe; picklable for worker processes."""

    def __init__(self, paths: tuple[str, ...] | list[str], aligned: tuple[str, ...] | list[str] = ()):
        self.paths, self.aligned = tuple(paths), tuple(aligned)
        self._ends = list(itertools.accumulate(_count(path) for path in self.paths))
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._readers: list[ArrayRecordReader | None] = [None] * len(self.paths)
        self._lock = threading.Lock()
        self._aligned_reader: RecordReader | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for key in ("_readers", "_lock", "_aligned_reader"):
            del state[key]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def locate(self, index: int) -> tuple[int, int]:
        """Global index -> (shard number, index of the record inside that shard)."""
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range for {len(self)} records")
        shard = bisect.bisect_right(self._ends, index)
        return shard, index - (self._ends[shard - 1] if shard else 0)

    def _reader(self, shard: int) -> ArrayRecordReader:
        reader = self._readers[shard]
        if reader is None:
            with self._lock:
                if self._readers[shard] is None:
                    self._readers[shard] = _open(self.paths[shard])
                reader = self._readers[shard]
        return reader

    def __getitem__(self, index: int) -> bytes:
        shard, position = self.locate(index)
        try:
            return self._reader(shard).read([position])[0]
        except Exception as e:  # ArrayRecord's errors are bare RuntimeErrors; the reader stays usable
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UnreadableRecordError(self.paths[shard], position, reason,
                                        self._recover_header(index, shard, reason)) from None

    def _recover_header(self, index: int, shard: int, reason: str) -> dict[str, Any]:
        """The damaged record's header from its raw chunk bytes, else from the aligned shards; {} if neither."""
        match = _CHUNK_RANGE.search(reason)
        if match:
            start, length = int(match[1]), int(match[2])
            try:
                with open(self.paths[shard], "rb") as f:
                    f.seek(start)
                    header = records.find_header(f.read(length))
                if header is not None:
                    return header
            except OSError:
                pass
        return self.aligned_header(index)

    def aligned_header(self, index: int) -> dict[str, Any]:
        """The header of record `index` of the aligned shards (the same example), or {} if there is none."""
        if not self.aligned:
            return {}
        try:
            if self._aligned_reader is None:
                self._aligned_reader = RecordReader(self.aligned)
            return records.decode_header(self._aligned_reader[index])
        except (ValueError, IndexError, UnreadableRecordError):
            return {}
