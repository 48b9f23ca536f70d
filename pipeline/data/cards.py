"""Dataset cards: `configs/datasets/NAME.yaml`, everything `segpipe` knows about one dataset.

A card names the dataset's source, its classes (name -> label value; a class's index is its
position), the image channels and optional facts:

    source:
      images: data/mine/images
      labels: data/mine/labels
    classes: {background: 0, vessel: 255}
    ignore_value: null
    channels: [gray]
    test_fraction: 0.2

The source is one of (paths relative to the repository root; the user's files are read in place):
  archives: NAME          the dataset's entry in `data_manifests/sources.yaml` (archives, sha256, layout);
  silver_truth: true      with it, the training parts' frames without reference (GT) instances get the
                          archive's `silver` role (the CTC silver truth, 0x_ST/SEG) where it has one;
                          test frames are GT only
  images, labels          folders of 2-D images and labels paired by file stem; optional masks,
                          instances (integer instance ids, 0 = background) and test_images +
                          test_labels (+ test_masks, test_instances)
  nnunet: FOLDER          an nnU-Net v2 raw dataset folder: dataset.json (file_ending), imagesTr
                          (CASE_0000.png, CASE_0001.png: channels), labelsTr (CASE.png), and
                          imagesTs + labelsTs as the test set when labelsTs exists
  datalist: FILE          a MONAI datalist JSON (`training`, optional `validation` and `test`: lists of
  base_dir: DIR           {image, label}; an image may be a list of files, one per channel); its paths
                          are relative to base_dir (optional; default: the JSON's folder)
A source without labelled test cases needs `test_fraction` (the seeded share held out for testing);
one with them must not set it. Optional `plan: {channels: auto, clahe: auto}` (either key) asks the
training plan (`pipeline.training.planning`) to choose the kept channel / CLAHE from the fingerprint
where the augmentation preset leaves them null.

`segpipe dataset add` and `segpipe dataset import` write one (`card_text`); a card written or edited
by hand is read the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Union

import yaml

from pipeline.config import ConfigError, check_bool, check_keys, check_list, check_number, check_str
from pipeline.errors import SegpipeError

CARD_KEYS = ("source", "classes", "ignore_value", "channels", "test_fraction", "modality", "spacing", "plan")
OPTIONAL_KEYS = ("ignore_value", "test_fraction", "modality", "spacing", "plan")
PLAN_REQUESTS = ("channels", "clahe")  # the card's `plan:` keys; each takes only "auto"
FOLDER_KEYS = ("images", "labels", "masks", "instances", "test_images", "test_labels", "test_masks", "test_instances")
SOURCE_KINDS = "folders (images, labels, ...), `archives: NAME` of sources.yaml, `nnunet: FOLDER` or `datalist: FILE`"
MAX_CLASSES = 255  # prepared labels are uint8 class indices


@dataclass(frozen=True)
class FolderSource:
    """Folders of 2-D images; every image pairs with the label (and mask, instances) of the same
    file stem."""

    images: Path
    labels: Path
    masks: Path | None = None
    instances: Path | None = None
    test_images: Path | None = None
    test_labels: Path | None = None
    test_masks: Path | None = None
    test_instances: Path | None = None

    command: ClassVar[str] = "add"
    comment: ClassVar[str] = "folders of 2-D images; files pair with their image by file stem"

    def folders(self) -> dict[str, Path]:
        """The folders the card sets, by key (images, labels, masks, instances, test_images, ...)."""
        return {key: getattr(self, key) for key in FOLDER_KEYS if getattr(self, key) is not None}

    def entries(self) -> dict[str, Path]:
        """The card's `source` keys."""
        return self.folders()

    @property
    def has_test(self) -> bool:
        return self.test_images is not None


@dataclass(frozen=True)
class NnunetSource:
    """An nnU-Net v2 raw dataset folder, read in place (`pipeline.data.importers`)."""

    root: Path
    command: ClassVar[str] = "import"
    comment: ClassVar[str] = "an nnU-Net v2 raw dataset folder (dataset.json, imagesTr, ...), read in place"

    def entries(self) -> dict[str, Path]:
        return {"nnunet": self.root}


@dataclass(frozen=True)
class DatalistSource:
    """A MONAI datalist JSON, its files read in place; paths relative to `base_dir` (default: the
    JSON's folder)."""

    file: Path
    base_dir: Path | None = None
    command: ClassVar[str] = "import"
    comment: ClassVar[str] = "a MONAI datalist (training/validation/test), files read in place"

    def entries(self) -> dict[str, Path]:
        return {"datalist": self.file, **({} if self.base_dir is None else {"base_dir": self.base_dir})}

    @property
    def root(self) -> Path:
        """The folder the datalist's paths are relative to."""
        return self.file.parent if self.base_dir is None else self.base_dir


ImportedSource = Union[NnunetSource, DatalistSource]


@dataclass(frozen=True)
class DatasetCard:
    """One dataset card, validated."""

    name: str
    path: Path
    classes: dict[str, int]  # name -> label value, in class-index order
    channels: tuple[str, ...]
    archives: str | None = None  # the dataset's entry in data_manifests/sources.yaml
    folders: FolderSource | None = None
    imported: ImportedSource | None = None  # an nnU-Net raw folder or a MONAI datalist
    ignore_value: int | None = None
    test_fraction: float | None = None
    modality: str | None = None
    spacing: tuple[float, ...] | None = None
    plan: dict[str, str] = field(default_factory=dict)  # {"channels": "auto", "clahe": "auto"}, either key
    facts: dict[str, Any] = field(default_factory=dict)  # as stats.json records them
    silver_truth: bool = False  # archives with a `silver` role (CTC 0x_ST/SEG): use it where no GT is

    @property
    def class_names(self) -> list[str]:
        return list(self.classes)

    @property
    def label_values(self) -> list[int]:
        return list(self.classes.values())


def card_path(folder: Path, name: str) -> Path:
    return Path(folder) / f"{name}.yaml"


def load_card(folder: Path, name: str) -> DatasetCard:
    """The card `folder/NAME.yaml`, validated; errors name the file and the key."""
    path = card_path(folder, name)
    if not path.is_file():
        known = sorted(p.stem for p in Path(folder).glob("*.yaml"))
        raise SegpipeError(
            f"{path}: no dataset card for {name!r} (cards: {', '.join(known) or 'none'}); "
            f"add one with `segpipe dataset add {name} --images DIR --labels DIR`"
        )
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return parse_card(raw, name, path)


def parse_card(raw: Any, name: str, path: Path) -> DatasetCard:
    """A card's YAML mapping checked key by key."""
    where = str(path)
    card = check_keys(raw, CARD_KEYS, where, optional=OPTIONAL_KEYS)
    archives, folders, imported = _source(card["source"], where)
    classes = _classes(card["classes"], where)
    ignore = card.get("ignore_value")
    if ignore is not None and (isinstance(ignore, bool) or not isinstance(ignore, int) or ignore in classes.values()):
        raise ConfigError(
            f"{where}: ignore_value must be null or an integer label value that is no class's, got {ignore!r}"
        )
    names = check_list(card["channels"], "channels", where, nonempty=True)
    channels = tuple(check_str(c, "channels[]", where) for c in names)
    test_fraction = check_number(
        card.get("test_fraction"), "test_fraction", where, low=0, high=1, low_open=True, high_open=True, optional=True
    )
    if test_fraction is not None and (archives is not None or (folders is not None and folders.has_test)):
        raise ConfigError(
            f"{where}: test_fraction is for sources without a test set (folders without "
            "test_images); the test set comes from the source here: remove test_fraction"
        )
    if folders is not None and not folders.has_test and test_fraction is None:
        raise ConfigError(
            f"{where}: no test_images folder: set test_fraction (e.g. 0.2), the seeded share of "
            "the cases held out for testing"
        )
    spacing = check_list(card.get("spacing"), "spacing", where, optional=True, nonempty=True)
    spacing_t = (
        None
        if spacing is None
        else tuple(float(check_number(s, "spacing[]", where, low=0, low_open=True)) for s in spacing)
    )
    modality = card.get("modality")
    if modality is not None:
        check_str(modality, "modality", where)
    plan = _plan_request(card.get("plan"), where)
    silver = card["source"].get("silver_truth", False) if archives is not None else False
    check_bool(silver, "source.silver_truth", where)
    facts = {
        "classes": list(classes),
        "label_values": list(classes.values()),
        "ignore_value": ignore,
        "channels": list(channels),
        "modality": modality,
        "spacing": spacing_t and list(spacing_t),
        "plan": dict(plan),
        "silver_truth": silver,
    }
    return DatasetCard(
        name,
        path,
        classes,
        channels,
        archives,
        folders,
        imported,
        ignore,
        test_fraction,
        modality,
        spacing_t,
        plan,
        facts,
        silver,
    )


def _plan_request(raw: Any, where: str) -> dict[str, str]:
    """The card's `plan`: what it asks the training plan to choose, {key: "auto"} ({} when absent)."""
    if raw is None:
        return {}
    section = check_keys(raw, PLAN_REQUESTS, f"{where}: plan", optional=PLAN_REQUESTS)
    for key, value in section.items():
        if value != "auto":
            raise ConfigError(f"{where}: plan.{key} must be auto (or leave the key out), got {value!r}")
    return section


def _source(raw: Any, where: str) -> tuple[str | None, FolderSource | None, ImportedSource | None]:
    """The card's `source`: archives, folders, or an imported format (one kind, its keys checked)."""
    if isinstance(raw, dict) and "archives" in raw and set(raw) <= {"archives", "silver_truth"}:
        return check_str(raw["archives"], "source.archives", where), None, None
    if isinstance(raw, dict) and "nnunet" in raw:
        section = check_keys(raw, ("nnunet",), f"{where}: source (an nnU-Net raw folder)")
        return None, None, NnunetSource(_path(section, "nnunet", where))
    if isinstance(raw, dict) and "datalist" in raw:
        section = check_keys(
            raw, ("datalist", "base_dir"), f"{where}: source (a MONAI datalist)", optional=("base_dir",)
        )
        base = None if section.get("base_dir") is None else _path(section, "base_dir", where)
        return None, None, DatalistSource(_path(section, "datalist", where), base)
    section = check_keys(raw, FOLDER_KEYS, f"{where}: source (one of {SOURCE_KINDS})", optional=FOLDER_KEYS[2:])
    paths = {k: None if v is None else _path(section, k, where) for k, v in section.items()}
    return None, check_folders(FolderSource(**paths), where), None


def _path(section: dict[str, Any], key: str, where: str) -> Path:
    return Path(check_str(section[key], f"source.{key}", where)).expanduser()


def split_fraction(card: DatasetCard, has_test: bool) -> float | None:
    """The card's test_fraction checked against its source's cases: None when the source has labelled
    test cases, else the share of the cases to hold out for testing."""
    if has_test and card.test_fraction is not None:
        raise ConfigError(f"{card.path}: the source has its own labelled test cases; remove test_fraction")
    if not has_test and card.test_fraction is None:
        raise ConfigError(
            f"{card.path}: the source has no labelled test cases: set test_fraction (e.g. 0.2), "
            "the seeded share of the cases held out for testing"
        )
    return card.test_fraction


def check_folders(source: FolderSource, where: str) -> FolderSource:
    """`source` if its folders go together: test images with test labels, with masks test masks and
    with instances test instances."""
    if (source.test_images is None) != (source.test_labels is None):
        raise ConfigError(f"{where}: test_images and test_labels go together; set both or neither")
    for key in ("masks", "instances"):
        train, test = getattr(source, key), getattr(source, f"test_{key}")
        if source.has_test and (train is None) != (test is None):
            raise ConfigError(f"{where}: {key} and test_{key} go together when there are test folders")
        if test is not None and not source.has_test:
            raise ConfigError(f"{where}: test_{key} without test_images")
    return source


def _classes(raw: Any, where: str) -> dict[str, int]:
    expected = "a mapping class name -> label value with 2 to 255 classes, e.g. {background: 0, vessel: 255}"
    if not isinstance(raw, dict) or not 2 <= len(raw) <= MAX_CLASSES:
        raise ConfigError(f"{where}: classes must be {expected}, got {raw!r}")
    for key, value in raw.items():
        if not isinstance(key, str) or not key or isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: classes must be {expected}; {key!r}: {value!r} is not name: integer")
    if len(set(raw.values())) != len(raw):
        raise ConfigError(f"{where}: classes {raw}: two classes share a label value")
    return dict(raw)


def _flow(value: Any) -> str:
    """`value` as one line of YAML (flow style)."""
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=1 << 16)
    return text.removesuffix("\n...\n").strip()


def card_text(
    name: str,
    source: FolderSource | ImportedSource,
    classes: dict[str, int],
    channels: list[str],
    test_fraction: float | None,
    ignore_value: int | None = None,
) -> str:
    """The card `segpipe dataset add` (folders) or `segpipe dataset import` (nnU-Net, datalist) writes,
    comments included."""
    rows: list[tuple[str, str]] = [("source:", source.comment)]
    rows += [(f"  {key}: {_flow(str(path))}", "") for key, path in source.entries().items()]
    rows += [
        (f"classes: {_flow(classes)}", "name: value in the label files; class index = position"),
        (f"ignore_value: {_flow(ignore_value)}", "a label value left out of the loss and the metrics"),
        (f"channels: {_flow(channels)}", "one name per image channel"),
    ]
    if test_fraction is not None:
        rows.append(
            (f"test_fraction: {_flow(test_fraction)}", "share of the cases held out for testing (prepare.seed)")
        )
    rows += [
        ("modality: null", ""),
        ("spacing: null", "pixel size [y, x], if known"),
        ("plan: {}", "{channels: auto, clahe: auto} (either): the training plan picks them from the data"),
    ]
    width = max(len(text) for text, _ in rows) + 2
    lines = [
        f"# Dataset card of `{name}` (segpipe dataset {source.command}). Edit it freely: `segpipe prepare {name}`",
        '# and `dvc repro` read it again. Keys: README, "Your own data".',
    ]
    lines += [f"{text.ljust(width)}# {comment}" if comment else text for text, comment in rows]
    return "\n".join(lines) + "\n"
