"""Specs of the OpenUS-46 datasets whose inputs are videos, cines, volumes or HDF5 stacks (F5-F7).

How the authors turned these into 2-D frames is undocumented (USF-MAE, arXiv 2510.22990); their 370K total
implies sub-sampling. The `FrameSampling` rules below are ours, chosen so no video set dominates:
a rate (Hz) where the frame rate is meaningful, else an even spread capped per sequence. ultrabench's POCUS
rule (3 Hz, at most 30 frames) is reproduced exactly. Slice axes and diagonal flips follow UltraSam's
converters as summarised in docs/openus46.md (F5, F6).
"""

from __future__ import annotations

from data_prep.formats.sampling import FrameSampling
from data_prep.openus46.spec import DatasetSpec

SPECS_SEQUENCES = (
    # 2-D+t stacks (840 frames); masks/ holds files with the same names.
    DatasetSpec(
        "acouslic", "ACOUSLIC (ACOUSLIC-AI train set)", "fetal abdomen (blind sweeps)", "F5",
        "MetaImage .mha 2-D+t", "CC BY-NC-SA 4.0", "zenodo.org/record/12697994",
        include=("**/images/stacked_fetal_ultrasound/*.mha",), exclude_dirs=("masks",),
        subject=r"(?P<subject>[^/]+)\.mha$", mha_stack=True, sampling=FrameSampling(max_frames=24)),
    # Only lus_videos/*.mp4: sample_video.gif at the repo root is not data.
    DatasetSpec(
        "blues", "BLUES (COVID-BLUES)", "lung", "F5", "MP4 video", "CC BY-NC-ND 4.0",
        "github.com/NinaWie/COVID-BLUES", include=("**/lus_videos/*.mp4",),
        subject=r"patient_(?P<subject>[^_/]+)_", sampling=FrameSampling(rate_hz=5, max_frames=20),
        notes="ND licence: keep derived frames private"),
    DatasetSpec(
        "brachial_plexus", "Brachial Plexus (Regional-US)", "neck, brachial plexus", "F5", "MP4 video",
        "non-commercial data-use agreement", "github.com/Regional-US/brachial_plexus",
        include=("**/videos/*.mp4",), exclude_dirs=("ac_masks", "needle", "bb_annotations", "*_masks"),
        subject=r"videos/(?P<subject>[^/]+)\.mp4$", sampling=FrameSampling(rate_hz=2, max_frames=30)),
    # half_sequence only: the ED / ES files repeat its first and last frame; *_gt* are masks.
    DatasetSpec(
        "camus", "CAMUS_public", "heart (apical 2CH / 4CH)", "F5", "NIfTI 2-D+t", "CC BY-NC-SA 4.0",
        "humanheart-project.creatis.insa-lyon.fr/database", include=("**/patient*_half_sequence.nii*",),
        exclude_files=("*_gt*",), subject=r"(?P<subject>patient\d+)_", sampling=FrameSampling()),
    # Frames are stored transposed (UltraSam applies a diagonal flip).
    DatasetSpec(
        "cardiacudc", "CardiacUDC", "heart (A4C)", "F5", "NIfTI 2-D+t", "Apache-2.0 (per atlas)",
        "kaggle.com CardiacUDC", include=("**/Site_*/*_image.nii*",), exclude_files=("*_label.nii*",),
        subject=r"(?P<subject>Site_[^/]+/[^/]+?)(?:-\d+)?_image\.nii",
        sampling=FrameSampling(max_frames=16, flip_diagonal=True),
        notes="multi-part Kaggle zip: see the archive instructions"),
    DatasetSpec(
        "echocp", "EchoCP", "heart (contrast TTE)", "F5", "NIfTI 2-D+t", "Apache-2.0 (per atlas)",
        "kaggle.com EchoCP", include=("**/*_image.nii*",), exclude_files=("*_label.nii*",),
        subject=r"(?P<subject>\d+)_[rv]_image", sampling=FrameSampling(max_frames=32, flip_diagonal=True)),
    # OpenUS-conv kept only ED + ES; four evenly spaced frames per video here.
    DatasetSpec(
        "echonet_dynamic", "EchoNet-Dynamic", "heart (A4C)", "F5", "AVI video",
        "Stanford research-use agreement", "echonet.github.io/dynamic", include=("**/Videos/*.avi",),
        subject=r"Videos/(?P<subject>[^/]+)\.avi$", sampling=FrameSampling(max_frames=4)),
    DatasetSpec(
        "echonet_pediatric", "EchoNet-Pediatric", "pediatric heart (A4C, PSAX)", "F5", "AVI video",
        "Stanford research-use agreement", "echonet.github.io/pediatric",
        include=("**/{A4C,PSAX}/Videos/*.avi",), subject=r"Videos/(?P<subject>[^/]+)\.avi$",
        sampling=FrameSampling(max_frames=4)),
    # Videos (sampled like ultrabench) plus stills; CT images and staging folders are not ultrasound.
    DatasetSpec(
        "pocus", "Pocus (POCOVID)", "lung", "F5", "MP4/AVI/MOV/GIF + JPG/PNG",
        "mixed, mostly CC BY-NC 4.0", "github.com/jannisborn/covid19_ultrasound",
        include=("**/pocus_videos/**/*.{mp4,avi,mov,mpeg,mpg,gif}", "**/pocus_images/**/*.{jpg,jpeg,png}"),
        exclude_dirs=("ct", "data_with_artifacts", "pocus", "label_uncertain"),
        subject=r"pocus_videos/(?:[^/]+/)*(?P<subject>[^/]+)\.\w+$",
        sampling=FrameSampling(rate_hz=3, max_frames=30)),
    # Axial slices with a diagonal flip (UltraSam).
    DatasetSpec(
        "microseg", "MicroSeg (micro-US prostate)", "prostate", "F6", "NIfTI 3-D", "Zenodo, not confirmed",
        "zenodo.org/record/10475293", include=("**/micro_ultrasound_scans/*.nii*",),
        exclude_dirs=("*_annotations",), subject=r"micro_ultrasound_scans/(?P<subject>[^/]+?)\.nii",
        sampling=FrameSampling(max_frames=32, flip_diagonal=True)),
    # Sagittal slices (axis 2) with a diagonal flip; the MR folders are MRI, not ultrasound.
    DatasetSpec(
        "regpro", "regPro (mu-RegPro)", "prostate (TRUS)", "F6", "NIfTI 3-D", "Zenodo 'other (open)'",
        "zenodo.org/record/8004388", include=("**/us_images/*.nii*",),
        exclude_dirs=("us_labels", "mr_images", "mr_labels"), subject=r"us_images/(?P<subject>[^/]+?)\.nii",
        sampling=FrameSampling(axis=2, max_frames=32, flip_diagonal=True)),
    # MRI_data.zip must not even be unpacked.
    DatasetSpec(
        "segthy", "Segthy (TUM)", "thyroid", "F6", "NIfTI 3-D", "CC BY (per atlas)",
        "doi.org/10.1371/journal.pone.0268550", include=("**/ground_truth_data/US/*_US.nii*",),
        exclude_dirs=("US_thyroid_label", "MRI*"), unpack_skip=("MRI_data.zip",),
        subject=r"_(?P<subject>P\d+)_", sampling=FrameSampling(stride=2, max_frames=64, flip_diagonal=True)),
    # Only the `image` dataset is read (never `mask`), sampled per nodule (`annot_id`).
    DatasetSpec(
        "thyroid_cineclip", "Thyroid US Cineclip (Stanford AIMI)", "thyroid nodule", "F7", "HDF5",
        "Stanford AIMI research-use agreement", "stanfordaimi.azurewebsites.net",
        include=("**/dataset.hdf5",), hdf5_dataset="image", hdf5_group="annot_id",
        sampling=FrameSampling(max_frames=20)),
)
