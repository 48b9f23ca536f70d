"""Multiscale pyramids built while row bands stream: level sizes, 2x downsampling, chunk-row output.

Level k+1 halves level k (sizes rounded up), so pixel (i, j) of level k covers the level-0 block
[i 2^k, (i + 1) 2^k) x [j 2^k, (j + 1) 2^k). Levels are added until one fits in a single tile.
Two downsamplings: `nearest` keeps the top-left pixel of every 2 x 2 block (label maps: no class
is invented), `mean` averages the block (probabilities; at an odd edge the last row or column
counts as its own neighbour). Integers are rounded back to their type.

`Pyramid.push(rows)` takes level-0 rows in order and hands every level's rows, in whole chunk rows
(the last one partial), to that level's sink. It holds at most one chunk row per level plus one
carried row: memory is set by the image's width, never by its height.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

DOWNSAMPLINGS = ("nearest", "mean")
Sink = Callable[[int, np.ndarray], None]
"""`sink(y0, block)`: rows [y0, y0 + n) of one level as (K, n, w)."""


def level_shapes(height: int, width: int, tile: int) -> list[tuple[int, int]]:
    """(height, width) of every level: the image, then halves (rounded up) until a level fits one tile."""
    shapes = [(height, width)]
    while max(shapes[-1]) > tile:
        h, w = shapes[-1]
        shapes.append((-(-h // 2), -(-w // 2)))
    return shapes


def halve(block: np.ndarray, mode: str) -> np.ndarray:
    """(K, 2m, w) -> (K, m, ceil(w / 2)) by `nearest` (top-left pixel) or `mean` of each 2 x 2 block."""
    if mode == "nearest":
        return np.ascontiguousarray(block[:, ::2, ::2])
    if block.shape[2] % 2:
        block = np.concatenate([block, block[:, :, -1:]], axis=2)
    k, n, w = block.shape
    mean = block.reshape(k, n // 2, 2, w // 2, 2).mean(axis=(2, 4), dtype=np.float32)
    if np.issubdtype(block.dtype, np.integer):
        np.rint(mean, out=mean)
    return mean.astype(block.dtype)


class _Halver:
    """Halves row bands arriving in order, carrying an odd last row over to the next band."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self._carry: np.ndarray | None = None

    def push(self, rows: np.ndarray) -> np.ndarray:
        """The half-size rows that `rows` (K, n, w) completes (maybe none)."""
        if self._carry is not None:
            rows = np.concatenate([self._carry, rows], axis=1)
        even = rows.shape[1] // 2 * 2
        self._carry = rows[:, even:].copy() if even < rows.shape[1] else None
        return halve(rows[:, :even], self.mode)

    def flush(self) -> np.ndarray:
        """The last half-size row, from a carried odd row (paired with itself), or no rows."""
        carry, self._carry = self._carry, None
        if carry is None:
            return np.zeros((0, 0, 0), np.uint8)
        return halve(np.concatenate([carry, carry], axis=1), self.mode)


class _ChunkRows:
    """Rows of one level gathered into whole chunk rows for its sink."""

    def __init__(self, sink: Sink | None, channels: int, width: int, chunk: int, dtype: np.dtype) -> None:
        self.sink, self.chunk = sink, chunk
        self._buffer = np.zeros((channels, chunk, width), dtype) if sink is not None else None
        self._start = 0  # level row of the buffer's first row
        self._filled = 0

    def add(self, rows: np.ndarray) -> None:
        if self._buffer is None:
            return
        done = 0
        while done < rows.shape[1]:
            take = min(self.chunk - self._filled, rows.shape[1] - done)
            self._buffer[:, self._filled : self._filled + take] = rows[:, done : done + take]
            self._filled += take
            done += take
            if self._filled == self.chunk:
                self.flush()

    def flush(self) -> None:
        if self._buffer is None or not self._filled:
            return
        self.sink(self._start, self._buffer[:, : self._filled])  # type: ignore[misc]
        self._start += self._filled
        self._filled = 0


class Pyramid:
    """Level-0 rows in, every level's rows out to `sinks[k]` (None: that level is not wanted) in
    whole chunk rows of `chunk` rows; `close()` after the last row flushes every level."""

    def __init__(
        self,
        shapes: Sequence[tuple[int, int]],
        channels: int,
        dtype: np.dtype | str,
        chunk: int,
        mode: str,
        sinks: Sequence[Sink | None],
    ) -> None:
        if mode not in DOWNSAMPLINGS:
            raise ValueError(f"downsampling must be one of {', '.join(DOWNSAMPLINGS)}, got {mode!r}")
        self._levels = [_ChunkRows(sink, channels, w, chunk, np.dtype(dtype)) for (_, w), sink in zip(shapes, sinks)]
        self._halvers = [_Halver(mode) for _ in shapes[1:]]

    def push(self, rows: np.ndarray) -> None:
        """The next level-0 rows (K, n, W)."""
        self._cascade(0, rows)

    def close(self) -> None:
        """Flush the carried odd rows down the levels, then every partial chunk row."""
        for k, halver in enumerate(self._halvers, start=1):
            self._cascade(k, halver.flush())
        for level in self._levels:
            level.flush()

    def _cascade(self, k: int, rows: np.ndarray) -> None:
        """`rows` of level k to its sink, and what they complete of the levels below."""
        while rows.shape[1]:
            self._levels[k].add(rows)
            if k == len(self._halvers):
                return
            rows = self._halvers[k].push(rows)
            k += 1
