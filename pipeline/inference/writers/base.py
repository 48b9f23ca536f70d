"""Row-band writers: results reach the disk as soon as their rows are final, through a temp file.

* `TiffRowWriter`: a tiled BigTIFF written by tifffile from a generator of tiles. tifffile runs in a
  background thread that consumes tile rows from a small bounded queue, so encoding overlaps with
  inference and at most two tile rows wait in memory. Keeps the input's resolution tags, and for
  OME-TIFF input writes OME-TIFF with the input's physical pixel sizes.

The other writers build on `RowWriter` and the temp-file helpers here: `NiftiRowWriter`
(nifti.py), and the pyramidal `OmeTiffWriter` (ome_tiff.py) and `OmeZarrWriter` (ome_zarr.py);
`formats.py` picks the writer of an output format.

Every writer writes a temp file beside the final path (a short name, whatever the length of the
final one, its process's id in it: `remove_stale_temps` clears those of killed runs); `finish()`
completes it and `publish()` gives it the permissions of a new file (0666 minus the umask) and
renames it onto the final name (`os.replace`, atomic); `abort()` removes it. An interrupted run
never leaves a file under the final name; several outputs of one run are published only once all
of them are finished.
"""

from __future__ import annotations

import errno
import os
import queue
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from pipeline.errors import SegpipeError
from pipeline.files import NAME_MAX, file_mode, has_suffix, temp_prefix
from pipeline.inference.readers.images import ImageMeta

_END = object()
_ABORT = object()


class WriteAborted(Exception):
    """Raised inside the writer thread to stop tifffile when the run is abandoned."""


def encode_probabilities(probs: np.ndarray, dtype: str) -> np.ndarray:
    """Probabilities as stored: uint8 = round(p * 255), float16 or float32."""
    if dtype == "uint8":
        return np.rint(probs * 255.0).astype(np.uint8)
    return probs.astype(np.dtype(dtype))


def strip_tiles(strip: np.ndarray, tile: int) -> Iterator[np.ndarray]:
    """The tiles (tile, tile[, K]) of a strip (n <= tile, W[, K]), left to right, zero-padded at the edges."""
    for x in range(0, strip.shape[1], tile):
        block = strip[:, x : x + tile]
        if block.shape[:2] != (tile, tile):
            padded = np.zeros((tile, tile, *strip.shape[2:]), strip.dtype)
            padded[: block.shape[0], : block.shape[1]] = block
            block = padded
        yield block


def is_zarr_store(path: Path) -> bool:
    """True if `path` is a directory holding a zarr group or array (v2 or v3 metadata)."""
    return any((path / name).is_file() for name in (".zgroup", ".zarray", "zarr.json"))


def check_output_path(final: Path) -> None:
    """SegpipeError if `final` cannot become the output: a name too long; for a file a directory
    there; for a zarr store (a name ending in .zarr, replaced whole) a file or a non-zarr directory there."""
    length = len(os.fsencode(final.name))
    if length > NAME_MAX:
        raise SegpipeError(
            f"{final}: the output file name is {length} bytes long, longer than file systems allow "
            f"({NAME_MAX}); shorten the input's name"
        )
    if has_suffix(final, (".zarr",)):
        if os.path.lexists(final) and not is_zarr_store(final):
            raise SegpipeError(
                f"{final}: the output path exists and is not a zarr store; remove it or choose another output"
            )
    elif final.is_dir():
        raise SegpipeError(f"{final}: the output path exists and is a directory; remove it or choose another output")


def temp_beside(final: Path, suffix: str, *, directory: bool = False) -> Path:
    """A new empty temp file (or `directory`) in `final`'s directory (created if needed), with a short
    name; SegpipeError if `final` cannot be the output or the directory cannot hold it."""
    check_output_path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        if directory:
            return Path(tempfile.mkdtemp(prefix=temp_prefix(), suffix=suffix, dir=final.parent))
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(), suffix=suffix, dir=final.parent)
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            raise SegpipeError(f"{final}: path too long for the file system ({exc.strerror})") from exc
        raise SegpipeError(f"{final.parent}: output directory is not writable ({exc.strerror or exc})") from exc
    os.close(fd)
    return Path(tmp)


class RowWriter:
    """Base: `write(y0, rows)` bands (K, n, W) in order; `finish()` completes the temp file,
    `publish()` renames it into place; `abort()` removes every temp file."""

    path: Path
    _done: Path | None = None
    """The finished temp file, waiting for `publish()`."""

    def write(self, y0: int, rows: np.ndarray) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def publish(self) -> Path:
        if self._done is None:
            raise SegpipeError(f"{self.path}: publish() before finish()")
        check_output_path(self.path)
        try:
            os.chmod(self._done, file_mode())  # mkstemp creates 0600; an output is an ordinary file
            os.replace(self._done, self.path)
        except OSError as exc:
            self._done.unlink(missing_ok=True)
            raise SegpipeError(f"{self.path}: cannot write the output ({exc.strerror or exc})") from exc
        self._done = None
        return self.path


class TiffRowWriter(RowWriter):
    """A tiled BigTIFF (H, W) or (H, W, K) written from row bands by tifffile in a thread."""

    def __init__(
        self,
        path: Path,
        height: int,
        width: int,
        channels: int,
        dtype: np.dtype | str,
        *,
        tile: int = 256,
        compression: str = "zlib",
        meta: ImageMeta | None = None,
    ) -> None:
        self.path = Path(path)
        self.height, self.width, self.channels = height, width, channels
        self.dtype = np.dtype(dtype)
        self.tile = tile
        self.ome = has_suffix(self.path, (".ome.tif", ".ome.tiff"))
        self._tmp = temp_beside(self.path, ".tmp.ome.tif" if self.ome else ".tmp.tif")
        self._strip = np.zeros((tile, width, channels), self.dtype)
        self._next = 0  # next image row expected
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        kwargs = self._tiff_kwargs(meta or ImageMeta(), compression)
        self._thread = threading.Thread(
            target=self._run, args=(kwargs,), name=f"tiff-writer {self.path.name}", daemon=True
        )
        self._thread.start()

    def _tiff_kwargs(self, meta: ImageMeta, compression: str) -> dict[str, Any]:
        shape = (self.height, self.width) if self.channels == 1 else (self.height, self.width, self.channels)
        kwargs: dict[str, Any] = dict(
            shape=shape,
            dtype=self.dtype,
            tile=(self.tile, self.tile),
            bigtiff=True,
            photometric="minisblack",
            compression=None if compression == "none" else compression,
            metadata=None,
            # tifffile encodes tiles in threads, `buffersize` bytes of tiles at a time (default:
            # hundreds of MB, which would pull most of the image out of our generator): one tile row.
            buffersize=self.tile * -(-self.width // self.tile) * self.tile * self.channels * self.dtype.itemsize,
        )
        if self.channels > 1:
            kwargs["planarconfig"] = "contig"
        if meta.resolution is not None:
            kwargs["resolution"] = meta.resolution
            kwargs["resolutionunit"] = meta.resolution_unit or 1
        if self.ome:
            kwargs["ome"] = True
            kwargs["metadata"] = {"axes": "YX" if self.channels == 1 else "YXS", **meta.ome_pixels}
        return kwargs

    def _strips(self) -> Iterator[np.ndarray]:
        """The queued strips (tile, W, K), in order, until the end (or the abort) of the run."""
        while True:
            strip = self._queue.get()
            if strip is _END:
                return
            if strip is _ABORT:
                raise WriteAborted()
            yield strip

    def _tiles(self) -> Iterator[np.ndarray]:
        for strip in self._strips():
            yield from strip_tiles(strip if self.channels > 1 else strip[..., 0], self.tile)

    def _run(self, kwargs: dict[str, Any]) -> None:
        import tifffile

        try:
            tifffile.imwrite(self._tmp, self._tiles(), **kwargs)
        except BaseException as exc:  # reported to the caller by _put / commit
            self._error = exc

    def _put(self, item: Any) -> None:
        """Queue `item` for the writer thread; if it died, raise its error."""
        while self._thread.is_alive():
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue
        if item is not _END or self._error is not None:
            raise SegpipeError(f"{self.path}: writing the TIFF failed: {self._error!r}") from self._error

    def write(self, y0: int, rows: np.ndarray) -> None:
        """Rows [y0, y0 + n) as (K, n, W); bands must arrive in order."""
        if y0 != self._next:
            raise SegpipeError(f"{self.path}: rows arrive out of order ({y0}, expected {self._next})")
        data = rows.transpose(1, 2, 0)  # (n, W, K)
        t = self.tile
        done = 0
        while done < data.shape[0]:
            y = y0 + done
            offset = y % t
            take = min(t - offset, data.shape[0] - done)
            self._strip[offset : offset + take] = data[done : done + take]
            done += take
            if offset + take == t or y + take == self.height:  # a full tile row, or the last one
                self._put(self._strip)
                self._strip = np.zeros_like(self._strip)
        self._next = y0 + data.shape[0]

    def finish(self) -> None:
        if self._next != self.height:
            self.abort()
            raise SegpipeError(f"{self.path}: only {self._next} of {self.height} rows were produced")
        self._put(_END)
        self._thread.join()
        if self._error is not None:
            self._tmp.unlink(missing_ok=True)
            raise SegpipeError(f"{self.path}: writing the TIFF failed: {self._error!r}") from self._error
        self._done = self._tmp

    def abort(self) -> None:
        if self._thread.is_alive():
            while True:  # make room, then tell the thread to stop
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            try:
                self._queue.put_nowait(_ABORT)
            except queue.Full:
                pass
            self._thread.join()
        self._tmp.unlink(missing_ok=True)
        self._done = None
