"""Folder sources of a dataset card: 2-D images and labels on disk, paired by file stem; and the
reading of cases, which imported sources (`pipeline.data.importers`) share.

Images: PNG, TIFF, JPEG, BMP, NIfTI, MHA, NRRD; grey, RGB or multi-channel (TIFF planes `CYX` or
samples `YXS`), 8/16-bit or float. Labels, masks and instances: the same formats but JPEG (lossy),
one value per pixel (grey RGB is read as grey); instances hold integer instance ids (0 = background),
kept as ids (uint16), not binarised. A case's image is one file or one file per channel (nnU-Net's
CASE_0000, CASE_0001, ...), stacked. Every problem names the file: an image without a label (or
the reverse), an unsupported or unreadable file, shapes that differ, label values outside the
card's classes, instance ids that are not integers >= 0 or more than 65535 of them, a channel count
other than the card's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.cards import DatasetCard, FolderSource
from pipeline.data.io import checked_image, read_raster, sha256_file
from pipeline.errors import SegpipeError, raise_problems
from pipeline.files import NIFTI_SUFFIXES, SITK_SUFFIXES, TIFF_SUFFIXES

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", *TIFF_SUFFIXES, *SITK_SUFFIXES, *NIFTI_SUFFIXES)
LABEL_SUFFIXES = tuple(s for s in IMAGE_SUFFIXES if s not in (".jpg", ".jpeg"))
CHANNEL_AXES = "CSQ"  # a TIFF axis before YX read as channels (tifffile: planes, samples, unknown)
ROLE_NAMES = {"image": "an image", "label": "a label", "fov": "a mask", "instances": "an instance mask"}
PARTS = (
    ("train", "images", {"label": "labels", "fov": "masks", "instances": "instances"}),
    ("test", "test_images", {"label": "test_labels", "fov": "test_masks", "instances": "test_instances"}),
)
MAX_INSTANCES = 65535  # prepared instances are uint16


@dataclass(frozen=True)
class FolderCase:
    """One case of a folder (or imported) source: its image file(s) and its other files by role."""

    case: str
    part: str  # "train" (the images folder), "test" (test_images) or, from a datalist, "val"
    images: tuple[Path, ...]  # one file, or one per channel (stacked in this order)
    files: dict[str, Path]  # label, and fov (a mask) and instances if any


def stem(path: Path) -> str:
    """The file name without its format suffix (`.nii.gz` counts as one)."""
    name = path.name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else path.stem


def _suffix(path: Path) -> str:
    return ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix.lower()


def folder_files(folder: Path) -> list[Path]:
    """Every file of `folder` but hidden ones (`.DS_Store`), sorted; a missing folder is an error."""
    if not folder.is_dir():
        raise SegpipeError(f"{folder}: folder not found (expected a folder of 2-D images)")
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _by_stem(folder: Path, suffixes: tuple[str, ...], what: str, problems: list[str]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in folder_files(folder):
        if not path.is_file() or _suffix(path) not in suffixes:
            problems.append(f"{path}: not usable as {what}; expected {', '.join(suffixes)} files (no subfolders)")
        elif stem(path) in found:
            problems.append(f"{path}: the same stem as {found[stem(path)].name}; one file per stem")
        else:
            found[stem(path)] = path
    return found


def pair_cases(source: FolderSource) -> list[FolderCase]:
    """The cases of a folder source: images paired with labels (and masks, instances) by file stem."""
    problems: list[str] = []
    cases: dict[str, FolderCase] = {}
    folders = source.folders()
    for part, image_key, role_keys in PARTS:
        if image_key not in folders:
            continue
        keys = {"image": image_key, **{role: key for role, key in role_keys.items() if key in folders}}
        roles = {"image": _by_stem(folders[image_key], IMAGE_SUFFIXES, ROLE_NAMES["image"], problems)}
        roles.update(
            {
                role: _by_stem(folders[keys[role]], LABEL_SUFFIXES, ROLE_NAMES[role], problems)
                for role in keys
                if role != "image"
            }
        )
        for role, files in roles.items():
            for key, path in files.items():
                if key not in roles["image"]:
                    problems.append(f"{path}: {ROLE_NAMES[role]} without an image (no {key}.* in {folders[image_key]})")
        for key, image in roles["image"].items():
            missing = [role for role in roles if key not in roles[role]]
            if missing:
                problems.append(
                    f"{image}: an image without {' and '.join(ROLE_NAMES[r] for r in missing)} "
                    f"(no {key}.* in {', '.join(str(folders[keys[r]]) for r in missing)})"
                )
                continue
            case = key if part == "train" else f"test_{key}"
            if case in cases:
                problems.append(f"{image}: case {case!r} twice (also {cases[case].images[0]}); rename one")
                continue
            others = {role: roles[role][key] for role in roles if role != "image"}
            cases[case] = FolderCase(case, part, (image,), others)
    raise_problems(problems, "the dataset's folders do not pair up")
    if not cases:
        raise SegpipeError(f"{source.images}: no images found")
    return [cases[c] for c in sorted(cases)]


def read_slice(path: Path, max_values: int | None = None) -> np.ndarray:
    """A 2-D image as (H, W) or (H, W, C); a 3-D volume or a stack is an error naming the file."""
    suffix = _suffix(path)
    array = read_raster(path, max_values)
    if suffix in TIFF_SUFFIXES:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            axes = tif.series[0].axes
        keep = [i for i, a in enumerate(axes) if a in "YX" or array.shape[i] > 1]
        array, axes = array.reshape([array.shape[i] for i in keep]), "".join(axes[i] for i in keep)
        if len(axes) == 3 and axes[0] in CHANNEL_AXES and axes[1:] == "YX":
            return np.moveaxis(array, 0, -1)
        if axes not in ("YX", "YXS"):
            raise SegpipeError(
                f"{path}: a TIFF with axes {axes} {array.shape}; expected a 2-D image (YX), "
                "RGB (YXS) or channel planes (CYX)"
            )
        return array
    volume = SegpipeError(f"{path}: a volume of shape {array.shape}; expected a 2-D slice")
    if suffix in NIFTI_SUFFIXES:  # (X, Y) or (X, Y, 1, ...)
        plane = array.reshape(array.shape[:2] + tuple(n for n in array.shape[2:] if n > 1))
        if plane.ndim != 2:
            raise volume
        return plane
    if suffix in SITK_SUFFIXES:  # (Y, X), (Y, X, C) or a 3-D (Z, Y, X[, C]) with Z = 1
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        size = reader.GetSize()
        if len(size) == 3 and size[2] == 1:
            return array[0]
        if len(size) != 2:
            raise volume
    return array


def read_plane(path: Path, max_values: int | None = None) -> np.ndarray:
    """A label or mask image as (H, W): one value per pixel (grey stored as RGB(A) is read as grey)."""
    array = read_slice(path, max_values)
    if array.ndim == 3:
        colour = array[..., :3]
        if array.shape[-1] not in (3, 4) or not (colour == colour[..., :1]).all():
            raise SegpipeError(
                f"{path}: a colour image {array.shape}; expected one value per pixel (a single-channel label or mask)"
            )
        array = array[..., 0]
    return array


def map_labels(label: np.ndarray, card: DatasetCard, path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Label values -> class indices 0..K-1 (uint8) as the card's classes say, and the pixels that
    count (False at the card's ignore_value; None without one). Other values: an error naming `path`."""
    values = np.asarray(card.label_values)
    allowed = np.append(values, card.ignore_value) if card.ignore_value is not None else values
    outside = np.unique(label[~np.isin(label, allowed)])
    if outside.size:
        shown = ", ".join(f"{v:g}" for v in outside[:10].tolist()) + (", ..." if outside.size > 10 else "")
        raise SegpipeError(
            f"{path}: label values {shown} are not in the classes of {card.path} "
            f"({card.classes}, ignore_value {card.ignore_value})"
        )
    index = np.zeros(label.shape, np.uint8)
    for k, value in enumerate(card.label_values):
        index[label == value] = k
    return index, (None if card.ignore_value is None else label != card.ignore_value)


def instance_ids(plane: np.ndarray, path: Path) -> np.ndarray:
    """An instance image as uint16 ids (0 = background), as stored; ids above 65535 (but at most 65535
    of them) renumbered 1..n in order of value. Values that are not integers >= 0, or more than 65535
    ids: an error naming `path`."""
    values = np.unique(plane)
    if values.dtype.kind == "f":
        wrong = values[~np.isfinite(values) | (values != np.round(values))]
    else:
        wrong = values[:0] if values.dtype.kind in "biu" else values
    if wrong.size:
        shown = ", ".join(str(v) for v in wrong[:5].tolist()) + (", ..." if wrong.size > 5 else "")
        raise SegpipeError(
            f"{path}: instance values {shown} ({plane.dtype}) are not integers; expected integer "
            "instance ids, 0 = background"
        )
    if values.size and values[0] < 0:
        raise SegpipeError(f"{path}: negative instance ids (down to {values[0]:g}); expected ids >= 0, 0 = background")
    ids = values[values > 0]
    if ids.size > MAX_INSTANCES:
        raise SegpipeError(
            f"{path}: {ids.size} instance ids; at most {MAX_INSTANCES} (the prepared instances are uint16)"
        )
    if ids.size and ids[-1] > MAX_INSTANCES:
        return np.where(plane > 0, np.searchsorted(ids, plane) + 1, 0).astype(np.uint16)
    return plane.astype(np.uint16)


def read_channels(paths: tuple[Path, ...], max_values: int | None = None) -> np.ndarray:
    """A case's image as (H, W, C): its file(s) read and stacked along the channels, in order."""
    planes = []
    for path in paths:
        array = checked_image(read_slice(path, max_values), path)  # 1-bit images: uint8 (NIfTI has no bool)
        if planes and array.shape[:2] != planes[0].shape[:2]:
            raise SegpipeError(
                f"{path}: shape {array.shape[:2]}, its first channel {paths[0].name} is "
                f"{planes[0].shape[:2]}; expected the same H x W"
            )
        planes.append(array[..., None] if array.ndim == 2 else array)
    return planes[0] if len(planes) == 1 else np.concatenate(planes, axis=-1)


def load_case(case: FolderCase, card: DatasetCard, max_values: int) -> dict[str, np.ndarray]:
    """The prepared volumes of one case (channel-first): image, label (class indices), fov (the
    mask and/or the pixels not at ignore_value) when the card has either, and instances (uint16
    ids) when the case has an instance mask."""
    image = read_channels(case.images, max_values)
    if image.shape[-1] != len(card.channels):
        files = f" in {len(case.images)} files" if len(case.images) > 1 else ""
        raise SegpipeError(
            f"{case.images[0]}: {image.shape[-1]} channel(s){files}; {card.path} declares "
            f"{len(card.channels)} ({', '.join(card.channels)})"
        )
    vols = {"image": np.moveaxis(image, -1, 0)}
    planes = {
        role: read_plane(case.files[role], max_values) for role in ("label", "fov", "instances") if role in case.files
    }
    for role, plane in planes.items():
        if plane.shape != image.shape[:2]:
            raise SegpipeError(
                f"{case.files[role]}: {role} of shape {plane.shape}, its image "
                f"{case.images[0].name} is {image.shape[:2]}; expected the same H x W"
            )
    label, valid = map_labels(planes["label"], card, case.files["label"])
    vols["label"] = label[None]
    fov = planes["fov"] != 0 if "fov" in planes else None
    if valid is not None:
        fov = valid if fov is None else fov & valid
    if fov is not None:
        vols["fov"] = fov.astype(np.uint8)[None]
    if "instances" in planes:
        vols["instances"] = instance_ids(planes["instances"], case.files["instances"])[None]
    return vols


def load_cases(cases: list[FolderCase], card: DatasetCard, max_values: int) -> dict[str, dict[str, np.ndarray]]:
    """Every case's volumes; all problems are reported together, each naming its file."""
    loaded, problems = {}, []
    for case in cases:
        try:
            loaded[case.case] = load_case(case, card, max_values)
        except SegpipeError as exc:
            problems.append(str(exc))
    raise_problems(problems, f"{card.name}: the files do not match {card.path}")
    return loaded


def file_rows(cases: list[FolderCase]) -> list[dict[str, str]]:
    """The per-file manifest of the cases: path, case, role (image, label, fov, instances) and sha256 of
    every file."""
    rows = []
    for case in cases:
        for role, path in [("image", p) for p in case.images] + list(case.files.items()):
            rows.append({"path": str(path), "case": case.case, "role": role, "sha256": sha256_file(path)})
    return rows


def fingerprint(source: FolderSource) -> list[dict[str, str]]:
    """Every file of the source's folders with its sha256: what `segpipe download` records for DVC."""
    return [
        {"folder": key, "name": path.name, "sha256": sha256_file(path)}
        for key, folder in source.folders().items()
        for path in folder_files(folder)
        if path.is_file()
    ]
