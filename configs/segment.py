"""Segmentation configs: `--config=configs/segment.py:DATASET[,fold=K,head=upernet|linear,...]`.

    python launch.py --config=configs/segment.py:busbra,fold=1 --workdir W \
        --config.input.data_dir=OUT [--config.init=PATH]

Preset arguments:
  dataset   busbra | mmotu | gist514 | busi | labelled (also the bare first word, e.g. `:mmotu`); a conversion
            with masks (converter 1.1.0+, `python -m data_prep DATASET ...`) under `input.data_dir`.
  classes   binary (default: every foreground class is "foreground"; BUS-BRA is binary anyway) | all (one
            class per mask class: MMOTU-2D's 8 tumour types, GIST514-DB's lmym / GIST).
  fold      the official round (BUS-BRA 1..5, GIST514-DB 0..4, MMOTU-2D / labelled 0; BUSI 1..K, its
            converter's image-level folds); -1 = the default.
  subset    GIST514-DB's frames: roi (lesion crops, the default) or raw (full frames). BUSI: benign_malignant
            (the default here: the images with a lesion, as lesion segmentation is usually reported) or
            three_class (normal images too, with their all-background masks: they score only through false
            positives, docs/segmentation.md).
  head      upernet (the MAE paper's protocol, default) | linear (1x1 projection of the last block's tokens).
  variant   the model size (mu|tiny|small|base|large|huge) when the init does not fix it (random init).
  img_size  input resolution; any multiple of the patch size works with any init (the position table is
            resized bicubically when the init used another size).
  epochs    total epochs (overrides the recipe's).
  recipe    reference (default: the MAE paper's UperNet protocol below) | small_data (measured on real, small
            ultrasound sets, docs/real_data.md: lr 5e-4 at batch 16, no layer decay from scratch).
  runlocal  shrink everything (a 2-block mu model, 32 px, a few steps) so that a CPU runs it in seconds.

`init` is a pretraining or fine-tuning workdir (read-only), an interop import directory or a PyTorch
`.pth`/`.pt`/`.safetensors`; unset means random initialisation (logged as a warning).

Recipe (docs/segmentation.md, "Loss and optimisation"): the MAE paper's semantic-segmentation protocol (UperNet
following BEiT's code, 100 epochs at batch 16) with the values of mmsegmentation's MAE ViT-B UperNet config:
blocks 3, 5, 7, 11, head width 768 (the encoder width), AdamW lr 1e-4 at batch 16 (blr 1.6e-3 per 256), betas
(0.9, 0.999), weight decay 0.05, layer decay 0.65, drop path 0.1. That config warms up for 1500 iterations and
decays polynomially; here warmup is 5 epochs and the decay cosine, as in fine-tuning. None of it is tuned for
ultrasound; 100 epochs suit the benchmarks' 0.4k-1.9k images.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from configs import common

DATASETS = ("busbra", "mmotu", "gist514", "busi", "labelled")
DEFAULT_SUBSETS = {"busi": "benign_malignant"}  # where segmentation's default differs from the benchmark's
CLASSES = ("binary", "all")
HEADS = ("upernet", "linear")
PRESETS = {
    "busbra": "BUS-BRA lesion masks (default; fold 1..5)",
    "mmotu": "MMOTU-2D tumour masks (classes=binary, or all: 8 tumour types)",
    "gist514": "GIST514-DB lesion polygons (fold 0..4, subset=roi|raw; classes=all: lmym / GIST)",
    "busi": "BUSI lesion masks (fold 1..5; benign and malignant images, subset=three_class adds normal)",
    "labelled": "your own masks from `python -m data_prep labelled --masks DIR`",
}
ARGUMENTS = ("classes=binary|all, fold=K, subset=roi|raw|three_class|benign_malignant, head=upernet|linear, "
             "variant=SIZE, img_size=N, epochs=N, recipe=reference|small_data, runlocal")
RECIPES = ("reference", "small_data")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = common.parse_arg(arg, preset="busbra", dataset="", classes="binary", fold=-1, subset="", head="upernet",
                            variant="", img_size=0, epochs=0, recipe="reference", runlocal=False)
    dataset = args.dataset or args.preset
    if dataset not in DATASETS:
        raise ValueError(f"unknown segmentation dataset {dataset!r}; choose one of {DATASETS}")
    if args.classes not in CLASSES:
        raise ValueError(f"unknown classes {args.classes!r}; choose binary or all")
    if args.head not in HEADS:
        raise ValueError(f"unknown head {args.head!r}; choose upernet or linear")
    if args.recipe not in RECIPES:
        raise ValueError(f"unknown recipe {args.recipe!r}; choose one of {', '.join(RECIPES)}")
    common.check_runlocal(args, "variant", "img_size", "epochs")

    c = ml_collections.ConfigDict()
    c.task = "segment"
    c.preset = dataset
    c.dataset = dataset
    c.classes = args.classes
    c.fold = config_dict.placeholder(int)  # None: the benchmark's default round
    c.subset = config_dict.placeholder(str)  # GIST514-DB roi | raw, BUSI three_class | benign_malignant
    if dataset in DEFAULT_SUBSETS:
        c.subset = DEFAULT_SUBSETS[dataset]
    c.seed = 0
    c.init = config_dict.placeholder(str)  # None: random init (warned); else workdir | import dir | .pth
    # Label budget: the share of the training split's images (with their masks) used, drawn per image class with
    # `seed`; validation and test stay whole (as configs/finetune.py's label_fraction).
    c.label_fraction = 1.0
    c.update(common.duration_fields())
    c.total_epochs = 100.0  # MAE paper, ADE20K: 100 epochs
    c.warmup_epochs = 5.0
    c.eval_epochs = 1.0  # validation Dice after every epoch selects the tested state
    c.batch_size = 16  # MAE paper / mmsegmentation's MAE UperNet config: batch 16 (8 GPUs x 2)
    c.grad_accum_steps = 1
    c.eval_batch_size = 32
    c.model = common.model_block("base", 224)
    c.model.head = args.head
    c.model.head_channels = 0  # UperNet width; 0 = the encoder width (768 for ViT-B, as the MAE UperNet config)
    c.model.drop_path = 0.1  # MAE UperNet ViT-B: drop path 0.1
    c.input = ml_collections.ConfigDict({
        "data_dir": "",  # the converter's --out_dir (or the benchmark's version folder itself)
        # joint (default): nearest resize, rotation, RandomResizedCrop and flip applied to image and mask alike
        # (mask by nearest neighbour), contrast/brightness on the image only; none: the resize alone.
        "augment": "joint",
        "rotation_degrees": 15.0,
        "crop_scale_min": 0.5,
        "contrast": 0.2,
        "brightness": 0.1,
        "num_threads": 2,
    })
    c.loss = ml_collections.ConfigDict({
        "dice_weight": 1.0,  # loss = cross-entropy + dice_weight * soft-Dice loss
        "class_weights": "",  # '' = all 1; else one weight per class, background first, e.g. "0.5,1"
    })
    c.mesh = common.mesh_block()
    c.optimizer = ml_collections.ConfigDict({
        "name": "adamw",
        "blr": 1.6e-3,  # lr = blr * batch / 256 = 1e-4 at batch 16 (mmsegmentation's MAE UperNet lr)
        "lr": config_dict.placeholder(float),
        "lr_batch_denominator": 256,
        "b1": 0.9,
        "b2": 0.999,
        "eps": 1e-8,
        "weight_decay": 0.05,
        "wd_mask": "finetune",  # no decay on 1-D params (BatchNorm, biases), pos_embed, cls_token
        "layer_decay": config_dict.placeholder(float),  # None: 0.65 up to ViT-B's width, 0.75 above
        # The layer decay of a run without `init` (random encoder); None: the same as with an init.
        "scratch_layer_decay": config_dict.placeholder(float),
        "min_lr": 1e-6,
        "clip_grad_norm": 0.0,
    })
    c.log_steps = 10
    c.ckpt_steps = 200
    c.ckpt_minutes = 30.0  # also a checkpoint every 30 minutes of wall time, and at least one per tenth of the run
    c.keep_ckpts = 2

    if args.recipe == "small_data":
        # Measured on BUSI lesions at 64 px (docs/real_data.md, "The segmentation recipe"): from scratch, the
        # reference lr of 1e-4 with layer decay reached test Dice 0.51; lr 5e-4 without layer decay 0.59.
        c.optimizer.lr = 5e-4  # absolute, at batch 16
        c.optimizer.scratch_layer_decay = 1.0

    return common.apply_downstream_args(c, args, head_channels=16)
