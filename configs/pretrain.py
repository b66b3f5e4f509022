"""Pretraining configs: `--config=configs/pretrain.py:PRESET[,key=value,...]`.

Presets:
  demo      a small MAE on synthetic ultrasound held in memory; finishes on a laptop CPU in a few minutes.
  usf_mae   the USF-MAE recipe (docs/usf_mae_recipe.md): ViT-B/16, raw-pixel targets, AdamW with PyTorch's
            default betas, decay on every parameter, clipping at 1.0, bf16, 10% warmup; continue from the
            ImageNet MAE weights with --config.init=mae_pretrain_vit_base_full.pth.
  mae_in1k  the reference MAE recipe (facebookresearch/mae PRETRAIN.md): norm-pix targets, betas (0.9, 0.95),
            no decay on 1-D params and biases, 40 warmup epochs, batch 4096.

Preset arguments: variant (the model size: mu|tiny|small|base|large|huge), img_size, batch_size, and
`runlocal`, which shrinks any preset (a mu model, synthetic data, a few steps) so that it runs on a CPU in
seconds.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from configs import common

PRESETS = {
    "demo": "small MAE on synthetic ultrasound, CPU, a few minutes (the default)",
    "usf_mae": "the USF-MAE recipe: ViT-B/16 224 px, raw-pixel targets, from the ImageNet MAE weights",
    "mae_in1k": "the reference MAE recipe: norm-pix targets, batch 4096, 800 epochs",
}
ARGUMENTS = "variant=mu|tiny|small|base|large|huge, img_size=N, batch_size=N, runlocal"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = common.parse_arg(arg, preset="demo", variant="", img_size=0, batch_size=0, runlocal=False)
    if args.preset not in PRESETS:
        raise ValueError(f"unknown pretrain preset {args.preset!r}; choose one of {', '.join(PRESETS)}")
    common.check_runlocal(args, "variant", "img_size", "batch_size")

    c = ml_collections.ConfigDict()
    c.task = "pretrain"
    c.preset = args.preset
    c.seed = 0
    c.update(common.duration_fields())
    c.batch_size = 64  # global batch per optimizer micro-step
    c.grad_accum_steps = 1  # optax.MultiSteps; the effective batch is batch_size * grad_accum_steps
    c.model = common.model_block("base", 224)
    c.input = common.input_block()
    c.mesh = common.mesh_block()
    c.optimizer = ml_collections.ConfigDict({
        "blr": 1.5e-4,
        "lr": config_dict.placeholder(float),  # absolute peak lr; when set, blr is ignored
        "lr_batch_denominator": 256,  # lr = blr * effective_batch / lr_batch_denominator
        "b1": 0.9,
        "b2": 0.95,
        "eps": 1e-8,
        "weight_decay": 0.05,
        "wd_mask": "reference",  # reference: no decay on 1-D params and biases | all: decay everything
        "min_lr": 0.0,
        "clip_grad_norm": 0.0,  # 0 disables global-norm clipping
    })
    # Pretrained weights loaded when the run starts (not when it resumes): a .pth/.pt/.safetensors, an interop
    # import directory or another workdir.
    c.init = config_dict.placeholder(str)
    c.log_steps = 20
    c.ckpt_steps = 1000
    c.ckpt_minutes = 30.0  # also a checkpoint every 30 minutes of wall time, and at least one per tenth of the run
    c.keep_ckpts = 3
    c.vis_steps = 1000  # every vis_steps a PNG grid: input | masked | reconstruction
    c.vis_count = 4
    # Probes of the encoder during pretraining (usf_mae_jax/evaluators/probes.py): every eval_steps (and at
    # step 0) ridge and k-NN probes on labelled sets, logged to TensorBoard and workdir/evals.jsonl.
    c.evals = ml_collections.ConfigDict({
        "sets": "",  # converted benchmarks under evals.data_dir: "busbra:1,gist514:0@raw"; '' = no probes
        "data_dir": "",
        "fit_split": "train",
        "score_split": "validation",
        "pool": "mean",  # mean of the patch tokens after norm | cls | blocks (every block's mean, averaged)
        "knn_k": 20,
        "ridge_l2": 1e-3,
        "batch_size": 128,
    })

    if args.preset == "demo":
        c.model = common.model_block("tiny", 64, patch_size=8, depth=4, decoder_depth=1)
        # `eval` is a nearest resize to img_size: a no-op on the synthetic frames, which are made at that size,
        # and what lets the demo run on one's own shards of any frame size (--config.input.source=shards).
        c.input = common.input_block(source="synthetic", synthetic_count=2048, augment="eval")
        c.batch_size = 32
        c.total_steps = 300
        c.warmup_fraction = 0.1
        c.optimizer.lr = 1e-3  # a tiny model on a tiny set tolerates a larger lr than blr * 32 / 256
        c.log_steps, c.ckpt_steps, c.vis_steps = 10, 100, 100
    elif args.preset == "usf_mae":
        # docs/usf_mae_recipe.md: base/16 at 224 from the ImageNet MAE "full" checkpoint, raw-pixel targets.
        c.model.norm_pix_loss = False
        c.model.dtype = "bfloat16"  # the authors train under bf16 autocast
        c.input = common.input_block(source="shards", augment="usf_mae")
        c.batch_size = 64
        c.total_epochs = 100.0
        c.warmup_fraction = 0.1  # linear warmup over 10% of all steps
        c.optimizer.update(
            blr=3e-4,  # grid {3e-4, 1e-3}
            lr_batch_denominator=128,  # the notebook scales by 128/256 at batch 64, i.e. blr * 64 / 128
            b1=0.9, b2=0.999, eps=1e-8,  # torch.optim.AdamW defaults
            weight_decay=0.05,  # grid {0.01, 0.05}
            wd_mask="all",  # the notebook decays every parameter
            min_lr=1e-5,
            clip_grad_norm=1.0)
    else:
        # facebookresearch/mae PRETRAIN.md: ViT-B, 800 epochs, batch 4096, blr 1.5e-4, warmup 40, norm-pix.
        c.model.norm_pix_loss = True
        c.model.dtype = "bfloat16"
        c.input = common.input_block(source="shards", augment="mae")
        c.batch_size = 4096
        c.total_epochs = 800.0
        c.warmup_epochs = 40.0
        c.optimizer.update(blr=1.5e-4, lr_batch_denominator=256, b1=0.9, b2=0.95, weight_decay=0.05,
                           wd_mask="reference", min_lr=0.0, clip_grad_norm=0.0)

    # Field-of-view-aware masking (models/mae.py, docs/transfer_study.md): patches whose largest uint8 value is
    # at most fov_threshold are out of view, left out of the loss and never visible. Off in every recipe.
    c.model.fov_masking = False
    c.model.fov_threshold = 0

    if args.variant:
        c.model.variant = args.variant
    if args.img_size:
        c.model.img_size = args.img_size
    if args.batch_size:
        c.batch_size = args.batch_size
    if args.runlocal:
        c.model.update(variant="mu", img_size=32, patch_size=8, dtype="float32", width=None, depth=None, heads=None,
                       decoder_width=None, decoder_depth=None, decoder_heads=None)
        c.input.update(source="synthetic", synthetic_count=64, augment="none")
        c.batch_size = 8
        for field in ("total_epochs", "warmup_epochs", "warmup_fraction", "warmup_steps"):
            c[field] = None
        c.total_steps, c.warmup_steps = 4, 1
        c.log_steps, c.ckpt_steps, c.vis_steps = 1, 2, 2
    return c
