"""The instance label map of an image streamed in row bands, with ids consistent across the image.

Probability rows arrive in order (`push(y0, probs)`, as `segpipe infer` streams them). They are cut
into blocks of `block` rows; each block's objects are extracted (`extract_instances`) from the block
with `halo` rows of context above and below, and only the block's own rows are emitted. Two
neighbouring blocks both extract the 2 x `halo` rows around their seam; an object of the new block
takes the id of the object of the previous one it overlaps most there when that one overlaps it most
too (mutual best overlap, covering at least half of the smaller of the two): an object cut by the
seam keeps one id, and an id already written never needs rewriting. Other objects get the next
free id, in raster order of their first emitted pixel. With `halo` at least an object's height the
blocks see every object whole and the result is the whole-image extraction, up to the ids.
Memory: (block + 2 halo) rows of probabilities, plus 2 halo rows of labels.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from pipeline.errors import SegpipeError
from pipeline.postprocessing.instances import InstanceSettings, extract_instances


class InstanceStream:
    """Rows of probabilities in, rows of the uint32 instance map out (module docstring)."""

    def __init__(
        self, settings: InstanceSettings, height: int, halo: int | None = None, block: int | None = None
    ) -> None:
        self.settings, self.height = settings, height
        self.halo = settings.halo if halo is None else halo
        self.block = max(2 * self.halo, 64) if block is None else block
        if self.halo < 0 or self.block < 1:
            raise SegpipeError(f"instances: halo {self.halo} and block {self.block}; expected >= 0 and >= 1")
        self._rows: np.ndarray | None = None  # probabilities (K, n, W) from row self._top on
        self._top = 0
        self._next = 0  # first row not yet emitted
        self._seam: tuple[int, np.ndarray, np.ndarray] | None = None  # previous block: (first row, local labels, ids)
        self._count = 0  # ids handed out

    @property
    def count(self) -> int:
        """Objects so far (the largest id written)."""
        return self._count

    def push(self, y0: int, probs: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """Take rows y0.. (K, n, W); yield (first row, (1, m, W) uint32 ids) of every block now final."""
        have = self._top + (0 if self._rows is None else self._rows.shape[1])
        if y0 != have:
            raise SegpipeError(f"instances: rows from {y0} arrived after rows up to {have}; expected them in order")
        self._rows = probs if self._rows is None else np.concatenate([self._rows, probs], axis=1)
        while self._next < self.height and have + probs.shape[1] >= min(
            self._next + self.block + self.halo, self.height
        ):
            yield self._emit()

    def finish(self) -> None:
        """Check that every row was emitted."""
        if self._next != self.height:
            raise SegpipeError(f"instances: {self._next} of {self.height} rows were emitted; the stream ended early")

    def _emit(self) -> tuple[int, np.ndarray]:
        assert self._rows is not None
        start, stop = self._next, min(self._next + self.block, self.height)
        c0, c1 = max(0, start - self.halo), min(self.height, stop + self.halo)
        local = extract_instances(self._rows[:, c0 - self._top : c1 - self._top], self.settings)
        ids = np.zeros(int(local.max(initial=0)) + 1, np.int64)
        if self._seam is not None:
            self._inherit(ids, local, c0)
        out = self._assign(ids, local[start - c0 : stop - c0])
        keep = max(c0, stop - self.halo)
        self._seam = (keep, local[keep - c0 :], ids)
        self._rows = self._rows[:, max(0, stop - self.halo) - self._top :]
        self._top, self._next = max(0, stop - self.halo), stop
        return start, out[None]

    def _inherit(self, ids: np.ndarray, local: np.ndarray, c0: int) -> None:
        """Ids of the previous block's objects for the new block's objects that match them at the seam."""
        assert self._seam is not None
        first, before, before_ids = self._seam
        lo, hi = max(first, c0), min(first + before.shape[0], c0 + local.shape[0])
        if hi <= lo:
            return
        a = before[lo - first : hi - first].ravel().astype(np.int64)
        b = local[lo - c0 : hi - c0].ravel().astype(np.int64)
        both = (a > 0) & (b > 0)
        if not both.any():
            return
        pairs, overlap = np.unique(a[both] * (b.max() + 1) + b[both], return_counts=True)
        pa, pb = np.divmod(pairs, b.max() + 1)
        size_a, size_b = np.bincount(a, minlength=pa.max() + 1), np.bincount(b, minlength=pb.max() + 1)
        best_for_a = _best(pa, overlap)
        best_for_b = _best(pb, overlap)
        for i in range(pairs.size):
            if (
                best_for_a[pa[i]] == i
                and best_for_b[pb[i]] == i
                and before_ids[pa[i]] > 0
                and 2 * overlap[i] >= min(size_a[pa[i]], size_b[pb[i]])
            ):
                ids[pb[i]] = before_ids[pa[i]]

    def _assign(self, ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Global ids of `rows` (local labels): new ids for the objects without one, in raster order."""
        flat = rows.ravel()
        present = flat > 0
        values, first = np.unique(flat[present], return_index=True)
        for value in values[np.argsort(first)]:
            if ids[value] == 0:
                self._count += 1
                ids[value] = self._count
        return ids[rows].astype(np.uint32)


def _best(keys: np.ndarray, overlap: np.ndarray) -> dict[int, int]:
    """For each key, the index of its pair with the largest overlap (the first on ties)."""
    best: dict[int, int] = {}
    for i in np.lexsort((-np.arange(keys.size), overlap)):  # ascending overlap, so the largest comes last
        best[int(keys[i])] = int(i)
    return best


def instances_of(probs: np.ndarray, settings: InstanceSettings) -> np.ndarray:
    """The (H, W) instance map `segpipe infer` writes for the whole probabilities (K, H, W): the same
    blocks, halo and stitching as a streamed image (they depend on the image's height, not the bands)."""
    stream = InstanceStream(settings, probs.shape[1])
    parts = [rows[0] for _, rows in stream.push(0, probs)]
    stream.finish()
    return np.concatenate(parts, axis=0)
