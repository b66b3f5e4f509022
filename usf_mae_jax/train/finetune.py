"""Full fine-tuning of a ViT classifier on a downstream benchmark: `run(config, workdir)`.

    python launch.py --config=configs/finetune.py:busbra,mode=full,fold=1 --workdir W \
        --config.input.data_dir=OUT [--config.init=PATH]

`run` dispatches on `config.method`: `full` here, `linear` in `linear_probe.py`. The full recipe is the
reference MAE fine-tune (mae_fidelity.md), every value set in configs/finetune.py:

  * `ViTClassifier` (global pool + fc_norm, or the cls token), drop path on the blocks' linear schedule;
  * the position table is a learned parameter initialised from the init's table (the fixed sin-cos table of
    an MAE), resized bicubically when the init was trained at another image size;
  * AdamW (betas 0.9/0.999, wd 0.05 without 1-D params, biases, pos_embed, cls_token), layer-wise lr decay
    applied to the lr and the decoupled decay together, linear warmup then cosine to `min_lr`, per step;
  * soft-target cross-entropy with label smoothing; optional mixup/cutmix (off by default) and class
    balancing (loss weights or sampling);
  * the step is `jit`ted with the state donated and sharded like pretraining (state.py); the step key is
    `fold_in(key(seed), step)`, split into drop-path and mixup streams (DESIGN.md, "Randomness").

After every epoch the validation split is evaluated; the state with the best validation macro-F1 is kept (on
device) and saved to `W/checkpoints` (params only, so W is itself a valid `init`). The test split is evaluated
once, with that state, into `W/results.json` and `W/confusion_matrix.png`; `W/splits.json` lists the
records of each split, `W/provenance.json` the init and its pretraining manifests, `W/history.json` the
per-epoch validation metrics. A workdir that already holds a finished run is refused rather than overwritten.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from configs import common
from usf_mae_jax.models import classifier, vit
from usf_mae_jax.train import checkpoint, downstream, layer_decay, metrics, optim, reporting, sharding

log = logging.getLogger(__name__)

DROP_PATH_STREAM, MIX_STREAM = 0, 1


# ------------------------------------------------------------------------------------------ loss and mixing


def soft_targets(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    """One-hot targets with label smoothing: 1 - s + s/C on the label, s/C elsewhere (timm's convention)."""
    off = smoothing / num_classes
    return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def mix_batch(images: jax.Array, targets: jax.Array, key: jax.Array,
              mix_cfg: Any) -> tuple[jax.Array, jax.Array]:
    """Batch-level mixup / cutmix with the batch's reverse as partner (timm `Mixup`, mode 'batch').

    With probability `prob` a mix happens; when both alphas are positive, cutmix is picked with
    probability `switch_prob`. Cutmix's lambda is corrected to the pasted box's true area.
    """
    mixup_alpha, cutmix_alpha = float(mix_cfg.mixup_alpha), float(mix_cfg.cutmix_alpha)
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return images, targets
    k_apply, k_switch, k_mix, k_cut, k_y, k_x = jax.random.split(key, 6)
    apply = jax.random.bernoulli(k_apply, float(mix_cfg.prob))
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = jax.random.bernoulli(k_switch, float(mix_cfg.switch_prob))
    else:
        use_cutmix = jnp.asarray(cutmix_alpha > 0)
    lam_mix = jax.random.beta(k_mix, max(mixup_alpha, 1e-3), max(mixup_alpha, 1e-3))
    lam_cut = jax.random.beta(k_cut, max(cutmix_alpha, 1e-3), max(cutmix_alpha, 1e-3))
    height, width = images.shape[1:3]
    ratio = jnp.sqrt(1.0 - lam_cut)
    cut_h, cut_w = (ratio * height).astype(jnp.int32), (ratio * width).astype(jnp.int32)
    cy = jax.random.randint(k_y, (), 0, height)
    cx = jax.random.randint(k_x, (), 0, width)
    y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
    x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
    rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
    box = ((rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1))[None, :, :, None]
    lam_box = 1.0 - ((y1 - y0) * (x1 - x0)) / (height * width)
    partner = images[::-1]
    mixed = jnp.where(use_cutmix, jnp.where(box, partner, images), lam_mix * images + (1 - lam_mix) * partner)
    lam = jnp.where(apply, jnp.where(use_cutmix, lam_box, lam_mix), 1.0)
    images = jnp.where(apply, mixed, images)
    return images, lam * targets + (1.0 - lam) * targets[::-1]


def weighted_cross_entropy(logits: jax.Array, targets: jax.Array, class_weights: jax.Array) -> jax.Array:
    """Mean soft-target cross-entropy; each example weighted by its target's class weight (1 when balanced
    weights are off), normalised by the weights' sum as torch's weighted CrossEntropyLoss does."""
    per_example = -(targets * jax.nn.log_softmax(logits.astype(jnp.float32))).sum(-1)
    weights = targets @ class_weights
    return (per_example * weights).sum() / jnp.maximum(weights.sum(), 1e-12)


# ------------------------------------------------------------------------------------------- optimizer


def make_optimizer(opt_cfg: Any, schedule, params: Any, depth: int,
                   decay: float) -> optax.GradientTransformation:
    """[clip] -> AdamW(schedule, fine-tune wd mask) -> per-parameter layer-decay scale (lr and wd at once)."""
    if opt_cfg.name != "adamw":
        raise ValueError(f"full fine-tuning uses optimizer.name='adamw', got {opt_cfg.name!r}")
    parts = []
    if opt_cfg.clip_grad_norm and opt_cfg.clip_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(opt_cfg.clip_grad_norm))
    parts.append(optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                             weight_decay=opt_cfg.weight_decay, mask=layer_decay.weight_decay_mask(params)))
    parts.append(layer_decay.scale_by_tree(layer_decay.lr_scales(params, depth, decay)))
    return optax.chain(*parts)


# ------------------------------------------------------------------------------------------------ plan


def plan_training(config: Any, num_train: int, mesh) -> dict[str, Any]:
    """Steps per epoch, total and warmup steps, and the peak lr; errors name the offending setting."""
    dp = sharding.data_parallel_size(mesh)
    if config.batch_size % dp:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by the data-parallel size {dp}")
    steps_per_epoch = max(num_train // config.batch_size, 1)
    total_steps = common.resolve_steps(config, "total", steps_per_epoch)
    if total_steps < 1:
        raise ValueError(f"the run has {total_steps} steps; raise total_epochs/total_steps")
    warmup = min(common.resolve_steps(config, "warmup", steps_per_epoch, total_steps), total_steps)
    return dict(steps_per_epoch=steps_per_epoch, total_steps=total_steps, warmup_steps=warmup,
                epochs=-(-total_steps // steps_per_epoch),
                peak_lr=optim.peak_learning_rate(config.optimizer, config.batch_size))


def check_fresh_workdir(workdir: str) -> None:
    """Refuses a workdir holding a finished run or checkpoints: fine-tuning does not resume or overwrite."""
    existing = [p for p in ("results.json", "checkpoints") if os.path.exists(os.path.join(workdir, p))]
    if existing and (existing != ["checkpoints"] or os.listdir(os.path.join(workdir, "checkpoints"))):
        raise ValueError(f"workdir {workdir} already holds a fine-tune run ({', '.join(existing)}); use a "
                         "fresh --workdir (fine-tuning restarts from the init, it does not resume)")


# ------------------------------------------------------------------------------------------------ model


def build_classifier(config: Any, init: downstream.InitInfo, num_classes: int) -> classifier.ViTClassifier:
    """The classifier with the init's encoder weights (and its position table, resized) loaded."""
    model = classifier.ViTClassifier(init.model_config, num_classes, nnx.Rngs(config.seed),
                                     global_pool=bool(config.model.global_pool),
                                     drop_path_rate=float(config.model.drop_path))
    if init.params is not None:
        report = classifier.load_encoder_params(model, init.params, init.source_img_size)
        log.info("init: loaded %d tensors, fresh %s, ignored %d (%s)", len(report["loaded"]), report["fresh"],
                 len(report["ignored"]), report["ignored"][:4])
    return model


def evaluate_split(predict_fn, data: downstream.SplitData, maker, batch: int, names, split: str) -> dict:
    probs = downstream.predict(predict_fn, data, maker, batch)
    return metrics.classification_results(data.labels, probs, names, split)


def create_state(config: Any, model_config: vit.ModelConfig, params: dict, tx, mesh) -> tuple[dict, Any]:
    """The sharded train state {step, params, opt_state}, created on the mesh (never on one device)."""
    def fresh(p):
        return {"step": jnp.zeros((), jnp.int32), "params": p, "opt_state": tx.init(p)}

    shardings = sharding.tree_shardings(jax.eval_shape(fresh, params), mesh, config.mesh.fsdp_min_size)
    state = jax.jit(fresh, out_shardings=shardings)(jax.device_put(params, shardings["params"]))
    return state, shardings


def make_step_functions(config: Any, graphdef, model_config: vit.ModelConfig, tx, schedule, shardings,
                        batch_sharding, class_weights: np.ndarray, num_classes: int):
    """(train_step, predict): jitted; the step donates the state, predict returns replicated probabilities."""
    smoothing, in_chans, seed = float(config.label_smoothing), model_config.in_chans, int(config.seed)
    weights = jnp.asarray(class_weights)
    mesh = batch_sharding.mesh

    def loss_fn(params, images, targets, key):
        logits = nnx.merge(graphdef, params)(images, rng=key)
        return weighted_cross_entropy(logits, targets, weights)

    def train_step(state, batch):
        key = jax.random.fold_in(jax.random.key(seed), state["step"])
        images = vit.normalize_images(batch["image"], in_chans)
        targets = soft_targets(batch["label"], num_classes, smoothing)
        images, targets = mix_batch(images, targets, jax.random.fold_in(key, MIX_STREAM), config.mixup)
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], images, targets,
                                                 jax.random.fold_in(key, DROP_PATH_STREAM))
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new = {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
               "opt_state": opt_state}
        return new, {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state["step"])}

    def predict(params, images):
        return jax.nn.softmax(nnx.merge(graphdef, params)(vit.normalize_images(images, in_chans)))

    batch_shardings = {"image": batch_sharding, "label": batch_sharding}
    step_fn = jax.jit(train_step, in_shardings=(shardings, batch_shardings),
                      out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))
    return step_fn, jax.jit(predict, out_shardings=sharding.replicated(mesh))


def train_full(config: Any, workdir: str, data: downstream.BenchmarkData, init: downstream.InitInfo) -> dict:
    """The fine-tune loop; returns {'results', 'history', 'best_epoch', 'seconds', 'images_per_s', ...}.

    `images_per_s` counts training steps only: the first step (compilation) and the per-epoch validation
    are excluded from the clock.
    """
    jax.config.update("jax_threefry_partitionable", True)
    mesh = sharding.make_mesh(config.mesh)
    train, num_classes = data.splits["train"], len(data.class_names)
    if config.class_balance not in ("none", "loss", "sampler"):
        raise ValueError(f"class_balance must be none, loss or sampler, got {config.class_balance!r}")
    plan = plan_training(config, len(train), mesh)
    model_config = init.model_config
    graphdef, params = nnx.split(build_classifier(config, init, num_classes))
    params = nnx.to_pure_dict(params)
    decay = downstream.layer_decay_for(config.optimizer, model_config)
    schedule = optim.warmup_cosine(plan["peak_lr"], plan["total_steps"], plan["warmup_steps"],
                                   config.optimizer.min_lr)
    tx = make_optimizer(config.optimizer, schedule, params, model_config.depth, decay)
    plan.update(layer_decay=decay, num_classes=num_classes)
    downstream.write_run_config(workdir, config, model_config, plan)
    log.info("fine-tune %s: %s params; plan %s", config.dataset,
             f"{sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)):,}", plan)
    state, shardings = create_state(config, model_config, params, tx, mesh)
    del params
    maker = downstream.BatchMaker(mesh, model_config.img_size, data.channels, config.input.num_threads)
    balanced = config.class_balance == "loss"
    class_weights = (downstream.class_loss_weights(train.labels, num_classes) if balanced
                     else np.ones(num_classes, np.float32))
    step_fn, predict_fn = make_step_functions(config, graphdef, model_config, tx, schedule, shardings,
                                              maker.sharding, class_weights, num_classes)
    eval_batch = downstream.eval_batch_size(config.eval_batch_size, mesh)
    transform = downstream.make_train_augment(config.input, model_config.img_size)
    sampling = (downstream.class_probabilities(train.labels, num_classes) if config.class_balance == "sampler"
                else None)
    rows, seed = downstream.local_rows(config.batch_size), int(config.seed)
    writer = reporting.MetricWriter(workdir)
    progress = reporting.Progress(0, plan["total_steps"])
    history, best, best_epoch, best_params = [], -1.0, 0, None
    step, timed_steps, train_seconds = 0, 0, 0.0
    try:
        for epoch in range(plan["epochs"]):
            steps = min(plan["steps_per_epoch"], plan["total_steps"] - step)
            indices = downstream.epoch_indices(len(train), steps, config.batch_size, seed, epoch, sampling)
            clock = time.perf_counter()
            for batch_indices in indices:
                local = batch_indices[rows]
                host = {"image": maker.images(train, local, transform, seed, epoch),
                        "label": train.labels[local].astype(np.int32)}
                state, step_metrics = step_fn(state, maker.to_global(host))
                step += 1
                if step == 1:  # compilation and the first step stay off the clock
                    jax.block_until_ready(state)
                    clock = time.perf_counter()
                else:
                    timed_steps += 1
                if step % config.log_steps == 0 or step == plan["total_steps"]:
                    values = jax.device_get(step_metrics)
                    if not np.isfinite(values["loss"]):
                        raise FloatingPointError(f"non-finite loss {values['loss']} at step {step}")
                    progress.update(step, float(values["loss"]))
                    writer.scalars(step, {k: float(v) for k, v in values.items()})
            jax.block_until_ready(state)
            train_seconds += time.perf_counter() - clock
            params_now = state["params"]
            val = evaluate_split(lambda x, p=params_now: predict_fn(p, x), data.splits["validation"], maker,
                                 eval_batch, data.class_names, "validation")
            history.append({"epoch": epoch + 1, "step": step, **{k: val[k] for k in metrics.SCALAR_KEYS}})
            writer.scalars(step, {f"val_{k}": val[k] for k in ("f1_macro", "accuracy", "mcc")})
            if val["f1_macro"] > best:
                best, best_epoch = val["f1_macro"], epoch + 1
                best_params = jax.tree.map(jnp.copy, state["params"])
        test = evaluate_split(lambda x: predict_fn(best_params, x), data.splits["test"], maker, eval_batch,
                              data.class_names, _split_name(config, "test"))
        saver = checkpoint.Checkpointer(workdir, keep=1, async_save=False)
        saver.save(best_epoch, {"step": jnp.asarray(best_epoch, jnp.int32), "params": best_params}, None,
                   force=True)
        saver.close()
    finally:
        maker.close()
        progress.close()
        writer.close()
    images_per_s = timed_steps * config.batch_size / train_seconds if train_seconds > 0 else float("nan")
    log.info("best validation macro-F1 %.4f at epoch %d; test macro-F1 %.4f; training %.1f s, %.1f images/s",
             best, best_epoch, test["f1_macro"], train_seconds, images_per_s)
    return {"results": test, "history": history, "best_epoch": best_epoch, "best_validation_f1": best,
            "seconds": train_seconds, "images_per_s": images_per_s, "steps": step}


def _split_name(config: Any, split: str) -> str:
    fold = "default" if config.fold is None else config.fold
    variant = f"/{config.variant}" if config.variant else ""
    return f"{config.dataset}{variant}/fold{fold}/{split}"


def run(config: Any, workdir: str) -> dict:
    """Fine-tunes (`config.method='full'`) or linear-probes (`'linear'`) and writes the run's files."""
    if config.method not in ("full", "linear"):
        raise ValueError(f"config.method must be full or linear, got {config.method!r}")
    check_fresh_workdir(workdir)
    data = downstream.load_benchmark(config)
    init = downstream.resolve_init(config)
    os.makedirs(workdir, exist_ok=True)
    downstream.write_membership(workdir, data)
    downstream.write_json(os.path.join(workdir, "provenance.json"), init.provenance)
    if config.method == "full":
        summary = train_full(config, workdir, data, init)
    else:
        from usf_mae_jax.train import linear_probe

        summary = linear_probe.train_linear(config, workdir, data, init)
    if jax.process_index() == 0:
        metrics.write_results(workdir, summary["results"], data.class_names)
    timing = {k: summary[k] for k in ("best_epoch", "best_validation_f1", "seconds", "images_per_s", "steps")}
    timing = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in timing.items()}
    downstream.write_json(os.path.join(workdir, "history.json"), {"history": summary["history"], **timing})
    return summary
