"""Downstream benchmarks as TFDS builders: BUS-BRA, MMOTU-2D, GIST514-DB (roi and raw), BUSI (three_class and
benign_malignant) and a generic labelled set.

Converting (the data must be downloaded by hand; each builder's MANUAL_DOWNLOAD_INSTRUCTIONS says how):

    python -m data_prep busbra   --raw_dir DIR --out_dir OUT      # DIR: the extracted folder or its parent
    python -m data_prep mmotu    --raw_dir DIR --out_dir OUT
    python -m data_prep gist514  --raw_dir DIR --out_dir OUT [--subset roi|raw|both]
    python -m data_prep busi     --raw_dir DIR --out_dir OUT [--subset three_class|benign_malignant|both]
    python -m data_prep labelled --src DIR_or_CSV --out_dir OUT [--name NAME] [--masks DIR]

or from Python: `convert("busbra", raw_dir, out_dir)`, which returns the manifest. Records carry the design's
fields (image PNG with 1 or 3 channels, height, width, dataset, source, subject, frame, label); `source`, the
path relative to the raw root, is the record id. Each benchmark's official splits are in `splits.json`; a
count that differs from the documented totals is a warning in `manifest.json`, and every skipped file is
listed there with its reason. Each image's segmentation mask travels in its record (`mask`, a uint8 class map,
and `has_mask`; data_prep/benchmarks/masks.py); masks never become inputs, and a mask that cannot be used is
dropped (or, with `--resize_mismatched_masks`, resized) and listed, never aborting the conversion.

Reading, for the fine-tuning and embedding code (see `usf_mae_jax.data.benchmarks` for the details):

    src = load_split(OUT, "busbra", "test", fold=1)    # random access: src[i] -> {"image": uint8 HWC,
                                                        #   "label", "subject", "source", "id"}
    src.ids, src.labels                                 # membership and labels without decoding
    class_names(OUT, "mmotu")                           # names in label order
    mask_class_names(OUT, "mmotu")                      # ["background", 8 tumour classes]
    split_ids(OUT, "gist514", "train", fold=3, subset="raw")
"""

from data_prep.benchmarks.busbra import Busbra
from data_prep.benchmarks.busi import Busi
from data_prep.benchmarks.common import LayoutError
from data_prep.benchmarks.convert import BENCHMARKS, convert
from data_prep.benchmarks.gist514 import Gist514
from data_prep.benchmarks.labelled import Labelled
from data_prep.benchmarks.mmotu import Mmotu
from usf_mae_jax.data.benchmarks import SplitSource, class_names, load_split, manifest, mask_class_names, split_ids

__all__ = ["BENCHMARKS", "Busbra", "Busi", "Gist514", "Labelled", "LayoutError", "Mmotu", "SplitSource", "class_names",
           "convert", "load_split", "manifest", "mask_class_names", "split_ids"]
