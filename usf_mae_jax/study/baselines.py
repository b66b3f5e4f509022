"""Baselines a medical-imaging user would pick instead of a pretrained ViT, on the project's own data protocol.

    python -m usf_mae_jax.study.baselines --model pixels_logreg|small_cnn|small_unet|otsu --data_dir D \
        --benchmark NAME [--fold K] [--subset S] [--label_fraction F] [--seed S] [--img_size 64] [--epochs 30] \
        [--batch_size 32] [--lr 1e-3] [--warmup_epochs 1] [--threads N] --out DIR [--overwrite]

A row of a comparison table means something only if every row saw the same images the same way, so the
baselines take everything but the model from the project's tasks:
  * data: the splits of `downstream.load_benchmark` (classification) or `segmentation.load_segmentation` with
    `classes="binary"`; the core functions take the loaded data, so a loader option reaches them untouched. The
    label budget is `downstream.label_subset` with the run's seed, the fine-tune task's draw (segmentation: the
    same draw with the masks kept); validation and test stay whole;
  * training images: `flip_crop` with scale 0.5-1 (configs/finetune.py) for classification, the joint transform
    of configs/segment.py (rotation 15 degrees, crop scale 0.5-1, flip, contrast 0.2, brightness 0.1) for
    segmentation; each epoch's order is seeded by (seed, epoch) and each example by (seed, epoch, record), as
    `downstream.EpochBatches` does; an epoch has floor(n / batch) steps, as core/steps.py plans it;
  * evaluation images: the nearest resize to img_size; a segmentation's logits are resized bilinearly to each
    mask's stored size (`segmentation.resize_logits`), the ground truth never;
  * selection: the epoch (or C) of the best validation score, macro-F1 or per-image mean Dice, the first one on
    a tie, as the training loop keeps its best state; the test split is scored once;
  * metrics: evaluators/metrics.py and evaluators/segmentation.py, so results.json holds the keys the tasks
    write, plus `model`, `n_train`, `epochs`, `best_epoch`, `train_seconds` and the CLI's `settings`.

Models:
  pixels_logreg  multinomial logistic regression (class_weight="balanced") on standardised grayscale pixels at
                 img_size; C from `C_GRID` by validation macro-F1. Deterministic.
  small_cnn      4 blocks of (conv-BN-ReLU) x 2 + max-pool, 32-64-128-256 channels, global average pool, linear;
                 class-weighted cross-entropy (N / (C n_c)), AdamW, per step core/optim.py's warmup then cosine.
  small_unet     4-level U-Net, 32-64-128-256 channels, transposed-conv upsampling and skip concatenation, one
                 logit per pixel; binary cross-entropy + batch soft Dice (smooth 1), as the segment task's
                 CE + Dice; same optimiser and schedule.
  otsu           evaluators/seg_baseline.py's dark-blob threshold at the stored resolution; nothing learned.
torch is a test-only dependency (requirements-test.txt): the torch baselines import it when they run.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ml_collections
import numpy as np

from usf_mae_jax import cli
from usf_mae_jax.cli import ConfigError, DataError
from usf_mae_jax.core import files, optim
from usf_mae_jax.data import augment, downstream
from usf_mae_jax.data import segmentation as segdata
from usf_mae_jax.evaluators import metrics, seg_baseline
from usf_mae_jax.evaluators import segmentation as segmetrics
from usf_mae_jax.models import vit

log = logging.getLogger(__name__)

CLASSIFIERS, SEGMENTERS = ("pixels_logreg", "small_cnn"), ("small_unet", "otsu")
MODELS = (*CLASSIFIERS, *SEGMENTERS)
C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # inverse L2 strengths; ties go to the first, the strongest regularisation
WIDTHS = (32, 64, 128, 256)  # channels of the CNN's blocks and of the U-Net's levels
WEIGHT_DECAY, MIN_LR = 0.05, 1e-6  # configs/finetune.py: AdamW decay 0.05 (not on 1-D params), cosine to 1e-6
PREDICT_BATCH = 128
# The training augmentations of configs/finetune.py and configs/segment.py (tests/test_baselines.py checks them).
CLASSIFICATION_INPUT = {"augment": "flip_crop", "crop_scale_min": 0.5}
SEGMENTATION_INPUT = {"augment": "joint", "rotation_degrees": 15.0, "crop_scale_min": 0.5, "contrast": 0.2,
                      "brightness": 0.1}


# ----------------------------------------------------------------------------------------------- shared


def import_torch(model: str):
    """The torch module, or a one-line ConfigError naming the baseline that needs it (a test-only dependency)."""
    try:
        import torch
    except ImportError:
        raise ConfigError(f"the {model} baseline needs torch: pip install torch==2.13.0") from None
    return torch


def _budget(split: downstream.SplitData, fraction: float, seed: int) -> downstream.SplitData:
    """The tasks' label-budget draw; a MaskedSplit keeps the masks of the records drawn."""
    if isinstance(split, segdata.MaskedSplit):
        return segdata.label_subset(split, fraction, seed)
    return downstream.label_subset(split, fraction, seed)


def _eval_images(split: downstream.SplitData, size: int, pool: ThreadPoolExecutor) -> np.ndarray:
    """uint8 (N, size, size, C): the evaluation transform (nearest resize) of every image of a split."""
    return downstream.augmented_images(split.images, np.arange(len(split)), augment.make_augment("eval", size),
                                       0, 0, pool)


def _to_input(torch, images: np.ndarray):
    """uint8 NHWC -> float32 NCHW with the project's normalisation (vit.channel_stats of the channel count)."""
    mean, std = vit.channel_stats(images.shape[-1])
    x = (images.astype(np.float32) / 255.0 - mean) / std
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _fit(torch, model, make_batch, loss_fn, validate, *, n_train: int, batch_size: int, epochs: int, lr: float,
         warmup_epochs: float, seed: int) -> dict[str, Any]:
    """Trains `model` in place, validating after each epoch, and leaves it in the state of the best epoch.

    `make_batch(indices, epoch) -> (inputs, targets)`, `validate(model) -> score` (higher is better).
    """
    if epochs < 1 or batch_size < 1 or lr <= 0 or warmup_epochs < 0:
        raise ConfigError(f"epochs and batch_size must be positive, lr > 0 and warmup_epochs >= 0; got {epochs}, "
                          f"{batch_size}, {lr}, {warmup_epochs}")
    steps_per_epoch = max(n_train // batch_size, 1)
    total = epochs * steps_per_epoch
    warmup = min(int(round(warmup_epochs * steps_per_epoch)), total)
    rates = np.asarray(optim.warmup_cosine(lr, total, warmup, MIN_LR)(np.arange(total)), np.float64)
    decayed = [p for p in model.parameters() if p.ndim > 1]
    optimizer = torch.optim.AdamW([{"params": decayed, "weight_decay": WEIGHT_DECAY},
                                   {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.999), eps=1e-8)
    history, best_state, best_epoch, best_score = [], None, None, -math.inf
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        table = downstream.epoch_indices(n_train, steps_per_epoch, batch_size, seed, epoch)
        for within, indices in enumerate(table):
            for group in optimizer.param_groups:
                group["lr"] = float(rates[epoch * steps_per_epoch + within])
            inputs, targets = make_batch(indices, epoch)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(inputs), targets)
            if not torch.isfinite(loss):
                raise ConfigError(f"the training loss is not finite at epoch {epoch + 1}, step {within + 1}: "
                                  "lower --lr")
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            score = float(validate(model))
        history.append(score)
        log.info("epoch %d/%d: validation %.4f", epoch + 1, epochs, score)
        if score > best_score:
            best_state, best_epoch, best_score = copy.deepcopy(model.state_dict()), epoch + 1, score
    model.load_state_dict(best_state)
    return {"epochs": epochs, "best_epoch": best_epoch, "validation": best_score, "validation_history": history,
            "train_seconds": time.perf_counter() - start}


def _predict(torch, model, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([model(_to_input(torch, images[i:i + PREDICT_BATCH])).numpy()
                               for i in range(0, len(images), PREDICT_BATCH)])


def _conv_block(nn, cin: int, cout: int):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


# ------------------------------------------------------------------------------------------ classification


def _full_probabilities(model, features: np.ndarray, num_classes: int) -> np.ndarray:
    """(N, num_classes) probabilities of a fitted sklearn classifier; a class it never saw gets 0."""
    probs = np.zeros((len(features), num_classes))
    probs[:, model.classes_] = model.predict_proba(features)
    return probs


def pixels_logreg(data: downstream.BenchmarkData, *, img_size: int = 64, label_fraction: float = 1.0, seed: int = 0,
                  c_grid: tuple[float, ...] = C_GRID) -> dict[str, Any]:
    """Logistic regression on raw pixels; C chosen on validation macro-F1 (module docstring)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    train = _budget(data.splits["train"], label_fraction, seed)
    splits = {"train": train, "validation": data.splits["validation"], "test": data.splits["test"]}
    with ThreadPoolExecutor(2) as pool:
        pixels = {name: _eval_images(split, img_size, pool).mean(axis=-1).reshape(len(split), -1)
                  for name, split in splits.items()}
    scaler = StandardScaler().fit(pixels["train"])
    features = {name: scaler.transform(x) for name, x in pixels.items()}
    num_classes = len(data.class_names)
    start = time.perf_counter()
    fitted, scores = {}, {}
    for c in c_grid:
        fitted[c] = LogisticRegression(C=c, class_weight="balanced", max_iter=5000).fit(features["train"], train.labels)
        scores[c] = metrics.classification_results(
            splits["validation"].labels, _full_probabilities(fitted[c], features["validation"], num_classes),
            data.class_names, "validation")["f1_macro"]
    best_c = max(c_grid, key=lambda c: scores[c])  # max() returns the first of equal scores
    seconds = time.perf_counter() - start
    results = metrics.classification_results(data.splits["test"].labels,
                                             _full_probabilities(fitted[best_c], features["test"], num_classes),
                                             data.class_names, data.split_name("test"))
    return {**{k: results[k] for k in metrics.RESULT_KEYS}, "model": "pixels_logreg", "n_train": len(train),
            "epochs": None, "best_epoch": None, "train_seconds": seconds, "C": best_c, "validation": scores[best_c],
            "validation_f1_macro_by_C": {str(c): scores[c] for c in c_grid}}


def small_cnn(data: downstream.BenchmarkData, *, img_size: int = 64, label_fraction: float = 1.0, seed: int = 0,
              epochs: int = 30, batch_size: int = 32, lr: float = 1e-3, warmup_epochs: float = 1.0) -> dict[str, Any]:
    """A small CNN trained from scratch with the fine-tune task's augmentation (module docstring)."""
    torch = import_torch("small_cnn")
    if img_size < 2 ** len(WIDTHS):
        raise ConfigError(f"small_cnn pools {len(WIDTHS)} times: img_size must be at least {2 ** len(WIDTHS)}")
    nn = torch.nn
    train = _budget(data.splits["train"], label_fraction, seed)
    num_classes = len(data.class_names)
    torch.manual_seed(seed)
    layers, cin = [], data.channels
    for cout in WIDTHS:
        layers += [_conv_block(nn, cin, cout), nn.MaxPool2d(2)]
        cin = cout
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))
    weights = torch.from_numpy(downstream.class_loss_weights(train.labels, num_classes))
    cross_entropy = nn.CrossEntropyLoss(weight=weights)  # normalised by the weights' sum, as the fine-tune's loss
    transform = downstream.make_train_augment(ml_collections.ConfigDict(CLASSIFICATION_INPUT), img_size)
    with ThreadPoolExecutor(2) as pool:
        validation, test = (_eval_images(data.splits[name], img_size, pool) for name in ("validation", "test"))

        def make_batch(indices, epoch):
            images = downstream.augmented_images(train.images, indices, transform, seed, epoch, pool)
            return _to_input(torch, images), torch.from_numpy(train.labels[indices])

        def validate(net):
            probs = torch.softmax(torch.from_numpy(_predict(torch, net, validation)), 1).numpy()
            return metrics.classification_results(data.splits["validation"].labels, probs, data.class_names,
                                                  "validation")["f1_macro"]

        fit = _fit(torch, model, make_batch, cross_entropy, validate, n_train=len(train), batch_size=batch_size,
                   epochs=epochs, lr=lr, warmup_epochs=warmup_epochs, seed=seed)
    probs = torch.softmax(torch.from_numpy(_predict(torch, model, test)), 1).numpy()
    results = metrics.classification_results(data.splits["test"].labels, probs, data.class_names,
                                             data.split_name("test"))
    return {**{k: results[k] for k in metrics.RESULT_KEYS}, "model": "small_cnn", "n_train": len(train), **fit}


# -------------------------------------------------------------------------------------------- segmentation


def _binary_classes(data: segdata.SegmentationData) -> None:
    if len(data.mask_class_names) != 2:
        raise ConfigError(f"the segmentation baselines are binary; load the data with classes='binary' (got mask "
                          f"classes {data.mask_class_names})")


def _segment_split(torch, model, images: np.ndarray, split: segdata.MaskedSplit) -> list[np.ndarray]:
    """0/1 maps at each mask's stored size: the logit map resized bilinearly to the mask, then > 0."""
    logits = _predict(torch, model, images)
    return [(segdata.resize_logits(one.transpose(1, 2, 0), mask.shape)[:, :, 0] > 0).astype(np.uint8)
            for one, mask in zip(logits, split.masks)]


def _build_unet(torch, in_chans: int):
    nn = torch.nn

    class SmallUNet(nn.Module):
        """Encoder levels WIDTHS (max-pool between), decoder: transposed conv x2, concatenated skip, conv block."""

        def __init__(self):
            super().__init__()
            self.down = nn.ModuleList(_conv_block(nn, cin, cout) for cin, cout in zip((in_chans, *WIDTHS), WIDTHS))
            self.up = nn.ModuleList(nn.ConvTranspose2d(cin, cout, 2, stride=2)
                                    for cin, cout in zip(WIDTHS[:0:-1], WIDTHS[-2::-1]))
            self.fuse = nn.ModuleList(_conv_block(nn, 2 * width, width) for width in WIDTHS[-2::-1])
            self.head = nn.Conv2d(WIDTHS[0], 1, 1)

        def forward(self, x):
            skips = []
            for level, block in enumerate(self.down):
                x = block(torch.nn.functional.max_pool2d(x, 2) if level else x)
                skips.append(x)
            for up, fuse, skip in zip(self.up, self.fuse, skips[-2::-1]):
                x = fuse(torch.cat([up(x), skip], dim=1))
            return self.head(x)

    return SmallUNet()


def small_unet(data: segdata.SegmentationData, *, img_size: int = 64, label_fraction: float = 1.0, seed: int = 0,
               epochs: int = 30, batch_size: int = 32, lr: float = 1e-3, warmup_epochs: float = 1.0) -> dict[str, Any]:
    """A small U-Net trained from scratch with the segment task's joint augmentation (module docstring)."""
    torch = import_torch("small_unet")
    _binary_classes(data)
    scale = 2 ** (len(WIDTHS) - 1)
    if img_size % scale:
        raise ConfigError(f"small_unet halves the image {len(WIDTHS) - 1} times: img_size must be a multiple of "
                          f"{scale}, got {img_size}")
    validation_split = data.splits["validation"]
    if not any(mask.any() for mask in validation_split.masks):
        raise DataError(f"{data.version_dir}: no validation mask has a foreground pixel, so validation Dice, which "
                        "selects the tested epoch, is undefined")
    train = _budget(data.splits["train"], label_fraction, seed)
    torch.manual_seed(seed)
    model = _build_unet(torch, data.channels)
    functional = torch.nn.functional

    def loss_fn(logits, masks):
        probs = torch.sigmoid(logits)
        dice = (2 * (probs * masks).sum() + 1.0) / (probs.sum() + masks.sum() + 1.0)
        return functional.binary_cross_entropy_with_logits(logits, masks) + (1.0 - dice)

    transform = segdata.make_train_transform(ml_collections.ConfigDict(SEGMENTATION_INPUT), img_size)
    with ThreadPoolExecutor(2) as pool:
        validation, test = (_eval_images(data.splits[name], img_size, pool) for name in ("validation", "test"))

        def make_batch(indices, epoch):
            pairs = segdata.augmented_pairs(train, indices, transform, seed, epoch, pool)
            return _to_input(torch, pairs["image"]), torch.from_numpy(pairs["mask"][:, None].astype(np.float32))

        def validate(net):
            preds = _segment_split(torch, net, validation, validation_split)
            return segmetrics.segmentation_results(preds, validation_split.masks, validation_split.ids,
                                                   data.mask_class_names, "validation", distances=False)[0]["dice"]

        fit = _fit(torch, model, make_batch, loss_fn, validate, n_train=len(train), batch_size=batch_size,
                   epochs=epochs, lr=lr, warmup_epochs=warmup_epochs, seed=seed)
    test_split = data.splits["test"]
    results, _ = segmetrics.segmentation_results(_segment_split(torch, model, test, test_split), test_split.masks,
                                                 test_split.ids, data.mask_class_names, data.split_name("test"))
    return {**results, "model": "small_unet", "n_train": len(train), **fit}


def otsu(data: segdata.SegmentationData) -> dict[str, Any]:
    """evaluators/seg_baseline.py's threshold on the test split, at the stored resolution; nothing is trained."""
    _binary_classes(data)
    test = data.splits["test"]
    results, _ = segmetrics.segmentation_results([seg_baseline.otsu_lesion(image) for image in test.images],
                                                 test.masks, test.ids, data.mask_class_names, data.split_name("test"))
    return {**results, "model": "otsu", "n_train": 0, "epochs": None, "best_epoch": None, "train_seconds": 0.0}


# ------------------------------------------------------------------------------------------ entry points


def load_data(model: str, data_dir: str, benchmark: str, fold: int | None = None, subset: str | None = None,
              **loader_options) -> downstream.BenchmarkData:
    """The splits `model` needs: a benchmark for the classifiers, its binary masks for the segmenters.
    `loader_options` go to the loader unchanged."""
    if model in SEGMENTERS:
        return segdata.load_segmentation(data_dir, benchmark, fold, subset, classes="binary", **loader_options)
    return downstream.load_benchmark(data_dir, benchmark, fold, subset, **loader_options)


def run(model: str, data: downstream.BenchmarkData, **options) -> dict[str, Any]:
    """The results of baseline `model` on loaded `data`; `options` are its keyword arguments (img_size, ...)."""
    functions = {"pixels_logreg": pixels_logreg, "small_cnn": small_cnn, "small_unet": small_unet, "otsu": otsu}
    if model not in functions:
        raise ConfigError(f"unknown baseline {model!r}; choose one of {', '.join(MODELS)}")
    return functions[model](data, **options)


def model_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of `args.model` among the command line's settings."""
    if args.model == "otsu":
        return {}
    common = {"img_size": args.img_size, "label_fraction": args.label_fraction, "seed": args.seed}
    if args.model == "pixels_logreg":
        return common
    return {**common, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
            "warmup_epochs": args.warmup_epochs}


def run_to(out: str, model: str, settings: dict[str, Any], load, overwrite: bool = False) -> dict[str, Any]:
    """Runs a baseline into `out/results.json`, or returns the finished results already there.

    A finished run with the same `settings` is skipped (a table driver resumes by running every row again);
    one with other settings is refused unless `overwrite`. `load()` returns the data, so a skip reads nothing.
    """
    path = os.path.join(out, "results.json")
    if os.path.isfile(path) and not overwrite:
        previous = files.read_json(path)
        if previous.get("settings") != settings:
            changed = sorted(k for k in {**settings, **previous.get("settings", {})}
                             if settings.get(k) != previous.get("settings", {}).get(k))
            raise ConfigError(f"{path} holds a finished run with other settings ({', '.join(changed)}); pass "
                              "--overwrite to replace it, or choose another --out")
        log.info("%s is finished; skipped", path)
        return previous
    options = {k: v for k, v in settings.items() if k in ("img_size", "label_fraction", "seed", "epochs",
                                                          "batch_size", "lr", "warmup_epochs")}
    results = {**run(model, load(), **options), "settings": settings}
    files.write_json(path, results, sort_keys=False)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m usf_mae_jax.study.baselines", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, choices=MODELS)
    parser.add_argument("--data_dir", required=True, help="the converter's --out_dir (or a version folder)")
    parser.add_argument("--benchmark", required=True, help="the converted benchmark's name, e.g. busbra")
    parser.add_argument("--fold", type=int, default=None, help="the official round (default: the benchmark's)")
    parser.add_argument("--subset", default=None, help="the benchmark's subset, e.g. GIST514-DB roi | raw")
    parser.add_argument("--label_fraction", type=float, default=1.0, help="share of the training labels used")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--img_size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    parser.add_argument("--warmup_epochs", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch's CPU threads (0: its default); on a CPU shared with other jobs 1 avoids the "
                             "thread oversubscription that slows a torch step down many times over")
    parser.add_argument("--out", required=True, help="folder for results.json")
    parser.add_argument("--overwrite", action="store_true", help="run again even when OUT/results.json is finished")
    parser.add_argument("--verbose", action="store_true", help="show the traceback of expected errors")
    args = parser.parse_args(argv)

    def work() -> int:
        if args.threads > 0 and args.model in ("small_cnn", "small_unet"):
            import_torch(args.model).set_num_threads(args.threads)
        settings = {"model": args.model, "benchmark": args.benchmark, "fold": args.fold, "subset": args.subset,
                    **model_options(args)}
        results = run_to(args.out, args.model, settings,
                         lambda: load_data(args.model, args.data_dir, args.benchmark, args.fold, args.subset),
                         args.overwrite)
        headline = ("f1_macro", "accuracy", "auc") if args.model in CLASSIFIERS else ("dice", "iou", "hd95")
        print(f"{args.model} on {results['split']}: " + ", ".join(
            f"{k} {results[k]:.4f}" if results[k] is not None else f"{k} n/a" for k in headline)
            + f" (n_train={results['n_train']}, best epoch {results['best_epoch']})")
        return 0

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return cli.run_cli(work, parser.prog, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
