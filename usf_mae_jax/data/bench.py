"""Host input throughput: the grain pipeline against the USF-MAE authors' per-image PIL loader.

    python -m usf_mae_jax.data.bench --data_dir DIR --augment usf_mae --batch_size 64 --steps N \\
        [--workers K] [--threads T] [--img_size 224] [--baseline pil]

Measures host batches (uint8, what `build_host_dataset` hands to `GlobalBatchIterator`) after `--warmup`
batches, so the figure is the loader's own ceiling, independent of any accelerator.

`--baseline pil` also runs, in the same process on the same shards, a loader built the way the authors'
is (their notebook's `Dataset.__getitem__` with a torchvision transform, `DataLoader` without workers):
per image, PIL opens the PNG and converts it to RGB, the transform runs as PIL operations (nearest resize,
rotation, flips, RandomResizedCrop with PIL's bilinear), then ToTensor and Normalize as float32 numpy, and
the batch is stacked, all in one Python loop with no prefetching. torchvision itself is not installable
here; the PIL calls are the ones torchvision makes for PIL images. The closing note gives both figures and
their ratio.

Besides images/s, the output gives images per CPU-second (process CPU time over all threads; a fairer
per-core figure on a shared machine than wall time divided by cores) and the load average, since other
processes on the host change the numbers. The last line is always `images_per_s=<grain pipeline figure>`.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
import time

import numpy as np
from ml_collections import ConfigDict
from PIL import Image

from usf_mae_jax.data import augment, pipeline, records

IMAGENET_MEAN = np.asarray([0.485, 0.456, 0.406], np.float32)[:, None, None]
IMAGENET_STD = np.asarray([0.229, 0.224, 0.225], np.float32)[:, None, None]


def _input_config(args: argparse.Namespace) -> ConfigDict:
    return ConfigDict({"source": "shards", "data_dir": args.data_dir, "weights": "", "augment": args.augment,
                       "synthetic_count": 0, "synthetic_seed": 0, "num_threads": args.threads,
                       "prefetch_buffer": args.prefetch, "device_prefetch": 1, "worker_processes": args.workers,
                       "max_corrupt_fraction": 0.01})


def _timed(next_batch, steps: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        next_batch()
    wall, cpu = time.perf_counter(), time.process_time()
    images = 0
    for _ in range(steps):
        images += len(next_batch())
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"images": images, "wall_s": wall, "cpu_s": cpu, "images_per_s": images / wall,
            "images_per_cpu_s": images / cpu if cpu > 0 else math.nan}


def run_grain(args: argparse.Namespace) -> dict[str, float]:
    stream = pipeline.build_host_dataset(_input_config(args), batch_size=args.batch_size, img_size=args.img_size,
                                         seed=0)
    iterator = iter(stream)
    result = _timed(lambda: next(iterator)["image"], args.steps, args.warmup)
    if args.workers > 0:  # the decoding runs in live child processes, whose CPU time is not visible here
        result["images_per_cpu_s"] = math.nan
    close = getattr(iterator, "close", None)
    if close is not None:
        close()
    return result


def _pil_transform(image: Image.Image, preset: str, size: int, rng: np.random.Generator) -> Image.Image:
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


def run_pil_baseline(args: argparse.Namespace) -> dict[str, float]:
    import grain

    datasets = pipeline.find_datasets(args.data_dir)
    source = grain.sources.ArrayRecordDataSource([p for d in datasets for p in d.paths])
    order = np.random.default_rng(0).permutation(len(source))
    rng = np.random.default_rng(0)
    position = 0

    def next_batch() -> np.ndarray:
        nonlocal position
        tensors = []
        for _ in range(args.batch_size):
            record = source[int(order[position % len(order)])]
            position += 1
            image = Image.open(io.BytesIO(records.image_bytes(record))).convert("RGB")
            image = _pil_transform(image, args.augment, args.img_size, rng)
            tensor = np.asarray(image, np.float32).transpose(2, 0, 1) / 255.0  # ToTensor
            tensors.append((tensor - IMAGENET_MEAN) / IMAGENET_STD)  # Normalize
        return np.stack(tensors)

    return _timed(next_batch, args.steps, args.warmup)


def _line(name: str, result: dict[str, float]) -> str:
    per_cpu = result["images_per_cpu_s"]
    per_cpu_text = "n/a (worker processes)" if math.isnan(per_cpu) else f"{per_cpu:.1f}"
    return (f"{name}: {result['images']} images in {result['wall_s']:.2f} s -> {result['images_per_s']:.1f} "
            f"images/s; {per_cpu_text} images per CPU-second")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m usf_mae_jax.data.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", required=True, help="dataset folder(s) or a root of them (comma-separated)")
    parser.add_argument("--augment", default="usf_mae", choices=augment.PRESETS)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--img_size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=0, help="grain worker processes; 0 = threads")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--prefetch", type=int, default=256, help="grain prefetch buffer (elements)")
    parser.add_argument("--baseline", choices=("pil",), help="also time the authors' PIL loader")
    args = parser.parse_args(argv)
    if args.workers > 0:
        from absl import flags

        flags.FLAGS(sys.argv[:1])  # grain's worker processes read absl flags (jax_stack.md 2b)

    cores = len(os.sched_getaffinity(0))
    load = os.getloadavg()
    print(f"host: {cores} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"augment={args.augment} img_size={args.img_size} batch={args.batch_size} steps={args.steps}")
    grain_result = run_grain(args)
    mode = f"{args.workers} worker processes" if args.workers else f"{args.threads} threads"
    print(_line(f"grain ({mode})", grain_result))
    print(f"grain images/s per core: {grain_result['images_per_s'] / cores:.1f} (wall / {cores} cores)")
    if args.baseline == "pil":
        baseline = run_pil_baseline(args)
        print(_line("pil baseline (authors' loader, 1 process, no prefetch)", baseline))
        print(f"ratio grain / pil = {grain_result['images_per_s'] / baseline['images_per_s']:.2f}x wall, "
              f"{grain_result['images_per_cpu_s'] / baseline['images_per_cpu_s']:.2f}x per CPU-second")
    print(f"images_per_s={grain_result['images_per_s']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
