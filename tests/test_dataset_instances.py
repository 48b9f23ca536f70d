"""Instance masks of folder datasets (issue 13): `segpipe dataset add --instances DIR`, prepared as
instances/CASE.nii.gz (uint16) whose cells give the U-Net eq. 2 border term (touching cells apart,
where connected components merge them), hashed in files.csv and the scan record, every error naming
its file, and the CTC SEG metric of `segpipe evaluate` for two classes."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Callable

import imageio.v3 as iio
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import tifffile
import torch

from pipeline.config import cards_dir
from pipeline.data.cards import load_card
from pipeline.data.io import read_volume
from pipeline.errors import SegpipeError
from pipeline.metrics import label_instances, seg_jaccards
from pipeline.stages.download import download
from pipeline.stages.evaluate import evaluate as run_evaluate
from pipeline.stages.prepare import prepare
from pipeline.transforms.weightmap import instances_from_labels, unet_weight_map

from fixtures import FixtureProject
from test_datasets import SHAPE, add, image_of, prepared, write_card

RADIUS = 5


def centre_row(case: int) -> int:
    return 10 + case


def two_cells(case: int, values: tuple[int, ...] = (0, 255)) -> tuple[np.ndarray, np.ndarray]:
    """(label, instances) of two disks that touch in one column (x = 14 + RADIUS = 19) with
    background gaps above and below it, ids 1 + case and 1000 + case; 3 classes: a bar (values[2],
    no instance) below the cells."""
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    row = centre_row(case)
    inst = np.zeros(SHAPE, np.uint16)
    inst[(yy - row) ** 2 + (xx - 14) ** 2 <= RADIUS**2] = 1 + case
    inst[((yy - row) ** 2 + (xx - 24) ** 2 <= RADIUS**2) & (inst == 0)] = 1000 + case
    label = np.where(inst > 0, values[1], values[0]).astype(np.uint8)
    if len(values) > 2:
        label[26:30, 4:36] = values[2]
    return label, inst


def gap(case: int) -> tuple[np.ndarray, np.ndarray]:
    """The two background pixels beside the touching column, next to both cells."""
    return np.array([centre_row(case) - 1, centre_row(case) + 1]), np.array([19, 19])


def write_cells(root: Path, n: int = 6, values: tuple[int, ...] = (0, 255), prefix: str = "") -> dict[str, Path]:
    """images/, labels/ and instances/ (16-bit PNG) of `n` cases named slice_XX."""
    folders = {k: root / f"{prefix}{k}" for k in ("images", "labels", "instances")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    for case in range(n):
        label, inst = two_cells(case, values)
        iio.imwrite(folders["labels"] / f"slice_{case:02d}.png", label)
        iio.imwrite(folders["images"] / f"slice_{case:02d}.png", image_of(label, case))
        iio.imwrite(folders["instances"] / f"slice_{case:02d}.png", inst)
    return folders


def weight_settings(project: FixtureProject, out: Path) -> dict[str, Any]:
    cfg = project.data_config()["prepare"]["weight_map"]
    stats = json.loads((out / "stats.json").read_text())
    return {"w0": cfg["w0"], "sigma": cfg["sigma"], "class_weights": stats["class_weights"]}


def cases_of(out: Path) -> list[tuple[int, dict[str, np.ndarray]]]:
    """(case number, prepared volumes) of every case of the manifest."""
    table = pd.read_csv(out / "manifest.csv")
    rows = []
    for row in table.itertuples():
        vols = {role: read_volume(out / getattr(row, role))[0] for role in ("label", "weight", "instances")}
        rows.append((int(row.case[-2:]), vols))
    return rows


# --- the weight map's cells -----------------------------------------------------------------------


def test_touching_cells_get_the_border_term_from_their_instances(project: FixtureProject) -> None:
    folders = write_cells(project.root / "cells")
    assert add("cells", folders, "--instances", str(folders["instances"])) == 0
    assert load_card(cards_dir(), "cells").folders.instances == folders["instances"]
    out = prepare("cells")
    settings = weight_settings(project, out)
    table = pd.read_csv(out / "manifest.csv")
    assert table["instances"].notna().all() and len(table) == 6
    for case, vols in cases_of(out):
        label, inst = two_cells(case)
        assert vols["instances"].dtype == np.uint16
        np.testing.assert_array_equal(vols["instances"], inst)  # ids as given
        by_hand = unet_weight_map(inst, labels=label // 255, **settings)
        np.testing.assert_allclose(vols["weight"], by_hand, rtol=1e-6)
        components = instances_from_labels(label // 255)
        assert components.max() == 1  # connected components merge the touching cells
        merged = unet_weight_map(components, labels=label // 255, **settings)
        assert (vols["weight"][gap(case)] > merged[gap(case)] + 0.5 * settings["w0"]).all()
    files = pd.read_csv(out / "files.csv")
    instances = files[files["role"] == "instances"]
    assert len(files) == 18 and len(instances) == 6
    for entry in instances.itertuples():
        assert Path(entry.path).parent == folders["instances"]
        assert entry.sha256 == hashlib.sha256(Path(entry.path).read_bytes()).hexdigest()


def test_three_classes_use_the_instances_on_the_foreground(project: FixtureProject) -> None:
    folders = write_cells(project.root / "cells", values=(0, 1, 2))
    for case in range(6):  # the instance files mark the gap too: only the label's foreground counts
        _, inst = two_cells(case)
        inst[gap(case)] = 1 + case
        tifffile.imwrite(folders["instances"] / f"slice_{case:02d}.tif", inst.astype(np.int32))
        (folders["instances"] / f"slice_{case:02d}.png").unlink()
    assert add("three", folders, "--classes", "background,cell,bar", "--instances", str(folders["instances"])) == 0
    out = prepare("three")
    settings = weight_settings(project, out)
    for case, vols in cases_of(out):
        label, inst = two_cells(case, (0, 1, 2))
        np.testing.assert_array_equal(label, vols["label"])
        assert vols["instances"][gap(case)].tolist() == [1 + case] * 2  # stored as given
        cells = inst.astype(np.int64)
        cells[label == 2] = 2000  # the bar has no instance: its class's component
        by_hand = unet_weight_map(cells, labels=label, **settings)
        np.testing.assert_allclose(vols["weight"], by_hand, rtol=1e-6)
        np.testing.assert_allclose(vols["weight"][label == 2], settings["class_weights"][2], rtol=1e-6)
        merged = unet_weight_map(instances_from_labels(label), labels=label, **settings)
        assert (vols["weight"][gap(case)] > merged[gap(case)] + 0.5 * settings["w0"]).all()


# --- segpipe evaluate: CTC SEG of a two-class folder dataset ---------------------------------------


def midpoint(model: Any, image: np.ndarray, **kwargs: Any) -> np.ndarray:
    """Stand-in for `predict`: the bright pixels (the cells, exactly) as probabilities (1, H, W)."""
    x = np.asarray(image)[0]
    return (x > (x.min() + x.max()) / 2).astype(np.float32)[None]


def test_evaluate_gives_the_seg_of_the_instances(project: FixtureProject, monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    from pipeline.config import load_config
    from pipeline.evaluation import evaluate as ev
    from pipeline.networks import build_network, save_checkpoint

    train, test = write_cells(project.root / "cells", n=4), write_cells(project.root / "cells", n=2, prefix="test_")
    assert (
        add(
            "cells",
            train,
            "--instances",
            str(train["instances"]),
            "--test-images",
            str(test["images"]),
            "--test-labels",
            str(test["labels"]),
            "--test-instances",
            str(test["instances"]),
        )
        == 0
    )
    out = prepare("cells")
    config = project.root / "configs" / "evaluate.yaml"
    config.write_text(
        yaml.safe_dump({**yaml.safe_load(config.read_text()), "overlays": None, "inference": {"tile": 32, "tta": []}})
    )
    torch.manual_seed(0)
    net = build_network("unet", 1, 1, base_width=4, depth=2, padding="same", batch_norm=True)
    save_checkpoint(
        net,
        project.root / "models" / "cells" / "unet" / "best.pt",
        dataset="cells",
        network_key="unet",
        profile="smoke",
        epoch=1,
        val_dice=0.5,
        augment={**load_config("augment")["cells"], "normalize": "zscore"},
    )
    monkeypatch.setattr(ev, "predict", midpoint)
    m = run_evaluate("cells", "unet")
    assert m["dice"] == pytest.approx(1.0)
    jaccards = []
    for case in range(2):
        label, inst = two_cells(case)
        stored = read_volume(out / f"instances/test_slice_{case:02d}.nii.gz")[0]
        np.testing.assert_array_equal(stored, inst)
        jaccards.append(seg_jaccards(label_instances(label > 0), inst)[1])
    assert m["seg"] == pytest.approx(np.concatenate(jaccards).mean())
    assert 0.4 < m["seg"] < 0.6  # one predicted component over two reference cells: about half each


# --- every error names its file ---------------------------------------------------------------------


def _instance_without_image(f: dict[str, Path]) -> tuple[Path, str]:
    path = f["instances"] / "slice_09.png"
    iio.imwrite(path, two_cells(0)[1])
    return path, "an instance mask without an image"


def _image_without_instances(f: dict[str, Path]) -> tuple[Path, str]:
    (f["instances"] / "slice_02.png").unlink()
    return f["images"] / "slice_02.png", "an image without an instance mask"


def _missing_folder(f: dict[str, Path]) -> tuple[Path, str]:
    for path in f["instances"].iterdir():
        path.unlink()
    f["instances"].rmdir()
    return f["instances"], "folder not found"


def _shape(f: dict[str, Path]) -> tuple[Path, str]:
    iio.imwrite(f["instances"] / "slice_01.png", np.zeros((16, 40), np.uint16))
    return f["instances"] / "slice_01.png", r"instances of shape \(16, 40\).*expected the same H x W"


def _not_integers(f: dict[str, Path]) -> tuple[Path, str]:
    inst = two_cells(3)[1].astype(np.float32)
    inst[0, 0] = 1.5
    (f["instances"] / "slice_03.png").unlink()
    nib.save(nib.Nifti1Image(inst, np.eye(4)), str(f["instances"] / "slice_03.nii.gz"))
    return f["instances"] / "slice_03.nii.gz", r"instance values 1\.5 \(float32\) are not integers"


def _negative(f: dict[str, Path]) -> tuple[Path, str]:
    inst = two_cells(4)[1].astype(np.int16)
    inst[0, 0] = -1
    (f["instances"] / "slice_04.png").unlink()
    tifffile.imwrite(f["instances"] / "slice_04.tif", inst)
    return f["instances"] / "slice_04.tif", "negative instance ids"


def _too_many(f: dict[str, Path]) -> tuple[Path, str]:
    side = 257  # 66049 pixels: ids 1..66048 and one background pixel
    label = np.zeros((side, side), np.uint8)
    label[1:] = 255
    iio.imwrite(f["labels"] / "slice_05.png", label)
    iio.imwrite(f["images"] / "slice_05.png", label // 2)
    (f["instances"] / "slice_05.png").unlink()
    tifffile.imwrite(f["instances"] / "slice_05.tif", np.arange(side * side, dtype=np.int32).reshape(side, side))
    return f["instances"] / "slice_05.tif", "66048 instance ids; at most 65535"


def _jpeg(f: dict[str, Path]) -> tuple[Path, str]:
    (f["instances"] / "slice_00.png").rename(f["instances"] / "slice_00.jpg")
    return f["instances"] / "slice_00.jpg", "not usable as an instance mask"


BREAKS = [
    _instance_without_image,
    _image_without_instances,
    _missing_folder,
    _shape,
    _not_integers,
    _negative,
    _too_many,
    _jpeg,
]


@pytest.mark.parametrize("breaker", BREAKS, ids=lambda b: b.__name__.removeprefix("_"))
def test_prepare_names_the_instance_file(project: FixtureProject, breaker: Callable[..., tuple[Path, str]]) -> None:
    folders = write_cells(project.root / "cells")
    write_card(
        project,
        "cells",
        f"source:\n  images: {folders['images']}\n  labels: {folders['labels']}\n"
        f"  instances: {folders['instances']}\nclasses: {{background: 0, cell: 255}}\nchannels: [gray]\n"
        "test_fraction: 0.2\n",
    )
    path, message = breaker(folders)
    with pytest.raises(SegpipeError) as error:
        prepare("cells")
    lines = str(error.value).splitlines()
    assert any(str(path) in line and re.search(message, line) for line in lines), str(error.value)
    assert not prepared(project, "cells").exists()


def test_add_checks_the_instance_folders(project: FixtureProject, capsys: pytest.CaptureFixture) -> None:
    train, test = write_cells(project.root / "cells", n=3), write_cells(project.root / "cells", n=2, prefix="test_")
    stray, _ = _instance_without_image(train)
    test_folders = ["--test-images", str(test["images"]), "--test-labels", str(test["labels"])]
    assert add("cells", train, "--instances", str(train["instances"])) == 2
    assert f"{stray}: an instance mask without an image" in capsys.readouterr().err
    stray.unlink()
    assert add("cells", train, "--instances", str(train["instances"]), *test_folders) == 2
    assert "instances and test_instances go together" in capsys.readouterr().err
    assert add("cells", train, "--test-instances", str(test["instances"])) == 2
    assert "test_instances without test_images" in capsys.readouterr().err
    assert not (project.root / "configs" / "datasets" / "cells.yaml").exists()


# --- what DVC sees ----------------------------------------------------------------------------------


def test_a_changed_instance_file_changes_the_scan_record(project: FixtureProject) -> None:
    folders = write_cells(project.root / "cells")
    assert add("cells", folders, "--instances", str(folders["instances"])) == 0
    record = download("cells") / "download.json"
    before = json.loads(record.read_text())
    assert before["folders"]["instances"] == str(folders["instances"])
    inst = two_cells(3)[1]
    inst[inst == 4] = 7  # another id for one cell: the same pixels, another file
    iio.imwrite(folders["instances"] / "slice_03.png", inst)
    download("cells")
    changed = [f for f in json.loads(record.read_text())["files"] if f not in before["files"]]
    assert [(f["folder"], f["name"]) for f in changed] == [("instances", "slice_03.png")]
