"""`segpipe dataset add` / `segpipe dataset import`: a dataset joins the project with a card and two
config edits.

`add` pairs folders (errors name the files); `import` lists the cases of an nnU-Net v2 raw folder
or a MONAI datalist (`pipeline.data.importers`; nothing is copied). Both read the labels' values
(an nnU-Net dataset.json states them) and the first image's channel count, and write, each
atomically:
  configs/datasets/NAME.yaml   the card (`pipeline.data.cards.card_text`)
  configs/augment.yaml         `NAME: {<<: *generic}`, the generic augmentation preset (text appended)
  configs/data.yaml            NAME in `datasets` and `folder_datasets`, the DVC matrix (comments kept)
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pipeline.config import read_yaml
from pipeline.data.cards import (
    FolderSource,
    ImportedSource,
    NnunetSource,
    card_path,
    card_text,
    check_folders,
    parse_card,
)
from pipeline.data.folders import FolderCase, pair_cases, read_channels, read_plane
from pipeline.data.importers import detect_source, list_cases, read_dataset_json
from pipeline.data.io import write_text
from pipeline.data.settings import check_data_config
from pipeline.errors import SegpipeError

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_]*")
CHANNEL_NAMES = {1: ["gray"], 3: ["red", "green", "blue"], 4: ["red", "green", "blue", "alpha"]}
AUGMENT_BASE = "generic"


@dataclass(frozen=True)
class ConfigFiles:
    """The files a new dataset is registered in: configs/data.yaml, configs/augment.yaml and the cards folder."""

    data: Path
    augment: Path
    cards: Path


def add_dataset(
    files: ConfigFiles,
    name: str,
    source: FolderSource,
    class_names: list[str] | None = None,
    ignore_value: int | None = None,
    test_fraction: float = 0.2,
) -> Path:
    """Write NAME's card for folders and register it in configs/data.yaml and configs/augment.yaml;
    returns the card."""
    limit = _new_name(files, name)
    cases = pair_cases(check_folders(source, "segpipe dataset add"))
    classes = infer_classes(label_values(cases, ignore_value, limit), class_names, source.labels)
    names = channel_names(read_channels(cases[0].images, limit).shape[-1])
    return _register(
        files, name, source, cases, classes, names, None if source.has_test else test_fraction, ignore_value
    )


def import_dataset(
    files: ConfigFiles,
    name: str,
    path: Path,
    base_dir: Path | None = None,
    class_names: list[str] | None = None,
    ignore_value: int | None = None,
    test_fraction: float = 0.2,
) -> Path:
    """Write NAME's card for an nnU-Net v2 raw folder or a MONAI datalist (read in place) and register
    it; an nnU-Net dataset.json gives the classes, ignore label and channel names. Returns the card."""
    limit = _new_name(files, name)
    source = detect_source(path, base_dir)
    cases = list_cases(source)
    channels = read_channels(cases[0].images, limit).shape[-1]
    if isinstance(source, NnunetSource):
        if class_names is not None or ignore_value is not None:
            raise SegpipeError(
                f"{source.root}: --classes and --ignore-value are for datalists; an nnU-Net "
                "dataset.json names the labels (and `ignore`)"
            )
        info = read_dataset_json(source.root)
        if channels != len(info.channels):
            raise SegpipeError(
                f"{cases[0].images[0]}: {channels} channel(s) in {len(cases[0].images)} file(s); "
                f"{source.root / 'dataset.json'} declares channel_names {info.channels}"
            )
        classes, names, ignore_value = info.classes, info.channels, info.ignore_value
    else:
        classes = infer_classes(label_values(cases, ignore_value, limit), class_names, source.file)
        names = channel_names(channels)
    has_test = any(case.part == "test" for case in cases)
    return _register(files, name, source, cases, classes, names, None if has_test else test_fraction, ignore_value)


def _new_name(files: ConfigFiles, name: str) -> int:
    """Check that NAME is a new, well-formed dataset name; returns prepare.limits.max_image_values."""
    cfg = check_data_config(read_yaml(files.data), str(files.data))
    path = card_path(files.cards, name)
    if not NAME_PATTERN.fullmatch(name):
        raise SegpipeError(f"dataset name {name!r}: expected lower-case letters, digits and _ (e.g. my_vessels)")
    if path.exists() or name in cfg.datasets:
        raise SegpipeError(
            f"{path}: dataset {name!r} exists already ({files.data} datasets: "
            f"{list(cfg.datasets)}); edit its card, or choose another name"
        )
    return int(cfg.prepare.limits["max_image_values"])


def channel_names(count: int) -> list[str]:
    """Names for `count` image channels: gray, RGB(A), else channel_0, channel_1, ..."""
    return CHANNEL_NAMES.get(count, [f"channel_{i}" for i in range(count)])


def _register(
    files: ConfigFiles,
    name: str,
    source: FolderSource | ImportedSource,
    cases: list[FolderCase],
    classes: dict[str, int],
    channels: list[str],
    test_fraction: float | None,
    ignore_value: int | None,
) -> Path:
    """Write the card, add NAME to configs/data.yaml and its preset to configs/augment.yaml."""
    data_path, augment_path, path = files.data, files.augment, card_path(files.cards, name)
    text = card_text(name, source, classes, channels, test_fraction, ignore_value)
    card = parse_card(yaml.safe_load(text), name, path)  # what `prepare` will read
    fov = "fov" in cases[0].files or ignore_value is not None
    augment = augment_text(augment_path.read_text(), name, fov, source.command)
    data = data_text(data_path.read_text(), name, str(data_path))
    write_text(path, text)
    write_text(augment_path, augment)
    write_text(data_path, data)
    print(
        f"{name}: {len(cases)} case(s), classes {card.classes}, ignore_value {card.ignore_value}, channels "
        f"{list(card.channels)}; wrote {path}, added {name} to {data_path} (datasets, folder_datasets) and "
        f"{augment_path}"
    )
    return path


def label_values(cases: list[FolderCase], ignore_value: int | None, limit: int) -> list[int]:
    """The distinct values of every label file (but `ignore_value`), as integers."""
    found: set[float] = set()
    for case in cases:
        found.update(np.unique(read_plane(case.files["label"], limit)).tolist())
    found.discard(ignore_value)
    folder = cases[0].files["label"].parent
    if any(not math.isfinite(v) or float(v) != int(v) for v in found):
        raise SegpipeError(
            f"{folder}: label values {sorted(found)[:10]} are not all integers; "
            "expected class values such as 0, 1 or 0, 255"
        )
    negative = sorted(int(v) for v in found if v < 0)
    if negative:  # class indices follow the values: a negative one would come before background
        raise SegpipeError(
            f"{folder}: negative label value(s) {negative[:10]}; expected class values >= 0 (0 = background); "
            f"to leave {negative[0]} out of the loss and the metrics: --ignore-value {negative[0]}"
        )
    return sorted(int(v) for v in found)


def infer_classes(values: list[int], names: list[str] | None, folder: Path) -> dict[str, int]:
    """Class name -> label value: values 0..K-1 in order, 0/255 for two classes, or the K distinct
    values found; without names, background/foreground for binary labels, else class_VALUE."""
    binary = set(values) <= {0, 1} or set(values) <= {0, 255}
    if names is None:
        top = 255 if binary and 255 in values else 1
        if binary:
            return {"background": 0, "foreground": top}
        return {("background" if v == 0 else f"class_{v}"): v for v in values}
    if len(set(names)) != len(names) or len(names) < 2:
        raise SegpipeError(f"--classes {','.join(names)}: expected at least two distinct class names")
    if set(values) <= set(range(len(names))):
        return {n: i for i, n in enumerate(names)}
    if len(names) == 2 and binary:
        return {names[0]: 0, names[1]: 255}
    if len(values) == len(names):
        return dict(zip(names, values))
    raise SegpipeError(
        f"{folder}: label values {values} do not map onto the {len(names)} classes {names}; "
        "give as many names as values, or write the card's classes (name: value) by hand"
    )


def augment_text(text: str, name: str, fov: bool, command: str) -> str:
    """configs/augment.yaml with NAME's preset appended: the generic one, centred in the FOV if `fov`
    (the comment names the `segpipe dataset` command that added it)."""
    current = yaml.safe_load(text)
    if name in current:
        return text
    if AUGMENT_BASE not in current:
        raise SegpipeError(f"configs/augment.yaml: no `{AUGMENT_BASE}: &{AUGMENT_BASE}` preset to base {name!r} on")
    lines = [f"\n{name}:                     # segpipe dataset {command} {name}", f"  <<: *{AUGMENT_BASE}"]
    if fov:
        patches = {**current[AUGMENT_BASE]["patches"], "fov_key": "fov"}
        lines.append(
            f"  patches: {yaml.safe_dump(patches, default_flow_style=True, sort_keys=False).strip()}"
            "   # centres inside the masks / labelled pixels"
        )
    out = text.rstrip("\n") + "\n" + "\n".join(lines) + "\n"
    if yaml.safe_load(out).get(name, {}).keys() != current[AUGMENT_BASE].keys():
        raise SegpipeError(f"configs/augment.yaml: the preset appended for {name!r} does not read back as a preset")
    return out


def data_text(text: str, name: str, where: str) -> str:
    """configs/data.yaml with NAME appended to `datasets` and `folder_datasets`, comments and layout kept."""
    from ruamel.yaml import YAML

    rt = YAML()
    rt.width = 4096
    rt.preserve_quotes = True
    rt.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    doc: Any = rt.load(text)
    for key in ("datasets", "folder_datasets"):
        doc[key].append(name)
        doc[key].fa.set_flow_style()
    buffer = io.StringIO()
    rt.dump(doc, buffer)
    check_data_config(yaml.safe_load(buffer.getvalue()), where)
    return buffer.getvalue()
