"""`segpipe download`: fresh download, resume, retries, sha256 checks, imports, offline errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.errors import SegpipeError
from pipeline.stages.download import download

from fixtures import FixtureProject, Mirror, closed_port_url, ctc_members, sha256, write_zip

HELA = "/hela/DIC-C2DH-HeLa.zip"


def raw(project: FixtureProject, dataset: str) -> Path:
    return project.root / "data" / "raw" / dataset


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_fresh_download_verifies_and_records(project: FixtureProject, mirror: Mirror) -> None:
    download("drive", mirror=mirror.url)
    folder = raw(project, "drive")
    assert leftovers(folder) == ["download.json", "test.zip", "training.zip"]
    for served in project.archives["drive"]:
        assert sha256(folder / served.name) == sha256(served)
    record = json.loads((folder / "download.json").read_text())
    assert [a["name"] for a in record["archives"]] == ["training.zip", "test.zip"]
    assert not any(a["accepted_override"] for a in record["archives"])
    assert record["archives"][0]["source"] == f"{mirror.url}/drive/training.zip"


def test_second_run_fetches_nothing(project: FixtureProject, mirror: Mirror) -> None:
    download("hela", mirror=mirror.url)
    n = len(mirror.control.requests)
    download("hela", mirror=mirror.url)
    assert len(mirror.control.requests) == n


def test_mirror_from_environment(project: FixtureProject, mirror: Mirror, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEGPIPE_MIRROR", mirror.url + "/")
    download("hela")
    assert mirror.control.requests == [(HELA, None)]


def test_resume_after_cut_uses_range(project: FixtureProject, mirror: Mirror) -> None:
    mirror.control.cut_after[HELA] = 1000
    download("hela", mirror=mirror.url)
    assert mirror.control.requests == [(HELA, None), (HELA, "bytes=1000-")]
    assert sha256(raw(project, "hela") / "DIC-C2DH-HeLa.zip") == sha256(project.archives["hela"][0])


def test_server_without_range_restarts_from_zero(project: FixtureProject, mirror: Mirror) -> None:
    mirror.control.no_range = True
    mirror.control.cut_after[HELA] = 700
    download("hela", mirror=mirror.url)
    assert sha256(raw(project, "hela") / "DIC-C2DH-HeLa.zip") == sha256(project.archives["hela"][0])


def test_retries_server_errors_with_backoff(project: FixtureProject, mirror: Mirror) -> None:
    mirror.control.fail_500[HELA] = 2
    download("hela", mirror=mirror.url)
    assert len(mirror.control.requests) == 3


def test_gives_up_after_retries_and_keeps_only_the_part_file(project: FixtureProject, mirror: Mirror) -> None:
    mirror.control.fail_500[HELA] = 10
    with pytest.raises(SegpipeError, match="after 3 attempts"):
        download("hela", mirror=mirror.url)
    assert "DIC-C2DH-HeLa.zip" not in leftovers(raw(project, "hela"))


def _serve_repacked(project: FixtureProject) -> str:
    """Replace the served HeLa archive by a different zip; return its hash."""
    served = project.archives["hela"][0]
    write_zip(served, ctc_members("DIC-C2DH-HeLa", seed=99))
    return sha256(served)


def test_sha256_mismatch_names_both_hashes_and_the_override(project: FixtureProject, mirror: Mirror) -> None:
    expected = json.dumps(project.data_config())  # unchanged config
    got = _serve_repacked(project)
    with pytest.raises(SegpipeError) as err:
        download("hela", mirror=mirror.url)
    message = str(err.value)
    assert got in message and "expected" in message and f"--accept-sha256 {got}" in message
    assert leftovers(raw(project, "hela")) == []  # no final file, no .part
    assert json.dumps(project.data_config()) == expected


def test_accepting_a_new_hash_explicitly(project: FixtureProject, mirror: Mirror) -> None:
    got = _serve_repacked(project)
    download("hela", mirror=mirror.url, accept_sha256=[got])
    record = json.loads((raw(project, "hela") / "download.json").read_text())
    assert record["archives"][0] == {
        "name": "DIC-C2DH-HeLa.zip",
        "sha256": got,
        "source": f"{mirror.url}{HELA}",
        "accepted_override": True,
    }


def test_offline_error_names_url_and_overrides(project: FixtureProject, capsys: pytest.CaptureFixture[str]) -> None:
    url = closed_port_url()
    code = main(["download", "hela", "--mirror", url])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{url}{HELA}" in err and "--mirror" in err and "--from PATH" in err and "SEGPIPE_MIRROR" in err
    assert "DIC-C2DH-HeLa.zip" not in leftovers(raw(project, "hela"))


def test_import_known_archive_from_disk(project: FixtureProject, tmp_path: Path) -> None:
    # no mirror is configured and the sources' URLs are unreachable: only --from can work
    elsewhere = tmp_path / "usb" / "hela-copy.zip"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(project.archives["hela"][0].read_bytes())
    download("hela", from_paths=[str(elsewhere)])
    assert leftovers(raw(project, "hela")) == ["DIC-C2DH-HeLa.zip", "download.json"]


def test_import_unknown_archive_needs_explicit_acceptance(project: FixtureProject, tmp_path: Path) -> None:
    official = write_zip(tmp_path / "DRIVE.zip", {"DRIVE/readme.txt": b"not really"})
    with pytest.raises(SegpipeError, match=f"--accept-sha256 {sha256(official)}"):
        download("drive", from_paths=[str(official)])
    assert leftovers(raw(project, "drive")) == []
    download("drive", from_paths=[str(official)], accept_sha256=[sha256(official)])
    record = json.loads((raw(project, "drive") / "download.json").read_text())
    assert record["archives"] == [
        {"name": "DRIVE.zip", "sha256": sha256(official), "source": str(official), "accepted_override": True}
    ]


def test_import_missing_file(project: FixtureProject, tmp_path: Path) -> None:
    with pytest.raises(SegpipeError, match="nope.zip: --from archive not found"):
        download("drive", from_paths=[str(tmp_path / "nope.zip")])


def test_unknown_dataset_lists_known_ones(project: FixtureProject) -> None:
    with pytest.raises(SegpipeError, match="drive, hela, u373"):
        download("kitti")


def _corrupt_part(project: FixtureProject, size: int) -> Path:
    """A NAME.part left by an earlier run, holding bytes that are not the archive's."""
    part = raw(project, "hela") / "DIC-C2DH-HeLa.zip.part"
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(b"\xee" * size)
    return part


@pytest.mark.parametrize("longer", [False, True])
def test_corrupt_part_is_discarded_and_downloaded_again(
    project: FixtureProject, mirror: Mirror, caplog: pytest.LogCaptureFixture, longer: bool
) -> None:
    served = project.archives["hela"][0]
    size = served.stat().st_size + 10 if longer else 1000  # longer: the server answers 416
    _corrupt_part(project, size)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.download"):
        download("hela", mirror=mirror.url)
    assert mirror.control.requests == [(HELA, f"bytes={size}-"), (HELA, None)]
    assert sha256(raw(project, "hela") / "DIC-C2DH-HeLa.zip") == sha256(served)
    assert leftovers(raw(project, "hela")) == ["DIC-C2DH-HeLa.zip", "download.json"]
    assert "resumed from an existing DIC-C2DH-HeLa.zip.part" in caplog.text
    assert "Discarded it; downloading again from zero" in caplog.text


def test_repacked_archive_is_only_reported_after_a_download_from_zero(
    project: FixtureProject, mirror: Mirror, caplog: pytest.LogCaptureFixture
) -> None:
    got = _serve_repacked(project)
    with pytest.raises(SegpipeError) as fresh:  # from zero: reported at once, one request
        download("hela", mirror=mirror.url)
    assert mirror.control.requests == [(HELA, None)]
    part = _corrupt_part(project, 1000)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.download"), pytest.raises(SegpipeError) as resumed:
        download("hela", mirror=mirror.url)
    assert mirror.control.requests[1:] == [(HELA, "bytes=1000-"), (HELA, None)]
    assert "Discarded it; downloading again from zero" in caplog.text
    for err in (fresh, resumed):  # the hash to accept is the archive's, never the corrupt part's
        message = str(err.value)
        assert f"got {got} from a download from zero" in message and "re-packed" in message
        assert f"--accept-sha256 {got}" in message
    assert not part.exists() and leftovers(raw(project, "hela")) == []


def test_a_later_download_keeps_the_archive_imported_with_from(
    project: FixtureProject, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`dvc repro` runs `segpipe download hela` after the user's `--from X --accept-sha256 H`: the imported
    archive stays (no fetch: the mirror's port is closed), unless it changed on disk."""
    archive = write_zip(tmp_path / "DIC-C2DH-HeLa.zip", ctc_members("DIC-C2DH-HeLa", seed=9))
    download("hela", from_paths=[str(archive)], accept_sha256=[sha256(archive)])
    before = (raw(project, "hela") / "download.json").read_text()
    with caplog.at_level(logging.INFO, logger="pipeline.data.download"):
        download("hela", mirror=closed_port_url())
    assert (raw(project, "hela") / "download.json").read_text() == before
    assert any("kept the archive(s) imported earlier" in r.getMessage() for r in caplog.records)
    (raw(project, "hela") / "DIC-C2DH-HeLa.zip").write_bytes(b"changed on disk")
    with pytest.raises(SegpipeError):  # no longer the imported file: a fetch, which fails offline
        download("hela", mirror=closed_port_url())
