"""Linear probing (`config.method='linear'`): frozen encoder, features computed once, BN + Linear head, LARS.

Reference behaviour (facebookresearch/mae `main_linprobe.py`, summarised in mae_fidelity.md):

  * the encoder is frozen; its feature is the cls token after `norm` (`model.global_pool=False`, the
    default) or the mean patch token after `fc_norm`. Since nothing upstream of the head trains, the features
    of every split are computed once, with the evaluation transform, and cached (in memory, and in
    `W/features.npz` when `keep_features`), so the 90 epochs only touch a (N, D) matrix;
  * the head is `LinearProbeHead`: BatchNorm without affine (eps 1e-6, PyTorch momentum 0.1) then a Linear
    initialised with trunc_normal(std 0.01);
  * LARS (optax.lars) with momentum 0.9, weight decay 0, trust coefficient 0.001, the trust ratio and decay
    skipped for 1-D parameters (the reference `LARS` excludes them), lr = blr * batch / 256 with blr 0.1,
    linear warmup (10 epochs) then cosine, per step. optax applies the lr before the momentum trace while the
    reference applies it after; the two agree whenever the lr is constant and differ only in how the
    warmup and decay are spread over the momentum's memory.

The best head by validation macro-F1 is kept and saved to `W/checkpoints`; the test split is evaluated once
with it.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from usf_mae_jax.models import classifier, vit
from usf_mae_jax.train import checkpoint, downstream, metrics, optim, reporting, sharding
from usf_mae_jax.train.finetune import _split_name, build_classifier, plan_training

log = logging.getLogger(__name__)


def make_lars(opt_cfg: Any, schedule, params: Any) -> optax.GradientTransformation:
    """optax.lars with the reference's exclusions: no decay and no trust ratio on 1-D parameters."""
    if opt_cfg.name != "lars":
        raise ValueError(f"linear probing uses optimizer.name='lars', got {opt_cfg.name!r}")
    matrices = jax.tree.map(lambda p: p.ndim > 1, params)
    return optax.lars(schedule, weight_decay=float(opt_cfg.weight_decay), weight_decay_mask=matrices,
                      trust_coefficient=float(opt_cfg.trust_coefficient), eps=0.0, trust_ratio_mask=matrices,
                      momentum=float(opt_cfg.momentum))


def extract_features(config: Any, data: downstream.BenchmarkData, init: downstream.InitInfo, mesh,
                     maker: downstream.BatchMaker) -> tuple[dict[str, np.ndarray], float]:
    """{split: (N, D) float32 features} from the frozen encoder, and the extraction rate in images/s
    (decode, resize and forward pass; compilation excluded)."""
    encoder = build_classifier(config, init, len(data.class_names))
    graphdef, params = nnx.split(encoder)
    params = jax.device_put(params, sharding.replicated(mesh))
    in_chans = init.model_config.in_chans
    features_fn = jax.jit(lambda p, images: nnx.merge(graphdef, p).forward_features(
        vit.normalize_images(images, in_chans)), out_shardings=sharding.replicated(mesh))
    batch = downstream.eval_batch_size(config.eval_batch_size, mesh)
    size = init.model_config.img_size
    blank = np.zeros((batch, size, size, data.channels), np.uint8)[downstream.local_rows(batch)]
    warm = maker.to_global({"image": blank})
    jax.block_until_ready(features_fn(params, warm["image"]))  # compile off the clock
    started, count, features = time.perf_counter(), 0, {}
    for name, split in data.splits.items():
        features[name] = downstream.predict(lambda x: features_fn(params, x), split, maker, batch)
        count += len(split)
    rate = count / max(time.perf_counter() - started, 1e-9)
    log.info("linear probe: features %s in %.1f images/s", {k: v.shape for k, v in features.items()}, rate)
    return features, rate


def train_linear(config: Any, workdir: str, data: downstream.BenchmarkData,
                 init: downstream.InitInfo) -> dict:
    """The linear-probe loop; returns the same summary as `finetune.train_full`."""
    mesh = sharding.make_mesh(config.mesh)
    train, num_classes = data.splits["train"], len(data.class_names)
    plan = plan_training(config, len(train), mesh)
    maker = downstream.BatchMaker(mesh, init.model_config.img_size, data.channels, config.input.num_threads)
    started = time.perf_counter()
    try:
        features, extract_rate = extract_features(config, data, init, mesh, maker)
    finally:
        maker.close()
    if config.keep_features and jax.process_index() == 0:
        np.savez(os.path.join(workdir, "features.npz"),
                 **{f"{k}_features": v for k, v in features.items()},
                 **{f"{k}_ids": np.asarray(s.ids) for k, s in data.splits.items()},
                 **{f"{k}_labels": s.labels for k, s in data.splits.items()})

    head = classifier.LinearProbeHead(features["train"].shape[1], num_classes, nnx.Rngs(config.seed))
    graphdef, params, stats = nnx.split(head, nnx.Param, nnx.BatchStat)
    params, stats = nnx.to_pure_dict(params), nnx.to_pure_dict(stats)
    schedule = optim.warmup_cosine(plan["peak_lr"], plan["total_steps"], plan["warmup_steps"],
                                   config.optimizer.min_lr)
    tx = make_lars(config.optimizer, schedule, params)
    plan.update(num_classes=num_classes, feature_images_per_s=extract_rate)
    downstream.write_run_config(workdir, config, init.model_config, plan)
    replicated = sharding.replicated(mesh)
    state = jax.device_put({"step": jnp.zeros((), jnp.int32), "params": params, "stats": stats,
                            "opt_state": tx.init(params)}, replicated)
    smoothing = float(config.label_smoothing)

    def loss_fn(params_, stats_, x, labels):
        model = nnx.merge(graphdef, params_, stats_)
        model.train()
        logits = model(x)
        targets = jax.nn.one_hot(labels, num_classes) * (1 - smoothing) + smoothing / num_classes
        loss = -(targets * jax.nn.log_softmax(logits)).sum(-1).mean()
        return loss, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))

    def train_step(state_, x, labels):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, new_stats), grads = grad_fn(state_["params"], state_["stats"], x, labels)
        updates, opt_state = tx.update(grads, state_["opt_state"], state_["params"])
        return {"step": state_["step"] + 1, "params": optax.apply_updates(state_["params"], updates),
                "stats": new_stats, "opt_state": opt_state}, {"loss": loss, "lr": schedule(state_["step"])}

    def predict(params_, stats_, x):
        model = nnx.merge(graphdef, params_, stats_)
        model.eval()
        return jax.nn.softmax(model(x))

    batch_sharding = sharding.batch_sharding(mesh)
    step_fn = jax.jit(train_step, donate_argnums=(0,), out_shardings=(replicated, replicated))
    predict_fn = jax.jit(predict, out_shardings=replicated)
    rows = downstream.local_rows(config.batch_size)

    def to_global(values: np.ndarray) -> jax.Array:
        return jax.make_array_from_process_local_data(batch_sharding, values)

    sampling = (downstream.class_probabilities(train.labels, num_classes) if config.class_balance == "sampler"
                else None)
    if config.class_balance == "loss":
        raise ValueError("class_balance='loss' is not offered for the linear probe; use 'sampler'")
    writer = reporting.MetricWriter(workdir)
    history, best, best_epoch, best_state, step = [], -1.0, 0, None, 0
    head_started = time.perf_counter()
    try:
        for epoch in range(plan["epochs"]):
            steps = min(plan["steps_per_epoch"], plan["total_steps"] - step)
            indices = downstream.epoch_indices(len(train), steps, config.batch_size, config.seed, epoch,
                                               sampling)
            for batch_indices in indices:
                local = batch_indices[rows]
                state, step_metrics = step_fn(state, to_global(features["train"][local]),
                                              to_global(train.labels[local].astype(np.int32)))
                step += 1
                if step % config.log_steps == 0 or step == plan["total_steps"]:
                    writer.scalars(step, {k: float(v) for k, v in jax.device_get(step_metrics).items()})
            probs = np.asarray(predict_fn(state["params"], state["stats"], features["validation"]))
            val = metrics.classification_results(data.splits["validation"].labels, probs, data.class_names,
                                                 "validation")
            history.append({"epoch": epoch + 1, "step": step, **{k: val[k] for k in metrics.SCALAR_KEYS}})
            if val["f1_macro"] > best:
                best, best_epoch = val["f1_macro"], epoch + 1
                best_state = jax.tree.map(jnp.copy, {"params": state["params"], "stats": state["stats"]})
        head_seconds = time.perf_counter() - head_started
        probs = np.asarray(predict_fn(best_state["params"], best_state["stats"], features["test"]))
        test = metrics.classification_results(data.splits["test"].labels, probs, data.class_names,
                                              _split_name(config, "test"))
        saver = checkpoint.Checkpointer(workdir, keep=1, async_save=False)
        saver.save(best_epoch, {"step": jnp.asarray(best_epoch, jnp.int32), **best_state}, None, force=True)
        saver.close()
    finally:
        writer.close()
    seconds = time.perf_counter() - started
    log.info("linear probe: best validation macro-F1 %.4f at epoch %d; test macro-F1 %.4f; %.1f s "
             "(head %.1f s)", best, best_epoch, test["f1_macro"], seconds, head_seconds)
    return {"results": test, "history": history, "best_epoch": best_epoch, "best_validation_f1": best,
            "seconds": seconds, "images_per_s": extract_rate, "steps": step, "head_seconds": head_seconds}
