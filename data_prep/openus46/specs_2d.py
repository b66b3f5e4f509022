"""Specs of the OpenUS-46 datasets whose inputs are 2-D images (families F1-F4 of docs/openus46.md).

Every include / exclude rule below reproduces the "include" and "exclude" columns of docs/openus46.md for that
dataset; the comments give the quirk the rule exists for. Globs are relative to `RAW/<key>/` and start
with `**/` where the user may have extracted the archive with or without its top folder.
"""

from __future__ import annotations

from data_prep.formats.sampling import FrameSampling
from data_prep.openus46.spec import DatasetSpec

IMG = "{png,jpg,jpeg,bmp,tif,tiff}"

SPECS_2D = (
    DatasetSpec(
        "105us", "105US", "liver (pancreatic cancer metastases)", "F1", "PNG (RGB)", "not stated",
        "ResearchGate upload (105US)", include=("**/105 US Images/*.png",),
        exclude_dirs=("*Masks*",)),
    # AUS = CT-simulated images; dropped like UltraSam and OpenUS-conv (617 real images). Both extensions.
    DatasetSpec(
        "abdomenus", "AbdomenUS", "abdomen", "F1", "JPG/PNG", "Kaggle page, not confirmed",
        "kaggle.com/datasets/ignaciorlando/ussimandsegm",
        include=("**/RUS/images/**/*.{png,jpg,jpeg}",), exclude_dirs=("annotations", "AUS")),
    # Class zips nested in the outer zip, sometimes <Class>/<Class>/image/.
    DatasetSpec(
        "aul", "AUL (Annotated Ultrasound Liver)", "liver", "F1", "JPG", "Zenodo record, not confirmed",
        "zenodo.org/record/7272660", include=("**/image/*.{jpg,jpeg,png}",),
        exclude_dirs=("segmentation",), notes="burnt-in yellow calipers: use --inpaint to remove"),
    # Kaggle nerve segmentation: masks in the same folder as *_mask.tif.
    DatasetSpec(
        "bp", "BP (Kaggle Ultrasound Nerve Segmentation)", "neck, brachial plexus", "F2", "TIFF (gray)",
        "Kaggle competition rules (no redistribution)", "kaggle.com/c/ultrasound-nerve-segmentation",
        include=("**/train/*.tif", "**/test/*.tif"), exclude_files=("*_mask.tif",),
        subject=r"train/(?P<subject>\d+)_\d+\.tif$"),
    # The image folder's name contains "masks": waive that global pattern, exclude stems with "_" instead.
    DatasetSpec(
        "breast", "BrEaST (BrEaST-Lesions_USG)", "breast", "F2", "PNG", "CC BY 4.0 (TCIA)",
        "doi.org/10.7937/9WKK-Q141", include=("**/case*.png",), exclude_files=("*_*",),
        waive_global=("*mask*",), subject=r"(?P<subject>case\d+)\.png$"),
    # Masks in BUS/GT/ carry identical file names: exclusion by folder only.
    DatasetSpec(
        "bus_b", "BUS (Dataset B, UDIAT)", "breast", "F1", "PNG", "research-use agreement",
        "UDIAT Dataset B (Yap et al. 2017)", include=("**/original/*.png",), exclude_dirs=("GT",)),
    DatasetSpec(
        "bus_uc", "BUS_UC", "breast", "F1", "PNG", "CC BY 4.0", "data.mendeley.com/datasets/3ksd7w7jkx",
        include=("**/{Benign,Malignant}/images/*.png",), exclude_dirs=("masks", "All")),
    # Some frames are colour Doppler: colour is content.
    DatasetSpec(
        "bus_ucml", "BUS_UCML (BUS-UCLM)", "breast", "F1", "PNG", "CC BY-NC 3.0 (v1) / CC BY 4.0 (v3)",
        "data.mendeley.com/datasets/7fvgj4jsp7", include=("**/images/*.png",), exclude_dirs=("masks",),
        colour_is_content=True),
    DatasetSpec(
        "bus_bra", "BUS-BRA", "breast", "F1", "PNG", "CC BY 4.0", "zenodo.org/record/8231412",
        include=("**/Images/bus_*.png",), exclude_dirs=("Masks",), holdout=True,
        subject=r"bus_(?P<subject>\d+)-[lrs]\.png$", notes="USF-MAE downstream benchmark"),
    # Videos overlap the stills: only with --include_optional.
    DatasetSpec(
        "cactus", "Cactus (CACTUS)", "heart (phantom)", "F3", "JPG (+ optional MP4)", "CC BY 4.0",
        "doi.org/10.20383/103.01484", include=("**/Images Dataset/*/*.{jpg,jpeg}",),
        optional_include=("**/Videos/**/*.mp4",), exclude_dirs=("Grades",),
        subject=r"Videos/.*?(?P<subject>[^/]+)\.mp4$", sampling=FrameSampling(rate_hz=1, max_frames=30)),
    DatasetSpec(
        "ccaui", "CCAUI (Common Carotid Artery Ultrasound Images)", "common carotid artery", "F1", "PNG",
        "CC BY 4.0", "data.mendeley.com/datasets/d4xt63mgjm", include=("**/US images/*.png",),
        exclude_dirs=("Expert mask images",)),
    # Trans-* planes duplicate FETAL_PLANES_DB and "Diverse" images HC18: deduplicated across datasets.
    DatasetSpec(
        "dfhi", "DFHI (fetal head biometry)", "fetal head", "F1", "PNG (RGB)", "CC BY 4.0",
        "zenodo.org/record/8265464",
        include=("**/Trans-*/Trans-*/*.png", "**/Orginal_train_images_to_959_661/*.png"),
        exclude_dirs=("*-Segmentation", "Test-Dataset-*", "*orginal-size*", "*original-size*", "*PASCAL*",
                      "*COCO*", "*YOLO*", "*Annotations*", "*-Labels*"),
        exclude_files=("*orginal-size*",)),
    DatasetSpec(
        "fallmud", "FALLMUD", "lower-leg muscle", "F1", "TIFF/JPG/PNG", "not stated",
        "kalisteo.cea.fr FALLMUD",
        include=(f"**/images/*.{IMG}",), exclude_dirs=("aponeurosis_masks", "fascicle_masks")),
    # ARRAY_FORMAT/*.npy pickles hold masks: never inputs (and .npy is not an input extension).
    DatasetSpec(
        "fass", "FASS (fetal abdominal structures)", "fetal abdomen", "F1", "PNG", "CC BY 4.0",
        "data.mendeley.com/datasets/4gcpm9dsc3", include=("**/IMAGES/*.png",),
        exclude_dirs=("ARRAY_FORMAT",), subject=r"(?P<subject>P\d+)_IMG"),
    # AC masks share the images' names (resized_data/mask/); Fast_unet/ holds paper figures.
    DatasetSpec(
        "fast_u_net", "Fast-U-Net", "fetal abdomen and head", "F1", "PNG (inside RAR)", "no licence file",
        "github.com/vahidashkani/Fast-U-Net", include=("**/resized_data/image/*.png",),
        exclude_dirs=("mask", "test_data", "Fast_unet"), notes="HC half = HC18 images (resized)"),
    # Layout not confirmed (docs/openus46.md): any image file, in class folders or not.
    DatasetSpec(
        "feft", "FEFT (first-trimester fetal echocardiography)", "fetal heart", "F3", "PNG/JPG (unconfirmed)",
        "CC BY 4.0", "figshare.com/articles/dataset/21215492", include=(f"**/*.{IMG}",),
        notes="layout unverified: every image file is taken"),
    DatasetSpec(
        "fetal_planes_db", "FETAL_PLANES_DB", "fetal planes + maternal cervix", "F3", "PNG (RGBA)",
        "CC BY 4.0", "zenodo.org/record/3904280", include=("**/Images/*.png",),
        subject=r"(?P<subject>Patient\d+)_"),
    # (3, 256, 256) MetaImage with identical channels; labels share file names in label_mha/.
    DatasetSpec(
        "fh_ps_aop", "FH-PS-AOP", "intrapartum pubic symphysis + fetal head", "F4", "MetaImage .mha",
        "Zenodo (CC BY 4.0 likely)", "zenodo.org/record/7851339", include=("**/image_mha/*.mha",),
        exclude_dirs=("label_mha",), notes="built from JNU-IFM frames"),
    DatasetSpec(
        "gist514_db", "GIST514-DB", "GI tract (endoscopic US)", "F3", "JPG", "not stated",
        "UltraSam benchmark release", include=("**/images/*.{jpg,jpeg}",), exclude_dirs=("annotations",),
        holdout=True, notes="USF-MAE downstream benchmark"),
    # *_Annotation.png ellipse outlines sit next to the images.
    DatasetSpec(
        "hc18", "HC (HC18)", "fetal head", "F2", "PNG (gray)", "CC BY 4.0", "zenodo.org/record/1327317",
        include=("**/training_set/*HC.png", "**/test_set/*HC.png"), exclude_files=("*_Annotation.png",),
        subject=r"(?P<subject>\d+)_\d*HC\.png$", notes="canonical copy of the HC18 duplicate group"),
    DatasetSpec(
        "jnu_ifm", "JNU-IFM", "intrapartum pubic symphysis + fetal head", "F1", "PNG (gray)", "CC BY 4.0",
        "figshare.com/articles/dataset/14371652", include=("**/image/*.png",),
        exclude_dirs=("mask", "mask_enhance"), subject=r"(?P<subject>[^/]+)/image/[^/]+$"),
    # Masks ship separately (labels/reviewed_masks_*), with the images' names.
    DatasetSpec(
        "kidneyus", "kidneyUS (Open Kidney)", "kidney", "F1", "PNG", "CC BY-NC-SA (registration)",
        "github.com/rsingla92/kidneyUS", include=("**/kidneyUS_images*/*.png",),
        exclude_dirs=("labels", "reviewed_masks*"), subject=r"(?P<subject>[^/_]+)_IM-"),
    DatasetSpec(
        "luss_phantom", "LUSS_phantom", "lung phantom", "F1", "PNG (+ optional WebM)", "CC BY 4.0",
        "doi.org/10.5518/1485", include=("**/data-3/{train,test}/images/*.png",),
        optional_include=("**/VideoClips/*.webm",), exclude_dirs=("masks",),
        subject=r"VideoClips/(?P<subject>[^/]+)\.webm$", sampling=FrameSampling(rate_hz=2, max_frames=10)),
    DatasetSpec(
        "mmotu_2d", "MMOTU-2D (OTU_2d)", "ovarian tumour", "F1", "JPG", "not stated (code Apache-2.0)",
        "github.com/cv516Buaa/MMOTU_DS2Net", include=("**/OTU_2d/images/*.{jpg,jpeg}",),
        exclude_dirs=("annotations",), holdout=True, notes="USF-MAE downstream benchmark"),
    # CEUS stills (the "3d" is only a folder name): colour is content.
    DatasetSpec(
        "mmotu_3d", "MMOTU-3D (OTU_3d, CEUS)", "ovarian tumour (CEUS)", "F1", "JPG", "not stated",
        "github.com/cv516Buaa/MMOTU_DS2Net", include=("**/OTU_3d/images/*.{jpg,jpeg}",),
        exclude_dirs=("annotations",), colour_is_content=True),
    # Folder names inside the zips are unconfirmed: any PNG outside mask folders and XML sidecars.
    DatasetSpec(
        "porcine", "Porcine (HEPIUSLAB spinal cord)", "porcine spinal cord", "F1", "PNG",
        "no licence declared",
        "github.com/HEPIUSLAB/ultrasound_spinal_cord_dataset", include=("**/*.png",),
        exclude_dirs=("*mask*", "*label*", "*annot*"), notes="zip layout unverified"),
    DatasetSpec(
        "psfhs", "PSFHS", "intrapartum pubic symphysis + fetal head", "F4", "MetaImage .mha", "CC BY 4.0",
        "zenodo.org/record/10969427", include=("**/image_mha/*.mha",), exclude_dirs=("label_mha",)),
    # Test images exist twice (General-1 and Expanded): keep one copy.
    DatasetSpec(
        "s1", "S1", "breast tumour", "F1", "JPG", "not stated", "UltraSam S1 release",
        include=("**/TrainingDataSet/BreastTumourImages/*.{jpg,jpeg}",
                 "**/TestingDataSet/Test-General-1-BreastTumourImages/*.{jpg,jpeg}"),
        exclude_dirs=("*Labels*", "Segmentation_Results", "Test-Expanded-BreastTumourImages")),
    # Segmentation_models/ is a second copy of the images and masks.
    DatasetSpec(
        "stmus_nda", "STMUS_NDA", "transverse musculoskeletal", "F1", "PNG", "CC BY 4.0",
        "data.mendeley.com/datasets/3jykz7wz8d", include=("**/{BB,GM,TA}/*/Images/*.png",),
        exclude_dirs=("Masks", "Segmentation_models")),
    DatasetSpec(
        "stu_hospital", "STU-Hospital", "breast", "F2", "PNG (gray, 128x128)", "no licence file",
        "github.com/xbhlk/STU-Hospital", include=("**/Test_Image_*.png",), exclude_files=("mask_*",)),
    # TN3K / TG3K JPEG masks share the images' names; DDTI comes as a nested zip.
    DatasetSpec(
        "thyroid_dataset", "Thyroid Dataset (TN3K, TG3K, DDTI)", "thyroid", "F1", "JPG / PNG",
        "not stated (code MIT)", "github.com/haifangong/TRFE-Net-for-thyroid-nodule-segmentation",
        include=("**/tn3k/{trainval-image,test-image}/*.jpg", "**/tg3k/thyroid-image/*.jpg",
                 "**/stage1/p_image/*.png"),
        exclude_dirs=("*-mask", "p_mask")),
    # Data/Data/Datasets/ duplicates the train/validation/test tree; mostly HC18 images.
    DatasetSpec(
        "ultrasound_fetus", "Ultrasound Fetus Dataset", "fetal head", "F2", "PNG", "CC BY 4.0",
        "data.mendeley.com/datasets/yrzzw9m6kk", include=("**/Data/Data/{train,validation,test}/*/*.png",),
        exclude_dirs=("Datasets",), exclude_files=("*_Annotation.png", "*mask*"),
        subject=r"/(?P<subject>\d+)_\d*HC\.png$", notes="duplicates HC18"),
    DatasetSpec(
        "upbd", "UPBD (UBPD)", "brachial plexus region", "F3", "JPG", "not stated", "UltraSam UBPD release",
        include=("**/JPEGImages/*.{jpg,jpeg}",), exclude_dirs=("json_train",)),
)
