"""A toy task for testing the training loop alone: linear regression with a running-mean `extra` state.

    python tests/toy_task.py WORKDIR ['{"total_steps": 12, ...}']   # runs the loop, prints the summary JSON

Its validation score is scripted by the config (`scores[i]` at step (i + 1) * eval_steps), so best-state selection
is tested on a known answer; `poison_step` makes the loss NaN from that step on, to test the guard. The test
result holds the selected params, so `results.json` shows which state was tested.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from usf_mae_jax.core import optim
from usf_mae_jax.data import downstream
from usf_mae_jax.trainers import loop
from usf_mae_jax.trainers.task import Task

FEATURES, EXAMPLES = 4, 64


def toy_config(**overrides) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict({
        "task": "toy", "seed": 0, "init": None, "batch_size": 8, "grad_accum_steps": 1,
        "total_steps": 12, "total_epochs": None, "warmup_steps": 2, "warmup_epochs": None, "warmup_fraction": None,
        "eval_steps": 4, "eval_epochs": None, "log_steps": 1, "ckpt_steps": 4, "ckpt_minutes": 0.0, "keep_ckpts": 3,
        "optimizer": {"name": "adamw", "lr": 0.05, "blr": 0.0, "lr_batch_denominator": 256, "b1": 0.9, "b2": 0.999,
                      "eps": 1e-8, "weight_decay": 0.0, "wd_mask": "all", "clip_grad_norm": 0.0, "min_lr": 0.0},
        "mesh": {"data": -1, "fsdp": 1, "fsdp_min_size": 2**18},
        "scores": [0.1, 0.9, 0.4], "poison_step": -1, "fail_after_batches": -1, "seconds_per_batch": 0.0})
    config.update(overrides)
    return config


class ToyTask(Task):
    name = "toy"
    select_metric = "score"

    def prepare(self, mesh, workdir):
        rng = np.random.default_rng(0)
        self.x = rng.normal(size=(EXAMPLES, FEATURES)).astype(np.float32)
        self.y = (self.x @ np.arange(1, FEATURES + 1, dtype=np.float32)).astype(np.float32)

    def examples_per_epoch(self):
        return EXAMPLES

    def create_variables(self):
        return {"params": {"w": jnp.zeros(FEATURES), "b": jnp.zeros(())},
                "extra": {"mean_loss": jnp.zeros(()), "seen": jnp.zeros((), jnp.int32)}}

    def make_optimizer(self, schedule, params, plan):
        return optim.make_optimizer(self.config.optimizer, schedule, params)

    def loss_fn(self, params, extra, batch, key):
        pred = batch["x"] @ params["w"] + params["b"]
        loss = jnp.mean((pred - batch["y"]) ** 2)
        poison = self.config.poison_step
        if poison >= 0:
            loss = jnp.where(extra["seen"] >= poison, jnp.nan, loss)
        new_extra = {"mean_loss": 0.9 * extra["mean_loss"] + 0.1 * jax.lax.stop_gradient(loss),
                     "seen": extra["seen"] + 1}
        return loss, ({"noise": jax.random.uniform(key)}, new_extra)

    def batches(self, plan, mesh):
        def rows(indices, epoch):
            time.sleep(self.config.seconds_per_batch)  # a slow input, so that a test can kill the run midway
            return {"x": self.x[indices], "y": self.y[indices]}

        batches = downstream.EpochBatches(EXAMPLES, plan.batch_size, plan.steps_per_epoch, self.config.seed, rows,
                                          mesh)
        fail_after = int(self.config.fail_after_batches)
        return batches if fail_after < 0 else FailingBatches(batches, fail_after)

    def evaluate(self, variables, step):
        index = step // self.config.eval_steps - 1  # a function of the step, as a real evaluation is
        score = float(self.config.scores[index % len(self.config.scores)])
        return {"score": score, "w0": float(variables["params"]["w"][0])}

    def test(self, variables):
        return {"w": np.asarray(variables["params"]["w"]).tolist(),
                "mean_loss": float(variables["extra"]["mean_loss"])}


class FailingBatches:
    """Raises after `after` batches, as a crash in the middle of a run would."""

    def __init__(self, inner, after):
        self.inner, self.after, self.count = inner, after, 0

    def __next__(self):
        if self.count == self.after:
            raise RuntimeError("simulated crash")
        self.count += 1
        return next(self.inner)

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)

    def close(self):
        self.inner.close()


def run(workdir: str, **overrides) -> dict:
    config = toy_config(**overrides)
    return loop.run(config, workdir, ToyTask(config))


def params_of(summary: dict) -> dict:
    return jax.tree.map(np.asarray, summary["state"]["params"])


def main() -> None:
    overrides = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    summary = run(sys.argv[1], **overrides)
    print(json.dumps({"status": summary["status"], "final_step": summary["final_step"],
                      "start_step": summary["start_step"], "results": summary["results"]}), flush=True)


if __name__ == "__main__":
    main()
