"""Unpacking a dataset's archives (zip, tar, tar.gz/.bz2/.xz) with every check made before writing.

One validation point for every archive kind: all archives of a dataset are listed first, and each
member's name and declared sizes are checked before any byte is unpacked:

- names: safe relative paths (no absolute path, no `..`), each stored once (no duplicates, where the
  last copy would win silently), each matching the dataset's layout or one of its ignore patterns;
- sizes (`UnpackLimits`, `prepare.limits` in configs/data.yaml): the member count, the total
  declared uncompressed bytes of the dataset's archives, and the compression ratio of each zip
  member and of each archive as a whole (archives or members unpacking to at most
  RATIO_EXEMPT_BYTES are exempt: an empty 16-bit mask deflates 1000:1);
- zip members: not encrypted, stored or deflate (the stdlib lacks zstd, AES, deflate64, ...; it
  decompresses bzip2/lzma without bounding the output of one read, so those are refused too).

Then the layout's files are streamed to disk, each capped at its declared size (a member holding
more is stopped there); ignored members are read through the same cap without being written, so
every member's CRC is checked. Every error is a SegpipeError naming the archive and the member.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import tarfile
import zipfile
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Mapping, Protocol, Sequence

from tqdm import tqdm

from pipeline.data.sources import Layout
from pipeline.errors import SegpipeError, raise_problems

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
RATIO_EXEMPT_BYTES = 16 << 20
ZIP_SUFFIXES = (".zip",)
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
ZIP_METHODS = {**zipfile.compressor_names, 93: "zstd", 95: "xz", 96: "jpeg", 99: "AES encryption"}
ZIP_ENCRYPTED_FLAGS = 0x01 | 0x40  # traditional and strong encryption


@dataclass(frozen=True)
class UnpackLimits:
    """Bounds on what a dataset's archives may declare (`prepare.limits` in configs/data.yaml)."""

    max_members: int
    max_unpacked_bytes: int
    max_compression_ratio: float

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "UnpackLimits":
        """From the checked `prepare.limits` section (`pipeline.data.settings.check_data_config`)."""
        return cls(int(cfg["max_members"]), int(cfg["max_unpacked_bytes"]), float(cfg["max_compression_ratio"]))


@dataclass(frozen=True)
class Member:
    """One archive entry as its headers declare it."""

    name: str
    size: int  # declared uncompressed bytes
    packed: int | None  # declared compressed bytes (zip; None for tar, compressed as a whole)
    kind: str  # "file", "dir" or "other" (link, device, fifo)
    refusal: str | None  # why it cannot be unpacked (encryption, compression method)
    ref: Any  # the library's ZipInfo / TarInfo


class _Reader(Protocol):
    kind: str

    def members(self) -> Iterator[Member]: ...

    def open(self, member: Member) -> BinaryIO: ...


class _ZipReader:
    kind = "zip"

    def __init__(self, path: Path) -> None:
        self._zip = zipfile.ZipFile(path)

    def members(self) -> Iterator[Member]:
        for info in self._zip.infolist():
            kind = "dir" if info.is_dir() else "file"
            yield Member(info.filename, info.file_size, info.compress_size, kind, _zip_refusal(info), info)

    def open(self, member: Member) -> BinaryIO:
        return self._zip.open(member.ref)

    def close(self) -> None:
        self._zip.close()


class _TarReader:
    kind = "tar"

    def __init__(self, path: Path) -> None:
        self._tar = tarfile.open(path, "r:*")

    def members(self) -> Iterator[Member]:
        for info in self._tar:  # headers one by one: the limits stop a stream before its end
            kind = "dir" if info.isdir() else "file" if info.isreg() else "other"
            yield Member(info.name, info.size, None, kind, None, info)

    def open(self, member: Member) -> BinaryIO:
        return self._tar.extractfile(member.ref)  # type: ignore[return-value]  # regular files only

    def close(self) -> None:
        self._tar.close()


def _zip_refusal(info: zipfile.ZipInfo) -> str | None:
    if info.flag_bits & ZIP_ENCRYPTED_FLAGS:
        return "is encrypted (password-protected); expected an archive without a password"
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        name = ZIP_METHODS.get(info.compress_type, "unknown")
        return (
            f"uses compression method {info.compress_type} ({name}); segpipe unpacks stored and deflate "
            f"members only: re-pack the archive with deflate"
        )
    return None


def _describe(exc: BaseException) -> str:
    kind = type(exc)
    name = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"
    return f"{name}: {exc}"


@contextlib.contextmanager
def _converted(where: str, what: str) -> Iterator[None]:
    """Turn the archive libraries' many exception types into one SegpipeError naming `where`."""
    try:
        yield
    except SegpipeError:
        raise
    except Exception as exc:  # zipfile, tarfile, zlib, bz2, lzma, struct, OSError...: no common base
        raise SegpipeError(f"{where}: {what} ({_describe(exc)})") from exc


@contextlib.contextmanager
def _open(archive: Path) -> Iterator[_Reader]:
    """A reader for `archive`, chosen by its name (.zip, .tar, .tar.gz, ...)."""
    name = archive.name.lower()
    if name.endswith(ZIP_SUFFIXES):
        kind: type[_ZipReader] | type[_TarReader] = _ZipReader
    elif name.endswith(TAR_SUFFIXES):
        kind = _TarReader
    else:
        raise SegpipeError(f"{archive}: unknown archive type; expected {', '.join(ZIP_SUFFIXES + TAR_SUFFIXES)}")
    with _converted(str(archive), f"not a readable {kind.kind} archive"):
        reader = kind(archive)
    try:
        yield reader
    finally:
        reader.close()


def _safe_path(name: str) -> str | None:
    """`name` as a relative POSIX path ('./' and empty parts dropped); None if absolute or with '..'."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or name.startswith("/") or ".." in parts or "\0" in name:
        return None
    return "/".join(parts)


def _too_compressed(size: int, packed: int, limits: UnpackLimits) -> bool:
    return size > RATIO_EXEMPT_BYTES and size > limits.max_compression_ratio * packed


def _ratio(size: int, packed: int) -> str:
    return f"{size / max(packed, 1):.0f}:1"


def _check_sizes(
    archive: Path, member: Member, count: int, declared: int, unpacked: int, limits: UnpackLimits, dataset: str
) -> None:
    """Refuse when the member's headers bring the archive (`count` members, `declared` bytes so far,
    after `unpacked` bytes of the dataset's earlier archives) over a limit."""
    where, refused = f"{archive}: member {member.name}", "refused before unpacking anything (a zip bomb?)"
    archive_bytes, ratio_key = archive.stat().st_size, "prepare.limits.max_compression_ratio"
    if count > limits.max_members:
        raise SegpipeError(
            f"{archive}: more than {limits.max_members} members (prepare.limits.max_members "
            f"in configs/data.yaml); {refused}"
        )
    if unpacked + declared > limits.max_unpacked_bytes:
        raise SegpipeError(
            f"{where}: the {dataset} archives declare more than {limits.max_unpacked_bytes} "
            f"bytes unpacked (prepare.limits.max_unpacked_bytes); {refused}"
        )
    if member.packed is not None and _too_compressed(member.size, member.packed, limits):
        raise SegpipeError(
            f"{where}: declares {member.size} bytes from {member.packed} compressed (ratio "
            f"{_ratio(member.size, member.packed)}, limit {limits.max_compression_ratio:g}:1, "
            f"{ratio_key}); {refused}"
        )
    if _too_compressed(declared, archive_bytes, limits):
        raise SegpipeError(
            f"{where}: the archive's {archive_bytes} bytes declare more than {declared} bytes "
            f"unpacked (ratio {_ratio(declared, archive_bytes)}, limit "
            f"{limits.max_compression_ratio:g}:1, {ratio_key}); {refused}"
        )


def _check(
    archive: Path, reader: _Reader, layout: Layout, dataset: str, limits: UnpackLimits, unpacked: int
) -> tuple[list[tuple[Member, bool]], int]:
    """Check one archive's members without reading their data: returns the members to read with
    whether each is written (False: ignored by the layout), and `unpacked` plus their sizes."""
    problems: list[str] = []
    planned: list[tuple[Member, bool]] = []
    unknown: list[Member] = []
    seen: set[str] = set()
    declared = 0
    with _converted(str(archive), f"not a readable {reader.kind} archive"):
        for count, member in enumerate(reader.members(), start=1):
            declared += member.size
            _check_sizes(archive, member, count, declared, unpacked, limits, dataset)
            if member.kind == "dir":
                continue
            path = _safe_path(member.name)
            if path is None:
                problems.append(f"{member.name!r}: unsafe path; expected a relative path without '..'")
                continue
            if path in seen:
                problems.append(f"{path}: duplicate member (stored more than once; the last copy would win silently)")
                continue
            seen.add(path)
            rel = f"{archive.name}/{path}"
            write = not layout.ignores(rel)
            if write and layout.match(rel) is None:
                unknown.append(replace(member, name=path))
            elif member.kind != "file":
                if write:
                    problems.append(f"{path}: not a regular file (a link or device); expected the file itself")
            elif member.refusal is not None:
                problems.append(f"{path}: {member.refusal}")
            else:
                planned.append((replace(member, name=path), write))
    extra = _extra_folders(layout, archive.name, [m.name for m in unknown], [m.name for m, write in planned if write])
    for member in unknown:
        if posixpath.dirname(member.name) not in extra:
            problems.append(f"{member.name}: unexpected file (matches no {dataset} layout pattern)")
        elif member.kind == "file" and member.refusal is None:
            planned.append((member, False))  # read through the size cap and the CRC check, never written
    hint = (
        f"To accept a file, widen its role's regex in datasets.{dataset}.layout.patterns, or leave it aside "
        f"with a regex in datasets.{dataset}.layout.ignore (data_manifests/sources.yaml)."
        if len(unknown) > sum(extra.values())
        else ""
    )
    raise_problems(problems, f"{archive}: refused before unpacking anything", hint)
    if extra:
        log.info(
            "%s: skipped %d folder(s) that hold no %s layout role: %s",
            archive,
            len(extra),
            dataset,
            ", ".join(f"{folder}/ ({count} files)" for folder, count in sorted(extra.items())),
        )
    return planned, unpacked + declared


def _extra_folders(layout: Layout, archive: str, unknown: list[str], known: list[str]) -> dict[str, int]:
    """Folders of `unknown` files to skip (`layout.extra_folders: skip`), with their file counts: those
    that are no role's folder and hold no folder of a `known` file. A stray file in a role's folder or
    beside the role folders (a top folder) stays an error."""
    if not layout.skip_extra_folders:
        return {}
    holders = {""}
    for path in known:
        parts = path.split("/")[:-1]
        holders.update("/".join(parts[:i]) for i in range(len(parts) + 1))
    folders = [posixpath.dirname(path) for path in unknown]
    return dict(Counter(f for f in folders if f not in holders and not layout.role_folder(f"{archive}/{f}")))


def copy_capped(src: BinaryIO, dst: BinaryIO, declared: int, where: str) -> None:
    """Copy `src` to `dst`, never more than `declared` bytes: a stream holding more or less is an error."""
    left = declared
    while chunk := src.read(min(CHUNK_BYTES, left + 1)):
        if len(chunk) > left:
            raise SegpipeError(
                f"{where}: holds more than its declared {declared} bytes; stopped there (a corrupt or hostile archive)"
            )
        dst.write(chunk)
        left -= len(chunk)
    if left:
        raise SegpipeError(f"{where}: ended after {declared - left} of its declared {declared} bytes (truncated)")


def _extract(archive: Path, reader: _Reader, member: Member, target: Path | None) -> None:
    """Stream one member to `target` (None: read and check it only), capped at its declared size."""
    where = f"{archive}: member {member.name}"
    with _converted(where, "cannot be written"):
        if target is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
        sink = open(target, "xb") if target is not None else open(os.devnull, "wb")
    with sink, _converted(where, "corrupt or unreadable"), reader.open(member) as src:
        copy_capped(src, sink, member.size, where)


def unpack(archives: Sequence[Path], dest: Path, layout: Layout, dataset: str, limits: UnpackLimits) -> Path:
    """Check the members of all `archives`, then unpack the layout's files into `dest/<archive name>/`."""
    with contextlib.ExitStack() as stack:
        planned, unpacked = [], 0
        for archive in archives:
            reader = stack.enter_context(_open(archive))
            members, unpacked = _check(archive, reader, layout, dataset, limits, unpacked)
            planned.append((archive, reader, members))
        for archive, reader, members in planned:
            for member, write in tqdm(members, desc=f"unpack {archive.name}", unit="file", leave=False):
                _extract(archive, reader, member, dest / archive.name / member.name if write else None)
    return dest
