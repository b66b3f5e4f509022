"""Tiny mock trees of the 46 OpenUS-46 datasets, reproducing each documented layout (openus46.md).

`build(key, raw_dir, seed)` writes `raw_dir/<key>/` with the dataset's images *and* the things that must not
become records (masks, often with the images' own file names, sidecar CSV / JSON / XML files, duplicate
folders, MRI volumes, figures), and returns a `Mock` listing exactly which records the converter must write:
{(source, frame): subject}. Sequence datasets get frame counts whose sampled indices are worked out by hand
in the comments, so the tests check the sampling rule against numbers, not against the code under test.

Images are 16-32 px random noise (every image unique, never blank); masks are 0/255 blobs.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import zipfile

import cv2
import numpy as np

from data_prep.openus46.registry import KEYS


@dataclasses.dataclass
class Mock:
    expected: dict[tuple[str, int], str]  # (source, frame) -> subject
    forbidden: list[str]  # mask / sidecar / duplicate files present in the tree
    shapes: dict[tuple[str, int], tuple[int, int]] = dataclasses.field(default_factory=dict)  # (h, w)


class _Tree:
    def __init__(self, root: str, seed: int):
        self.root = root
        self.rng = np.random.default_rng(seed)
        self.mock = Mock({}, [])

    def path(self, rel: str) -> str:
        full = os.path.join(self.root, rel)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        return full

    def noise(self, h=16, w=20, channels=0, dtype=np.uint8):
        shape = (h, w, channels) if channels else (h, w)
        if dtype == np.uint16:
            return self.rng.integers(1000, 60000, shape).astype(np.uint16)
        pixels = self.rng.integers(16, 240, shape).astype(np.uint8)
        if channels == 4:
            pixels[..., 3] = 255  # opaque alpha, as in FETAL_PLANES_DB
        return pixels

    def image(self, rel, subject="", h=16, w=20, channels=0, dtype=np.uint8, expect=True):
        cv2.imwrite(self.path(rel), self.noise(h, w, channels, dtype))
        if expect:
            self.mock.expected[(rel, -1)] = subject
            self.mock.shapes[(rel, -1)] = (h, w)
        return rel

    def mask(self, rel, h=16, w=20):
        blob = np.zeros((h, w), np.uint8)
        blob[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 255
        cv2.imwrite(self.path(rel), blob)
        self.mock.forbidden.append(rel)

    def text(self, rel, content="x"):
        with open(self.path(rel), "w") as handle:
            handle.write(content)
        self.mock.forbidden.append(rel)

    def expect_frames(self, rel, frames, subject="", shape=None):
        for frame in frames:
            self.mock.expected[(rel, frame)] = subject
            if shape is not None:
                self.mock.shapes[(rel, frame)] = shape

    def stack(self, n, h=16, w=20, empty=()):
        frames = self.noise(n * h, w).reshape(n, h, w)
        for index in empty:
            frames[index] = 0
        return frames

    def mha(self, rel, array):
        import SimpleITK as sitk

        sitk.WriteImage(sitk.GetImageFromArray(array), self.path(rel))

    def nifti(self, rel, array):
        """`array` in SimpleITK order (slowest axis first); nibabel stores the reverse."""
        import nibabel as nib

        nib.save(nib.Nifti1Image(np.ascontiguousarray(np.transpose(array)), np.eye(4)), self.path(rel))

    def video(self, rel, n, fps=10, size=32):
        write_video(self.path(rel), [self.noise(size, size, 3) for _ in range(n)], fps)

    def zip_folder(self, folder_rel, zip_rel):
        """Moves the folder `folder_rel` into the zip `zip_rel` (member paths relative to its parent).

        The converter extracts a zip into a folder named after its stem, next to it; the expected and
        forbidden paths under `folder_rel` are moved to where that extraction will put them.
        """
        folder = os.path.join(self.root, folder_rel)
        parent = os.path.dirname(folder_rel)
        with zipfile.ZipFile(self.path(zip_rel), "w") as archive:
            for directory, _, files in os.walk(folder):
                for name in files:
                    full = os.path.join(directory, name)
                    archive.write(full, os.path.relpath(full, os.path.dirname(folder)))
        shutil.rmtree(folder)
        target = zip_rel.rsplit(".", 1)[0]

        def moved(rel):
            if not rel.startswith(folder_rel + "/"):
                return rel
            return f"{target}/{rel[len(parent) + 1:] if parent else rel}"

        self.mock.expected = {(moved(rel), frame): v for (rel, frame), v in self.mock.expected.items()}
        self.mock.shapes = {(moved(rel), frame): v for (rel, frame), v in self.mock.shapes.items()}
        self.mock.forbidden = [moved(rel) for rel in self.mock.forbidden]


def write_video(path, frames, fps=10):
    """Writes RGB uint8 frames with PyAV; the codec follows the extension (AVI: MJPEG, GIF, WebM: VP8)."""
    import av

    codec, pix_fmt = {".avi": ("mjpeg", "yuvj420p"), ".gif": ("gif", "rgb8"),
                      ".webm": ("libvpx", "yuv420p")}.get(os.path.splitext(path)[1].lower(),
                                                          ("mpeg4", "yuv420p"))
    container = av.open(path, "w")
    stream = container.add_stream(codec, rate=fps)
    stream.height, stream.width = frames[0].shape[:2]
    stream.pix_fmt = pix_fmt
    for frame in frames:
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()


# ---- 2-D image datasets (F1-F4) -------------------------------------------------------------------------

def _105us(t):
    for n in ("001", "002"):
        t.image(f"105US/105 US Images/{n}.png", channels=3)
        t.mask(f"105US/105 US Masks/{n} G man.png")
    t.text("105US/readme.txt")


def _abdomenus(t):
    t.image("abdominal_US/RUS/images/train/r1.jpg")
    t.image("abdominal_US/RUS/images/test/r2.png")
    t.image("abdominal_US/AUS/images/train/a1.png", expect=False)  # CT-simulated: excluded
    t.mock.forbidden.append("abdominal_US/AUS/images/train/a1.png")
    t.mask("abdominal_US/RUS/annotations/train/r1.png")


def _aul(t):
    # outer zip -> class zips -> <Class>/image (Malignant nested one level deeper)
    t.image("outer/Benign/image/1.jpg")
    t.text("outer/Benign/segmentation/liver/1.json")
    t.zip_folder("outer/Benign", "outer/Benign.zip")
    t.image("outer/Malignant/Malignant/image/2.jpg")
    t.text("outer/Malignant/Malignant/segmentation/mass/2.json")
    t.zip_folder("outer/Malignant", "outer/Malignant.zip")
    t.zip_folder("outer", "AUL.zip")


def _bp(t):
    t.image("train/3_7.tif", "3")
    t.mask("train/3_7_mask.tif")
    t.image("train/12_1.tif", "12")
    t.mask("train/12_1_mask.tif")
    t.image("test/5.tif")


def _breast(t):
    folder = "BrEaST-Lesions_USG-images_and_masks"
    t.image(f"{folder}/case001.png", "case001")
    t.mask(f"{folder}/case001_tumor.png")
    t.mask(f"{folder}/case001_other1.png")
    t.image(f"{folder}/case002.png", "case002")
    t.text("BrEaST-Lesions-USG-clinical-data.csv")


def _bus_b(t):
    for n in ("000001", "000002"):
        t.image(f"BUS/original/{n}.png")
        t.mask(f"BUS/GT/{n}.png")  # identical names


def _bus_uc(t):
    for cls in ("Benign", "Malignant"):
        t.image(f"{cls}/images/{cls[0]}1.png")
        t.mask(f"{cls}/masks/{cls[0]}1.png")
        t.image(f"All/images/{cls[0]}1.png", expect=False)
        t.mock.forbidden.append(f"All/images/{cls[0]}1.png")


def _bus_ucml(t):
    t.image("images/ALWI_000.png", channels=3)
    t.mask("masks/ALWI_000.png")


def _bus_bra(t):
    t.image("BUSBRA/Images/bus_0001-l.png", "0001")
    t.mask("BUSBRA/Masks/mask_0001-l.png")
    t.text("BUSBRA/5-fold-cv.csv")


def _cactus(t):
    for view in ("A4C", "SC"):
        t.image(f"Cactus Dataset/Images Dataset/{view}/{view}_1.jpg")
    t.text("Cactus Dataset/Grades/A4C_grades.csv")
    t.video("Cactus Dataset/Videos/Training/Video1.mp4", 4)  # optional input, off by default
    t.mock.forbidden.append("Cactus Dataset/Videos/Training/Video1.mp4")


def _ccaui(t):
    t.image("US images/202201.png")
    t.mask("Expert mask images/202201.png")


def _dfhi(t):
    t.image("Trans-thalamic/Trans-thalamic/tt1.png", channels=3)
    t.mask("Trans-thalamic/Trans-thalamic-Segmentation/SegmentationClass/tt1.png")
    t.zip_folder("Trans-thalamic", "Trans-thalamic.zip")
    t.image("Diverse Fetal Head Images/Orginal_train_images_to_959_661/d1.png")
    t.image("Diverse Fetal Head Images/orginal-size/d1.png", channels=3, expect=False)
    t.mask("Test-Dataset-PASCAL/SegmentationClass/d9.png")
    t.text("Trans-thalamic-Pixel-Size.csv")
    t.mock.forbidden += ["Diverse Fetal Head Images/orginal-size/d1.png"]


def _fallmud(t):
    t.image("FALLMUD/NeilCronin/images/img_00001.tif")
    t.image("FALLMUD/RyanCunningham/images/img_00002.jpg")
    t.image("FALLMUD/RyanCunningham/images/img_00003.png", dtype=np.uint16)  # 16-bit
    t.mask("FALLMUD/NeilCronin/aponeurosis_masks/img_00001.png")
    t.mask("FALLMUD/RyanCunningham/fascicle_masks/img_00002.tif")


def _fass(t):
    base = "Fetal Abdominal Structures Segmentation Dataset Using Ultrasonic Images"
    t.image(f"outer/inner/{base}/IMAGES/P12_IMG3.png", "P12", channels=3)
    t.text(f"outer/inner/{base}/ARRAY_FORMAT/P12_IMG3.npy")
    t.zip_folder("outer/inner", "outer/inner.zip")  # zip inside a zip
    t.zip_folder("outer", "FASS.zip")


def _fast_u_net(t):
    t.image("Dataset/AC/resized_data/image/1.png")
    t.mask("Dataset/AC/resized_data/mask/1.png")  # same name as the image
    t.image("Dataset/HC/resized_data/image/5_HC.png")
    t.mask("Dataset/HC/resized_data/mask/5_HC_Annotation.png")
    t.text("Dataset/AC/AC_image1.rar", "Rar!")
    t.text("Dataset/AC/train.txt", "1.png 1.png")
    t.image("test_data/image/t1.jpg", expect=False)
    t.mask("test_data/mask/t1.jpg")
    t.image("Fast_unet/figure1.jpg", expect=False)
    t.mock.forbidden += ["test_data/image/t1.jpg", "Fast_unet/figure1.jpg"]


def _feft(t):
    t.image("FEFT/4CH/a.png")
    t.image("FEFT/3VT/b.jpg")


def _fetal_planes_db(t):
    t.image("FETAL_PLANES_ZENODO/Images/Patient00012_Plane1_1_of_2.png", "Patient00012", channels=4)
    t.image("FETAL_PLANES_ZENODO/Images/Patient00013_Plane3_1_of_1.png", "Patient00013", channels=4)
    t.text("FETAL_PLANES_ZENODO/FETAL_PLANES_DB_data.csv")


def _fh_ps_aop(t):
    base = "Pubic Symphysis-Fetal Head Segmentation and Angle of Progression"
    channel = t.noise(16, 20)
    t.mha(f"{base}/image_mha/00001.mha", np.stack([channel] * 3))  # (3, H, W), identical channels
    t.mock.expected[(f"{base}/image_mha/00001.mha", -1)] = ""
    t.mock.shapes[(f"{base}/image_mha/00001.mha", -1)] = (16, 20)
    t.mha(f"{base}/label_mha/00001.mha", np.zeros((16, 20), np.uint8))
    t.mock.forbidden.append(f"{base}/label_mha/00001.mha")


def _gist514_db(t):
    t.image("usd514_jpeg_roi/images/g1.jpg", channels=3)
    t.text("usd514_jpeg_roi/annotations/train_anno_crop_split_0.json")


def _hc18(t):
    t.image("training_set/001_HC.png", "001")
    t.mask("training_set/001_HC_Annotation.png")
    t.image("training_set/002_2HC.png", "002")
    t.mask("training_set/002_2HC_Annotation.png")
    t.image("test_set/500_HC.png", "500")
    t.text("training_set_pixel_size_and_HC.csv")


def _jnu_ifm(t):
    t.image("vid01/image/vid01_0001.png", "vid01")
    t.mask("vid01/mask/vid01_0001_mask.png")
    t.mask("vid01/mask_enhance/vid01_0001.png")
    t.text("vid01/frame_label.csv")


def _kidneyus(t):
    t.image("kidneyUS_images_27_june_2023/12_IM-0001-0002_anon.png", "12")
    t.mask("labels/reviewed_masks_1/capsule/12_IM-0001-0002_anon.png")


def _luss_phantom(t):
    t.image("data-3/train/images/f1.png")
    t.mask("data-3/train/masks/f1.png")
    t.image("data-3/test/images/f2.png")
    t.video("VideoClips/clip1.webm", 4)  # optional
    t.mock.forbidden.append("VideoClips/clip1.webm")


def _mmotu_2d(t):
    t.image("OTU_2d/images/1.JPG", channels=3)
    t.mask("OTU_2d/annotations/1.PNG")
    t.mask("OTU_2d/annotations/1_binary.PNG")
    t.text("OTU_2d/train.txt")


def _mmotu_3d(t):
    t.image("OTU_3d/images/7.JPG", channels=3)
    t.mask("OTU_3d/annotations/7.PNG")


def _porcine(t):
    t.image("segmentation/train/images/p1.png")
    t.mask("segmentation/train/masks/p1.png")
    t.image("detection/d1.png")
    t.text("detection/d1.xml")


def _psfhs(t):
    t.mha("PSFHS/image_mha/03744.mha", np.stack([t.noise(16, 20)] * 3))
    t.mock.expected[("PSFHS/image_mha/03744.mha", -1)] = ""
    t.mha("PSFHS/label_mha/03744.mha", np.zeros((16, 20), np.uint8))
    t.mock.forbidden.append("PSFHS/label_mha/03744.mha")


def _s1(t):
    t.image("Data/TrainingDataSet/BreastTumourImages/1.jpg")
    t.mask("Data/TrainingDataSet/General-1-channel-Labels/1.png")
    t.mask("Data/TrainingDataSet/Expanded-3-channel-Labels/1.png")
    t.image("Data/TestingDataSet/Test-General-1-BreastTumourImages/9.jpg")
    t.image("Data/TestingDataSet/Test-Expanded-BreastTumourImages/9.jpg", expect=False)
    t.mask("Data/Segmentation_Results/9.png")
    t.mock.forbidden.append("Data/TestingDataSet/Test-Expanded-BreastTumourImages/9.jpg")


def _stmus_nda(t):
    base = "Polito-Radboud-DeepLearningUS"
    t.image(f"{base}/BB/Healthy/Images/b1.png")
    t.mask(f"{base}/BB/Healthy/Masks/b1.png")
    t.image(f"{base}/TA/Pathological/Images/t1.png")
    t.image("Segmentation_models/data/MuscleCNN/train/b1.png", expect=False)
    t.mask("Segmentation_models/data/MuscleCNN/trainannot/b1.png")
    t.mock.forbidden.append("Segmentation_models/data/MuscleCNN/train/b1.png")


def _stu_hospital(t):
    t.image("Hospital/Test_Image_1.png", h=32, w=32)
    t.mask("Hospital/mask_1.png", 40, 40)


def _thyroid_dataset(t):
    t.image("Thyroid Dataset/tn3k/trainval-image/0001.jpg")
    t.mask("Thyroid Dataset/tn3k/trainval-mask/0001.jpg")  # JPEG mask, same name
    t.image("Thyroid Dataset/tn3k/test-image/0002.jpg")
    t.image("Thyroid Dataset/tg3k/thyroid-image/0003.jpg")
    t.mask("Thyroid Dataset/tg3k/thyroid-mask/0003.jpg")
    t.image("Thyroid Dataset/DDTI dataset/DDTI/2_preprocessed_data/stage1/p_image/4.PNG")
    t.mask("Thyroid Dataset/DDTI dataset/DDTI/2_preprocessed_data/stage1/p_mask/4.PNG")
    t.zip_folder("Thyroid Dataset/DDTI dataset/DDTI", "Thyroid Dataset/DDTI dataset/DDTI.zip")


def _ultrasound_fetus(t):
    base = "Ultrasound Fetus Dataset/Ultrasound Fetus Dataset/Data/Data"
    t.image(f"{base}/train/benign/010_HC.png", "010")
    t.image(f"{base}/test/malignant/011_HC.png", "011")
    t.mask(f"{base}/test/malignant/011_HC_Annotation.png")
    t.image(f"{base}/Datasets/benign/010_HC.png", expect=False)  # duplicate tree
    t.mock.forbidden.append(f"{base}/Datasets/benign/010_HC.png")


def _upbd(t):
    t.image("JPEGImages/u1.jpg")
    t.text("json_train/u1.json")


# ---- videos, cines, volumes, HDF5 (F5-F7) ---------------------------------------------------------------

def _acouslic(t):
    base = "acouslic-ai-train-set"
    # 28 frames, 0-3 blank: 24 non-empty frames = exactly the cap of 24 -> frames 4..27.
    t.mha(f"{base}/images/stacked_fetal_ultrasound/uuid-a.mha", t.stack(28, empty=(0, 1, 2, 3)))
    t.expect_frames(f"{base}/images/stacked_fetal_ultrasound/uuid-a.mha", range(4, 28), "uuid-a", (16, 20))
    # 10 frames, 3 and 7 blank -> 8 frames.
    t.mha(f"{base}/images/stacked_fetal_ultrasound/uuid-b.mha", t.stack(10, empty=(3, 7)))
    t.expect_frames(f"{base}/images/stacked_fetal_ultrasound/uuid-b.mha", (0, 1, 2, 4, 5, 6, 8, 9), "uuid-b")
    t.mha(f"{base}/masks/stacked_fetal_abdomen/uuid-a.mha", np.zeros((28, 16, 20), np.uint8))
    t.mock.forbidden.append(f"{base}/masks/stacked_fetal_abdomen/uuid-a.mha")
    t.text(f"{base}/circumferences/fetal_abdominal_circumferences_per_sweep.csv")


def _blues(t):
    # 12 frames at 10 fps, sampled at 5 Hz -> stride 2 -> 0, 2, ..., 10 (cap 20 not reached).
    t.video("lus_videos/patient_7_L1.mp4", 12)
    t.expect_frames("lus_videos/patient_7_L1.mp4", (0, 2, 4, 6, 8, 10), "7", (32, 32))
    t.video("sample_video.gif", 3)
    t.mock.forbidden.append("sample_video.gif")
    t.text("severity.csv")
    t.text("appendix.pdf")


def _brachial_plexus(t):
    # 12 frames at 10 fps, sampled at 2 Hz -> stride 5 -> 0, 5, 10.
    t.video("data/Sonosite/videos/P_021_09.mp4", 12)
    t.expect_frames("data/Sonosite/videos/P_021_09.mp4", (0, 5, 10), "P_021_09")
    t.mask("data/Sonosite/ac_masks/P_021_09/P_021_09_000.jpg")
    t.mask("data/Sonosite/needle/needle_masks/P_021_09_000.jpg")
    t.mask("data/Sonosite/P_021_09_masks/P_021_09_001.jpg")
    t.text("data/Sonosite/bb_annotations/P_021_09.txt")
    t.text("subjects_data.csv")


def _camus(t):
    base = "database_nifti/patient0001"
    # half_sequence of 5 frames of 16 x 24: every frame (no cap); ED / ES repeat two of them.
    t.nifti(f"{base}/patient0001_2CH_half_sequence.nii.gz", t.stack(5, 16, 24))
    t.expect_frames(f"{base}/patient0001_2CH_half_sequence.nii.gz", range(5), "patient0001", (16, 24))
    for extra in ("2CH_ED", "2CH_ES", "2CH_half_sequence_gt", "2CH_ED_gt"):
        t.nifti(f"{base}/patient0001_{extra}.nii.gz", t.stack(1, 16, 24)[0])
        t.mock.forbidden.append(f"{base}/patient0001_{extra}.nii.gz")
    t.text(f"{base}/Info_2CH.cfg")


def _cardiacudc(t):
    # Kaggle's renamed inner archive; frames stored transposed -> records are 24 x 16.
    site = "cardiacUDC_dataset/Site_G_100"
    t.nifti(f"{site}/patient5-4_image.nii.gz", t.stack(8, 16, 24))
    t.expect_frames(f"{site}/patient5-4_image.nii.gz", range(8), "Site_G_100/patient5", (24, 16))
    t.nifti(f"{site}/patient5-4_label.nii.gz", np.zeros((8, 16, 24), np.uint8))
    t.nifti("cardiacUDC_dataset/label_all_frame/patient5-4_image.nii.gz", t.stack(8, 16, 24))
    t.mock.forbidden += [f"{site}/patient5-4_label.nii.gz",
                         "cardiacUDC_dataset/label_all_frame/patient5-4_image.nii.gz"]
    t.zip_folder("cardiacUDC_dataset", "cardiacUDC_dataset.change2zip")


def _echocp(t):
    t.nifti("EchoCP_dataset/003_r_image.nii.gz", t.stack(6, 16, 24))
    t.expect_frames("EchoCP_dataset/003_r_image.nii.gz", range(6), "003", (24, 16))
    t.nifti("EchoCP_dataset/003_r_label.nii.gz", np.zeros((6, 16, 24), np.uint8))
    t.mock.forbidden.append("EchoCP_dataset/003_r_label.nii.gz")
    t.text("echoCP_diagnosis_label.xlsx")


def _echonet_dynamic(t):
    # 10 frames, cap 4 evenly spaced -> 0, 3, 6, 9.
    t.video("EchoNet-Dynamic/Videos/0X1A.avi", 10)
    t.expect_frames("EchoNet-Dynamic/Videos/0X1A.avi", (0, 3, 6, 9), "0X1A")
    t.text("EchoNet-Dynamic/FileList.csv")
    t.text("EchoNet-Dynamic/VolumeTracings.csv")


def _echonet_pediatric(t):
    base = "pediatric_echo_avi/pediatric_echo_avi"
    t.video(f"{base}/A4C/Videos/CR1.avi", 10)
    t.expect_frames(f"{base}/A4C/Videos/CR1.avi", (0, 3, 6, 9), "CR1")
    t.video(f"{base}/PSAX/Videos/CR2.avi", 7)  # cap 4 of 7 -> 0, 2, 4, 6
    t.expect_frames(f"{base}/PSAX/Videos/CR2.avi", (0, 2, 4, 6), "CR2")
    t.text(f"{base}/A4C/FileList.csv")


def _pocus(t):
    # 3 Hz: 9 fps -> stride 3 and 10 fps -> stride 3; 10 and 12 frames -> 0, 3, 6, 9.
    t.video("data/pocus_videos/convex/Cov_a.mp4", 10, fps=9)
    t.expect_frames("data/pocus_videos/convex/Cov_a.mp4", (0, 3, 6, 9), "Cov_a")
    t.video("data/pocus_videos/linear/Reg_b.gif", 12, fps=10)
    t.expect_frames("data/pocus_videos/linear/Reg_b.gif", (0, 3, 6, 9), "Reg_b")
    t.image("data/pocus_images/convex/Pneu_c.jpg")
    for rel in ("data/ct/ct1.jpg", "data/pocus/staging.jpg", "data/pocus_images/label_uncertain/u.jpg"):
        t.image(rel, expect=False)
        t.mock.forbidden.append(rel)
    t.video("data/data_with_artifacts/art.mp4", 3)
    t.mock.forbidden.append("data/data_with_artifacts/art.mp4")


def _microseg(t):
    base = "Micro_Ultrasound_Prostate_Segmentation_Dataset"
    # 10 axial slices, 0, 1 and 9 blank -> 2..8 (cap 32 not reached); diagonal flip -> 20 x 16.
    t.nifti(f"{base}/train/micro_ultrasound_scans/microUS_train_01.nii.gz", t.stack(10, empty=(0, 1, 9)))
    t.expect_frames(f"{base}/train/micro_ultrasound_scans/microUS_train_01.nii.gz", range(2, 9),
                    "microUS_train_01", (20, 16))
    for folder in ("train/expert_annotations", "train/non_expert_annotations", "test/clinician_annotations"):
        t.nifti(f"{base}/{folder}/microUS_train_01.nii.gz", np.zeros((10, 16, 20), np.uint8))
        t.mock.forbidden.append(f"{base}/{folder}/microUS_train_01.nii.gz")


def _regpro(t):
    # (6, 16, 12) volume sliced along axis 2 -> 12 slices of 6 x 16, flipped to 16 x 6; slices 0, 11 blank.
    volume = t.stack(6, 16, 12)
    volume[:, :, 0] = 0
    volume[:, :, 11] = 0
    t.nifti("train/us_images/case000001.nii.gz", volume)
    t.expect_frames("train/us_images/case000001.nii.gz", range(1, 11), "case000001", (16, 6))
    for folder in ("us_labels", "mr_images", "mr_labels"):
        t.nifti(f"train/{folder}/case000001.nii.gz", t.stack(6, 16, 12))
        t.mock.forbidden.append(f"train/{folder}/case000001.nii.gz")


def _segthy(t):
    base = "US_volunteer_dataset/ground_truth_data"
    # 9 slices, stride 2 -> 0, 2, 4, 6, 8; flipped -> 20 x 16.
    t.nifti(f"{base}/US/1_P3_1_left_US.nii", t.stack(9))
    t.expect_frames(f"{base}/US/1_P3_1_left_US.nii", (0, 2, 4, 6, 8), "P3", (20, 16))
    t.nifti(f"{base}/US_thyroid_label/1_P3_1_left_US_thyroid.nii", np.zeros((9, 16, 20), np.uint8))
    t.mock.forbidden.append(f"{base}/US_thyroid_label/1_P3_1_left_US_thyroid.nii")
    t.nifti("MRI_data/mri_volume.nii", t.stack(4))
    t.zip_folder("MRI_data", "MRI_data.zip")  # must never be unpacked


def _thyroid_cineclip(t):
    import h5py

    ids = [b"a1", b"a1", b"b2", b"a1", b"b2", b"b2", b"a1"]
    with h5py.File(t.path("dataset.hdf5"), "w") as handle:
        handle["image"] = t.stack(len(ids), 16, 20)
        handle["mask"] = np.zeros((len(ids), 16, 20), np.uint8)
        handle["annot_id"] = np.array(ids)
        handle["frame_num"] = np.arange(len(ids))
    for position, value in enumerate(ids):
        t.mock.expected[("dataset.hdf5", position)] = value.decode()
    t.text("metadata.csv")


BUILDERS = {key: globals()[f"_{key}"] for key in KEYS}


def build(key: str, raw_dir: str, seed: int = 0) -> Mock:
    """Writes the mock of dataset `key` under `raw_dir/<key>/` and returns what the converter must write."""
    tree = _Tree(os.path.join(raw_dir, key), seed)
    BUILDERS[key](tree)
    return tree.mock
