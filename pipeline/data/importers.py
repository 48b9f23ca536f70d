"""Sources in the formats users already have, read in place: nnU-Net v2 raw dataset folders and
MONAI datalists (`segpipe dataset import`, and a card's `source: {nnunet: ...}` or
`source: {datalist: ..., base_dir: ...}`).

Both list their cases as `FolderCase`s (image channel files, label) with a part, read by prepare
the same way as a folder source's:
  nnU-Net   imagesTr/CASE_0000{file_ending}, CASE_0001... (channels) + labelsTr/CASE{file_ending}
            -> train (prepare.val_fraction -> val); imagesTs + labelsTs -> test when labelsTs
            exists. Files not ending in file_ending are left aside, as nnU-Net does.
  datalist  training -> train (prepare.val_fraction -> val, unless `validation` lists the
            validation cases) and test -> test; test entries without a label cannot be scored
            and are left out (a warning says so). Case ids: the image paths below their common
            folder, without suffix, `/` -> `_`.
Every problem names the file: a missing dataset.json key, a region-based label, a case missing
a channel, a label without an image, a datalist entry pointing to a missing file.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.data.cards import DatalistSource, ImportedSource, NnunetSource
from pipeline.data.folders import FolderCase, folder_files, stem
from pipeline.data.io import sha256_file
from pipeline.errors import SegpipeError, raise_problems

log = logging.getLogger(__name__)

DATASET_JSON = "dataset.json"
NNUNET_KEYS = ("channel_names", "labels", "numTraining", "file_ending")
IGNORE_LABEL = "ignore"  # nnU-Net's label name for unlabelled pixels
CHANNEL_FILE = re.compile(r"(?P<case>.+)_(?P<channel>\d{4})")
DATALIST_PARTS = (("training", "train"), ("validation", "val"), ("test", "test"))


@dataclass(frozen=True)
class NnunetDataset:
    """What an nnU-Net dataset.json declares."""

    channels: list[str]  # channel_names in channel order
    classes: dict[str, int]  # name -> label value, by value; the ignore label excluded
    ignore_value: int | None
    num_training: int
    file_ending: str


def detect_source(path: Path, base_dir: Path | None = None) -> ImportedSource:
    """PATH as an nnU-Net raw dataset folder (holding dataset.json) or a MONAI datalist JSON file."""
    path = Path(path).expanduser()
    if path.is_dir():
        if base_dir is not None:
            raise SegpipeError(f"{path}: --base-dir is for datalists; an nnU-Net folder holds its files")
        if not (path / DATASET_JSON).is_file():
            raise SegpipeError(
                f"{path}: a folder without {DATASET_JSON}; expected an nnU-Net v2 raw dataset "
                "folder (dataset.json, imagesTr, labelsTr) or a MONAI datalist JSON file"
            )
        return NnunetSource(path)
    if path.is_file() and path.suffix.lower() == ".json":
        return DatalistSource(path, None if base_dir is None else Path(base_dir).expanduser())
    raise SegpipeError(
        f"{path}: not an nnU-Net v2 raw dataset folder (with {DATASET_JSON}) nor a MONAI datalist "
        ".json file" + ("" if path.exists() else " (not found)")
    )


def list_cases(source: ImportedSource) -> list[FolderCase]:
    """The labelled cases of an imported source, each with its part (train, val, test)."""
    return nnunet_cases(source) if isinstance(source, NnunetSource) else datalist_cases(source)


def fingerprint(source: ImportedSource) -> list[dict[str, str]]:
    """dataset.json (or the datalist) and every file of the cases with its sha256, for DVC to see."""
    described = source.root / DATASET_JSON if isinstance(source, NnunetSource) else source.file
    paths = [described] + [p for case in list_cases(source) for p in (*case.images, *case.files.values())]
    return [{"path": str(p), "sha256": sha256_file(p)} for p in paths]


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SegpipeError(f"{path}: not found; expected {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SegpipeError(f"{path}: not valid JSON ({exc}); expected {what}") from exc


# --- nnU-Net v2 raw dataset folders ------------------------------------------------------------------


def read_dataset_json(root: Path) -> NnunetDataset:
    """The folder's dataset.json, checked: channel_names, labels (name -> value; `ignore` -> the
    ignore value; region-based labels refused), numTraining and file_ending."""
    path = Path(root) / DATASET_JSON
    raw = _read_json(path, "nnU-Net v2's dataset.json")
    missing = [key for key in NNUNET_KEYS if not isinstance(raw, dict) or key not in raw]
    if missing:
        raise SegpipeError(f"{path}: missing keys {missing}; an nnU-Net v2 dataset.json has {list(NNUNET_KEYS)}")
    names = raw["channel_names"]
    if (
        not isinstance(names, dict)
        or not names
        or set(names) != {str(i) for i in range(len(names))}
        or not all(isinstance(v, str) and v for v in names.values())
    ):
        raise SegpipeError(f'{path}: channel_names must map "0", "1", ... to channel names, got {names!r}')
    labels = raw["labels"]
    if not isinstance(labels, dict):
        raise SegpipeError(f"{path}: labels must map class names to label values, got {labels!r}")
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            raise SegpipeError(
                f"{path}: label {name!r} is region-based ({value}); region-based labels are not "
                "supported: one label value per class"
            )
        if isinstance(value, bool) or not isinstance(value, int):
            raise SegpipeError(f"{path}: label {name!r}: {value!r} is not an integer label value")
    classes = dict(sorted(((n, v) for n, v in labels.items() if n != IGNORE_LABEL), key=lambda item: item[1]))
    if len(classes) < 2:
        raise SegpipeError(f"{path}: labels {labels}: expected at least two classes (background and one more)")
    ending, count = raw["file_ending"], raw["numTraining"]
    if not isinstance(ending, str) or not ending.startswith("."):
        raise SegpipeError(f'{path}: file_ending must be a suffix such as ".png", got {ending!r}')
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise SegpipeError(f"{path}: numTraining must be a positive integer, got {count!r}")
    return NnunetDataset([names[str(i)] for i in range(len(names))], classes, labels.get(IGNORE_LABEL), count, ending)


def nnunet_cases(source: NnunetSource) -> list[FolderCase]:
    """imagesTr/labelsTr (train) and, when labelsTs exists, imagesTs/labelsTs (test), paired by case id."""
    info = read_dataset_json(source.root)
    problems: list[str] = []
    cases = _nnunet_part(source.root, "Tr", "train", info, problems)
    if (source.root / "labelsTs").is_dir():
        cases += _nnunet_part(source.root, "Ts", "test", info, problems)
    raise_problems(problems, f"{source.root}: the nnU-Net dataset does not pair up")
    n_train = sum(case.part == "train" for case in cases)
    if n_train != info.num_training:
        raise SegpipeError(
            f"{source.root / DATASET_JSON}: numTraining is {info.num_training}, imagesTr/labelsTr "
            f"hold {n_train} case(s) with file_ending {info.file_ending}"
        )
    return cases


def _nnunet_part(root: Path, suffix: str, part: str, info: NnunetDataset, problems: list[str]) -> list[FolderCase]:
    """The cases of imagesXX + labelsXX: every channel file of a case present, a label per case."""
    images, labels = root / f"images{suffix}", root / f"labels{suffix}"
    ending, n_names = info.file_ending, len(info.channels)
    channels: dict[str, dict[int, Path]] = {}
    for path in _ending_with(images, ending):
        found = CHANNEL_FILE.fullmatch(path.name[: -len(ending)])
        if found is None:
            problems.append(f"{path}: not an nnU-Net image name; expected CASE_0000{ending} (a 4-digit channel)")
        elif int(found["channel"]) >= n_names:
            problems.append(
                f"{path}: channel {int(found['channel'])}, but {root / DATASET_JSON} declares {n_names} channel_names"
            )
        else:
            channels.setdefault(found["case"], {})[int(found["channel"])] = path
    expected = sorted({k for files in channels.values() for k in files})
    label_of = {path.name[: -len(ending)]: path for path in _ending_with(labels, ending)}
    for case, path in label_of.items():
        if case not in channels:
            problems.append(f"{path}: a label without an image (no {case}_0000{ending} in {images})")
    cases = []
    for case, files in sorted(channels.items()):
        absent = [images / f"{case}_{k:04d}{ending}" for k in expected if k not in files]
        if absent:
            problems.append(
                f"{absent[0]}: missing; case {case} lacks channel(s) "
                f"{[k for k in expected if k not in files]} that other cases have"
            )
        elif case not in label_of:
            problems.append(f"{files[expected[0]]}: an image without a label (no {case}{ending} in {labels})")
        else:
            name = case if part == "train" else f"test_{case}"
            cases.append(FolderCase(name, part, tuple(files[k] for k in expected), {"label": label_of[case]}))
    return cases


def _ending_with(folder: Path, ending: str) -> list[Path]:
    """The files of `folder` whose name ends with `ending` (others are left aside, as nnU-Net does)."""
    return [p for p in folder_files(folder) if p.is_file() and p.name.endswith(ending)]


# --- MONAI datalists ---------------------------------------------------------------------------------


def datalist_cases(source: DatalistSource) -> list[FolderCase]:
    """The datalist's labelled entries: training -> train, validation -> val, test -> test."""
    raw = _read_json(source.file, "a MONAI datalist (training, validation, test lists of {image, label})")
    if not isinstance(raw, dict) or not isinstance(raw.get("training"), list) or not raw["training"]:
        nnunet = isinstance(raw, dict) and "channel_names" in raw
        hint = "; an nnU-Net dataset.json: import its folder" if nnunet else ""
        raise SegpipeError(
            f"{source.file}: expected a MONAI datalist: a JSON object whose `training` is a "
            f'non-empty list of {{"image": ..., "label": ...}}{hint}'
        )
    problems: list[str] = []
    entries: list[tuple[str, tuple[Path, ...], Path]] = []
    for key, part in DATALIST_PARTS:
        items = raw.get(key) or []
        if not isinstance(items, list):
            problems.append(f"{source.file}: `{key}` must be a list of {{image, label}} entries")
            continue
        unlabelled = 0
        for i, item in enumerate(items):
            where = f"{source.file}: {key}[{i}]"
            if part == "test" and (isinstance(item, str) or (isinstance(item, dict) and "label" not in item)):
                unlabelled += 1
                continue
            files = _entry_files(item, where, source.root, problems)
            if files is not None:
                entries.append((part, *files))
        if unlabelled:
            log.warning(
                "%s: %d of %d test entries have no label and are left out (they cannot be scored)",
                source.file,
                unlabelled,
                len(items),
            )
    raise_problems(problems, f"{source.file}: the datalist's entries are not usable")
    return _datalist_ids(entries, source.file)


def _entry_files(item: Any, where: str, root: Path, problems: list[str]) -> tuple[tuple[Path, ...], Path] | None:
    """An entry's image file(s) and label, resolved against `root`; None (and a problem) if unusable."""
    image = item.get("image") if isinstance(item, dict) else None
    names = image if isinstance(image, list) else [image]
    label = item.get("label") if isinstance(item, dict) else None
    if not names or not all(isinstance(n, str) and n for n in names) or not isinstance(label, str) or not label:
        problems.append(f'{where}: expected {{"image": FILE or [FILE per channel], "label": FILE}}, got {item!r}')
        return None
    paths = [root / n for n in names] + [root / label]
    absent = [p for p in paths if not p.is_file()]
    for path in absent:
        problems.append(f"{path}: listed in {where} but not found (paths are relative to {root})")
    return None if absent else (tuple(paths[:-1]), paths[-1])


def _datalist_ids(entries: list[tuple[str, tuple[Path, ...], Path]], where: Path) -> list[FolderCase]:
    """Cases named by their first image's path below the images' common folder (suffix dropped)."""
    if not entries:
        raise SegpipeError(f"{where}: no labelled entries")
    common = Path(os.path.commonpath([images[0].parent.resolve() for _, images, _ in entries]))
    cases: dict[str, FolderCase] = {}
    problems = []
    for part, images, label in entries:
        rel = images[0].resolve().parent.relative_to(common) / stem(images[0])
        case = "_".join(rel.parts)
        if case in cases:
            problems.append(
                f"{images[0]}: case {case!r} twice in {where} (also {cases[case].images[0]}); "
                "each image once, in one of training, validation and test"
            )
            continue
        cases[case] = FolderCase(case, part, images, {"label": label})
    raise_problems(problems, f"{where}: the datalist's cases are not distinct")
    return [cases[c] for c in sorted(cases)]
