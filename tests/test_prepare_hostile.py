"""`segpipe prepare` against hostile inputs: bombs and duplicates refused before unpacking, image
headers claiming huge sizes refused before decoding, and the temporary folders of killed prepares
removed at the next start (simulated, and a real SIGKILL mid-prepare)."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

from pipeline.data.io import read_raster
from pipeline.errors import SegpipeError
from pipeline.stages.prepare import prepare

from fixtures import FixtureProject, ctc_members, sha256
from test_archives import DATA_LIMITS, MIB, crc_of_zeros, deflated_zeros, make_zip, patch_zip
from test_prepare import install_raw, no_temp_left, prepared

HELA = "DIC-C2DH-HeLa"
LIMIT = DATA_LIMITS["max_image_values"]


def install_zip(project: FixtureProject, dataset: str, archive: Path) -> None:
    """Record an archive already in data/raw/DATASET as `segpipe download` would."""
    record = {"name": archive.name, "sha256": sha256(archive), "source": "test", "accepted_override": False}
    (archive.parent / "download.json").write_text(json.dumps({"dataset": dataset, "archives": [record]}))


def hela_zip(project: FixtureProject, items: list[tuple[str, bytes]], method: int = zipfile.ZIP_DEFLATED) -> Path:
    folder = project.root / "data" / "raw" / "hela"
    folder.mkdir(parents=True, exist_ok=True)
    return make_zip(folder / f"{HELA}.zip", items, method)


def test_prepare_refuses_a_zip_bomb_before_unpacking(project: FixtureProject) -> None:
    bomb = f"{HELA}/01_GT/TRA/man_track999.tif"  # a path the layout ignores: it used to be unpacked anyway
    archive = hela_zip(project, [*ctc_members(HELA).items(), (bomb, deflated_zeros(1400))], zipfile.ZIP_STORED)
    patch_zip(archive, bomb, method=zipfile.ZIP_DEFLATED, crc=crc_of_zeros(1400), usize=1400 * MIB)
    install_zip(project, "hela", archive)
    with pytest.raises(
        SegpipeError,
        match=rf"data/raw/hela/{HELA}\.zip: member {bomb}: declares 1468006400 bytes "
        r"from 14\d{5} compressed .*refused before unpacking",
    ):
        prepare("hela")
    assert not prepared(project, "hela").exists() and no_temp_left(project)


def test_prepare_refuses_duplicate_members(project: FixtureProject) -> None:
    items = list(ctc_members(HELA).items())
    name, data = items[0]
    archive = hela_zip(project, [*items, (name, data[::-1])])
    install_zip(project, "hela", archive)
    expected = rf"raw/hela/{HELA}\.zip: refused before unpacking anything .*\n  - {name}: duplicate"
    with pytest.raises(SegpipeError, match=expected):
        prepare("hela")
    assert not prepared(project, "hela").exists() and no_temp_left(project)


def liar_tiff(path: Path, shape: tuple[int, int] = (35000, 35000)) -> Path:
    """A small 16-bit TIFF whose header claims `shape` (its width and length tags overwritten)."""
    tifffile.imwrite(path, np.zeros((64, 64), np.uint16))
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tif.pages[0].tags["ImageWidth"].overwrite(shape[1])
        tif.pages[0].tags["ImageLength"].overwrite(shape[0])
    return path


def liar_png(path: Path, shape: tuple[int, int] = (35000, 35000)) -> Path:
    """A small PNG whose IHDR claims `shape` (its CRC fixed, so the header itself is valid)."""
    data = bytearray(iio.imwrite("<bytes>", np.zeros((64, 64), np.uint8), extension=".png"))
    data[16:24] = shape[1].to_bytes(4, "big") + shape[0].to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (liar_tiff, rf"the header declares a 35000x35000 image \(1225000000 values\), more than the limit of {LIMIT}"),
        (liar_png, r"cannot read as an image \(DecompressionBombError: Image size \(1225000000 pixels\)"),
    ],
)
def test_image_headers_claiming_huge_sizes_are_refused_before_decoding(tmp_path: Path, make, message: str) -> None:
    path = make(tmp_path / ("liar.tif" if make is liar_tiff else "liar.png"))
    tracemalloc.start()
    try:
        with pytest.raises(SegpipeError, match=rf"{path.name}: {message}"):
            read_raster(path, LIMIT)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * MIB  # decoding would allocate 1.2-2.4 GB
    small = tmp_path / "ok.tif"
    tifffile.imwrite(small, np.zeros((64, 64), np.uint16))
    expected = r"ok\.tif: the header declares a 64x64 image \(4096 values\), more than the limit of 4000"
    with pytest.raises(SegpipeError, match=expected):
        read_raster(small, 4000)
    assert read_raster(small, 4096).shape == (64, 64)


def test_prepare_refuses_an_image_header_claiming_35000x35000(project: FixtureProject, tmp_path: Path) -> None:
    frame = f"{HELA}/01/t003.tif"
    members = ctc_members(HELA)
    members[frame] = liar_tiff(tmp_path / "t003.tif").read_bytes()
    install_raw(project, "hela", {f"{HELA}.zip": members})
    start = time.perf_counter()
    with pytest.raises(SegpipeError, match=rf"{frame}: the header declares a 35000x35000 image .*refused before decod"):
        prepare("hela")
    assert time.perf_counter() - start < 60 and no_temp_left(project)


# --- temporary folders of killed prepares --------------------------------------------------------


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_stale_temp_folders_of_the_dataset_are_removed_at_the_next_start(project: FixtureProject) -> None:
    folder = project.root / "data" / "prepared"
    host, dead = socket.gethostname(), dead_pid()
    names = {
        "killed": f".hela.tmp-{host}-{dead}-abc_12",
        "live": f".hela.tmp-{host}-{os.getpid()}-def34",  # another prepare of hela, still running
        "other_host": f".hela.tmp-elsewhere-{dead}-ghi56",
        "other_dataset": f".u373.tmp-{host}-{dead}-jkl78",
    }
    for name in names.values():
        (folder / name / "unpacked").mkdir(parents=True)
        (folder / name / "unpacked" / "t000.tif").write_bytes(b"half-written")
    with pytest.raises(SegpipeError, match="run `segpipe download hela` first"):
        prepare("hela")  # a failing start cleans up too
    left = sorted(p.name for p in folder.iterdir())
    assert left == sorted(n for k, n in names.items() if k != "killed")
    install_raw(project, "hela", {f"{HELA}.zip": ctc_members(HELA)})
    prepare("hela")
    assert sorted(p.name for p in folder.iterdir()) == sorted([*left, "hela"])


def _wait_for_line(proc: subprocess.Popen, text: str, timeout: float) -> None:
    deadline, seen = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            line = proc.stdout.readline()
            if not line:
                break
            seen += line
            if text in line:
                return
    proc.kill()
    raise AssertionError(f"child never printed {text!r}; stdout {seen!r}, stderr {proc.stderr.read()!r}")


def test_prepare_killed_with_sigkill_is_cleaned_at_the_next_start(project: FixtureProject) -> None:
    install_raw(project, "hela", {f"{HELA}.zip": ctc_members(HELA)})
    child = (
        "import time\n"
        "import pipeline.preprocessing.prepare as prepare\n"
        "from pipeline.stages.prepare import prepare as run\n"
        "def hold(*args, **kwargs):\n"
        "    print('unpacked', flush=True)\n"
        "    time.sleep(600)\n"
        "prepare.validate = hold\n"
        "run('hela')\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", child],
        cwd=project.root,
        env=dict(os.environ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_line(proc, "unpacked", timeout=120)
        stale = list((project.root / "data" / "prepared").glob(".hela.tmp-*"))
        assert len(stale) == 1 and any(p.is_file() for p in stale[0].rglob("*.tif"))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert stale[0].exists()  # SIGKILL: no finally clause ran
    prepare("hela")
    assert not stale[0].exists() and no_temp_left(project)
