"""Sliding-window inference: the tiling engine and `predict` for images held in memory.

The network's padding decides the strategy (see `pipeline.networks` for the contract):

* "same" padding: overlapping windows blended with an importance map. Window placement, the
  zero padding of images smaller than a window, and the weights are MONAI's
  (`monai.inferers.utils.sliding_window_inference`: `dense_patch_slices` with a scan interval of
  int(roi * (1 - overlap)), the last window shifted back inside the image;
  `monai.data.utils.compute_importance_map`), so `predict` equals `SlidingWindowInferer` followed by
  sigmoid (one output channel) or softmax: logits blended as sum_w(w * logits) / sum_w(w).
* "valid" padding: the overlap-tile strategy of the U-Net paper (Ronneberger et al. 2015, Fig. 2):
  output tiles cover the image exactly, each input tile adds the halo, the image is mirrored
  (reflect) at its borders; each output pixel is taken from exactly one tile, no blending. Tiles
  start at multiples of the network's output-size period (2**depth for the U-Net), so the max-pool
  grid of every tile lines up with that of the whole image: the result equals the network run on
  the whole mirror-padded image.

The engine visits windows in raster order, runs them in batches, accumulates their logits in a
band a few tiles high, and yields image rows as soon as no later window touches them: memory is
bounded by the band, not by the image (`pipeline.inference.streaming` feeds it from disk).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from pipeline.errors import SegpipeError
from pipeline.inference.optimize import InferenceNetwork, ModelLike, optimize_network
from pipeline.inference.readers import ArrayReader, ImageReader

BLENDS = ("gaussian", "constant")
INTENSITIES = ("scale", "none")
PREPROCESSING = ("checkpoint", "intensity")
"""`preprocess`: the checkpoint's recorded training preprocessing (when it has one), or `intensity`."""
PROBABILITY_DTYPES = ("uint8", "float16", "float32")
COMPRESSIONS = ("zlib", "zstd", "lzw", "lzma", "none")
_EMIT_ROWS = 64
"""Final rows are normalised and handed to the writers this many at a time (bounds temporaries)."""
TTA_TRANSFORMS: dict[str, tuple[tuple[int, ...], bool]] = {
    "h": ((-1,), False), "v": ((-2,), False), "hv": ((-2, -1), False),
    "t": ((), True), "th": ((-1,), True), "tv": ((-2,), True), "thv": ((-2, -1), True),
}
"""Test-time augmentation by the symmetries of the square window (the dihedral group D4): name ->
(flipped axes, then transposed?). "h" mirrors left-right, "v" top-bottom, "hv" both (a 180 degree
rotation); "t" transposes (swaps rows and columns), "th" / "tv" are rotations by 90 degrees, "thv"
the anti-transpose. The 7 together with the identity are all 8 symmetries."""


def tta_logits(net: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
    """`net(x)` averaged with `net` of the `names` transforms of the square windows `x` (N, C, T, T),
    each output mapped back by the inverse transform; out of place (`net` may return
    inference-mode tensors)."""
    out = net(x)
    for name in names:
        dims, transpose = TTA_TRANSFORMS[name]
        y = x.flip(dims) if dims else x
        y = net(y.transpose(-2, -1) if transpose else y)
        y = y.transpose(-2, -1) if transpose else y
        out = out + (y.flip(dims) if dims else y)
    return out / (1 + len(names)) if names else out


@dataclass(frozen=True)
class InferenceSettings:
    """The knobs of `configs/inference.yaml` (DVC params); see that file for their meaning.

    No defaults here: the config file is the one source of them (`load_settings`).
    """

    tile: int
    overlap: float
    blend: str
    sigma_scale: float
    batch_size: int
    tta: tuple[str, ...]
    intensity: str
    preprocess: str
    preprocess_max_megapixels: float
    device: str
    threads: int | None
    fold_batch_norm: bool
    inplace_activations: bool
    channels_last: bool
    compile: bool
    tiff_tile: int
    compression: str
    threshold: float
    save_probabilities: bool
    probabilities_dtype: str

    def validated(self, where: str = "inference settings") -> "InferenceSettings":
        """Self, after checking every value; SegpipeError naming `where` and the key otherwise."""

        def bad(key: str, expected: str) -> SegpipeError:
            return SegpipeError(f"{where}: {key} must be {expected}, got {getattr(self, key)!r}")

        def positive_int(key: str) -> None:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(key, "an integer >= 1")

        positive_int("tile")
        positive_int("batch_size")
        positive_int("tiff_tile")
        if self.tiff_tile % 16:
            raise bad("tiff_tile", "a multiple of 16 (TIFF tiles)")
        if self.threads is not None:
            positive_int("threads")
        if not isinstance(self.overlap, (int, float)) or not 0 <= self.overlap < 1:
            raise bad("overlap", "a number in [0, 1)")
        if not isinstance(self.sigma_scale, (int, float)) or self.sigma_scale <= 0:
            raise bad("sigma_scale", "a positive number")
        if not isinstance(self.threshold, (int, float)) or not 0 < self.threshold < 1:
            raise bad("threshold", "a number in (0, 1)")
        limit = self.preprocess_max_megapixels
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0:
            raise bad("preprocess_max_megapixels", "a positive number")
        for key, choices in (("blend", BLENDS), ("intensity", INTENSITIES), ("preprocess", PREPROCESSING),
                             ("probabilities_dtype", PROBABILITY_DTYPES), ("compression", COMPRESSIONS)):
            if getattr(self, key) not in choices:
                raise bad(key, f"one of {', '.join(choices)}")
        if not isinstance(self.tta, tuple) or any(t not in TTA_TRANSFORMS for t in self.tta):
            raise bad("tta", f"a list of window transforms from {', '.join(TTA_TRANSFORMS)}")
        for key in ("fold_batch_norm", "inplace_activations", "channels_last", "compile", "save_probabilities"):
            if not isinstance(getattr(self, key), bool):
                raise bad(key, "true or false")
        return self


def load_settings(base: InferenceSettings | None = None, **overrides: Any) -> InferenceSettings:
    """`base` (default: `configs/inference.yaml`) with the non-None `overrides` applied, validated."""
    if base is None:
        base = _config_settings()
    given = {k: v for k, v in overrides.items() if v is not None}
    if "tta" in given:
        given["tta"] = tuple(given["tta"])
    unknown = sorted(set(given) - set(InferenceSettings.__dataclass_fields__))
    if unknown:
        raise SegpipeError(f"unknown inference setting(s): {', '.join(unknown)}")
    return replace(base, **given).validated("inference arguments")


def _config_settings() -> InferenceSettings:
    """`configs/inference.yaml` (keys of its `graph` and `output` sections flattened)."""
    from pipeline.config import config_dir, load_config

    path = config_dir() / "inference.yaml"
    flat: dict[str, Any] = {}
    for key, value in load_config("inference").items():
        if key in ("graph", "output") and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    known = set(InferenceSettings.__dataclass_fields__)
    unknown, missing = sorted(set(flat) - known), sorted(known - set(flat))
    problems = [f"unknown key(s) {', '.join(unknown)}"] if unknown else []
    problems += [f"missing key(s) {', '.join(missing)}"] if missing else []
    if problems:
        raise SegpipeError(f"{path}: {'; '.join(problems)} (keys: {', '.join(sorted(known))})")
    if "tta" in flat:
        flat["tta"] = tuple(flat["tta"] or ())
    return InferenceSettings(**flat).validated(str(path))


def inference_network(model: ModelLike | InferenceNetwork, settings: InferenceSettings) -> InferenceNetwork:
    """`optimize_network` with the graph settings of `settings` (an InferenceNetwork passes through)."""
    return optimize_network(model, settings.device, fold_bn=settings.fold_batch_norm,
                            inplace_act=settings.inplace_activations, channels_last=settings.channels_last,
                            compile=settings.compile, threads=settings.threads)


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
        return TilePlan("blend", tile, tile, _monai_axis(height, tile, overlap),
                        _monai_axis(width, tile, overlap), "constant")
    period = output_period(net)
    out_tile = net.valid_output_size(max(tile, period))
    stride = out_tile // period * period
    in_tile = net.input_size(out_tile)
    if in_tile - out_tile != 2 * net.halo:
        raise SegpipeError(f"network halo {net.halo} disagrees with its sizes {in_tile} -> {out_tile}")
    return TilePlan("overlap-tile", in_tile, out_tile, _overlap_tile_axis(height, out_tile, stride, net.halo),
                    _overlap_tile_axis(width, out_tile, stride, net.halo), "reflect")


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


class _PaddedRows:
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


class _Band:
    """Blended (or copied) logits of image rows [top, top + used), (K, rows, W), grown on demand."""

    def __init__(self, channels: int, width: int, rows: int, weighted: bool) -> None:
        self.acc = torch.zeros((channels, rows, width))
        self.wsum = torch.zeros((1, rows, width)) if weighted else None
        self.top = 0
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

    def add(self, logits: torch.Tensor, rows: tuple[int, int], cols: tuple[int, int], weight: torch.Tensor | None) -> None:
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
        (first row, (K, n, W)); then the band moves down to `stop`."""
        n = stop - self.top
        for i in range(0, n, chunk):
            j = min(i + chunk, n)
            part = self.acc[:, i:j] if self.wsum is None else self.acc[:, i:j] / self.wsum[:, i:j]
            yield self.top + i, part
        rest = self.used - n
        for buf in (self.acc, self.wsum):
            if buf is None:
                continue
            if rest > 0:
                buf[:, :rest] = buf[:, n : self.used].clone()
            buf[:, max(rest, 0) : self.used] = 0
        self.used = max(rest, 0)
        self.top = stop


def _batches(n_rows: int, n_cols: int, batch_size: int) -> list[list[tuple[int, int]]]:
    """Windows (row, col) in raster order, in batches that stay within one window row when a row
    holds at least `batch_size` windows (so the band never spans more than one window row), else
    in groups of whole rows."""
    if n_cols >= batch_size:
        return [[(iy, ix) for ix in range(x0, min(x0 + batch_size, n_cols))]
                for iy in range(n_rows) for x0 in range(0, n_cols, batch_size)]
    per = batch_size // n_cols
    return [[(iy, ix) for iy in range(y0, min(y0 + per, n_rows)) for ix in range(n_cols)]
            for y0 in range(0, n_rows, per)]


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Sigmoid for one channel, softmax over channels otherwise; logits (K, ...) -> same shape."""
    return torch.sigmoid(logits) if logits.shape[0] == 1 else torch.softmax(logits, dim=0)


@dataclass
class RowStream:
    """The window plan of one image and the lazy stream of its final probability rows."""

    plan: TilePlan
    rows: Iterator[tuple[int, np.ndarray]]
    """(first image row, probabilities (K, n, W) float32) in order, covering the image once."""


def _forward(net: InferenceNetwork, x: torch.Tensor, tta: Sequence[str], batch_size: int) -> torch.Tensor:
    """Logits of a batch, averaged over the `tta` transforms; padded to `batch_size` if compiled."""
    n = x.shape[0]
    if net.fixed_batch and n < batch_size:
        x = torch.cat([x, x.new_zeros((batch_size - n, *x.shape[1:]))])
    return tta_logits(net, x, tta)[:n]


def stream_probabilities(
    net: InferenceNetwork,
    reader: ImageReader,
    settings: InferenceSettings,
    progress: Callable[[int, int], None] | None = None,
) -> RowStream:
    """Plan the windows of `reader`'s image and return the lazy stream of its probability rows.

    `progress(pixels, total_pixels)` is called after each band with the pixels it finished.
    """
    c, h, w = reader.shape
    if c != net.in_channels:
        raise SegpipeError(f"{reader.path}: the image has {c} channel(s), the model expects {net.in_channels}")
    plan = plan_tiles(net, h, w, settings.tile, settings.overlap)
    return RowStream(plan, _rows(net, reader, plan, settings, progress))


def _rows(
    net: InferenceNetwork,
    reader: ImageReader,
    plan: TilePlan,
    settings: InferenceSettings,
    progress: Callable[[int, int], None] | None,
) -> Iterator[tuple[int, np.ndarray]]:
    from monai.data.utils import compute_importance_map

    _, h, w = reader.shape
    blend = plan.strategy == "blend"
    weight = (
        compute_importance_map((plan.in_tile, plan.in_tile), mode=settings.blend,
                               sigma_scale=settings.sigma_scale, device="cpu", dtype=torch.float32)
        if blend else None
    )
    scale = (float(np.iinfo(reader.dtype).max)
             if settings.intensity == "scale" and np.issubdtype(reader.dtype, np.integer) else None)
    source = _PaddedRows(reader, plan)
    band = _Band(net.out_channels, w, plan.out_tile, blend)
    batches = _batches(len(plan.rows.starts), len(plan.cols.starts), settings.batch_size)
    t_in, t_out = plan.in_tile, plan.out_tile
    for b, batch in enumerate(batches):
        top = plan.rows.starts[batch[0][0]]
        rows = source.rows(top, plan.rows.starts[batch[-1][0]] + t_in)
        tiles = np.stack([
            rows[:, plan.rows.starts[iy] - top : plan.rows.starts[iy] - top + t_in,
                 plan.cols.starts[ix] : plan.cols.starts[ix] + t_in]
            for iy, ix in batch
        ])
        x = torch.from_numpy(tiles).to(torch.float32)
        if scale is not None:
            x /= scale
        logits = _forward(net, x, settings.tta, settings.batch_size)
        if logits.shape[1:] != (net.out_channels, t_out, t_out):
            raise SegpipeError(
                f"the network mapped tiles {tuple(x.shape[1:])} to {tuple(logits.shape[1:])}, expected "
                f"({net.out_channels}, {t_out}, {t_out})"
            )
        for (iy, ix), out in zip(batch, logits):
            (r0, r1), (c0, c1) = plan.rows.keep[iy], plan.cols.keep[ix]
            oy, ox = plan.rows.out_starts[iy], plan.cols.out_starts[ix]
            cut = (slice(r0 - oy, r1 - oy), slice(c0 - ox, c1 - ox))
            band.add(out[(slice(None), *cut)], (r0, r1), (c0, c1), None if weight is None else weight[cut])
        final = plan.rows.keep[batches[b + 1][0][0]][0] if b + 1 < len(batches) else h
        if final > band.top:
            for y0, part in band.pop(final, _EMIT_ROWS):
                probs = probabilities(part).numpy()
                if progress is not None:
                    progress(probs.shape[1] * w, h * w)
                yield y0, probs


def predict(
    model: ModelLike | InferenceNetwork,
    image: np.ndarray | torch.Tensor,
    *,
    tile: int | None = None,
    overlap: float | None = None,
    blend: str | None = None,
    sigma_scale: float | None = None,
    tta: Sequence[str] | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    intensity: str | None = None,
    settings: InferenceSettings | None = None,
) -> np.ndarray:
    """Class probabilities of an in-memory image (C, H, W): float32 (K, H, W).

    `model` is a contract network, a checkpoint path, or an `InferenceNetwork`. Arguments left at
    None come from `settings` (default: `configs/inference.yaml`). Sigmoid for one output channel,
    softmax otherwise.
    `intensity="scale"` divides integer images by their dtype's maximum (floats pass unchanged).
    The checkpoint's recorded training preprocessing (`preprocess` setting) is NOT applied here:
    `image` is taken as the network's input, so callers preprocess it themselves (`segpipe
    evaluate` uses `pipeline.engine.data.preprocess`); `predict_file` applies it to files.
    """
    settings = load_settings(settings, tile=tile, overlap=overlap, blend=blend, sigma_scale=sigma_scale,
                             tta=tta, batch_size=batch_size, device=device, intensity=intensity)
    net = inference_network(model, settings)
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    reader = ArrayReader(array, "<image array>")
    stream = stream_probabilities(net, reader, settings)
    out = np.empty((net.out_channels, *array.shape[1:]), np.float32)
    for y0, probs in stream.rows:
        out[:, y0 : y0 + probs.shape[1]] = probs
    return out


__all__ = [
    "BLENDS",
    "InferenceSettings",
    "TilePlan",
    "load_settings",
    "plan_tiles",
    "predict",
    "probabilities",
    "source_index",
    "stream_probabilities",
]
