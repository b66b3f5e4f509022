"""One process of a multi-process test: `python tests/multiprocess_worker.py SCENARIO PID NPROC PORT OUT`.

Run as NPROC processes on 127.0.0.1 (4 fake CPU devices each, set by the caller through XLA_FLAGS), or as a
single process with all devices, so that tests/test_distributed.py can compare the two.

Scenarios:
  steps     three sharded train steps (data x fsdp mesh across the processes) on a fixed global batch;
            process 0 writes the gathered params to OUT/params.npz.
  disjoint  three batches from the input pipeline; each process writes hashes of the rows it read.
  train     the training loop's pretraining of the runlocal preset into the shared workdir OUT/workdir (2 steps).
  probes    the pretraining probes (evaluators/probes.py) of a random encoder on the converted benchmark in
            OUT/bench, every process extracting its rows; process 0 writes the features and the scores.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import jax
import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import pretrain as pretrain_configs
from tests.helpers import pretrain_setup
from usf_mae_jax.core import sharding
from usf_mae_jax.data import pipeline
from usf_mae_jax.trainers import loop
from usf_mae_jax.trainers.pretrain import PretrainTask


def tiny_config() -> ml_collections.ConfigDict:
    config = pretrain_configs.get_config("demo,runlocal")
    config.optimizer.eps = 1e-3  # see test_pretrain: keeps zero-gradient params from amplifying float noise
    config.mesh.fsdp, config.mesh.fsdp_min_size = 2, 64
    config.vis_steps, config.total_steps, config.ckpt_steps = 0, 2, 2
    return config


def run_steps(out: str) -> None:
    config = tiny_config()
    mesh = sharding.make_mesh(config.mesh)
    setup = pretrain_setup(config, mesh)
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 1), dtype=np.uint8)
    batch_sharding = sharding.batch_sharding(mesh)
    train_state = setup.init()
    for _ in range(3):
        batch = {"image": jax.make_array_from_callback(images.shape, batch_sharding, lambda idx: images[idx])}
        train_state, _ = setup.train_step(train_state, batch)
    from jax.experimental import multihost_utils

    params = multihost_utils.process_allgather(train_state["params"], tiled=True)
    if jax.process_index() == 0:
        flat = {jax.tree_util.keystr(p, simple=True, separator="/"): np.asarray(v)
                for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
        np.savez(os.path.join(out, "params.npz"), **flat)


def run_disjoint(out: str) -> None:
    config = tiny_config()
    mesh = sharding.make_mesh(config.mesh)
    data = pipeline.make_pretrain_iterator(config.input, global_batch_size=8, img_size=32, seed=0, mesh=mesh)
    hashes = []
    for _ in range(3):
        batch = next(data)
        for shard in batch["image"].addressable_shards:
            hashes += [hashlib.sha1(np.asarray(row).tobytes()).hexdigest() for row in np.asarray(shard.data)]
    with open(os.path.join(out, f"rows_{jax.process_index()}.json"), "w") as f:
        json.dump(sorted(set(hashes)), f)


def run_train(out: str) -> None:
    config = tiny_config()
    summary = loop.run(config, os.path.join(out, "workdir"), PretrainTask(config))
    with open(os.path.join(out, f"train_{jax.process_index()}.json"), "w") as f:
        json.dump({"final_step": summary["final_step"], "losses": summary["losses"]}, f)


def run_probes(out: str) -> None:
    from flax import nnx

    from usf_mae_jax.evaluators import probes
    from usf_mae_jax.models import vit
    from usf_mae_jax.models.mae import MaskedAutoencoder

    config = tiny_config()
    config.evals.update(sets="busbra:1", data_dir=os.path.join(out, "bench"), batch_size=8)
    config.mesh.update(data=-1, fsdp=1)
    mesh = sharding.make_mesh(config.mesh)
    model_config = vit.config_from_block(config.model)
    graphdef, params = nnx.split(MaskedAutoencoder(model_config, rngs=nnx.Rngs(0)))
    evaluator = probes.ProbeEvaluator(config.evals, graphdef, model_config, mesh)
    features = evaluator.features(params, evaluator.sets[0].score)
    scores = evaluator(params)
    evaluator.close()
    if jax.process_index() == 0:
        np.save(os.path.join(out, f"features_{jax.process_count()}.npy"), features)
        with open(os.path.join(out, f"scores_{jax.process_count()}.json"), "w") as f:
            json.dump(scores, f)


def main() -> None:
    scenario, pid, nproc, port, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    jax.config.update("jax_threefry_partitionable", True)
    if nproc > 1:
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc, process_id=pid,
                                   initialization_timeout=120)
    {"steps": run_steps, "disjoint": run_disjoint, "train": run_train, "probes": run_probes}[scenario](out)
    if nproc > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
