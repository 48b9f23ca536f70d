"""`segpipe dataset import` (issue 13): an nnU-Net v2 raw folder and a MONAI datalist become dataset
cards whose source points at the files in place; prepare reads them through the folder cases
(channels stacked, class indices, the ignore label outside the field of view, splits), download
records every file's sha256, and every bad input names its file."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import imageio.v3 as iio
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.cli import main
from pipeline.commands.dataset import config_files
from pipeline.config import cards_dir
from pipeline.data.cards import DatalistSource, NnunetSource, load_card
from pipeline.data.io import read_volume
from pipeline.data.registry import import_dataset as import_into
from pipeline.errors import SegpipeError
from pipeline.stages.download import download
from pipeline.stages.prepare import prepare

from fixtures import FixtureProject
from test_datasets import SHAPE, disk_label, image_of

BACKGROUND, INTERIOR, BORDER, IGNORE = 0, 1, 2, 3
LABELS = {"background": BACKGROUND, "interior": INTERIOR, "border": BORDER, "ignore": IGNORE}
CHANNEL_NAMES = {"0": "phase", "1": "dapi"}


def cell_label(case: int) -> np.ndarray:
    """A cell (interior ringed by its border) on background; the two left columns unlabelled."""
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    r2 = (yy - 14) ** 2 + (xx - 16 - case) ** 2
    label = np.full(SHAPE, BACKGROUND, np.uint8)
    label[r2 <= 64] = BORDER
    label[r2 <= 36] = INTERIOR
    label[:, :2] = IGNORE
    return label


def channels_of(label: np.ndarray, case: int) -> list[np.ndarray]:
    rng = np.random.default_rng(case)
    cell = np.isin(label, (INTERIOR, BORDER))
    return [
        (rng.integers(0, 60, SHAPE) + 150 * cell).astype(np.uint8),
        (rng.integers(100, 200, SHAPE) - 90 * (label == BORDER)).astype(np.uint8),
    ]


def write_nnunet(root: Path, n_train: int = 6, n_test: int = 0, labels_ts: bool = True) -> Path:
    """An nnU-Net v2 raw folder: 2 channels as CASE_0000.png / CASE_0001.png, labels CASE.png."""
    parts = [("Tr", range(n_train))] + ([("Ts", range(100, 100 + n_test))] if n_test else [])
    for suffix, cases in parts:
        (root / f"images{suffix}").mkdir(parents=True)
        if suffix == "Tr" or labels_ts:
            (root / f"labels{suffix}").mkdir()
        for case in cases:
            label = cell_label(case % 10)
            for k, channel in enumerate(channels_of(label, case)):
                iio.imwrite(root / f"images{suffix}" / f"cell_{case:03d}_{k:04d}.png", channel)
            if suffix == "Tr" or labels_ts:
                iio.imwrite(root / f"labels{suffix}" / f"cell_{case:03d}.png", label)
    dataset = {
        "channel_names": CHANNEL_NAMES,
        "labels": LABELS,
        "numTraining": n_train,
        "file_ending": ".png",
        "name": "cells",
    }
    (root / "dataset.json").write_text(json.dumps(dataset, indent=2))
    return root


def entry(case: int, folder: str = "Tr", label: bool = True) -> dict[str, object]:
    item: dict[str, object] = {"image": [f"images{folder}/cell_{case:03d}_{k:04d}.png" for k in range(2)]}
    if label:
        item["label"] = f"labels{folder}/cell_{case:03d}.png"
    return item


def write_datalist(path: Path, **lists: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(lists, indent=2))
    return path


def set_dataset_json(root: Path, **changes: object) -> Path:
    path = root / "dataset.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return path


def manifest(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "manifest.csv").set_index("case")


# --- nnU-Net v2 raw folders --------------------------------------------------------------------------


def test_an_nnunet_folder_is_imported_and_prepared_in_place(project: FixtureProject) -> None:
    root = write_nnunet(project.root / "nnUNet_raw" / "Dataset001_Cells", n_test=2, labels_ts=False)
    assert main(["dataset", "import", str(root), "--name", "cells"]) == 0

    text = (project.root / "configs" / "datasets" / "cells.yaml").read_text()
    assert len(text.splitlines()) <= 12 and "segpipe dataset import" in text
    card = load_card(cards_dir(), "cells")
    assert card.imported == NnunetSource(root) and card.folders is None and card.archives is None
    assert card.classes == {"background": 0, "interior": 1, "border": 2} and card.ignore_value == IGNORE
    assert card.channels == ("phase", "dapi") and card.test_fraction == 0.2  # imagesTs has no labelsTs
    config = project.data_config()
    assert config["datasets"][-1] == "cells" and config["folder_datasets"] == ["cells"]
    preset = yaml.safe_load((project.root / "configs" / "augment.yaml").read_text())["cells"]
    assert preset["patches"]["fov_key"] == "fov"

    out = prepare("cells")
    table = manifest(out)
    assert sorted(table.index) == [f"cell_{i:03d}" for i in range(6)]  # imagesTs without labels: unused
    assert table["split"].value_counts().to_dict() == {"train": 4, "val": 1, "test": 1}
    for case, row in table.iterrows():
        i = int(case[-3:])
        image, label, fov = (read_volume(out / row[k]) for k in ("image", "label", "fov"))
        np.testing.assert_array_equal(image, np.stack(channels_of(cell_label(i), i)))  # _0000, _0001 stacked
        expected = cell_label(i)
        expected[expected == IGNORE] = BACKGROUND
        np.testing.assert_array_equal(label[0], expected)  # label value = class index here
        assert not fov[0][:, :2].any() and fov[0][:, 2:].all()  # ignore -> outside the field of view
    files = pd.read_csv(out / "files.csv")
    assert len(files) == 18 and files["role"].value_counts().to_dict() == {"image": 12, "label": 6}
    stats = json.loads((out / "stats.json").read_text())
    assert stats["classes"] == ["background", "interior", "border"] and stats["ignore_value"] == IGNORE
    assert len(stats["class_weights"]) == 3 and stats["channels"] == ["phase", "dapi"]


def test_labels_ts_is_the_test_set(project: FixtureProject) -> None:
    root = write_nnunet(project.root / "raw" / "Dataset002_Cells", n_train=5, n_test=2)
    assert main(["dataset", "import", str(root), "--name", "cells"]) == 0
    card = load_card(cards_dir(), "cells")
    assert card.test_fraction is None and "test_fraction" not in card.path.read_text()
    table = manifest(prepare("cells"))
    assert sorted(table.index[table["split"] == "test"]) == ["test_cell_100", "test_cell_101"]
    assert table["split"].value_counts().to_dict() == {"train": 4, "val": 1, "test": 2}
    card.path.write_text(card.path.read_text() + "test_fraction: 0.2\n")
    with pytest.raises(SegpipeError, match=r"cells\.yaml: the source has its own labelled test cases; remove"):
        prepare("cells")


def test_a_single_rgb_file_per_case_gives_three_channels(project: FixtureProject) -> None:
    root = project.root / "Dataset003_Rgb"
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True)
    for case in range(3):
        label = disk_label(case, (0, 1))
        iio.imwrite(root / "imagesTr" / f"road_{case}_0000.png", image_of(label, case, channels=3))
        iio.imwrite(root / "labelsTr" / f"road_{case}.png", label)
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "R", "1": "G", "2": "B"},
                "numTraining": 3,
                "labels": {"background": 0, "road": 1},
                "file_ending": ".png",
            }
        )
    )
    import_into(config_files(), "roads", root)
    out = prepare("roads")
    row = manifest(out).loc["road_1"]
    rgb = image_of(disk_label(1, (0, 1)), 1, channels=3)
    np.testing.assert_array_equal(read_volume(out / row.image), np.moveaxis(rgb, -1, 0))


def test_the_record_holds_every_file_the_cases_use(project: FixtureProject) -> None:
    root = write_nnunet(project.root / "Dataset001_Cells", n_train=3)
    import_into(config_files(), "cells", root)
    record = download("cells") / "download.json"
    before = json.loads(record.read_text())
    assert before["source"] == {"nnunet": str(root)}
    assert {Path(f["path"]).name for f in before["files"]} == {"dataset.json"} | {
        f"cell_{i:03d}{k}.png" for i in range(3) for k in ("_0000", "_0001", "")
    }
    iio.imwrite(root / "labelsTr" / "cell_001.png", cell_label(5))
    changed = [
        f
        for f in json.loads(download("cells").joinpath("download.json").read_text())["files"]
        if f not in before["files"]
    ]
    assert [Path(f["path"]).name for f in changed] == ["cell_001.png"]


# --- MONAI datalists ---------------------------------------------------------------------------------


def test_a_datalist_with_validation_and_test(project: FixtureProject, caplog: pytest.LogCaptureFixture) -> None:
    root = write_nnunet(project.root / "cells", n_train=7)
    lists = write_datalist(
        project.root / "splits" / "datalist.json",
        training=[entry(i) for i in range(4)],
        validation=[entry(4)],
        test=[entry(5), entry(6, label=False), "imagesTr/cell_006_0000.png"],
    )
    assert (
        main(
            [
                "dataset",
                "import",
                str(lists),
                "--name",
                "listed",
                "--base-dir",
                str(root),
                "--classes",
                "background,interior,border",
                "--ignore-value",
                "3",
            ]
        )
        == 0
    )
    card = load_card(cards_dir(), "listed")
    assert card.imported == DatalistSource(lists, root) and card.test_fraction is None
    assert card.classes == {"background": 0, "interior": 1, "border": 2} and card.ignore_value == IGNORE
    assert card.channels == ("channel_0", "channel_1")

    caplog.set_level(logging.WARNING)
    out = prepare("listed")
    assert "2 of 3 test entries have no label and are left out" in caplog.text
    table = manifest(out)
    assert table["split"].to_dict() == {
        **{f"cell_00{i}_0000": "train" for i in range(4)},
        "cell_004_0000": "val",
        "cell_005_0000": "test",
    }
    row = table.loc["cell_005_0000"]
    np.testing.assert_array_equal(read_volume(out / row.image), np.stack(channels_of(cell_label(5), 5)))
    assert not read_volume(out / row.fov)[0][:, :2].any()


def test_a_datalist_without_test_holds_out_test_fraction(project: FixtureProject) -> None:
    root = write_nnunet(project.root / "cells", n_train=6)
    lists = write_datalist(root / "datalist.json", training=[entry(i) for i in range(6)])  # relative to its folder
    import_into(config_files(), "listed", lists, ignore_value=IGNORE, test_fraction=0.34)
    card = load_card(cards_dir(), "listed")
    assert card.test_fraction == 0.34 and card.imported == DatalistSource(lists)
    assert card.classes == {"background": 0, "class_1": 1, "class_2": 2}
    table = manifest(prepare("listed"))
    assert table["split"].value_counts().to_dict() == {"train": 3, "val": 1, "test": 2}


def test_a_binary_datalist_trains(project: FixtureProject) -> None:
    from pipeline.stages.train import train

    tracking = project.root / "configs" / "tracking.yaml"  # the MLflow model is tested elsewhere; skip its cost
    tracking.write_text(
        tracking.read_text()
        .replace("log_model: true", "log_model: false")
        .replace("register_model: true", "register_model: false")
    )
    data = project.root / "scans"
    (data / "img").mkdir(parents=True)
    (data / "seg").mkdir()
    for case in range(5):
        iio.imwrite(data / "seg" / f"s{case}.png", disk_label(case))
        iio.imwrite(data / "img" / f"s{case}.png", image_of(disk_label(case), case))
    lists = write_datalist(
        data / "list.json", training=[{"image": f"img/s{c}.png", "label": f"seg/s{c}.png"} for c in range(5)]
    )
    import_into(config_files(), "scans", lists)
    assert load_card(cards_dir(), "scans").classes == {"background": 0, "foreground": 255}
    out = prepare("scans")
    assert set(np.unique(read_volume(out / manifest(out).iloc[0].label))) == {0, 1}
    result = train("scans", "unet", profile="smoke")
    assert result.checkpoint.is_file()


# --- every error names its file ----------------------------------------------------------------------


def _missing_key(root: Path) -> tuple[Path, str]:
    raw = json.loads((root / "dataset.json").read_text())
    del raw["file_ending"]
    (root / "dataset.json").write_text(json.dumps(raw))
    return root / "dataset.json", r"missing keys \['file_ending'\]"


def _region_based(root: Path) -> tuple[Path, str]:
    path = set_dataset_json(root, labels={"background": 0, "cell": [1, 2], "border": 2})
    return path, "label 'cell' is region-based .* not supported"


def _missing_channel(root: Path) -> tuple[Path, str]:
    (root / "imagesTr" / "cell_002_0001.png").unlink()
    return root / "imagesTr" / "cell_002_0001.png", r"missing; case cell_002 lacks channel\(s\) \[1\]"


def _label_without_image(root: Path) -> tuple[Path, str]:
    for k in range(2):
        (root / "imagesTr" / f"cell_003_{k:04d}.png").unlink()
    return root / "labelsTr" / "cell_003.png", "a label without an image"


def _image_without_label(root: Path) -> tuple[Path, str]:
    (root / "labelsTr" / "cell_001.png").unlink()
    return root / "imagesTr" / "cell_001_0000.png", "an image without a label"


def _num_training(root: Path) -> tuple[Path, str]:
    return set_dataset_json(root, numTraining=9), "numTraining is 9, imagesTr/labelsTr hold 4 case"


def _volume(root: Path) -> tuple[Path, str]:
    set_dataset_json(root, file_ending=".nii.gz")
    for path in sorted(root.glob("*Tr/*.png")):
        array = iio.imread(path)[..., None]  # (H, W, 1): a 2-D slice
        nib.save(nib.Nifti1Image(array, np.eye(4)), str(path.with_name(path.stem + ".nii.gz")))
    volume = root / "imagesTr" / "cell_000_0000.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((*SHAPE, 3), np.uint8), np.eye(4)), str(volume))
    return volume, r"a volume of shape \(32, 40, 3\); expected a 2-D slice"


NNUNET_BREAKS = [
    _missing_key,
    _region_based,
    _missing_channel,
    _label_without_image,
    _image_without_label,
    _num_training,
    _volume,
]


@pytest.mark.parametrize("breaker", NNUNET_BREAKS, ids=lambda b: b.__name__.lstrip("_"))
def test_nnunet_errors_name_the_file(project: FixtureProject, breaker, capsys: pytest.CaptureFixture) -> None:
    root = write_nnunet(project.root / "Dataset001_Cells", n_train=4)
    path, message = breaker(root)
    data_before = (project.root / "configs" / "data.yaml").read_text()
    assert main(["dataset", "import", str(root), "--name", "cells"]) == 2
    err = capsys.readouterr().err
    assert any(str(path) in line and re.search(message, line) for line in err.splitlines()), err
    assert not (project.root / "configs" / "datasets" / "cells.yaml").exists()
    assert (project.root / "configs" / "data.yaml").read_text() == data_before


def test_datalist_errors_name_the_file(project: FixtureProject) -> None:
    root = write_nnunet(project.root / "cells", n_train=3)
    lists = write_datalist(
        root / "list.json",
        training=[entry(0), entry(1), {"image": "imagesTr/nope.png", "label": "labelsTr/cell_002.png"}],
    )
    missing = re.escape(f"{root / 'imagesTr' / 'nope.png'}: listed in {lists}: training[2] but not found")
    with pytest.raises(SegpipeError, match=missing):
        import_into(config_files(), "listed", lists)
    write_datalist(lists, training=[entry(0), {"image": "imagesTr/cell_001_0000.png"}])
    with pytest.raises(SegpipeError, match=re.escape(f"{lists}: training[1]: expected")):
        import_into(config_files(), "listed", lists)
    write_datalist(lists, training=[entry(0), entry(1)], test=[entry(0)])
    with pytest.raises(SegpipeError, match=r"case 'cell_000_0000' twice"):
        import_into(config_files(), "listed", lists)
    write_datalist(lists, validation=[entry(0)])
    with pytest.raises(SegpipeError, match=re.escape(f"{lists}: expected a MONAI datalist")):
        import_into(config_files(), "listed", lists)


def test_unknown_paths_and_misplaced_options(project: FixtureProject) -> None:
    (project.root / "plain").mkdir()
    with pytest.raises(SegpipeError, match=r"plain: a folder without dataset\.json"):
        import_into(config_files(), "x", project.root / "plain")
    (project.root / "notes.txt").write_text("hello")
    with pytest.raises(SegpipeError, match=r"notes\.txt: not an nnU-Net v2 raw dataset folder .* nor a MONAI"):
        import_into(config_files(), "x", project.root / "notes.txt")
    root = write_nnunet(project.root / "Dataset001_Cells", n_train=3)
    with pytest.raises(SegpipeError, match=r"--classes and --ignore-value are for datalists"):
        import_into(config_files(), "x", root, class_names=["a", "b", "c"])
    with pytest.raises(SegpipeError, match=r"datasets/drive\.yaml: dataset 'drive' exists already"):
        import_into(config_files(), "drive", root)


def test_card_sources_are_checked(project: FixtureProject) -> None:
    card = project.root / "configs" / "datasets" / "odd.yaml"
    card.write_text("source: {nnunet: a, images: b}\nclasses: {bg: 0, fg: 1}\nchannels: [gray]\n")
    with pytest.raises(SegpipeError, match=r"odd\.yaml: source \(an nnU-Net raw folder\): .*unknown keys \['images'\]"):
        load_card(cards_dir(), "odd")
    card.write_text("source: {datalist: l.json, base_dir: 3}\nclasses: {bg: 0, fg: 1}\nchannels: [gray]\n")
    with pytest.raises(SegpipeError, match=r"odd\.yaml: source\.base_dir must be a non-empty string"):
        load_card(cards_dir(), "odd")


def test_the_cli_lists_dataset_import(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "dataset add, dataset import" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["dataset", "import", "--help"])
    assert "--base-dir" in capsys.readouterr().out
