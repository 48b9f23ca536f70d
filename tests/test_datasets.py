"""Dataset cards and folder datasets (issue 13): `segpipe dataset add`, prepare of a folder (pairing
by stem, per-file sha256, class mapping, seeded test split), every error naming its file, the card
read back, DVC's view of the folder, and a binary folder dataset trained and evaluated."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import imageio.v3 as iio
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import tifffile
import yaml

from pipeline.cli import main
from pipeline.config import cards_dir
from pipeline.data.cards import load_card
from pipeline.data.folders import read_plane, read_slice
from pipeline.data.io import read_volume
from pipeline.errors import SegpipeError
from pipeline.stages.download import download
from pipeline.stages.prepare import prepare

from fixtures import REPO_ROOT, FixtureProject

SHAPE = (32, 40)


def disk_label(case: int, values: tuple[int, ...] = (0, 255)) -> np.ndarray:
    """A label of len(values) classes: background, a disk, and (3 classes) a bar."""
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    label = np.full(SHAPE, values[0], np.uint8)
    label[(yy - 10 - case) ** 2 + (xx - 20) ** 2 <= 36] = values[1]
    if len(values) > 2:
        label[24:28, 4 + case : 30] = values[2]
    return label


def image_of(label: np.ndarray, case: int, channels: int = 1) -> np.ndarray:
    rng = np.random.default_rng(case)
    grey = (rng.integers(0, 60, SHAPE) + 150 * (label != label.flat[0])).astype(np.uint8)
    return grey if channels == 1 else np.stack([grey] * channels, axis=-1)


def write_folders(root: Path, n: int = 6, values: tuple[int, ...] = (0, 255), prefix: str = "") -> dict[str, Path]:
    """images/ and labels/ of `n` PNG cases named slice_XX."""
    folders = {"images": root / f"{prefix}images", "labels": root / f"{prefix}labels"}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    for case in range(n):
        label = disk_label(case, values)
        iio.imwrite(folders["labels"] / f"slice_{case:02d}.png", label)
        iio.imwrite(folders["images"] / f"slice_{case:02d}.png", image_of(label, case))
    return folders


def add(name: str, folders: dict[str, Path], *extra: str) -> int:
    return main(
        ["dataset", "add", name, "--images", str(folders["images"]), "--labels", str(folders["labels"]), *extra]
    )


def write_card(project: FixtureProject, name: str, text: str) -> None:
    """A hand-written card, registered as `dataset add` would (datasets, folder_datasets, preset)."""
    (project.root / "configs" / "datasets" / f"{name}.yaml").write_text(text)
    cfg = project.data_config()
    cfg["datasets"].append(name)
    cfg["folder_datasets"].append(name)
    project.set_data_config(cfg)
    augment = project.root / "configs" / "augment.yaml"
    augment.write_text(augment.read_text() + f"\n{name}:\n  <<: *generic\n")


def folder_card(folders: dict[str, Path], classes: str = "{background: 0, vessel: 255}", extra: str = "") -> str:
    return (
        f"source:\n  images: {folders['images']}\n  labels: {folders['labels']}\n"
        f"classes: {classes}\nchannels: [gray]\ntest_fraction: 0.2\n{extra}"
    )


def prepared(project: FixtureProject, name: str) -> Path:
    return project.root / "data" / "prepared" / name


# --- the binary case, end to end --------------------------------------------------------------------


def test_add_prepare_train_evaluate_a_png_folder(project: FixtureProject) -> None:
    from pipeline.stages.evaluate import evaluate
    from pipeline.stages.train import train

    tracking = project.root / "configs" / "tracking.yaml"  # the MLflow model is tested elsewhere; skip its cost
    tracking.write_text(
        tracking.read_text()
        .replace("log_model: true", "log_model: false")
        .replace("register_model: true", "register_model: false")
    )
    folders = write_folders(project.root / "mine")
    data_before = (project.root / "configs" / "data.yaml").read_text()
    assert add("vessels", folders, "--classes", "background,vessel") == 0

    card = project.root / "configs" / "datasets" / "vessels.yaml"
    assert len(card.read_text().splitlines()) <= 16 and "\nplan: {}" in card.read_text()  # plan: shown, asks nothing
    loaded = load_card(cards_dir(), "vessels")
    assert loaded.plan == {}
    assert loaded.classes == {"background": 0, "vessel": 255} and loaded.channels == ("gray",)
    assert loaded.test_fraction == 0.2 and loaded.folders.images == folders["images"]
    data_after = (project.root / "configs" / "data.yaml").read_text()
    config = yaml.safe_load(data_after)
    assert config["datasets"][-1] == "vessels" and config["folder_datasets"] == ["vessels"]
    comments = [line.split("#", 1)[1] for line in data_before.splitlines() if "#" in line]
    assert all(comment in data_after for comment in comments)  # every comment kept
    augment = yaml.safe_load((project.root / "configs" / "augment.yaml").read_text())
    assert augment["vessels"] == augment["generic"]

    out = prepare("vessels")
    table = pd.read_csv(out / "manifest.csv")
    assert table["split"].value_counts().to_dict() == {"train": 4, "test": 1, "val": 1}
    row = table.iloc[0]
    label = read_volume(out / row.label)
    assert label.dtype == np.uint8 and set(np.unique(label)) == {0, 1}
    np.testing.assert_array_equal(label[0], disk_label(int(row.case[-2:])) // 255)
    assert read_volume(out / row.image).shape == (1, *SHAPE) and pd.isna(row.fov)
    files = pd.read_csv(out / "files.csv")
    assert len(files) == 12 and set(files["role"]) == {"image", "label"}
    for entry in files.itertuples():
        assert entry.sha256 == hashlib.sha256(Path(entry.path).read_bytes()).hexdigest()
    stats = json.loads((out / "stats.json").read_text())
    assert stats["classes"] == ["background", "vessel"] and stats["label_values"] == [0, 255]
    assert stats["test_fraction"] == 0.2

    result = train("vessels", "unet", profile="smoke")
    assert result.epochs == 2 and result.checkpoint.is_file()
    metrics = evaluate("vessels", "unet")
    assert 0.0 <= metrics["dice"] <= 1.0
    assert (project.root / "results" / "vessels" / "unet" / "metrics.json").is_file()


def test_the_test_split_is_seeded(project: FixtureProject) -> None:
    folders = write_folders(project.root / "mine", n=10)
    write_card(project, "mine", folder_card(folders))
    first = pd.read_csv(prepare("mine") / "manifest.csv")
    assert pd.read_csv(prepare("mine") / "manifest.csv").equals(first)
    cfg = project.data_config()
    cfg["prepare"]["seed"] = 7
    project.set_data_config(cfg)
    other = pd.read_csv(prepare("mine") / "manifest.csv")
    assert (first["split"] == "test").sum() == 2 and list(other["split"]) != list(first["split"])


def test_a_hand_written_card_prepares_the_same(project: FixtureProject) -> None:
    folders = write_folders(project.root / "mine")
    assert add("by_command", folders, "--classes", "background,vessel") == 0
    by_hand = (
        "# written by hand, keys in another order and block style\nchannels:\n  - gray\n"
        "classes:\n  background: 0\n  vessel: 255\ntest_fraction: 0.2\n"
        f"source:\n  labels: {folders['labels']}\n  images: {folders['images']}\n"
    )
    write_card(project, "by_hand", by_hand)
    a, b = prepare("by_command"), prepare("by_hand")
    assert (a / "manifest.csv").read_text() == (b / "manifest.csv").read_text()
    for rel in pd.read_csv(a / "manifest.csv")[["image", "label", "weight"]].to_numpy().ravel():
        np.testing.assert_array_equal(read_volume(a / rel), read_volume(b / rel))
    stats = [json.loads((p / "stats.json").read_text()) for p in (a, b)]
    assert {**stats[0], "dataset": None} == {**stats[1], "dataset": None}


# --- classes: 3 classes kept as indices (trained in test_multiclass_train.py); the ignore value ------


def test_three_classes_keep_their_indices(project: FixtureProject) -> None:
    folders = write_folders(project.root / "mine", values=(0, 100, 200))
    assert add("three", folders, "--classes", "background,disk,bar") == 0
    assert load_card(cards_dir(), "three").classes == {"background": 0, "disk": 100, "bar": 200}
    out = prepare("three")
    table = pd.read_csv(out / "manifest.csv")
    label = read_volume(out / table.iloc[0].label)[0]
    assert set(np.unique(label)) == {0, 1, 2}
    np.testing.assert_array_equal(label, disk_label(int(table.iloc[0].case[-2:]), (0, 1, 2)))


def test_the_ignore_value_is_left_out_of_the_field_of_view(project: FixtureProject) -> None:
    folders = write_folders(project.root / "mine", values=(0, 1))
    label = disk_label(0, (0, 1))
    label[:, :3] = 9  # unlabelled border
    iio.imwrite(folders["labels"] / "slice_00.png", label)
    assert add("ignoring", folders, "--ignore-value", "9") == 0
    preset = yaml.safe_load((project.root / "configs" / "augment.yaml").read_text())["ignoring"]
    assert preset["patches"]["fov_key"] == "fov"
    out = prepare("ignoring")
    row = pd.read_csv(out / "manifest.csv").set_index("case").loc["slice_00"]
    fov, stored = read_volume(out / row.fov)[0], read_volume(out / row.label)[0]
    assert not fov[:, :3].any() and fov[:, 3:].all() and not stored[:, :3].any()
    assert json.loads((out / "stats.json").read_text())["ignore_value"] == 9


# --- every error names its file ---------------------------------------------------------------------


def _break_label_missing(f: dict[str, Path]) -> tuple[Path, str]:
    (f["labels"] / "slice_02.png").unlink()
    return f["images"] / "slice_02.png", "an image without a label"


def _break_image_missing(f: dict[str, Path]) -> tuple[Path, str]:
    (f["images"] / "slice_03.png").unlink()
    return f["labels"] / "slice_03.png", "a label without an image"


def _break_shape(f: dict[str, Path]) -> tuple[Path, str]:
    iio.imwrite(f["labels"] / "slice_01.png", np.zeros((16, 40), np.uint8))
    return f["labels"] / "slice_01.png", r"label of shape \(16, 40\).*expected the same H x W"


def _break_values(f: dict[str, Path]) -> tuple[Path, str]:
    label = disk_label(4)
    label[0, 0] = 7
    iio.imwrite(f["labels"] / "slice_04.png", label)
    return f["labels"] / "slice_04.png", "label values 7 are not in the classes of"


def _break_unreadable(f: dict[str, Path]) -> tuple[Path, str]:
    (f["images"] / "slice_05.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really" * 10)
    return f["images"] / "slice_05.png", "cannot read as an image"


def _break_channels(f: dict[str, Path]) -> tuple[Path, str]:
    iio.imwrite(f["images"] / "slice_00.png", image_of(disk_label(0), 0, channels=3))
    return f["images"] / "slice_00.png", r"3 channel\(s\); .* declares 1 \(gray\)"


def _break_stray_file(f: dict[str, Path]) -> tuple[Path, str]:
    (f["images"] / "notes.txt").write_text("scanner settings")
    return f["images"] / "notes.txt", "not usable as an image"


def _break_jpeg_label(f: dict[str, Path]) -> tuple[Path, str]:
    (f["labels"] / "slice_00.png").rename(f["labels"] / "slice_00.jpg")
    return f["labels"] / "slice_00.jpg", "not usable as a label"


def _break_duplicate_stem(f: dict[str, Path]) -> tuple[Path, str]:
    tifffile.imwrite(f["images"] / "slice_01.tif", image_of(disk_label(1), 1))
    return f["images"] / "slice_01.tif", "the same stem as slice_01.png"


BREAKS = [
    _break_label_missing,
    _break_image_missing,
    _break_shape,
    _break_values,
    _break_unreadable,
    _break_channels,
    _break_stray_file,
    _break_jpeg_label,
    _break_duplicate_stem,
]


@pytest.mark.parametrize("breaker", BREAKS, ids=lambda b: b.__name__.removeprefix("_break_"))
def test_prepare_names_the_file(project: FixtureProject, breaker) -> None:
    folders = write_folders(project.root / "mine")
    write_card(project, "mine", folder_card(folders))
    path, message = breaker(folders)
    with pytest.raises(SegpipeError) as error:
        prepare("mine")
    assert str(path) in str(error.value)
    assert any(str(path) in line and re.search(message, line) for line in str(error.value).splitlines()), str(
        error.value
    )
    assert not prepared(project, "mine").exists()
    assert not list((project.root / "data" / "prepared").glob(".mine.tmp-*"))


def test_add_refuses_unpaired_folders_and_writes_nothing(
    project: FixtureProject, capsys: pytest.CaptureFixture
) -> None:
    folders = write_folders(project.root / "mine")
    (folders["labels"] / "slice_02.png").unlink()
    data_before = (project.root / "configs" / "data.yaml").read_text()
    assert add("mine", folders) == 2
    assert f"{folders['images'] / 'slice_02.png'}: an image without a label" in capsys.readouterr().err
    assert not (project.root / "configs" / "datasets" / "mine.yaml").exists()
    assert (project.root / "configs" / "data.yaml").read_text() == data_before


def test_add_refuses_test_images_without_test_labels(project: FixtureProject, capsys: pytest.CaptureFixture) -> None:
    folders = write_folders(project.root / "mine")
    assert add("mine", folders, "--test-images", str(folders["images"])) == 2
    assert "test_images and test_labels go together" in capsys.readouterr().err


def test_card_errors_name_the_card_and_key(project: FixtureProject) -> None:
    folders = write_folders(project.root / "mine")
    write_card(project, "mine", folder_card(folders, classes="{background: 0, vessel: 0}"))
    with pytest.raises(SegpipeError, match=r"datasets/mine\.yaml: classes .* two classes share a label value"):
        prepare("mine")
    write_card(project, "nosplit", folder_card(folders).replace("test_fraction: 0.2\n", ""))
    with pytest.raises(SegpipeError, match=r"datasets/nosplit\.yaml: no test_images folder: set test_fraction"):
        prepare("nosplit")
    with pytest.raises(SegpipeError, match=r"datasets/absent\.yaml: no dataset card for 'absent'"):
        prepare("absent")


# --- formats, test folders and masks ----------------------------------------------------------------


def test_tiff_float_images_nifti_labels_test_folders_and_masks(project: FixtureProject) -> None:
    root = project.root / "mixed"
    folders = {k: root / k for k in ("images", "labels", "masks", "test_images", "test_labels", "test_masks")}
    for folder in folders.values():
        folder.mkdir(parents=True)
    for part, n in (("", 4), ("test_", 2)):
        for case in range(n):
            label = disk_label(case, (0, 1))
            planes = np.stack([image_of(label, case).astype(np.float32) / 255, np.full(SHAPE, 0.5, np.float32)])
            tifffile.imwrite(folders[f"{part}images"] / f"s{case}.tif", planes)  # CYX, 2 channels
            nib.save(nib.Nifti1Image(label[..., None], np.eye(4)), str(folders[f"{part}labels"] / f"s{case}.nii.gz"))
            mask = np.ones(SHAPE, np.uint8)
            mask[:2] = 0
            sitk.WriteImage(sitk.GetImageFromArray(mask), str(folders[f"{part}masks"] / f"s{case}.mha"))
    source = "".join(f"  {k}: {v}\n" for k, v in folders.items())
    write_card(project, "mixed", f"source:\n{source}classes: {{background: 0, cell: 1}}\nchannels: [dapi, actin]\n")
    out = prepare("mixed")
    table = pd.read_csv(out / "manifest.csv").set_index("case")
    assert sorted(table.index[table["split"] == "test"]) == ["test_s0", "test_s1"]
    image = read_volume(out / table.loc["s1", "image"])
    assert image.shape == (2, *SHAPE) and image.dtype == np.float32
    fov = read_volume(out / table.loc["s1", "fov"])[0]
    assert not fov[:2].any() and fov[2:].all()
    assert len(pd.read_csv(out / "files.csv")) == 18


def test_2d_readers(tmp_path: Path) -> None:
    rgb = np.arange(SHAPE[0] * SHAPE[1] * 3, dtype=np.uint16).reshape(*SHAPE, 3)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb)
    np.testing.assert_array_equal(read_slice(tmp_path / "rgb.tif"), rgb)
    tifffile.imwrite(
        tmp_path / "stack.tif", np.zeros((3, *SHAPE), np.uint8), photometric="minisblack", metadata={"axes": "ZYX"}
    )
    with pytest.raises(SegpipeError, match=r"stack\.tif: a TIFF with axes ZYX"):
        read_slice(tmp_path / "stack.tif")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, *SHAPE), np.uint8)), str(tmp_path / "volume.nrrd"))
    with pytest.raises(SegpipeError, match=r"volume\.nrrd: a volume of shape \(2, 32, 40\); expected a 2-D slice"):
        read_slice(tmp_path / "volume.nrrd")
    vector = sitk.GetImageFromArray(np.zeros((*SHAPE, 3), np.float32), isVector=True)  # 2-D, 3 components
    sitk.WriteImage(vector, str(tmp_path / "vector.mha"))
    assert read_slice(tmp_path / "vector.mha").shape == (*SHAPE, 3)
    grey = disk_label(0)
    iio.imwrite(tmp_path / "grey_rgb.png", np.stack([grey] * 3, axis=-1))
    np.testing.assert_array_equal(read_plane(tmp_path / "grey_rgb.png"), grey)
    iio.imwrite(tmp_path / "colour.png", np.stack([grey, grey // 2, grey], axis=-1))
    with pytest.raises(SegpipeError, match=r"colour\.png: a colour image"):
        read_plane(tmp_path / "colour.png")


# --- what DVC sees ----------------------------------------------------------------------------------


def test_the_folder_record_changes_with_an_image(project: FixtureProject) -> None:
    folders = write_folders(project.root / "mine")
    assert add("mine", folders) == 0
    record = download("mine") / "download.json"
    before = record.read_bytes()
    assert download("mine") and record.read_bytes() == before  # unchanged folder, same record
    iio.imwrite(folders["images"] / "slice_03.png", image_of(disk_label(3), 99))
    download("mine")
    changed = [f for f in json.loads(record.read_text())["files"] if f not in json.loads(before)["files"]]
    assert [(f["folder"], f["name"]) for f in changed] == [("images", "slice_03.png")]


def test_dvc_matrix_includes_an_added_dataset(project: FixtureProject) -> None:
    from test_dvc_deps import resolved_stages, stage_deps

    folders = write_folders(project.root / "mine")
    assert add("mine", folders) == 0
    (project.root / "dvc.yaml").write_text((REPO_ROOT / "dvc.yaml").read_text())
    stages = resolved_stages(project.root)
    scan, prep = stages["scan_folder@mine"], stages["prepare@mine"]
    assert scan["always_changed"] is True and scan["outs"] == ["data/raw/mine"]
    assert "configs/datasets/mine.yaml" in stage_deps(scan)
    assert {"configs/datasets/mine.yaml", "data/raw/mine"} <= set(stage_deps(prep))
    code = [d for d in stage_deps(scan) if d.startswith("pipeline/")]
    assert code == [d for d in stage_deps(stages["download_cells@hela"]) if d.startswith("pipeline/")]
    assert {"train@mine-unet", "evaluate@mine-u2net"} <= set(stages)
    assert "scan_folder@hela" not in stages


def test_the_shipped_datasets_are_archive_cards() -> None:
    for name in ("drive", "hela", "u373"):
        card = load_card(REPO_ROOT / "configs" / "datasets", name)
        assert card.archives == name and card.folders is None and len(card.classes) == 2
        assert list(card.classes.values()) == [0, 1]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.nan, r"3 pixel\(s\) are NaN, infinite or beyond float32 \(float32\)"),
        (np.inf, r"3 pixel\(s\) are NaN, infinite or beyond float32 \(float32\)"),
        (1e300, r"3 pixel\(s\) are NaN, infinite or beyond float32 \(float64\)"),
    ],
)
def test_non_finite_image_values_are_refused_naming_the_file(
    project: FixtureProject, capsys: pytest.CaptureFixture, bad: float, message: str
) -> None:
    folders = write_folders(project.root / "f")
    dtype = np.float64 if bad == 1e300 else np.float32
    image = iio.imread(folders["images"] / "slice_02.png").astype(dtype)
    image[0, :3] = bad
    (folders["images"] / "slice_02.png").unlink()
    tifffile.imwrite(folders["images"] / "slice_02.tif", image)
    assert add("nonfinite", folders) == 0  # dataset add reads the first image only (slice_00 is fine)
    capsys.readouterr()
    assert main(["prepare", "nonfinite"]) == 2  # every image is read: refused, naming the file and the count
    err = capsys.readouterr().err
    assert "slice_02.tif" in err and re.search(message, err), err
    assert not (project.root / "data" / "prepared" / "nonfinite").exists()


def test_64_bit_integer_images_are_kept_when_they_fit_and_refused_when_not(project: FixtureProject) -> None:
    from pipeline.data.io import checked_image

    fits = np.array([[0, 70000]], np.uint64)
    assert checked_image(fits, Path("a.tif")).dtype == np.int32
    with pytest.raises(SegpipeError, match=r"a\.tif: uint64 pixels up to 18446744073709551615 do not fit 32 bits"):
        checked_image(np.array([[0, 2**64 - 1]], np.uint64), Path("a.tif"))
    folders = write_folders(project.root / "g")
    for path in sorted(folders["images"].glob("*.png")):
        tifffile.imwrite(path.with_suffix(".tif"), iio.imread(path).astype(np.uint64))
        path.unlink()
    assert add("wide", folders) == 0
    out = prepare("wide")  # used to fail in nibabel ("Image data has type uint64")
    table = pd.read_csv(out / "manifest.csv")
    assert read_volume(out / table["image"].iloc[0]).dtype == np.int32


def test_negative_label_values_are_refused_with_the_ignore_value_route(
    project: FixtureProject, capsys: pytest.CaptureFixture
) -> None:
    folders = write_folders(project.root / "h")
    for path in sorted(folders["labels"].glob("*.png")):
        label = iio.imread(path).astype(np.int16)
        label[0, 0] = -1
        tifffile.imwrite(path.with_suffix(".tif"), label)
        path.unlink()
    assert add("neg", folders) == 2
    err = capsys.readouterr().err
    assert "negative label value(s) [-1]" in err and "--ignore-value -1" in err, err
    assert add("neg", folders, "--ignore-value", "-1") == 0
    assert load_card(cards_dir(), "neg").classes == {"background": 0, "foreground": 255}
