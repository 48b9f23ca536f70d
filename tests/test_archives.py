"""Hostile archives (pipeline/data/archives.py): zip and tar bombs, members bigger than declared,
compression methods the stdlib lacks, encryption, corrupt deflate, duplicates and unsafe names are
refused with a SegpipeError naming the archive and the member, before anything is written; a
hypothesis fuzz over damaged zips never gets another exception."""

from __future__ import annotations

import io
import struct
import tarfile
import time
import warnings
import zipfile
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, event, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from pipeline.data.archives import UnpackLimits, copy_capped, unpack
from pipeline.data.settings import check_data_config
from pipeline.data.sources import get_source
from pipeline.errors import SegpipeError

from fixtures import REPO_ROOT, _tif_bytes

LAYOUT = get_source(REPO_ROOT / "data_manifests", "hela").layout
DATA_LIMITS = check_data_config(  # the shipped defaults
    yaml.safe_load((REPO_ROOT / "configs" / "data.yaml").read_text()), "configs/data.yaml"
).prepare.limits
LIMITS = UnpackLimits.from_config(DATA_LIMITS)
ROOT = "DIC-C2DH-HeLa"
FRAME = f"{ROOT}/01/t000.tif"
MIB = 1 << 20


def members(n: int = 2) -> dict[str, bytes]:
    """A few members in the HeLa layout: frames, a SEG mask and a TRA mask (ignored by the layout)."""
    rng = np.random.default_rng(n)
    out = {f"{ROOT}/01/t{i:03d}.tif": _tif_bytes(rng.integers(0, 999, (8, 8), dtype=np.uint16)) for i in range(n)}
    out[f"{ROOT}/01_GT/SEG/man_seg000.tif"] = _tif_bytes(np.eye(8, dtype=np.uint16))
    out[f"{ROOT}/01_GT/TRA/man_track000.tif"] = _tif_bytes(np.eye(8, dtype=np.uint16) * 2)
    return out


def make_zip(
    path: Path, content: dict[str, bytes] | list[tuple[str, bytes]], method: int = zipfile.ZIP_DEFLATED
) -> Path:
    items = content.items() if isinstance(content, dict) else content
    with warnings.catch_warnings(), zipfile.ZipFile(path, "w", compression=method) as zf:
        warnings.simplefilter("ignore")  # "Duplicate name": on purpose
        for name, data in items:
            zf.writestr(name, data)
    return path


def make_tar(path: Path, items: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, {"gz": "w:gz", "xz": "w:xz"}.get(path.suffix.lstrip("."), "w")) as tf:
        for name, data in items:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def written(dest: Path) -> list[str]:
    return sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) if dest.exists() else []


# --- patching zip headers ------------------------------------------------------------------------

LOCAL = {"flags": (6, "<H"), "method": (8, "<H"), "crc": (14, "<I"), "csize": (18, "<I"), "usize": (22, "<I")}
CENTRAL = {"flags": (8, "<H"), "method": (10, "<H"), "crc": (16, "<I"), "csize": (20, "<I"), "usize": (24, "<I")}


def patch_zip(path: Path, name: str, **fields: int) -> Path:
    """Overwrite header fields of member `name` in its local header and its central directory entry."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        local, pos = zf.getinfo(name).header_offset, zf.start_dir
    while data[pos : pos + 4] == b"PK\x01\x02":
        n_name, n_extra, n_comment = struct.unpack_from("<HHH", data, pos + 28)
        if data[pos + 46 : pos + 46 + n_name].decode() == name:
            for key, value in fields.items():
                struct.pack_into(LOCAL[key][1], data, local + LOCAL[key][0], value)
                struct.pack_into(CENTRAL[key][1], data, pos + CENTRAL[key][0], value)
        pos += 46 + n_name + n_extra + n_comment
    path.write_bytes(bytes(data))
    return path


def deflated_zeros(mib: int, prefix: bytes = b"", suffix: bytes = b"") -> bytes:
    """Raw deflate of prefix + `mib` MiB of zeros + suffix, built in milliseconds: after a full
    flush the compressor starts afresh, so every MiB of zeros compresses to the same bytes."""
    zeros = bytes(MIB)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = c.compress(prefix) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(zeros) + c.flush(zlib.Z_FULL_FLUSH)
    return head + block * mib + c.compress(suffix) + c.flush()


def crc_of_zeros(mib: int, prefix: bytes = b"", suffix: bytes = b"") -> int:
    crc, zeros = zlib.crc32(prefix), bytes(MIB)
    for _ in range(mib):
        crc = zlib.crc32(zeros, crc)
    return zlib.crc32(suffix, crc)


def zip_bomb(path: Path, names: list[str], mib: int) -> Path:
    """A real zip bomb: each member `mib` MiB of zeros, deflated, with correct CRCs and sizes."""
    stream, crc = deflated_zeros(mib), crc_of_zeros(mib)
    make_zip(path, [(name, stream) for name in names], method=zipfile.ZIP_STORED)
    for name in names:
        patch_zip(path, name, method=zipfile.ZIP_DEFLATED, crc=crc, usize=mib * MIB)
    return path


def tar_gz_bomb(path: Path, name: str, mib: int) -> Path:
    """A tar.gz holding one member of `mib` MiB of zeros (gzip header and trailer written here)."""
    info = tarfile.TarInfo(name)
    info.size = mib * MIB
    header, end = info.tobuf(format=tarfile.GNU_FORMAT), bytes(1024)
    size = len(header) + mib * MIB + len(end)
    trailer = struct.pack("<II", crc_of_zeros(mib, header, end), size & 0xFFFFFFFF)
    path.write_bytes(b"\x1f\x8b\x08\x00\0\0\0\0\x02\xff" + deflated_zeros(mib, header, end) + trailer)
    return path


# --- bombs and the byte cap ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["one_member", "many_members", "tar_gz"])
def test_bombs_are_refused_before_anything_is_written(tmp_path: Path, kind: str) -> None:
    if kind == "one_member":  # 1.45 MB zip -> 1.4 GB: refused by the member's compression ratio
        archive = zip_bomb(tmp_path / "bomb.zip", [FRAME], 1400)
        expected = rf"bomb\.zip: member {FRAME}: declares 1468006400 bytes from \d+ compressed \(ratio 10\d\d:1"
    elif kind == "many_members":  # 200 x 8 MiB, each under the per-member exemption: the archive's ratio
        archive = zip_bomb(tmp_path / "bomb.zip", [f"{ROOT}/01_GT/TRA/man_track{i:03d}.tif" for i in range(200)], 8)
        expected = r"bomb\.zip: member .*: the archive's \d+ bytes declare more than \d+ bytes unpacked \(ratio"
    else:  # a gzip stream: the declared sizes are read header by header, never the data behind them
        archive = tar_gz_bomb(tmp_path / "bomb.tar.gz", FRAME, 1400)
        expected = rf"bomb\.tar\.gz: member {FRAME}: the archive's \d+ bytes declare more than"
    assert archive.stat().st_size < 2 * MIB
    start = time.perf_counter()
    with pytest.raises(SegpipeError, match=expected + r".*refused before unpacking anything"):
        unpack([archive], tmp_path / "out", LAYOUT, "hela", LIMITS)
    assert time.perf_counter() - start < 5
    assert written(tmp_path / "out") == []


def test_total_declared_size_of_all_archives_is_capped(tmp_path: Path) -> None:
    first = make_zip(tmp_path / "a.zip", {FRAME: b"x" * 600})
    second = make_zip(tmp_path / "b.zip", {f"{ROOT}/01/t001.tif": b"y" * 600})
    limits = UnpackLimits(max_members=10, max_unpacked_bytes=1000, max_compression_ratio=100)
    with pytest.raises(SegpipeError, match=r"b\.zip: member .*t001\.tif: the hela archives declare more than 1000"):
        unpack([first, second], tmp_path / "out", LAYOUT, "hela", limits)
    assert written(tmp_path / "out") == []  # the first archive was within limits, but nothing is unpacked
    many = make_zip(tmp_path / "many.zip", {f"{ROOT}/01/t{i:03d}.tif": b"" for i in range(11)})
    with pytest.raises(SegpipeError, match=r"many\.zip: more than 10 members \(prepare\.limits\.max_members"):
        unpack([many], tmp_path / "out", LAYOUT, "hela", limits)


def test_a_stream_longer_than_declared_is_stopped_at_the_declared_size(tmp_path: Path) -> None:
    out = tmp_path / "member.bin"
    with open(out, "wb") as dst, pytest.raises(SegpipeError, match="x.zip: member a: holds more than its declared 100"):
        copy_capped(io.BytesIO(b"z" * 5000), dst, 100, "x.zip: member a")
    assert out.stat().st_size <= 100
    with open(out, "wb") as dst, pytest.raises(SegpipeError, match="ended after 50 of its declared 100 bytes"):
        copy_capped(io.BytesIO(b"z" * 50), dst, 100, "x.zip: member a")


@pytest.mark.parametrize("method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_a_member_bigger_than_declared_never_writes_more(tmp_path: Path, method: int) -> None:
    content = members()
    archive = patch_zip(make_zip(tmp_path / "liar.zip", content, method), FRAME, usize=40)
    with pytest.raises(SegpipeError, match=rf"liar\.zip: member {FRAME}: corrupt or unreadable"):
        unpack([archive], tmp_path / "out", LAYOUT, "hela", LIMITS)
    assert (tmp_path / "out" / "liar.zip" / FRAME).stat().st_size <= 40


# --- methods, encryption, corrupt data ------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("method", 93, r"uses compression method 93 \(zstd\); segpipe unpacks stored and deflate members only"),
        ("method", 99, r"uses compression method 99 \(AES encryption\)"),
        ("method", 9, r"uses compression method 9 \(deflate64\)"),
        ("flags", 0x1, r"is encrypted \(password-protected\)"),
    ],
)
def test_unsupported_methods_and_encryption_are_refused(tmp_path: Path, field: str, value: int, message: str) -> None:
    archive = patch_zip(make_zip(tmp_path / "odd.zip", members()), FRAME, **{field: value})
    with pytest.raises(SegpipeError, match=rf"odd\.zip: refused before unpacking anything .*\n  - {FRAME}: {message}"):
        unpack([archive], tmp_path / "out", LAYOUT, "hela", LIMITS)
    assert written(tmp_path / "out") == []


def test_bzip2_members_are_refused(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "bz.zip", members(), zipfile.ZIP_BZIP2)
    with pytest.raises(SegpipeError, match=r"(?s)bz\.zip: refused .*: uses compression method 12 \(bzip2\)"):
        unpack([archive], tmp_path / "out", LAYOUT, "hela", LIMITS)


def test_corrupt_deflate_stream_names_archive_and_member(tmp_path: Path) -> None:
    archive = make_zip(tmp_path / "bad.zip", members())
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo(FRAME)
    data = bytearray(archive.read_bytes())
    n_name, n_extra = struct.unpack_from("<HH", data, info.header_offset + 26)
    data[info.header_offset + 30 + n_name + n_extra] = 0x07  # first deflate block: BTYPE 11, reserved
    archive.write_bytes(bytes(data))
    expected = rf"bad\.zip: member {FRAME}: corrupt or unreadable \(zlib\.error: .*invalid block"
    with pytest.raises(SegpipeError, match=expected):
        unpack([archive], tmp_path / "out", LAYOUT, "hela", LIMITS)


def test_limits_are_checked_with_the_data_config() -> None:
    from pipeline.config import ConfigError

    cfg = yaml.safe_load((REPO_ROOT / "configs" / "data.yaml").read_text())
    cfg["prepare"]["limits"]["max_compression_ratio"] = 0.5
    with pytest.raises(ConfigError, match="prepare.limits.max_compression_ratio must be a finite number >= 1"):
        check_data_config(cfg, "configs/data.yaml")
    del cfg["prepare"]["limits"]["max_image_values"]
    with pytest.raises(ConfigError, match=r"prepare\.limits: missing keys \['max_image_values'\]"):
        check_data_config(cfg, "configs/data.yaml")


def test_not_an_archive_and_unknown_types(tmp_path: Path) -> None:
    (tmp_path / "junk.zip").write_bytes(b"not a zip at all")
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tar at all")
    (tmp_path / "data.rar").write_bytes(b"Rar!")
    for name, message in (
        ("junk.zip", "not a readable zip archive"),
        ("junk.tar.gz", "not a readable tar archive"),
        ("data.rar", "unknown archive type; expected .zip, .tar"),
    ):
        with pytest.raises(SegpipeError, match=rf"{name}: {message}"):
            unpack([tmp_path / name], tmp_path / "out", LAYOUT, "hela", LIMITS)


# --- names ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".zip", ".tar", ".tar.gz"])
def test_duplicate_members_are_refused(tmp_path: Path, suffix: str) -> None:
    items = [*members().items(), (FRAME, b"the second copy, which would win")]
    if suffix == ".tar.gz":
        items[-1] = (f"./{FRAME}", items[-1][1])  # the same path, spelt differently
    path = tmp_path / f"dup{suffix}"
    archive = make_zip(path, items) if suffix == ".zip" else make_tar(path, items)
    with pytest.raises(
        SegpipeError,
        match=rf"dup{suffix}: refused before unpacking anything .*\n  - {FRAME}: "
        r"duplicate member \(stored more than once",
    ):
        unpack([archive], tmp_path / "out", LAYOUT, "hela", LIMITS)
    assert written(tmp_path / "out") == []


def test_unsafe_names_links_and_unexpected_files_are_refused(tmp_path: Path) -> None:
    items = [*members().items(), ("../escape.tif", b"x"), ("/etc/passwd", b"x"), (f"{ROOT}/notes.txt", b"x")]
    archive = make_tar(tmp_path / "names.tar", items)
    with tarfile.open(archive, "a") as tf:
        link = tarfile.TarInfo(f"{ROOT}/01/t009.tif")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    with pytest.raises(SegpipeError) as err:
        unpack([archive], tmp_path / "out", LAYOUT, "hela", LIMITS)
    message = str(err.value)
    assert message.startswith(f"{archive}: refused before unpacking anything (4 problem(s))")
    for line in (
        "'../escape.tif': unsafe path",
        "'/etc/passwd': unsafe path",
        f"{ROOT}/notes.txt: unexpected file",
        f"{ROOT}/01/t009.tif: not a regular file",
    ):
        assert line in message
    assert written(tmp_path) == ["names.tar"]


@pytest.mark.parametrize("suffix", [".zip", ".tar.gz", ".tar.xz"])
def test_layout_files_are_unpacked_and_ignored_ones_only_read(tmp_path: Path, suffix: str) -> None:
    content = members(3)
    path = tmp_path / f"HeLa{suffix}"
    archive = make_zip(path, content) if suffix == ".zip" else make_tar(path, list(content.items()))
    unpack([archive], tmp_path / "out", LAYOUT, "hela", LIMITS)
    kept = {name: data for name, data in content.items() if "/TRA/" not in name}
    assert written(tmp_path / "out") == sorted(f"{path.name}/{name}" for name in kept)
    for name, data in kept.items():
        assert (tmp_path / "out" / path.name / name).read_bytes() == data


def test_an_ignored_member_is_still_crc_checked(tmp_path: Path) -> None:
    tra = f"{ROOT}/01_GT/TRA/man_track000.tif"
    archive = patch_zip(make_zip(tmp_path / "tra.zip", members()), tra, crc=1234)
    expected = rf"tra\.zip: member {tra}: corrupt or unreadable \(zipfile\.BadZipFile: Bad CRC"
    with pytest.raises(SegpipeError, match=expected):
        unpack([archive], tmp_path / "out", LAYOUT, "hela", LIMITS)


def test_the_published_layout_unpacks_roles_and_skips_other_folders(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    content = members(2)
    extras = {
        f"{ROOT}/01_ERR_SEG/mask000.tif": b"e",
        f"{ROOT}/01_ST/SEG/man_seg000.tif": b"s",
        f"{ROOT}/01_ST/WEIGHT_MAPS/weight_map_000.npy": b"\x93NUMPY never read as an array",
        f"{ROOT}/01_GT/TRA/man_track.txt": b"1 0 5 0\n",
        f"{ROOT}/01_RES/mask000.tif": b"r",
        f"{ROOT}/extra/notes/readme.txt": b"n",
    }
    archive = make_zip(tmp_path / "HeLa.zip", {**content, **extras})
    with caplog.at_level("INFO", logger="pipeline.data.archives"):
        unpack([archive], tmp_path / "out", LAYOUT, "hela", LIMITS)
    kept = [*content, f"{ROOT}/01_ST/SEG/man_seg000.tif"]  # the silver truth is a role (`silver`)
    assert written(tmp_path / "out") == sorted(f"HeLa.zip/{name}" for name in kept if "/TRA/" not in name)
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 1  # listed once, folder by folder
    for folder in ("01_RES", "extra/notes", "01_ST/WEIGHT_MAPS"):
        assert f"{ROOT}/{folder}/ (1 files)" in skipped[0]
    assert "ERR_SEG" not in skipped[0]  # a known folder of the layout's ignore list, not an unknown one


@pytest.mark.parametrize("stray", [f"{ROOT}/01/t12.tif", f"{ROOT}/01_GT/SEG/man_seg000.png", f"{ROOT}/notes.txt"])
def test_a_file_that_breaks_a_role_pattern_refuses_the_archive_and_names_the_key(tmp_path: Path, stray: str) -> None:
    archive = make_zip(tmp_path / "HeLa.zip", {**members(2), stray: b"x"})
    with pytest.raises(SegpipeError) as err:
        unpack([archive], tmp_path / "out", LAYOUT, "hela", LIMITS)
    message = str(err.value)
    assert f"{stray}: unexpected file (matches no hela layout pattern)" in message
    assert "datasets.hela.layout.patterns" in message and "datasets.hela.layout.ignore" in message
    assert written(tmp_path / "out") == []


def test_a_layout_that_refuses_extra_folders_refuses_them(tmp_path: Path) -> None:
    strict = replace(LAYOUT, skip_extra_folders=False)
    archive = make_zip(tmp_path / "HeLa.zip", {**members(2), f"{ROOT}/01_RES/mask000.tif": b"r"})
    with pytest.raises(SegpipeError, match=rf"{ROOT}/01_RES/mask000\.tif: unexpected file"):
        unpack([archive], tmp_path / "out", strict, "hela", LIMITS)


# --- fuzz -------------------------------------------------------------------------------------------

FUZZ_CASES = 300
OUTCOMES = (
    "not a readable zip archive",
    "refused before unpacking anything",
    "corrupt or unreadable",
    "cannot be written",
    "declare",
    "holds more than",
    "ended after",
)


def _seed_zip() -> tuple[bytes, list[int]]:
    """A small valid zip in the HeLa layout and where its headers start (local, central, end record)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members().items():
            zf.writestr(name, data)
    data = buf.getvalue()
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        starts = [info.header_offset for info in zf.infolist()] + [zf.start_dir, data.rfind(b"PK\x05\x06")]
    return data, starts


SEED, HEADERS = _seed_zip()
POSITION = st.one_of(
    st.integers(0, len(SEED) - 1),  # anywhere, or inside a header (46 bytes from its start)
    st.sampled_from(HEADERS).flatmap(lambda p: st.integers(p, min(p + 45, len(SEED) - 1))),
)


@hyp_settings(
    max_examples=FUZZ_CASES, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)
@given(
    flips=st.lists(st.tuples(POSITION, st.integers(0, 255)), max_size=6),
    cut=st.one_of(st.none(), st.integers(0, len(SEED))),
)
def test_fuzz_damaged_zips_fail_cleanly(
    tmp_path_factory: pytest.TempPathFactory, flips: list[tuple[int, int]], cut: int | None
) -> None:
    """A zip with bytes overwritten anywhere (headers favoured) and/or truncated: unpack either succeeds
    or raises SegpipeError naming the archive, never another exception."""
    raw = bytearray(SEED)
    for position, value in flips:
        raw[position] = value
    folder = tmp_path_factory.mktemp("zipfuzz")
    archive = folder / "fuzz.zip"
    archive.write_bytes(bytes(raw[:cut] if cut is not None else raw))
    try:
        unpack([archive], folder / "out", LAYOUT, "hela", LIMITS)
    except SegpipeError as exc:
        message = str(exc)
        assert message.startswith(f"{archive}: "), message
        kind = next((k for k in OUTCOMES if k in message), "other")
        if "\n  - " in message:  # a list of problems: the first one's kind
            cause = message.split("\n  - ", 1)[1].split(": ", 1)[1].split(" (")[0]
        else:  # the library's exception type
            cause = message.split(f"{kind} (", 1)[1].split(":", 1)[0] if f"{kind} (" in message else ""
        event(f"SegpipeError: {kind}: {cause}" if cause else f"SegpipeError: {kind}")
    else:
        event("unpacked")
