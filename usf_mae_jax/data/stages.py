"""Where the host time goes: CPU microseconds per image for every stage of the input pipeline.

`report(label, data_dir, preset, size, batch_size)` (printed by `python -m usf_mae_jax.data.bench --stages`)
times each stage alone, in one thread, over the same records, for two ways of feeding the `usf_mae` recipe:

* `frames`: the stored frame (PNG, capped at max_side) is decoded and nearest-resized to the model's size:
  what every preset did before the nearest variant existed, and what `mae` still does;
* `nearest`: the stored nearest-resized variant (raw pixels) is read and used as is.

The rest of the recipe (rotation, flips, crop box, bilinear crop) runs on the same 224-px image in both, as
do the copy into the batch and the host-to-device copy. The last row is the whole pipeline in one thread
(`pipeline.build_host_dataset`, CPU time per image), so what the stages leave out (mixing, generators,
grain) shows as the difference.

`storage_options(paths, size)` (`--codecs`) is the measurement behind the stored variant
(docs/data_pipeline.md): for original frames, the bytes per record and the CPU time to get the nearest
`size` resize out of an ArrayRecord shard, for each way of storing what the recipe needs.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable

import cv2
import jax
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from ml_collections import ConfigDict

from usf_mae_jax.data import augment, pipeline, records, shards

_SAMPLES = 256


def _cpu_us(function: Callable[[int], object], count: int = _SAMPLES) -> float:
    """CPU microseconds per call of function(i) for i in range(count), after one untimed pass."""
    for i in range(min(count, 16)):
        function(i)
    start = time.process_time()
    for i in range(count):
        function(i)
    return (time.process_time() - start) / count * 1e6


def _pipeline_us(data_dir: str, preset: str, size: int, batch_size: int, batches: int = 12) -> float:
    cfg = ConfigDict({"source": "shards", "data_dir": data_dir, "weights": "", "augment": preset, "channels": 0,
                      "synthetic_count": 0, "synthetic_seed": 0, "num_threads": 1, "prefetch_buffer": 1,
                      "device_prefetch": 1, "worker_processes": 0, "max_corrupt_fraction": 0.01})
    iterator = iter(pipeline.build_host_dataset(cfg, batch_size=batch_size, img_size=size, seed=0))
    next(iterator)
    start = time.process_time()
    for _ in range(batches):
        next(iterator)
    result = (time.process_time() - start) / (batches * batch_size) * 1e6
    iterator.close()
    return result


def measure(data_dir: str, size: int, batch_size: int) -> dict[str, dict[str, float]]:
    """{stage: {'frames': us, 'nearest': us}} for the first dataset under `data_dir` (module docstring)."""
    info = pipeline.find_datasets(data_dir)[0]
    if size not in info.nearest:
        raise ValueError(f"{info.folder} has no stored nearest{size} variant; convert it with a current data_prep")
    readers = {"frames": shards.RecordReader(info.paths), "nearest": shards.RecordReader(info.nearest[size])}
    count = min(_SAMPLES, len(readers["frames"]))
    order = np.random.default_rng(0).permutation(len(readers["frames"]))[:count]
    rows: dict[str, dict[str, float]] = {}
    raw, images = {}, {}
    for path, reader in readers.items():
        rows.setdefault("read record", {})[path] = _cpu_us(lambda i, r=reader: r[int(order[i])], count)
        raw[path] = [reader[int(i)] for i in order]
        rows.setdefault("decode", {})[path] = _cpu_us(lambda i, p=path: records.decode(raw[p][i]), count)
        images[path] = [records.decode(r)["image"] for r in raw[path]]
    rows["nearest resize"] = {"frames": _cpu_us(lambda i: augment.resize_nearest(images["frames"][i], size), count),
                              "nearest": 0.0}
    small = images["nearest"]
    rng = np.random.default_rng(0)
    boxes = [augment.random_resized_crop_box(size, size, augment.USF_MAE_SCALE, augment.CROP_RATIO, rng)
             for _ in range(count)]
    rotated = [augment.rotate(image, 45.0) for image in small]
    batch = np.empty((batch_size, *small[0].shape), np.uint8)
    shared = {
        "generator (seeded per record)": _cpu_us(lambda i: np.random.default_rng([0, 0, 0, i]), count),
        "rotation": _cpu_us(lambda i: augment.rotate(small[i], 10.0 + i % 80), count),
        "flips": _cpu_us(lambda i: np.ascontiguousarray(augment.vflip(augment.hflip(rotated[i]))), count),
        "crop box": _cpu_us(lambda i: augment.random_resized_crop_box(
            size, size, augment.USF_MAE_SCALE, augment.CROP_RATIO, rng), count),
        "crop + bilinear resize": _cpu_us(lambda i: augment.resized_crop(rotated[i], boxes[i], size, "bilinear"),
                                          count),
        "copy into the batch": _cpu_us(lambda i: batch.__setitem__(i % batch_size, rotated[i]), count),
    }
    device = jax.devices()[0]  # the copy GlobalBatchIterator makes, here to one device
    shared[f"host-to-device ({device.platform.upper()} device)"] = _cpu_us(
        lambda i: jax.device_put(batch, device).block_until_ready(), 16) / batch_size
    for stage, value in shared.items():
        rows[stage] = {"frames": value, "nearest": value}
    return rows


def report(label: str, data_dir: str, preset: str, size: int, batch_size: int) -> None:
    """Prints the stage table and the one-thread pipeline figure."""
    rows = measure(data_dir, size, batch_size)
    print(f"[{label}] CPU microseconds per image, one thread (frames: PNG frame decoded and nearest-resized; "
          f"nearest: the stored nearest{size} variant)")
    print(f"[{label}]   {'stage':32s} {'frames':>9s} {'nearest':>9s}")
    for stage, values in rows.items():
        print(f"[{label}]   {stage:32s} {values['frames']:9.1f} {values['nearest']:9.1f}")
    total = {path: sum(values[path] for values in rows.values()) for path in ("frames", "nearest")}
    print(f"[{label}]   {'sum of the stages':32s} {total['frames']:9.1f} {total['nearest']:9.1f}")
    print(f"[{label}]   {'whole pipeline, ' + preset + ', 1 thread':32s} {'':9s} "
          f"{_pipeline_us(data_dir, preset, size, batch_size):9.1f}")


def _gather_nearest(payload: bytes, height: int, width: int, size: int) -> np.ndarray:
    """The nearest `size` resize of a raw (height, width) frame by indexing only the pixels it keeps."""
    rows = ((np.arange(size) + 0.5) * height / size).astype(np.int64)
    cols = ((np.arange(size) + 0.5) * width / size).astype(np.int64)
    return np.frombuffer(payload, np.uint8).reshape(height, width)[rows][:, cols]


def storage_options(paths: list[str], size: int) -> list[tuple[str, float, float]]:
    """[(option, KB per record in the shard, CPU us to read it and get the nearest resize)] for grayscale
    files."""
    originals = [cv2.imread(p, cv2.IMREAD_GRAYSCALE) for p in paths[:_SAMPLES]]
    height, width = originals[0].shape
    nearest = [augment.resize_nearest(o[:, :, None], size)[:, :, 0] for o in originals]
    png = [cv2.IMWRITE_PNG_COMPRESSION, 1]

    def png_decode(b: bytes) -> np.ndarray:
        return cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_GRAYSCALE)

    options = [
        (f"nearest{size} raw (stored variant)", [n.tobytes() for n in nearest], "uncompressed",
         lambda b: np.frombuffer(b, np.uint8).reshape(size, size)),
        (f"nearest{size} raw, ArrayRecord zstd:1", [n.tobytes() for n in nearest], "zstd:1",
         lambda b: np.frombuffer(b, np.uint8).reshape(size, size)),
        (f"nearest{size} PNG", [cv2.imencode(".png", n, png)[1].tobytes() for n in nearest], "uncompressed",
         png_decode),
        (f"original {width}x{height} raw, gather", [o.tobytes() for o in originals], "uncompressed",
         lambda b: _gather_nearest(b, height, width, size)),
        (f"original {width}x{height} PNG, decode + resize", [cv2.imencode(".png", o, png)[1].tobytes()
                                                            for o in originals], "uncompressed",
         lambda b: augment.resize_nearest(png_decode(b)[:, :, None], size)),
    ]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for index, (name, payloads, compression, get) in enumerate(options):
            sizes = []
            for count in (0, len(payloads)):  # the empty shard's size is the fixed overhead to leave out
                path = os.path.join(folder, f"{index}-{count}.array_record")
                out = ArrayRecordWriter(path, f"group_size:1,{compression}")
                for payload in payloads[:count]:
                    out.write(payload)
                out.close()
                sizes.append(os.path.getsize(path))
            reader = shards.RecordReader([path])
            rows.append((name, (sizes[1] - sizes[0]) / len(payloads) / 1e3,
                         _cpu_us(lambda i, r=reader, g=get: g(r[i]), len(payloads))))
    return rows


def report_storage(label: str, paths: list[str], size: int) -> None:
    print(f"[{label}] storing what usf_mae needs: KB per record, CPU microseconds to read it and get the nearest "
          f"{size} frame")
    for name, kilobytes, micros in storage_options(paths, size):
        print(f"[{label}]   {name:44s} {kilobytes:8.1f} KB {micros:9.1f} us")
