"""Where the windows of an image go, and the two row buffers the engine streams through.

The network's padding decides the strategy (see `pipeline.networks` for the contract):

* "same" padding: overlapping windows, later blended with an importance map. Window placement and
  the zero padding of images smaller than a window are MONAI's
  (`monai.inferers.utils.sliding_window_inference`: `dense_patch_slices` with a scan interval of
  int(roi * (1 - overlap)), the last window shifted back inside the image).
* "valid" padding: the overlap-tile strategy of the U-Net paper (Ronneberger et al. 2015, Fig. 2):
  output tiles cover the image exactly, each input tile adds the halo, the image is mirrored
  (reflect) at its borders; each output pixel is taken from exactly one tile, no blending. Tiles
  start at multiples of the network's output-size period (2**depth for the U-Net), so the max-pool
  grid of every tile lines up with that of the whole image: the result equals the network run on
  the whole mirror-padded image.

`PaddedRows` serves the rows of the padded image as a band moving down (each source row read
once); `LogitBand` accumulates the windows' logits in a band a few tiles high and hands out rows
once final; `window_batches` orders the windows so that the band stays small.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from pipeline.errors import SegpipeError
from pipeline.inference.backends.torch_graph import InferenceNetwork
from pipeline.inference.readers.images import ImageReader


@dataclass(frozen=True)
class AxisPlan:
    """Window positions along one axis. Padded coordinates = image coordinates + `pad_before`."""

    size: int
    pad_before: int
    pad_after: int
    starts: tuple[int, ...]
    """Input window starts, padded coordinates."""
    out_starts: tuple[int, ...]
    """Where each window's output starts, image coordinates."""
    keep: tuple[tuple[int, int], ...]
    """The output range [lo, hi) each window contributes, image coordinates."""


@dataclass(frozen=True)
class TilePlan:
    """Where the windows of one image go; `strategy` is "blend" or "overlap-tile"."""

    strategy: str
    in_tile: int
    out_tile: int
    rows: AxisPlan
    cols: AxisPlan
    pad_mode: str
    """"constant" (zeros, MONAI's small-image padding) or "reflect" (mirror, U-Net paper)."""

    @property
    def n_windows(self) -> int:
        return len(self.rows.starts) * len(self.cols.starts)

    def describe(self) -> str:
        if self.strategy == "blend":
            return f"{self.n_windows} tiles of {self.in_tile}^2 blended"
        stride = self.rows.keep[0][1] - self.rows.keep[0][0] if len(self.rows.keep) > 1 else self.out_tile
        return f"{self.n_windows} tiles of {self.in_tile}^2 -> {self.out_tile}^2 (stride {stride}, overlap-tile)"


def _monai_axis(size: int, roi: int, overlap: float) -> AxisPlan:
    """MONAI's windows along one axis: zero padding (centred) up to `roi`, then dense_patch_slices."""
    from monai.data.utils import dense_patch_slices

    padded = max(size, roi)
    before = (padded - size) // 2
    interval = roi if roi == padded else max(int(roi * (1 - overlap)), 1)
    starts = tuple(int(s[0].start) for s in dense_patch_slices((padded,), (roi,), (interval,)))
    out_starts = tuple(s - before for s in starts)
    keep = tuple((max(o, 0), min(o + roi, size)) for o in out_starts)
    return AxisPlan(size, before, padded - size - before, starts, out_starts, keep)


def _overlap_tile_axis(size: int, out_tile: int, stride: int, halo: int) -> AxisPlan:
    """Overlap-tile along one axis: outputs at 0, stride, 2 stride, ...; inputs add the halo."""
    out_starts = tuple(range(0, size, stride))
    keep = tuple((o, min(o + stride, size)) for o in out_starts)
    pad_after = out_starts[-1] + out_tile - size + halo
    return AxisPlan(size, halo, pad_after, out_starts, out_starts, keep)


def output_period(net: InferenceNetwork) -> int:
    """The spacing of reachable output sizes of a valid network (2**depth for the U-Net)."""
    smallest = net.valid_output_size(1)
    return net.valid_output_size(smallest + 1) - smallest


def plan_tiles(net: InferenceNetwork, height: int, width: int, tile: int, overlap: float) -> TilePlan:
    """Windows for an image of height x width.

    same padding: `tile` is the window (MONAI's roi_size) and must be an input size the network
    takes. valid padding: `tile` is the output tile, rounded up to a reachable output size; the
    input tile adds 2 * halo; `overlap` does not apply (overlap-tile never blends).
    """
    if net.padding == "same":
        try:
            if net.output_size(tile) != tile:
                raise SegpipeError(f"the network maps {tile} to {net.output_size(tile)}, not 'same'")
        except SegpipeError as exc:
            raise SegpipeError(f"tile {tile} does not suit this network: {exc}") from exc
        return TilePlan(
            "blend", tile, tile, _monai_axis(height, tile, overlap), _monai_axis(width, tile, overlap), "constant"
        )
    period = output_period(net)
    out_tile = net.valid_output_size(max(tile, period))
    stride = out_tile // period * period
    in_tile = net.input_size(out_tile)
    if in_tile - out_tile != 2 * net.halo:
        raise SegpipeError(f"network halo {net.halo} disagrees with its sizes {in_tile} -> {out_tile}")
    return TilePlan(
        "overlap-tile",
        in_tile,
        out_tile,
        _overlap_tile_axis(height, out_tile, stride, net.halo),
        _overlap_tile_axis(width, out_tile, stride, net.halo),
        "reflect",
    )


def source_index(size: int, before: int, after: int, mode: str) -> np.ndarray:
    """Image index of each padded position (-1: a zero of constant padding).

    "reflect" mirrors without repeating the edge (numpy's/torch's "reflect"), as often as needed:
    the padded signal is periodic with period 2 * (size - 1).
    """
    idx = np.arange(-before, size + after, dtype=np.int64)
    if mode == "constant":
        return np.where((idx >= 0) & (idx < size), idx, -1)
    if size == 1:
        return np.zeros_like(idx)
    period = 2 * (size - 1)
    m = np.mod(idx, period)
    return np.where(m >= size, period - m, m)


class PaddedRows:
    """Rows of the padded image, (C, rows, W_padded) in the source dtype: a band moving down."""

    def __init__(self, reader: ImageReader, plan: TilePlan) -> None:
        self.reader = reader
        c, h, w = reader.shape
        self.row_index = source_index(h, plan.rows.pad_before, plan.rows.pad_after, plan.pad_mode)
        self.col_index = source_index(w, plan.cols.pad_before, plan.cols.pad_after, plan.pad_mode)
        self.cols_identity = plan.cols.pad_before == 0 and plan.cols.pad_after == 0
        self.top = 0
        self.count = 0
        self.band = np.zeros((c, plan.in_tile, len(self.col_index)), reader.dtype)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Padded rows [start, stop); `start` never decreases between calls. Each row is read once."""
        have = self.top + self.count
        keep = max(min(have, stop) - start, 0)
        if keep and start > self.top:  # slide the rows still needed to the front
            self.band[:, :keep] = self.band[:, start - self.top : start - self.top + keep].copy()
        if stop - start > self.band.shape[1]:
            grown = np.zeros((self.band.shape[0], stop - start, self.band.shape[2]), self.band.dtype)
            grown[:, :keep] = self.band[:, :keep]
            self.band = grown
        if stop > have:
            first = max(start, have)
            self.band[:, first - start : stop - start] = self._read(first, stop)
        self.top, self.count = start, stop - start
        return self.band[:, : stop - start]

    def _read(self, start: int, stop: int) -> np.ndarray:
        c, _, w = self.reader.shape
        src = self.row_index[start:stop]
        valid = src >= 0
        if valid.all() and src[-1] - src[0] == len(src) - 1:  # an unpadded run of rows: no copy
            rows = self.reader.read_rows(int(src[0]), int(src[-1]) + 1)
        else:
            rows = np.zeros((c, stop - start, w), self.reader.dtype)
            if valid.any():
                lo, hi = int(src[valid].min()), int(src[valid].max()) + 1
                rows[:, valid] = self.reader.read_rows(lo, hi)[:, src[valid] - lo]
        if rows.shape != (c, stop - start, w):
            raise SegpipeError(f"{self.reader.path}: rows {start}..{stop} read back with shape {rows.shape}")
        if self.cols_identity:
            return rows
        out = np.zeros((c, stop - start, len(self.col_index)), self.reader.dtype)
        cvalid = self.col_index >= 0
        out[:, :, cvalid] = rows[:, :, self.col_index[cvalid]]
        return out


class LogitBand:
    """Blended (or copied) logits of image rows [top, top + used), (K, rows, W), grown on demand."""

    def __init__(self, channels: int, width: int, rows: int, weighted: bool, top: int = 0) -> None:
        self.acc = torch.zeros((channels, rows, width))
        self.wsum = torch.zeros((1, rows, width)) if weighted else None
        self.top = top
        self.used = 0

    def _ensure(self, stop: int) -> None:
        need = stop - self.top
        if need > self.acc.shape[1]:
            acc = torch.zeros((self.acc.shape[0], need, self.acc.shape[2]))
            acc[:, : self.used] = self.acc[:, : self.used]
            self.acc = acc
            if self.wsum is not None:
                wsum = torch.zeros((1, need, self.acc.shape[2]))
                wsum[:, : self.used] = self.wsum[:, : self.used]
                self.wsum = wsum
        self.used = max(self.used, need)

    def add(
        self, logits: torch.Tensor, rows: tuple[int, int], cols: tuple[int, int], weight: torch.Tensor | None
    ) -> None:
        """Add (blend) or copy `logits` (K, r, c), already cut to the kept range, at `rows` x `cols`."""
        self._ensure(rows[1])
        r = slice(rows[0] - self.top, rows[1] - self.top)
        c = slice(cols[0], cols[1])
        if self.wsum is None or weight is None:
            self.acc[:, r, c] = logits
        else:
            self.acc[:, r, c] += logits * weight
            self.wsum[:, r, c] += weight

    def pop(self, stop: int, chunk: int) -> Iterator[tuple[int, torch.Tensor]]:
        """Final logits of rows [top, stop), normalised by the weight sum, `chunk` rows at a time
        (first row, (K, n, W), a view valid until the next chunk); then the band moves down to `stop`."""
        n = stop - self.top
        for i in range(0, n, chunk):
            j = min(i + chunk, n)
            part = self.acc[:, i:j] if self.wsum is None else self.acc[:, i:j].div_(self.wsum[:, i:j])
            yield self.top + i, part  # a view: final rows are normalised in place, no temporary
        rest = self.used - n
        for buf in (self.acc, self.wsum):
            if buf is None:
                continue
            if rest > 0:  # the rows still open move up; a copy only when source and target overlap
                buf[:, :rest] = buf[:, n : self.used] if rest <= n else buf[:, n : self.used].clone()
            buf[:, max(rest, 0) : self.used] = 0
        self.used = max(rest, 0)
        self.top = stop


def window_batches(n_rows: int, n_cols: int, batch_size: int) -> list[list[tuple[int, int]]]:
    """Windows (row, col) in raster order, in batches that stay within one window row when a row
    holds at least `batch_size` windows (so the band never spans more than one window row), else
    in groups of whole rows."""
    if n_cols >= batch_size:
        return [
            [(iy, ix) for ix in range(x0, min(x0 + batch_size, n_cols))]
            for iy in range(n_rows)
            for x0 in range(0, n_cols, batch_size)
        ]
    per = batch_size // n_cols
    return [
        [(iy, ix) for iy in range(y0, min(y0 + per, n_rows)) for ix in range(n_cols)] for y0 in range(0, n_rows, per)
    ]


__all__ = [
    "AxisPlan",
    "LogitBand",
    "PaddedRows",
    "TilePlan",
    "output_period",
    "plan_tiles",
    "source_index",
    "window_batches",
]
