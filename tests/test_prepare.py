"""`segpipe prepare` and `segpipe manifest`: validation failures, conversion, splits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.config import read_config
from pipeline.data.io import read_volume
from pipeline.data.manifest import write_file_manifest
from pipeline.data.settings import check_data_config
from pipeline.errors import SegpipeError
from pipeline.preprocessing.prepare import separate_touching
from pipeline.stages.prepare import prepare

from fixtures import FixtureProject, ctc_members, disk_instances, drive_members, sha256, write_zip


def install_raw(project: FixtureProject, dataset: str, zips: dict[str, dict[str, bytes]]) -> None:
    """Put archives into data/raw/DATASET as `segpipe download` would (record included)."""
    folder = project.root / "data" / "raw" / dataset
    records = []
    for name, members in zips.items():
        path = write_zip(folder / name, members)
        records.append({"name": name, "sha256": sha256(path), "source": "test", "accepted_override": False})
    (folder / "download.json").write_text(json.dumps({"dataset": dataset, "archives": records}))


def drive_zips(changes: dict[str, bytes | None] | None = None) -> dict[str, dict[str, bytes]]:
    """DRIVE as training.zip + test.zip, with members replaced (bytes) or removed (None)."""
    members = drive_members()
    for path, data in (changes or {}).items():
        if data is None:
            members.pop(path)
        else:
            members[path] = data
    return {
        "training.zip": {k: v for k, v in members.items() if k.startswith("training/")},
        "test.zip": {k: v for k, v in members.items() if not k.startswith("training/")},
    }


def prepared(project: FixtureProject, dataset: str) -> Path:
    return project.root / "data" / "prepared" / dataset


def no_temp_left(project: FixtureProject) -> bool:
    folder = project.root / "data" / "prepared"
    return not folder.exists() or not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_prepare_drive_converts_and_splits(project: FixtureProject) -> None:
    install_raw(project, "drive", drive_zips())
    out = prepare("drive")
    table = pd.read_csv(out / "manifest.csv")
    assert table["split"].value_counts().to_dict() == {"train": 4, "test": 3, "val": 1}
    assert sorted(table.loc[table.split == "test", "case"]) == ["test_01", "test_02", "test_03"]
    row = table.loc[table.split == "test"].iloc[0]
    image, label = read_volume(out / row.image), read_volume(out / row.label)
    fov, weight, label2 = read_volume(out / row.fov), read_volume(out / row.weight), read_volume(out / row.label2)
    assert image.shape == (3, 48, 40) and image.dtype == np.uint8
    assert label.shape == fov.shape == label2.shape == weight.shape == (1, 48, 40)
    assert set(np.unique(label)) <= {0, 1} and label.dtype == np.uint8 and label.any()
    assert weight.dtype == np.float32 and np.all(weight > 0)
    assert table.loc[table.split == "train", "label2"].isna().all()
    stats = json.loads((out / "stats.json").read_text())
    assert stats["splits"] == {"train": 4, "test": 3, "val": 1} and stats["seed"] == 2015
    assert no_temp_left(project)


def _runs(dataset: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    experiment = client.get_experiment_by_name(dataset)
    return client.search_runs([experiment.experiment_id], order_by=["start_time DESC"]) if experiment else []


def test_prepare_is_tracked_in_mlflow(project: FixtureProject) -> None:
    install_raw(project, "u373", {"PhC-C2DH-U373.zip": ctc_members("PhC-C2DH-U373")})
    prepare("u373")
    run = _runs("u373")[0]
    assert run.info.status == "FINISHED" and run.data.tags["stage"] == "prepare"
    assert run.data.metrics["cases_train"] == 2 and run.data.metrics["cases_test"] == 2
    assert run.data.params["prepare.seed"] == "2015"
    assert len(run.data.tags["data_manifest_sha256"]) == 64
    members = ctc_members("PhC-C2DH-U373")
    del members["PhC-C2DH-U373/01/t000.tif"]
    install_raw(project, "u373", {"PhC-C2DH-U373.zip": members})
    with pytest.raises(SegpipeError):
        prepare("u373")
    assert _runs("u373")[0].info.status == "FAILED"


def test_split_is_seeded_and_recorded(project: FixtureProject) -> None:
    install_raw(project, "drive", drive_zips())
    first = pd.read_csv(prepare("drive") / "manifest.csv")
    again = pd.read_csv(prepare("drive") / "manifest.csv")
    pd.testing.assert_frame_equal(first, again)
    cfg = project.data_config()
    cfg["prepare"]["seed"] = 7
    project.set_data_config(cfg)
    other = pd.read_csv(prepare("drive") / "manifest.csv")
    assert list(other["split"]) != list(first["split"])  # 5 training cases: 5 choices of the val case


def test_prepare_cells_keeps_frames_with_ground_truth(project: FixtureProject) -> None:
    install_raw(project, "u373", {"PhC-C2DH-U373.zip": ctc_members("PhC-C2DH-U373")})
    table = pd.read_csv(prepare("u373") / "manifest.csv")  # the u373 card: GT frames only
    assert sorted(table["case"]) == ["01_000", "01_002", "01_004", "02_001", "02_003"]
    install_raw(project, "hela", {"DIC-C2DH-HeLa.zip": ctc_members("DIC-C2DH-HeLa")})
    out = prepare("hela")  # the hela card: silver_truth, sequence 01's other frames train on 01_ST
    table = pd.read_csv(out / "manifest.csv")
    assert sorted(table["case"]) == ["01_000", "01_001", "01_002", "01_003", "01_004", "01_005", "02_001", "02_003"]
    assert table.loc[table.case.str.startswith("02"), "split"].eq("test").all()  # GT only: no 02 silver frame
    split = dict(zip(table["case"], table["split"]))
    assert sorted(split[c] for c in split if c.startswith("01")) == ["train"] * 5 + ["val"]  # 20 % of 6 frames
    inst = {c: read_volume(out / p)[0] for c, p in zip(table["case"], table["instances"])}
    assert inst["01_001"].max() == 3 and inst["01_001"].dtype == np.uint16  # the silver file, read like GT
    assert json.loads((out / "stats.json").read_text())["silver_cases"] == ["01_001", "01_003", "01_005"]
    row = table.iloc[0]
    inst, label = read_volume(out / row.instances), read_volume(out / row.label)
    assert inst.dtype == np.uint16 and inst.shape == (1, 64, 64)
    assert read_volume(out / row.image).dtype == np.uint16
    # the two touching disks (centres (16,16) and (16,30), radius 8) are separated by background
    assert inst[0, 16, 21] == 1 and inst[0, 16, 22] == 2
    assert label[0, 16, 21] == 0 and label[0, 16, 22] == 0 and label[0, 16, 20] == 1
    weight = read_volume(out / row.weight)[0]
    assert weight[16, 21] > weight[16, 3] + 5  # the gap between touching cells weighs more (eq. 2)


def test_separate_touching_only_removes_contacts() -> None:
    inst = disk_instances((40, 60), [(20, 15), (20, 45)], radius=10)  # far apart
    np.testing.assert_array_equal(separate_touching(inst), (inst > 0).astype(np.uint8))
    inst = np.zeros((5, 6), np.uint16)
    inst[:, :3], inst[:, 3:] = 1, 2
    assert separate_touching(inst)[:, 2:4].sum() == 0 and separate_touching(inst)[:, [0, 1, 4, 5]].all()


def test_corrupt_zip_names_the_archive(project: FixtureProject) -> None:
    install_raw(project, "hela", {"DIC-C2DH-HeLa.zip": ctc_members("DIC-C2DH-HeLa")})
    archive = project.root / "data/raw/hela/DIC-C2DH-HeLa.zip"
    data = bytearray(archive.read_bytes())
    # damage a member's bytes (not zeros: a stored member may hold zeros there)
    data[len(data) // 3 : len(data) // 3 + 64] = b"\xff" * 64
    archive.write_bytes(bytes(data))
    with pytest.raises(SegpipeError, match=r"DIC-C2DH-HeLa\.zip: .*(corrupt|not a readable zip)"):
        prepare("hela")
    assert not prepared(project, "hela").exists() and no_temp_left(project)


def test_truncated_zip_names_the_archive(project: FixtureProject) -> None:
    install_raw(project, "hela", {"DIC-C2DH-HeLa.zip": ctc_members("DIC-C2DH-HeLa")})
    archive = project.root / "data/raw/hela/DIC-C2DH-HeLa.zip"
    archive.write_bytes(archive.read_bytes()[:5000])
    with pytest.raises(SegpipeError, match=r"DIC-C2DH-HeLa\.zip: not a readable zip"):
        prepare("hela")


def test_missing_file_is_named(project: FixtureProject) -> None:
    install_raw(project, "drive", drive_zips({"test/1st_manual/02_manual1.gif": None}))
    with pytest.raises(SegpipeError, match=r"test/1st_manual/02_manual1\.gif: missing"):
        prepare("drive")
    assert not prepared(project, "drive").exists() and no_temp_left(project)


def test_extra_and_unknown_files_are_named(project: FixtureProject) -> None:
    extra = drive_members()["training/images/21_training.tif"]
    install_raw(project, "drive", drive_zips({"training/images/39_training.tif": extra, "training/notes.txt": b"hi"}))
    with pytest.raises(SegpipeError) as err:
        prepare("drive")
    assert "training/notes.txt: unexpected file" in str(err.value)


def test_extra_file_matching_the_layout_is_named(project: FixtureProject) -> None:
    extra = drive_members()["training/images/21_training.tif"]
    install_raw(project, "drive", drive_zips({"training/images/39_training.tif": extra}))
    with pytest.raises(SegpipeError, match=r"training/images/39_training\.tif: extra file"):
        prepare("drive")


def test_changed_file_fails_its_sha256(project: FixtureProject) -> None:
    other = drive_members(seed=5)["training/images/22_training.tif"]
    install_raw(project, "drive", drive_zips({"training/images/22_training.tif": other}))
    with pytest.raises(SegpipeError, match=r"22_training\.tif: sha256 [0-9a-f]{64}, expected [0-9a-f]{64}"):
        prepare("drive")


def test_wrong_shape_against_the_manifest(project: FixtureProject) -> None:
    small = drive_members(shape=(32, 40))["training/images/22_training.tif"]
    install_raw(project, "drive", drive_zips({"training/images/22_training.tif": small}))
    with pytest.raises(SegpipeError, match=r"22_training\.tif: shape 32x40x3, expected 48x40x3"):
        prepare("drive")


def _ctc_with(path: str, array: np.ndarray) -> dict[str, dict[str, bytes]]:
    from fixtures import _tif_bytes

    members = ctc_members("DIC-C2DH-HeLa")
    members[path] = _tif_bytes(array)
    return {"DIC-C2DH-HeLa.zip": members}


def test_wrong_shape_against_the_layout(project: FixtureProject) -> None:
    install_raw(project, "hela", _ctc_with("DIC-C2DH-HeLa/01/t003.tif", np.zeros((32, 64), np.uint16)))
    with pytest.raises(SegpipeError, match=r"01/t003\.tif: shape \(32, 64\), expected \(64, 64\)"):
        prepare("hela")


def test_wrong_dtype_against_the_layout(project: FixtureProject) -> None:
    install_raw(project, "hela", _ctc_with("DIC-C2DH-HeLa/02_GT/SEG/man_seg003.tif", np.zeros((64, 64), np.float32)))
    with pytest.raises(SegpipeError, match=r"man_seg003\.tif: dtype float32, expected one of \['uint16'\]"):
        prepare("hela")


def test_wrong_count_against_the_layout(project: FixtureProject) -> None:
    members = ctc_members("DIC-C2DH-HeLa")
    del members["DIC-C2DH-HeLa/02/t005.tif"]
    install_raw(project, "hela", {"DIC-C2DH-HeLa.zip": members})
    with pytest.raises(SegpipeError, match=r"02/image: 5 files, expected exactly 6"):
        prepare("hela")


def test_failed_prepare_keeps_the_previous_output(project: FixtureProject) -> None:
    install_raw(project, "drive", drive_zips())
    out = prepare("drive")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    install_raw(project, "drive", drive_zips({"test/mask/01_test_mask.gif": None}))
    with pytest.raises(SegpipeError):
        prepare("drive")
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert before == after and no_temp_left(project)


def test_prepare_without_download_says_what_to_run(project: FixtureProject) -> None:
    with pytest.raises(SegpipeError, match="run `segpipe download u373` first"):
        prepare("u373")


def test_manifest_command_matches_an_independent_manifest(project: FixtureProject, tmp_path: Path) -> None:
    zips = drive_zips()
    source = tmp_path / "DRIVE"
    for members in zips.values():
        for name, data in members.items():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes(data)
    out = write_file_manifest(
        "drive", str(source), read_config("data", check_data_config), str(tmp_path / "drive_files.csv")
    )
    ours = pd.read_csv(out).sort_values("path").reset_index(drop=True)
    reference = pd.read_csv(project.root / "data_manifests/drive_files.csv").sort_values("path").reset_index(drop=True)
    pd.testing.assert_frame_equal(ours, reference, check_dtype=False)


def test_atomic_writes_get_ordinary_permissions(tmp_path: Path) -> None:
    import os

    from pipeline.data.io import write_text

    umask = os.umask(0o022)
    try:
        write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(umask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_silver_truth_is_a_yes_or_no_of_archive_sources(tmp_path: Path) -> None:
    from pipeline.config import ConfigError
    from pipeline.data.cards import parse_card

    base = {"classes": {"background": 0, "cell": 1}, "channels": ["dic"]}
    assert parse_card({**base, "source": {"archives": "hela", "silver_truth": True}}, "hela", tmp_path).silver_truth
    assert not parse_card({**base, "source": {"archives": "hela"}}, "hela", tmp_path).silver_truth
    with pytest.raises(ConfigError, match="source.silver_truth"):
        parse_card({**base, "source": {"archives": "hela", "silver_truth": "yes"}}, "hela", tmp_path)
    with pytest.raises(ConfigError, match="silver_truth"):
        parse_card({**base, "source": {"images": "a", "labels": "b", "silver_truth": True}}, "x", tmp_path)
