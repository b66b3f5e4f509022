"""Downstream configs: `--config=configs/finetune.py:DATASET[,mode=full|linear,fold=K,...]`.

    python launch.py --config=configs/finetune.py:busbra,mode=full,fold=1 --workdir W \
        --config.input.data_dir=OUT [--config.init=PATH]

Preset arguments:
  dataset   busbra | mmotu | gist514 | busi | labelled (also the bare first word, e.g. `:busbra`); the
            converted benchmark lives under `input.data_dir` (the `--out_dir` of `python -m data_prep DATASET`).
  mode      full (task `finetune`: every weight trains) | linear (task `linear_probe`: frozen encoder,
            cached features, BN + Linear head).
  fold      the official round (BUS-BRA 1..5, GIST514-DB 0..4, MMOTU-2D / labelled 0; BUSI 1..K, its
            converter's image-level folds); -1 = the benchmark's default (the single fixed split of
            docs/usf_mae_recipe.md: BUS-BRA fold 1, GIST514-DB split 0; BUSI fold 1).
  subset    GIST514-DB's frames: roi (lesion crops, the default) or raw (full frames). BUSI's classes:
            three_class (benign, malignant, normal; the default) or benign_malignant (normal left out).
  variant   the model size (mu|tiny|small|base|large|huge) when the init does not fix it (random init).
  img_size  input resolution; any multiple of the patch size works with any init (the position table is
            resized bicubically when the init used another size).
  epochs    total epochs (overrides the recipe's).
  recipe    reference (default: the MAE fine-tune recipe, FINETUNE.md) | small_data (measured on real, small,
            imbalanced ultrasound, docs/real_data.md: lr 5e-4 at batch 32, no layer decay from scratch,
            class-weighted loss, selection that never picks a single-class collapse); full mode only.
  runlocal  shrink everything (mu model, 32 px, a few steps) so that a CPU runs it in seconds.

`init` is a pretraining or fine-tuning workdir (read-only), an interop import directory or a PyTorch
`.pth`/`.pt`/`.safetensors`; unset means random initialisation, which the run logs as a warning. When the init
records its architecture, the architecture comes from it and `model.img_size` from this config.

Recipe values are the reference MAE fine-tune and linear-probe recipes (facebookresearch/mae FINETUNE.md,
summarised in docs/usf_mae_recipe.md, "Reference MAE recipes"); the USF-MAE paper does not publish its
downstream recipe, so where the reference is tuned for ImageNet (batch, epochs, RandAugment), the ultrasound
choice is stated next to it.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from configs import common

DATASETS = ("busbra", "mmotu", "gist514", "busi", "labelled")
MODES = {"full": "finetune", "linear": "linear_probe"}
PRESETS = {
    "busbra": "BUS-BRA, benign vs malignant breast lesions (default; fold 1..5)",
    "mmotu": "MMOTU-2D, 8 ovarian tumour classes",
    "gist514": "GIST514-DB, GIST vs leiomyoma (fold 0..4, subset=roi|raw)",
    "busi": "BUSI, benign / malignant / normal (fold 1..5; subset=benign_malignant leaves normal out)",
    "labelled": "your own labelled set from `python -m data_prep labelled`",
}
ARGUMENTS = ("mode=full|linear, fold=K, subset=roi|raw|three_class|benign_malignant, variant=SIZE, img_size=N, "
             "epochs=N, recipe=reference|small_data, runlocal")
RECIPES = ("reference", "small_data")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = common.parse_arg(arg, preset="busbra", dataset="", mode="full", fold=-1, subset="", variant="",
                            img_size=0, epochs=0, recipe="reference", runlocal=False)
    dataset = args.dataset or args.preset
    if dataset not in DATASETS:
        raise ValueError(f"unknown fine-tune dataset {dataset!r}; choose one of {DATASETS}")
    if args.mode not in MODES:
        raise ValueError(f"unknown mode {args.mode!r}; choose full or linear")
    if args.recipe not in RECIPES:
        raise ValueError(f"unknown recipe {args.recipe!r}; choose one of {', '.join(RECIPES)}")
    common.check_runlocal(args, "variant", "img_size", "epochs")
    linear = args.mode == "linear"

    c = ml_collections.ConfigDict()
    c.task = MODES[args.mode]
    c.preset = dataset
    c.dataset = dataset
    c.fold = config_dict.placeholder(int)  # None: the benchmark's default round
    c.subset = config_dict.placeholder(str)  # GIST514-DB roi | raw, BUSI three_class | benign_malignant; None: default
    c.seed = 0
    c.init = config_dict.placeholder(str)  # None: random init (warned); else workdir | import dir | .pth
    c.update(common.duration_fields())
    # The reference fine-tunes ViT-B for 100 epochs (FINETUNE.md); the benchmarks are ~1-2k images, so an
    # epoch is a few steps and 100 epochs stays cheap.
    c.total_epochs = 100.0
    c.warmup_epochs = 5.0  # reference fine-tune: 5 warmup epochs
    c.eval_epochs = 1.0  # validation after every epoch selects the tested state
    c.batch_size = 64  # global; the reference uses 1024 on ImageNet, too large for a ~1k-image benchmark
    c.grad_accum_steps = 1
    c.eval_batch_size = 128
    c.model = common.model_block("base", 224)
    c.model.global_pool = True  # reference fine-tune: mean of patch tokens -> fc_norm -> head (False: cls + norm)
    c.model.drop_path = 0.1  # reference fine-tune: drop path 0.1 for ViT-B (0.2 for L, 0.3 for H, FINETUNE.md)
    c.input = ml_collections.ConfigDict({
        "data_dir": "",  # the converter's --out_dir (or the benchmark's version folder itself)
        # Training augmentation. flip_crop (default): nearest resize to img_size, RandomResizedCrop with
        # scale (0.5, 1) and ratio (3/4, 4/3) back to img_size (bilinear), horizontal flip p=0.5. The
        # reference's RandAugment m9 and random erasing are ImageNet colour/texture policies and are not
        # used on grayscale ultrasound. Also: the presets of usf_mae_jax/data/augment.py (usf_mae | mae |
        # eval | none). Evaluation always uses `eval` (the authors' nearest resize).
        "augment": "flip_crop",
        "crop_scale_min": 0.5,
        "num_threads": 2,  # host threads decoding and augmenting a batch
    })
    c.mesh = common.mesh_block()
    c.optimizer = ml_collections.ConfigDict({
        "name": "adamw",  # adamw (fine-tune) | lars (linear probe)
        "blr": 5e-4,  # reference fine-tune: blr 5e-4, lr = blr * batch / 256
        "lr": config_dict.placeholder(float),  # absolute peak lr; when set, blr is ignored
        "lr_batch_denominator": 256,
        "b1": 0.9,  # reference fine-tune: AdamW betas (0.9, 0.999)
        "b2": 0.999,
        "eps": 1e-8,
        "weight_decay": 0.05,  # reference fine-tune: wd 0.05, not on 1-D, bias, pos_embed, cls_token
        "wd_mask": "finetune",
        # reference fine-tune: layer-wise lr decay 0.65 for B, 0.75 for L/H; None picks by the model's width
        # (<= 768: 0.65, else 0.75), so a --config.model.variant=large override gets the right value.
        "layer_decay": config_dict.placeholder(float),
        "momentum": 0.9,  # LARS only
        "trust_coefficient": 0.001,  # LARS only (reference util/lars.py)
        "min_lr": 1e-6,  # reference fine-tune: cosine down to 1e-6
        "clip_grad_norm": 0.0,  # the reference fine-tune does not clip (clip_grad None)
        # The layer decay of a run without `init` (random encoder); None: the same as with an init.
        "scratch_layer_decay": config_dict.placeholder(float),
    })
    c.label_smoothing = 0.1  # reference fine-tune: label smoothing 0.1
    # Mixup 0.8 / CutMix 1.0 are the reference's ImageNet values; they are OFF by default here: mixing two
    # ultrasound frames (or pasting a patch of one onto another) can erase or invent the lesion that carries
    # the label. Set the alphas to the reference values to turn them on.
    c.mixup = ml_collections.ConfigDict({"mixup_alpha": 0.0, "cutmix_alpha": 0.0, "prob": 1.0,
                                         "switch_prob": 0.5})
    # none | loss (per-class weights N / (C * n_c) in the cross-entropy) | sampler (draw training examples
    # with probability proportional to 1 / n_c). Neither is in the reference; offered for imbalanced sets
    # such as BUS-BRA (1268 benign / 607 malignant).
    c.class_balance = "none"
    # Label budget: the share of the training split's labelled examples used, drawn per class (at least one
    # each) with `seed`; validation and test stay whole. The transfer study's small budget (docs/transfer_study.md).
    c.label_fraction = 1.0
    # The state tested is the best by this validation metric: f1_macro, or f1_macro_guarded, which ranks a state
    # predicting one class for the whole validation split below every other (trainers/downstream.py).
    c.select_metric = "f1_macro"
    c.log_steps = 10
    c.ckpt_steps = 200
    c.ckpt_minutes = 30.0  # also a checkpoint every 30 minutes of wall time, and at least one per tenth of the run
    c.keep_ckpts = 2

    if args.recipe == "small_data" and not linear:
        # Measured on real, small, imbalanced ultrasound (BUSI at 64 px, docs/real_data.md, "The fine-tuning
        # recipe"): the reference's lr, scaled down to a small batch (blr 5e-4 * 32 / 256 = 6.25e-5), left a ViT
        # from scratch at a single-class collapse (test macro-F1 0.37 / 0.31) and 30 epochs did not suffice.
        c.batch_size = 32
        c.optimizer.lr = 5e-4  # absolute, at batch 32
        c.optimizer.scratch_layer_decay = 1.0  # no layer decay without a pretrained encoder to protect
        c.class_balance = "loss"
        c.select_metric = "f1_macro_guarded"

    if linear:
        # Reference linear probe: frozen encoder, cls feature after `norm`, BN (no affine) + Linear, LARS
        # momentum 0.9, wd 0, blr 0.1, 10 warmup epochs of 90; no label smoothing, no mixup.
        c.model.global_pool = False
        c.model.drop_path = 0.0
        c.total_epochs = 90.0
        c.warmup_epochs = 10.0
        c.batch_size = 256  # the reference uses 16384 on ImageNet; a benchmark has ~1k training images
        c.input.augment = "eval"  # features are computed once, so no augmentation (cached features)
        c.optimizer.update(name="lars", blr=0.1, weight_decay=0.0, momentum=0.9, min_lr=0.0, layer_decay=1.0)
        c.label_smoothing = 0.0

    return common.apply_downstream_args(c, args)
