"""Reads PyTorch `.pth`/`.pt` checkpoints and `.safetensors` files into NumPy, without torch and safely.

A `.pth` file is a pickle, and unpickling runs whatever callables the pickle names. A checkpoint from the web
could therefore run code on load. This reader uses a restricted unpickler that only resolves the handful of
globals a state dict needs (tensor rebuild functions, storage types, `OrderedDict`) to local, harmless
replacements, and refuses every other global with an error that names it. Nothing from torch is imported.

Formats handled:
  * the zip format (`torch.save` since 1.6): `<root>/data.pkl` plus one raw storage per `<root>/data/<key>`;
  * the legacy format (`_use_new_zipfile_serialization=False`): magic number, protocol and system-info
    pickles, the main pickle, the list of storage keys, then each storage as an int64 element count and its
    raw bytes;
  * `.safetensors`: an 8-byte little-endian header size, a JSON header, then raw little-endian tensor data.
    The reader and writer here are our own so that bfloat16 round-trips through `ml_dtypes` (the
    `safetensors.numpy` helpers cannot represent it).

Storages are read lazily: unpickling yields `TensorRef`s, and only the ones a caller materialises are read,
so an optimizer state stored next to the model costs nothing.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
import pickle
import struct
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

from usf_mae_jax.cli import CheckpointError

# torch storage class name -> element dtype (torch/storage.py `_dtype_to_storage_type_map`).
STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C  # torch/serialization.py MAGIC_NUMBER
LEGACY_PROTOCOL_VERSION = 1001


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
    """The checkpoint names a global outside the allow-list; it was not executed."""


class CheckpointFormatError(CheckpointError):
    """The file is not a checkpoint this reader understands."""


@dataclasses.dataclass(frozen=True)
class StorageType:
    """Stand-in for `torch.FloatStorage` and friends: only carries the element dtype."""

    name: str
    dtype: np.dtype


class Storage:
    """One flat storage, read from the archive on first use and cached."""

    def __init__(self, dtype: np.dtype, numel: int, reader, byteorder: str = "little"):
        self.dtype, self.numel, self._reader, self._byteorder = dtype, numel, reader, byteorder
        self._array: np.ndarray | None = None

    def array(self) -> np.ndarray:
        if self._array is None:
            raw = self._reader()
            stored = self.dtype.newbyteorder("<" if self._byteorder == "little" else ">")
            if len(raw) < self.numel * self.dtype.itemsize:
                raise CheckpointFormatError(f"storage holds {len(raw)} bytes, expected "
                                            f"{self.numel} x {self.dtype.itemsize}")
            array = np.frombuffer(raw, dtype=stored, count=self.numel)
            self._array = array.astype(self.dtype.newbyteorder("="), copy=False)
        return self._array


@dataclasses.dataclass
class TensorRef:
    """A tensor as `torch._utils._rebuild_tensor_v2` describes it: a strided view of a storage."""

    storage: Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    def numpy(self) -> np.ndarray:
        dtype = self.storage.dtype
        if 0 in self.shape:
            return np.zeros(self.shape, dtype)
        flat = self.storage.array()
        last = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride))
        # Bounds-check before `as_strided`, which would otherwise read outside the storage.
        if self.offset < 0 or last >= flat.size or min(self.shape) < 0 or min(self.stride, default=0) < 0:
            raise CheckpointFormatError(f"tensor view {self.shape} at offset {self.offset} runs past its "
                                        f"storage of {flat.size} elements")
        view = np.lib.stride_tricks.as_strided(flat[self.offset:], self.shape,
                                               [s * dtype.itemsize for s in self.stride], writeable=False)
        return np.array(view, dtype=dtype, copy=True)


class IgnoredObject:
    """What an allowed non-tensor object (argparse `Namespace` of training args) unpickles into.

    It records its state and runs nothing, so a checkpoint's `args` entry loads harmlessly and is ignored.
    """

    def __init__(self, *args, **kwargs):
        self.args, self.state = args, dict(kwargs)

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"IgnoredObject({self.state!r})"


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                    metadata=None):
    if not isinstance(storage, Storage):
        raise CheckpointFormatError(f"tensor rebuilt from a {type(storage).__name__}, not a storage")
    return TensorRef(storage, int(storage_offset), tuple(int(n) for n in size), tuple(int(s) for s in stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data


# (module, name) -> local replacement. Everything else is refused.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("argparse", "Namespace"): IgnoredObject,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals and turns storages into lazy `Storage`s."""

    def __init__(self, file, source: str, storage_loader):
        super().__init__(file)
        self.source = source
        self.storage_loader = storage_loader

    def find_class(self, module: str, name: str):
        if module == "torch" and name in STORAGE_DTYPES:
            return StorageType(name, STORAGE_DTYPES[name])
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        raise UnsafeCheckpointError(
            f"{self.source}: refusing to load global '{module}.{name}'; only tensors, storages, "
            "OrderedDict and plain containers are allowed (the pickle was not executed)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise UnsafeCheckpointError(f"{self.source}: unsupported persistent id {pid!r:.80}")
        storage_type, key = pid[1], str(pid[2])
        if not isinstance(storage_type, StorageType):
            raise CheckpointFormatError(f"{self.source}: storage {key} has unsupported type {storage_type!r}")
        return self.storage_loader(storage_type.dtype, key, int(pid[4]), pid[5] if len(pid) > 5 else None)


def _load_zip(path: str) -> Any:
    archive = zipfile.ZipFile(path)
    names = archive.namelist()
    pickles = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
    if not pickles:
        if any(n.endswith("constants.pkl") for n in names):
            raise CheckpointFormatError(f"{path}: a TorchScript archive, not a state dict; save "
                                        "`model.state_dict()` with torch.save instead")
        raise CheckpointFormatError(f"{path}: zip file without data.pkl, not a torch checkpoint")
    root = pickles[0][: -len("data.pkl")]
    byteorder = "little"
    if root + "byteorder" in names:
        byteorder = archive.read(root + "byteorder").decode().strip()
    storages: dict[str, Storage] = {}

    def load_storage(dtype, key, numel, _view):
        if key not in storages:
            member = f"{root}data/{key}"
            if member not in names:
                raise CheckpointFormatError(f"{path}: storage {member} is missing from the archive")
            storages[key] = Storage(dtype, numel, lambda: archive.read(member), byteorder)
        return storages[key]

    return RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), path, load_storage).load()


def _load_legacy(path: str) -> Any:
    with open(path, "rb") as f:
        data = f.read()
    stream = io.BytesIO(data)

    def no_storage(*_):
        raise CheckpointFormatError(f"{path}: storage reference in a legacy header")

    header = [RestrictedUnpickler(stream, path, no_storage).load() for _ in range(3)]
    if header[0] != LEGACY_MAGIC_NUMBER or header[1] != LEGACY_PROTOCOL_VERSION:
        raise CheckpointFormatError(f"{path}: not a torch checkpoint (bad magic number or protocol)")
    little = bool(header[2].get("little_endian", True)) if isinstance(header[2], dict) else True
    storages: dict[str, Storage] = {}
    sizes: dict[str, int] = {}

    def load_storage(dtype, key, numel, view):
        if view is not None:
            raise CheckpointFormatError(f"{path}: legacy storage views are not supported")
        if key not in storages:
            sizes[key] = numel
            storages[key] = Storage(dtype, numel, lambda: payloads[key], "little" if little else "big")
        return storages[key]

    result = RestrictedUnpickler(stream, path, load_storage).load()
    keys = RestrictedUnpickler(stream, path, no_storage).load()
    payloads: dict[str, bytes] = {}
    position = stream.tell()
    for key in keys:
        (numel,) = struct.unpack("<q" if little else ">q", data[position:position + 8])
        nbytes = numel * storages[key].dtype.itemsize
        payloads[key] = data[position + 8:position + 8 + nbytes]
        if len(payloads[key]) != nbytes:
            raise CheckpointFormatError(f"{path}: truncated legacy storage {key}")
        position += 8 + nbytes
    return result


def load_pickle_checkpoint(path: str | os.PathLike) -> Any:
    """Unpickles a `.pth`/`.pt` file safely; tensors come back as lazy `TensorRef`s (see `materialize`)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if zipfile.is_zipfile(path):
        return _load_zip(path)
    with open(path, "rb") as f:
        head = f.read(2)
    if head[:1] != b"\x80":
        raise CheckpointFormatError(f"{path}: neither a torch zip archive nor a legacy torch pickle "
                                    "(very old tar-format checkpoints are not supported)")
    return _load_legacy(path)


def materialize(tree: Any) -> Any:
    """Replaces every `TensorRef` in a nested dict/list/tuple by its NumPy array."""
    if isinstance(tree, TensorRef):
        return tree.numpy()
    if isinstance(tree, dict):
        return {k: materialize(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(materialize(v) for v in tree)
    return tree


# safetensors dtype tags <-> NumPy dtypes.
SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_SAFETENSORS_TAGS = {dtype: tag for tag, dtype in SAFETENSORS_DTYPES.items()}


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Returns (tensors, metadata) of a `.safetensors` file, with the header validated."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise CheckpointFormatError(f"{path}: too short to be a safetensors file")
    (header_size,) = struct.unpack("<Q", data[:8])
    if header_size > len(data) - 8:
        raise CheckpointFormatError(f"{path}: header size {header_size} exceeds the file size")
    try:
        header = json.loads(data[8:8 + header_size])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointFormatError(f"{path}: unreadable safetensors header ({error})") from None
    metadata = header.pop("__metadata__", None) or {}
    body = memoryview(data)[8 + header_size:]
    tensors = {}
    for name, info in header.items():
        if info.get("dtype") not in SAFETENSORS_DTYPES:
            raise CheckpointFormatError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
        dtype, shape = SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"])
        begin, end = info["data_offsets"]
        if not 0 <= begin <= end <= len(body) or end - begin != int(np.prod(shape)) * dtype.itemsize:
            raise CheckpointFormatError(f"{path}: tensor {name} has inconsistent offsets {begin}..{end} "
                                        f"for shape {shape} {info['dtype']}")
        tensors[name] = np.frombuffer(body[begin:end], dtype.newbyteorder("<")).astype(dtype).reshape(shape)
    return tensors, metadata


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
    """Writes NumPy arrays (bfloat16 included) as a `.safetensors` file, keys sorted, 8-byte aligned."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    chunks, offset = [], 0
    for name in sorted(tensors):
        array = np.asarray(tensors[name])
        if array.dtype not in _SAFETENSORS_TAGS:
            raise ValueError(f"tensor {name}: dtype {array.dtype} cannot be stored in safetensors")
        raw = np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": _SAFETENSORS_TAGS[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(os.fspath(path), "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for raw in chunks:
            f.write(raw)
