"""Files on disk: the one table of image suffixes, and atomic writing.

Every file the pipeline writes appears whole or not at all: it is written to a temporary file beside
its final name and renamed onto it (`os.replace`, atomic on one file system) only when complete, with
the mode of any new file (0666 minus the umask). The streamed inference outputs, which span several
files published together, keep their own temp names and publish step (`pipeline.inference.writers`)
with the same file mode.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator

from pipeline.errors import SegpipeError
from pipeline.tracking_store import pid_alive

TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
PNG_JPEG_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGEIO_SUFFIXES = (".gif", ".bmp", *PNG_JPEG_SUFFIXES)
SITK_SUFFIXES = (".mha", ".nrrd")
_TEMP_NAME = re.compile(r"\.segpipe-(?P<pid>\d+)-(?P<host>[0-9a-f]{8})-")
NAME_MAX = 255
"""Bytes a file name may have on the usual file systems (ext4, xfs, btrfs, APFS)."""


def has_suffix(path: str | os.PathLike[str], suffixes: tuple[str, ...]) -> bool:
    """Whether `path`'s name ends with one of `suffixes` (case-insensitive; .nii.gz counts whole)."""
    return Path(path).name.lower().endswith(suffixes)


def check_name_length(path: str | os.PathLike[str], what: str = "output file") -> None:
    """SegpipeError naming `path` when its file name is longer than file systems allow."""
    length = len(os.fsencode(Path(path).name))
    if length > NAME_MAX:
        raise SegpipeError(
            f"{path}: the {what} name is {length} bytes long, longer than file systems allow ({NAME_MAX}); "
            "choose a shorter name"
        )


def file_mode(directory: bool = False) -> int:
    """The mode of a new ordinary file (0666), or `directory` (0777), minus the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `final` (same suffixes, so writers pick the format by name); rename
    it onto `final` only if the block succeeds, else remove it."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    check_name_length(final)
    suffix = "".join(final.suffixes[-2:])[-32:]  # writers pick the format by it (.nii.gz); the name stays short
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name[:64]}.", suffix=f".tmp{suffix}", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        os.chmod(tmp_path, file_mode())  # mkstemp makes 0600; the result should look like any new file
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        tmp_path.unlink(missing_ok=True)


def temp_prefix() -> str:
    """The name prefix of this process's temp files: `.segpipe-PID-HOST8-` (HOST8: 8 hex digits of the
    host name's sha1), so that those of a killed process can be told apart (`remove_stale_temps`)."""
    return f".segpipe-{os.getpid()}-{hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]}-"


def remove_stale_temps(directory: Path) -> list[Path]:
    """Remove the temp files and folders in `directory` that a killed segpipe process of this host
    left (its process is gone); those of live processes and other hosts stay. Returns the removed."""
    ours = temp_prefix().split("-")[2]
    removed = []
    try:
        entries = [p for p in directory.iterdir() if p.name.startswith(".segpipe-")]
    except OSError:
        return removed
    for path in entries:
        found = _TEMP_NAME.match(path.name)
        if found and found["host"] == ours and not pid_alive(int(found["pid"])):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            removed.append(path)
    return removed
