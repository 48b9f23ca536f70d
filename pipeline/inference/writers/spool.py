"""`ChunkSpool`: blocks of rows parked on disk, zlib-compressed, until a writer reads them back once.

The pyramidal OME-TIFF (`ome_tiff.py`) needs its reduced levels and the channels after the first
only after the full-resolution page is written. It parks them here, one block (a tile row of one
plane) at a time: each block is compressed in the calling thread and appended to one temp file,
and an in-memory index (a few numbers per block) finds it again. Unlike a zarr store, nothing runs
in other threads and nothing is cached: memory is the one block in hand.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np

from pipeline.errors import SegpipeError

Key = tuple[int, int, int]
"""(level, plane, first row) of a block."""


class ChunkSpool:
    """Blocks (rows, width) of one dtype, put once and got back by key, in a temp file at `path`."""

    def __init__(self, path: Path, dtype: np.dtype | str, level: int = 1) -> None:
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.level = level
        self._index: dict[Key, tuple[int, int, tuple[int, int]]] = {}  # key -> offset, length, shape
        self._end = 0
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0)
        self._file = os.fdopen(os.open(self.path, flags, 0o600), "r+b")

    def put(self, key: Key, block: np.ndarray) -> None:
        """Park `block` (rows, width) under `key`."""
        data = zlib.compress(np.ascontiguousarray(block, self.dtype), self.level)
        try:
            self._file.seek(self._end)
            self._file.write(data)
        except OSError as exc:
            raise SegpipeError(f"{self.path}: cannot write the spool ({exc}; disk full?)") from exc
        self._index[key] = (self._end, len(data), (block.shape[0], block.shape[1]))
        self._end += len(data)

    def get(self, key: Key) -> np.ndarray:
        """The block parked under `key`."""
        offset, length, shape = self._index[key]
        self._file.seek(offset)
        data = self._file.read(length)
        if len(data) != length:
            raise SegpipeError(f"{self.path}: the spool is truncated at block {key}")
        return np.frombuffer(zlib.decompress(data), self.dtype).reshape(shape)

    def close(self) -> None:
        """Close and delete the file."""
        if not self._file.closed:
            self._file.close()
        self.path.unlink(missing_ok=True)


__all__ = ["ChunkSpool"]
