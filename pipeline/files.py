"""Files on disk: the one table of image suffixes, and atomic writing.

Every file the pipeline writes appears whole or not at all: it is written to a temporary file beside
its final name and renamed onto it (`os.replace`, atomic on one file system) only when complete, with
the mode of any new file (0666 minus the umask). The streamed inference outputs, which span several
files published together, keep their own temp names and publish step (`pipeline.inference.writers`)
with the same file mode.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
PNG_JPEG_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGEIO_SUFFIXES = (".gif", ".bmp", *PNG_JPEG_SUFFIXES)
SITK_SUFFIXES = (".mha", ".nrrd")


def has_suffix(path: str | os.PathLike[str], suffixes: tuple[str, ...]) -> bool:
    """Whether `path`'s name ends with one of `suffixes` (case-insensitive; .nii.gz counts whole)."""
    return Path(path).name.lower().endswith(suffixes)


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
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".tmp{''.join(final.suffixes)}", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        os.chmod(tmp_path, file_mode())  # mkstemp makes 0600; the result should look like any new file
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        tmp_path.unlink(missing_ok=True)
