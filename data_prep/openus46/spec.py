"""One OpenUS-46 dataset spec, and how its files are found: include globs, exclude rules, subject ids.

The USF-MAE training set was "every PNG under a folder", which ingests masks as easily as images. Here
every dataset names its inputs positively (`include` globs, relative to `RAW/<key>/`) and then removes
what must stay out, in three layers (docs/openus46.md, "Format families"):

* `exclude_dirs`: any directory component matching one of these patterns drops the file (masks that share
  the image's file name, such as BUS `GT/`, ACOUSLIC `masks/`, TN3K `*-mask/`, are only separable here);
* `exclude_files`: file-name patterns (`*_mask.tif`, `*_Annotation.png`);
* `GLOBAL_EXCLUDES`: the safety net applied to every path component of every dataset, unless the spec
  waives a pattern (BrEaST keeps its images in a folder whose name contains "masks").

Patterns are case-insensitive. Globs support `*`, `?`, `[...]`, `{a,b}` and `**` (any number of folders,
zero included).

`discover` accounts for every file under the dataset folder: an input, excluded with a reason, or left out by
category (`not_included` when no include glob matches it; symlinks that cannot be followed and unpacking
leftovers as reported by `data_prep.walk`), so the manifest can show that nothing vanished.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from functools import lru_cache

from data_prep.formats.dicom import DICOM_EXTENSIONS
from data_prep.formats.hdf5 import HDF5_EXTENSIONS
from data_prep.formats.sampling import FrameSampling
from data_prep.formats.video import VIDEO_EXTENSIONS
from data_prep.formats.volumes import METAIMAGE_EXTENSIONS, NIFTI_EXTENSIONS
from data_prep.walk import walk

# Still images read with formats.image2d. GIF is absent on purpose: POCUS ships GIF clips, read as video.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
INPUT_EXTENSIONS = (IMAGE_EXTENSIONS + METAIMAGE_EXTENSIONS + NIFTI_EXTENSIONS + VIDEO_EXTENSIONS
                    + HDF5_EXTENSIONS + DICOM_EXTENSIONS)

# docs/openus46.md: "Apply the global exclusion list to every dataset on top of its own rules".
GLOBAL_EXCLUDES = ("*mask*", "*_gt*", "*annot*", "label*", "gt", "segmentationclass*", "*_label.nii*",
                   "array_format", "segmentation_results", "__macosx", ".ds_store", "._*")

# Format families of docs/openus46.md, for the --list table.
FAMILIES = {
    "F1": "2-D images, masks in a separate folder",
    "F2": "2-D images, masks in the same folder",
    "F3": "2-D images without masks",
    "F4": "single 2-D MetaImage",
    "F5": "video / cine",
    "F6": "3-D volume",
    "F7": "HDF5 frames",
}


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Everything the converter needs to know about one dataset; see the module docstring for the rules.

    subject: regex searched in the relative path; its `subject` group is the patient / case / video id.
    sampling: frame or slice sampling of the dataset's sequence files (videos, cines, volumes, HDF5).
    optional_include: inputs converted only with --include_optional (videos that overlap the stills).
    mha_stack: `.mha` files hold a 2-D+t stack (ACOUSLIC) rather than one 2-D image.
    hdf5_dataset / hdf5_group: the image dataset in an HDF5 file, and the id dataset sampled per group.
    colour_is_content: colour is signal (Doppler, CEUS), so de-annotation must not erase colour.
    unpack_skip: zip file names never to extract (Segthy's MRI archive).
    holdout: a downstream benchmark, held out of pretraining by default.
    """

    key: str
    name: str
    anatomy: str
    family: str
    format: str
    licence: str
    source: str
    include: tuple[str, ...]
    exclude_dirs: tuple[str, ...] = ()
    exclude_files: tuple[str, ...] = ()
    optional_include: tuple[str, ...] = ()
    waive_global: tuple[str, ...] = ()
    subject: str | None = None
    sampling: FrameSampling = dataclasses.field(default_factory=FrameSampling)
    mha_stack: bool = False
    hdf5_dataset: str = "image"
    hdf5_group: str | None = None
    colour_is_content: bool = False
    unpack_skip: tuple[str, ...] = ()
    holdout: bool = False
    notes: str = ""

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"{self.key}: unknown format family {self.family!r}")
        if not self.include:
            raise ValueError(f"{self.key}: a spec needs at least one include glob")
        if self.subject is not None and "(?P<subject>" not in self.subject:
            raise ValueError(f"{self.key}: subject regex needs a (?P<subject>...) group")


def _brace_expand(pattern: str) -> list[str]:
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end():]
    return [out for option in match.group(1).split(",") for out in _brace_expand(head + option + tail)]


def _glob_to_regex(pattern: str) -> str:
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]+/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i + 1)
            body = pattern[i + 1:end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


@lru_cache(maxsize=512)
def compile_globs(patterns: tuple[str, ...]) -> re.Pattern | None:
    """One case-insensitive regex matching a relative posix path against any of `patterns`."""
    expanded = [p for pattern in patterns for p in _brace_expand(pattern)]
    if not expanded:
        return None
    return re.compile("^(?:" + "|".join(_glob_to_regex(p) for p in expanded) + ")$", re.IGNORECASE)


def _matches_any(name: str, patterns: tuple[str, ...]) -> str | None:
    lower = name.lower()
    for pattern in patterns:
        if fnmatch.fnmatchcase(lower, pattern.lower()):
            return pattern
    return None


def exclusion_reason(spec: DatasetSpec, relpath: str) -> str | None:
    """Why `relpath` (posix, relative to the dataset root) is not an input of `spec`, or None if it is."""
    parts = relpath.split("/")
    directories, filename = parts[:-1], parts[-1]
    if not filename.lower().endswith(INPUT_EXTENSIONS):
        return "not an image, volume or video file"
    for directory in directories:
        if pattern := _matches_any(directory, spec.exclude_dirs):
            return f"excluded folder {directory!r} ({pattern})"
    if pattern := _matches_any(filename, spec.exclude_files):
        return f"excluded file name ({pattern})"
    global_patterns = tuple(p for p in GLOBAL_EXCLUDES if p not in spec.waive_global)
    for part in parts:
        if pattern := _matches_any(part, global_patterns):
            return f"global exclusion {pattern!r} on {part!r}"
    return None


def _unpacking_leftover(relative_dir: str) -> str | None:
    """Half-extracted zips (`<stem>.partial/`, see `formats.archives`) are not entered."""
    return "unpacking_leftover" if relative_dir.endswith(".partial") else None


def discover(spec: DatasetSpec, root: str, include_optional: bool = False
             ) -> tuple[list[str], dict[str, str], dict[str, list[str]]]:
    """(input files, {excluded file: reason}, {category: files left out}) for a dataset extracted at `root`.

    Only files matched by an include glob are considered at all; those are then filtered by the exclude
    rules, and the reasons of files that matched an include but were excluded are returned for the manifest.
    The other files are left out as `not_included`, next to what the walk could not read (module docstring).
    """
    globs = spec.include + (spec.optional_include if include_optional else ())
    include = compile_globs(globs)
    tree = walk(root, prune=_unpacking_leftover)
    inputs, excluded, left_out = [], {}, tree.left_out
    for relpath in tree.files:
        if not include.match(relpath):
            left_out.setdefault("not_included", []).append(relpath)
            continue
        reason = exclusion_reason(spec, relpath)
        if reason is None:
            inputs.append(relpath)
        else:
            excluded[relpath] = reason
    return inputs, excluded, left_out


@lru_cache(maxsize=128)
def _subject_regex(pattern: str) -> re.Pattern:
    return re.compile(pattern)


def subject_of(spec: DatasetSpec, relpath: str) -> str:
    """The subject id of a file from the spec's regex, or "" when the layout does not give one."""
    if spec.subject is None:
        return ""
    match = _subject_regex(spec.subject).search(relpath)
    return match.group("subject") if match else ""
