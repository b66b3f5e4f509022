"""Host input throughput: the grain pipeline against the USF-MAE authors' per-image PIL loader.

    python -m usf_mae_jax.data.bench                      # 256x256 and 640x480 sources, usf_mae, batch 64
    python -m usf_mae_jax.data.bench --busy 1             # the same with one CPU-bound process beside it
    python -m usf_mae_jax.data.bench --stages             # also the per-stage CPU time per image
    python -m usf_mae_jax.data.bench --codecs             # also the ways to store the usf_mae input
    python -m usf_mae_jax.data.bench --data_dir DIR       # existing shards instead of generated ones

Sources. For each `--source_size WxH`, `--count` synthetic speckle frames of that size (data/synthetic.py)
are written as PNG files, the authors' input, and converted with `python -m data_prep folder` (default
settings: frames capped at 512 px, the nearest-224 variant stored). Both are cached under `--work_dir`, so a
rerun measures at once. The converter runs as a command, as a user would run it, since the library never
imports data_prep.

Loaders, timed in alternating rounds so that drift in the machine's load hits both alike:
* grain: `pipeline.build_host_dataset` (the trainer's host batches, uint8, before the device copy), a fresh
  iterator per round, timed from its creation to its last batch, so no prefetched batch comes for free;
* pil: the authors' loader (their notebook's `Dataset.__getitem__` with a torchvision transform and a
  `DataLoader` without workers), as the PIL calls torchvision makes: per image PIL opens the PNG file and
  converts it to RGB, then nearest resize, rotation, flips, RandomResizedCrop with PIL's bilinear, ToTensor
  and Normalize as float32 numpy; then the batch is stacked. With `--data_dir` it reads the frames' PNG
  payloads from the records instead (no source files), and says so.

Reported per source size: the median images/s of each loader, per core (wall / cores) and per CPU-second
(process CPU time over all threads; fairer on a shared machine), and the median over rounds of the
per-round ratio grain / pil. Every line carries the load average, and the header and each summary the cores
actually free at that moment (`free_cores`): on a shared machine the load average lags and says nothing
about who else runs now. The last line is always `images_per_s=<grain median of the last source size>`.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import multiprocessing
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import cv2
import numpy as np
from ml_collections import ConfigDict
from PIL import Image

from usf_mae_jax.data import augment, pipeline, records, shards, stages, synthetic

IMAGENET_MEAN = np.asarray([0.485, 0.456, 0.406], np.float32)[:, None, None]
IMAGENET_STD = np.asarray([0.229, 0.224, 0.225], np.float32)[:, None, None]
SOURCE_VERSION = 1  # bump when the generated sources change, so cached ones are not reused
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load {one:.2f} {five:.2f} {fifteen:.2f}"


def free_cores() -> float:
    """How many cores this process gets right now: the speed-up of one thread per core over one thread on
    work that releases the GIL (SHA-256 of 4 MB blocks). The load average lags; this is the state now."""
    cores = len(os.sched_getaffinity(0))
    block = os.urandom(4 << 20)

    def work():
        for _ in range(8):
            hashlib.sha256(block).digest()

    start = time.perf_counter()
    work()
    one = time.perf_counter() - start
    threads = [threading.Thread(target=work) for _ in range(cores)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return cores * one / (time.perf_counter() - start)


def _state() -> str:
    return f"{_load()}; free cores now {free_cores():.2f} of {len(os.sched_getaffinity(0))}"


def parse_size(text: str) -> tuple[int, int]:
    """'640x480' -> (width 640, height 480)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"source size {text!r} is not WIDTHxHEIGHT, e.g. 640x480") from None
    if width <= 0 or height <= 0:
        raise argparse.ArgumentTypeError(f"source size {text!r} must be positive")
    return width, height


# ------------------------------------------------------------------------------------------------ data


def _write_frame(job: tuple[str, int, int, int]) -> None:
    path, index, width, height = job
    rng = np.random.default_rng([SOURCE_VERSION, index])
    lesion = int(rng.integers(-1, 2))
    cv2.imwrite(path, synthetic.synthesize((height, width), rng, lesion=lesion))


def _converted(folder: str, img_size: int) -> bool:
    """Whether `folder` holds a conversion in this version's record format with the nearest variant."""
    try:
        with open(os.path.join(folder, pipeline.MANIFEST_NAME)) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return False
    return (manifest.get("record_format_version") == records.FORMAT_VERSION
            and f"nearest{img_size}" in manifest.get("variants", {}))


def prepare(work_dir: str, size: tuple[int, int], count: int, img_size: int) -> tuple[str, list[str]]:
    """(shard root, source PNG paths) for `count` frames of `size`, generating and converting what is missing
    or was converted by an older data_prep."""
    width, height = size
    name = f"speckle_{width}x{height}_{count}_v{SOURCE_VERSION}"
    src, out = os.path.join(work_dir, "sources", name), os.path.join(work_dir, "shards", name)
    paths = [os.path.join(src, f"{i:06d}.png") for i in range(count)]
    missing = [(p, i, width, height) for i, p in enumerate(paths) if not os.path.isfile(p)]
    if missing:
        os.makedirs(src, exist_ok=True)
        print(f"[{width}x{height}] writing {len(missing)} synthetic speckle PNGs to {src}", flush=True)
        # spawn, not fork: this process already runs JAX's and grain's threads.
        with ProcessPoolExecutor(len(os.sched_getaffinity(0)), mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(_write_frame, missing, chunksize=16))
    if not _converted(os.path.join(out, "frames"), img_size):
        print(f"[{width}x{height}] converting with python -m data_prep folder -> {out}", flush=True)
        subprocess.run([sys.executable, "-m", "data_prep", "folder", "--src", src, "--out_dir", out, "--name",
                        "frames", "--nearest_size", str(img_size), "--no_progress", "--overwrite"], check=True,
                       cwd=REPO, env={**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")})
    return out, paths


# --------------------------------------------------------------------------------------------- loaders


def _input_config(args: argparse.Namespace, data_dir: str) -> ConfigDict:
    return ConfigDict({"source": "shards", "data_dir": data_dir, "weights": "", "augment": args.augment,
                       "channels": 0, "synthetic_count": 0, "synthetic_seed": 0, "num_threads": args.threads,
                       "prefetch_buffer": args.prefetch, "device_prefetch": 1, "worker_processes": args.workers,
                       "max_corrupt_fraction": 0.01})


def _timed(images: int, run) -> dict[str, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"images_per_s": images / wall, "images_per_cpu_s": images / cpu if cpu > 0 else math.nan}


def grain_round(args: argparse.Namespace, data_dir: str, round_index: int) -> dict[str, float]:
    """One timed pass of the grain pipeline: a fresh iterator (seed = round), `--batches` batches.

    With worker processes, their start (seconds) is left out of the timing: it precedes the first batch,
    which is taken before the clock starts; the batches they buffer meanwhile (2 per worker) do come free.
    """
    stream = pipeline.build_host_dataset(_input_config(args, data_dir), batch_size=args.batch_size,
                                         img_size=args.img_size, seed=round_index)
    iterator = iter(stream) if args.workers > 0 else None
    if iterator is not None:
        next(iterator)

    def run():
        nonlocal iterator
        iterator = iterator or iter(stream)
        for _ in range(args.batches):
            next(iterator)

    result = _timed(args.batches * args.batch_size, run)
    if args.workers > 0:  # the work runs in child processes, whose CPU time is not visible here
        result["images_per_cpu_s"] = math.nan
    iterator.close()
    return result


def pil_transform(image: Image.Image, preset: str, size: int, rng: np.random.Generator) -> Image.Image:
    """The authors' torchvision transform as the PIL calls torchvision makes (see augment.py for the order)."""
    if preset in ("usf_mae", "eval"):
        image = image.resize((size, size), Image.NEAREST)
        if preset == "eval":
            return image
        image = image.rotate(rng.uniform(*augment.USF_MAE_ROTATION), resample=Image.NEAREST)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_TOP_BOTTOM)
        scale, resample = augment.USF_MAE_SCALE, Image.BILINEAR
    elif preset == "mae":
        scale, resample = augment.MAE_SCALE, Image.BICUBIC
    else:
        return image
    top, left, h, w = augment.random_resized_crop_box(image.height, image.width, scale, augment.CROP_RATIO, rng)
    image = image.resize((size, size), resample, box=(left, top, left + w, top + h))
    if preset == "mae" and rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return image


def pil_round(args: argparse.Namespace, open_image, count: int, round_index: int) -> dict[str, float]:
    """One timed pass of the authors' loader over `--pil_batches` batches, in a shuffled order."""
    order = np.random.default_rng(round_index).permutation(count)
    rng = np.random.default_rng(round_index)

    def run():
        position = 0
        for _ in range(args.pil_batches):
            tensors = []
            for _ in range(args.batch_size):
                image = open_image(int(order[position % count])).convert("RGB")
                position += 1
                image = pil_transform(image, args.augment, args.img_size, rng)
                tensor = np.asarray(image, np.float32).transpose(2, 0, 1) / 255.0  # ToTensor
                tensors.append((tensor - IMAGENET_MEAN) / IMAGENET_STD)  # Normalize
            np.stack(tensors)

    return _timed(args.pil_batches * args.batch_size, run)


def _record_opener(data_dir: str):
    """PIL images from the frames' PNG payloads, for existing shards without their source files."""
    datasets = pipeline.find_datasets(data_dir)
    reader = shards.RecordReader([p for d in datasets for p in d.paths])
    return (lambda i: Image.open(io.BytesIO(records.image_bytes(reader[i])))), len(reader)


# ---------------------------------------------------------------------------------------------- report


def measure(args: argparse.Namespace, label: str, data_dir: str, open_image, count: int) -> float:
    """Alternating rounds for one data set; prints the per-round and median figures; returns grain's median."""
    cores = len(os.sched_getaffinity(0))
    grain_runs, pil_runs, ratios = [], [], []
    grain_round(args, data_dir, 10_000)  # warm-up: page cache, OpenCV and grain start-up
    if open_image is not None:
        pil_round(args, open_image, count, 10_000)
    for r in range(args.rounds):
        grain_runs.append(grain_round(args, data_dir, r))
        line = f"[{label}] round {r + 1}: grain {grain_runs[-1]['images_per_s']:.0f} images/s"
        if open_image is not None:
            pil_runs.append(pil_round(args, open_image, count, r))
            ratios.append(grain_runs[-1]["images_per_s"] / pil_runs[-1]["images_per_s"])
            line += f", pil {pil_runs[-1]['images_per_s']:.0f} images/s, ratio {ratios[-1]:.2f}x"
        print(f"{line}; {_load()}", flush=True)
    grain = statistics.median(r["images_per_s"] for r in grain_runs)
    grain_cpu = statistics.median(r["images_per_cpu_s"] for r in grain_runs)
    threads = pipeline.host_threads(_input_config(args, data_dir))
    mode = f"{args.workers} worker processes" if args.workers else f"{threads} threads"
    print(f"[{label}] grain ({mode}): {grain:.1f} images/s, {grain / cores:.1f} per core ({cores} cores), "
          f"{grain_cpu:.1f} per CPU-second; {_state()}")
    if pil_runs:
        pil = statistics.median(r["images_per_s"] for r in pil_runs)
        print(f"[{label}] pil (authors' loader, 1 process): {pil:.1f} images/s, "
              f"{statistics.median(r['images_per_cpu_s'] for r in pil_runs):.1f} per CPU-second")
        print(f"[{label}] ratio grain / pil: {statistics.median(ratios):.2f}x (median of {len(ratios)} rounds, "
              f"min {min(ratios):.2f}x, max {max(ratios):.2f}x)")
    return grain


def _spin() -> None:
    while True:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m usf_mae_jax.data.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--source_size", type=parse_size, action="append",
                        help="WIDTHxHEIGHT of the generated source frames; repeatable (default 256x256 and 640x480)")
    parser.add_argument("--count", type=int, default=1024, help="generated frames per source size")
    parser.add_argument("--work_dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "usf_mae_jax_bench"),
                        help="cache of the generated sources and their shards")
    parser.add_argument("--data_dir", help="measure these existing shards instead of generated ones")
    parser.add_argument("--augment", default="usf_mae", choices=augment.PRESETS)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--img_size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=40, help="grain batches per round")
    parser.add_argument("--pil_batches", type=int, default=8, help="PIL-loader batches per round")
    parser.add_argument("--threads", type=int, default=0, help="input.num_threads (0: the pipeline's default)")
    parser.add_argument("--workers", type=int, default=0, help="input.worker_processes; 0 = threads")
    parser.add_argument("--prefetch", type=int, default=0, help="input.prefetch_buffer in batches (0: auto)")
    parser.add_argument("--baseline", choices=("pil", "none"), default="pil")
    parser.add_argument("--busy", type=int, default=0, help="CPU-bound processes to run beside the benchmark")
    parser.add_argument("--stages", action="store_true", help="print the CPU time per image of every stage")
    parser.add_argument("--codecs", action="store_true",
                        help="print the storage options for the usf_mae input (generated sources only)")
    args = parser.parse_args(argv)
    if args.workers > 0:
        from absl import flags

        flags.FLAGS(sys.argv[:1])  # grain's worker processes read absl flags (docs/jax_stack.md 2b)

    spinners = [multiprocessing.get_context("spawn").Process(target=_spin, daemon=True) for _ in range(args.busy)]
    for spinner in spinners:
        spinner.start()
    try:
        print(f"host: {len(os.sched_getaffinity(0))} cores; {_state()}; busy={args.busy}; augment={args.augment} "
              f"img_size={args.img_size} batch={args.batch_size} rounds={args.rounds}", flush=True)
        if args.data_dir:
            jobs = [(args.data_dir, args.data_dir, *(_record_opener(args.data_dir) if args.baseline == "pil"
                                                      else (None, 0)))]
            if args.baseline == "pil":
                print("note: the pil baseline reads the frames' PNG payloads from the records (no source files)")
        else:
            jobs = []
            for width, height in args.source_size or [(256, 256), (640, 480)]:
                data_dir, paths = prepare(args.work_dir, (width, height), args.count, args.img_size)
                opener = (lambda i, paths=paths: Image.open(paths[i])) if args.baseline == "pil" else None
                jobs.append((f"{width}x{height}", data_dir, opener, len(paths)))
                if args.codecs:
                    stages.report_storage(f"{width}x{height}", paths, args.img_size)
        result = math.nan
        for label, data_dir, opener, count in jobs:
            if args.stages:
                stages.report(label, data_dir, args.augment, args.img_size, args.batch_size)
            result = measure(args, label, data_dir, opener, count)
        print(f"images_per_s={result:.1f}")
    finally:
        for spinner in spinners:
            spinner.terminate()
            spinner.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
