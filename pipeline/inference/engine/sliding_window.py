"""Sliding-window inference: the streaming engine and `predict` for images held in memory.

`stream_probabilities` plans the windows of an image (`pipeline.inference.engine.tiling`), visits them in
raster order, runs them in batches (with test-time augmentation, `pipeline.inference.engine.tta`),
accumulates their logits in a band a few tiles high, and yields image rows as soon as no later
window touches them: memory is bounded by the band, not by the image
(`pipeline.inference.run.predict` feeds it from disk).

"same" padding: the windows' logits are blended with MONAI's importance map
(`monai.data.utils.compute_importance_map`) as sum_w(w * logits) / sum_w(w), so `predict` equals
MONAI's `SlidingWindowInferer` followed by sigmoid (one output channel) or softmax. "valid" padding:
the U-Net paper's overlap-tile (Ronneberger et al. 2015), each output pixel from exactly one tile.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from pipeline.errors import SegpipeError
from pipeline.inference.backends.torch_graph import InferenceNetwork, ModelLike, torch_network
from pipeline.inference.engine.memory import release_freed_memory
from pipeline.inference.engine.tiling import LogitBand, PaddedRows, TilePlan, plan_tiles, window_batches
from pipeline.inference.engine.tta import tta_logits
from pipeline.inference.readers.images import ArrayReader, ImageReader
from pipeline.inference.settings import InferenceSettings, load_settings

_EMIT_ROWS = 64
"""Final rows are normalised and handed to the writers this many at a time (bounds temporaries)."""


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
    start_row: int = 0,
) -> RowStream:
    """Plan the windows of `reader`'s image and return the lazy stream of its probability rows.

    `progress(pixels, total_pixels)` is called after each band with the pixels it finished. With
    `start_row` the stream begins at the first batch holding a window that touches that row and
    yields rows from `start_row` on: every such row gets the same windows, batches and blending order
    as in a stream from row 0, so its values are equal bit for bit (`pipeline.inference.run.resume`).
    """
    c, h, w = reader.shape
    if c != net.in_channels:
        raise SegpipeError(f"{reader.path}: the image has {c} channel(s), the model expects {net.in_channels}")
    plan = plan_tiles(net, h, w, settings.tile, settings.overlap)
    return RowStream(plan, _rows(net, reader, plan, settings, progress, start_row))


def _rows(
    net: InferenceNetwork,
    reader: ImageReader,
    plan: TilePlan,
    settings: InferenceSettings,
    progress: Callable[[int, int], None] | None,
    start_row: int,
) -> Iterator[tuple[int, np.ndarray]]:
    from monai.data.utils import compute_importance_map

    _, h, w = reader.shape
    batches = window_batches(len(plan.rows.starts), len(plan.cols.starts), settings.batch_size)
    first = next(
        (b for b, batch in enumerate(batches) if any(plan.rows.keep[iy][1] > start_row for iy, _ in batch)),
        len(batches),
    )
    if first == len(batches):
        return
    blend = plan.strategy == "blend"
    weight = (
        compute_importance_map(
            (plan.in_tile, plan.in_tile),
            mode=settings.blend,
            sigma_scale=settings.sigma_scale,
            device="cpu",
            dtype=torch.float32,
        )
        if blend
        else None
    )
    scale = (
        float(np.iinfo(reader.dtype).max)
        if settings.intensity == "scale" and np.issubdtype(reader.dtype, np.integer)
        else None
    )
    source = PaddedRows(reader, plan)
    band = LogitBand(net.out_channels, w, plan.out_tile, blend, top=plan.rows.keep[batches[first][0][0]][0])
    t_in, t_out = plan.in_tile, plan.out_tile
    for b in range(first, len(batches)):
        batch = batches[b]
        top = plan.rows.starts[batch[0][0]]
        rows = source.rows(top, plan.rows.starts[batch[-1][0]] + t_in)
        tiles = np.stack(
            [
                rows[
                    :,
                    plan.rows.starts[iy] - top : plan.rows.starts[iy] - top + t_in,
                    plan.cols.starts[ix] : plan.cols.starts[ix] + t_in,
                ]
                for iy, ix in batch
            ]
        )
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
                if y0 + part.shape[1] <= start_row:
                    continue  # rows a resumed run already has (their earlier windows were not run)
                if y0 < start_row:
                    part, y0 = part[:, start_row - y0 :], start_row
                probs = probabilities(part).numpy()
                if progress is not None:
                    progress(probs.shape[1] * w, h * w)
                yield y0, probs
            release_freed_memory()


def predict(
    model: ModelLike | InferenceNetwork,
    image: np.ndarray | torch.Tensor,
    *,
    settings: InferenceSettings | None = None,
    **overrides: Any,
) -> np.ndarray:
    """Class probabilities of an in-memory image (C, H, W): float32 (K, H, W).

    `model` is a contract network, a checkpoint path (run in torch), or an `InferenceNetwork` (e.g. an
    ONNX model's, from `pipeline.inference.inference_network`). `settings` (default:
    `InferenceSettings()`) with the non-None `overrides` (its fields: tile, overlap, blend, tta, ...)
    applied says how. Sigmoid for one output channel, softmax otherwise.
    `intensity="scale"` divides integer images by their dtype's maximum (floats pass unchanged).
    The checkpoint's recorded training preprocessing (`preprocess` setting) is NOT applied here:
    `image` is taken as the network's input, so callers preprocess it themselves (`segpipe
    evaluate` uses `pipeline.transforms.presets.preprocess`); `predict_file` applies it to files.
    """
    settings = load_settings(settings, **overrides)
    net = torch_network(model, settings)
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    reader = ArrayReader(array, "<image array>")
    stream = stream_probabilities(net, reader, settings)
    out = np.empty((net.out_channels, *array.shape[1:]), np.float32)
    for y0, probs in stream.rows:
        out[:, y0 : y0 + probs.shape[1]] = probs
    return out


__all__ = [
    "RowStream",
    "predict",
    "probabilities",
    "stream_probabilities",
]
