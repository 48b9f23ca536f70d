"""MONAI's streaming path for `segpipe bench infer`: PatchInferer + WSISlidingWindowSplitter + ZarrAvgMerger.

MONAI's own way to segment an image that does not fit in memory: `WSISlidingWindowSplitter` reads
each window from the file through `WSIReader` (backend "OpenSlide", MONAI's recommended CPU reader,
from the openslide-python / openslide-bin packages; it reads our generic tiled BigTIFF), the network
runs on batches of windows, and `ZarrAvgMerger` adds each output window into on-disk zarr arrays of
sums and counts, then divides them chunk by chunk into an on-disk zarr array of averaged logits.
The labels (argmax) are then streamed from that array into a tiled BigTIFF (zlib, 256 tiles: what
our `tiff` output writes). All of it is timed, from opening the slide to the closed label file;
the sums, counts and averages live under the output folder and are deleted after the measurement.

Where it differs from ours by design of MONAI's classes, not by choice here (the row's notes say so):
* blending: the merger averages with constant weights (no importance map); ours blends as
  `configs/inference.yaml` says (gaussian by default);
* windows: the splitter pads the image at the bottom/right to fit whole steps of
  tile * (1 - overlap) (OpenSlide reads black there), where ours (like `SlidingWindowInferer`)
  shifts the last window inside the image; the layouts coincide when (side - tile) is a multiple
  of the step (e.g. 1024 or 16384 with tile 256, overlap 0.25).
Everything else is MONAI's defaults (zarr's guessed chunks and codec, no prefetch buffer).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch


def window_starts(size: int, tile: int, overlap: float) -> list[int]:
    """Window starts of MONAI's `SlidingWindowSplitter` along one axis (end padded to whole steps)."""
    step = round(tile - tile * overlap)
    padded = size + (tile - size) % step
    return list(range(0, padded - tile + 1, step))


def _label_tiles(merged: Any, tile: int) -> Iterator[np.ndarray]:
    """Tiles (row-major) of the argmax over channels of the (1, C, H, W) zarr array `merged`, read in
    bands of whole zarr chunk rows (or one tile row) and chunk columns, so memory stays at a few chunks."""
    _, _, h, w = merged.shape
    ch, cw = merged.chunks[2], merged.chunks[3]
    band = ch if ch % tile == 0 else tile
    for y0 in range(0, h, band):
        y1 = min(y0 + band, h)
        labels = np.zeros((y1 - y0, -(-w // tile) * tile), np.uint8)
        for x0 in range(0, w, cw):
            labels[:, x0 : min(x0 + cw, w)] = np.asarray(merged[0, :, y0:y1, x0 : x0 + cw]).argmax(0)
        for ty in range(0, y1 - y0, tile):
            rows = labels[ty : ty + tile]
            if rows.shape[0] < tile:
                rows = np.pad(rows, ((0, tile - rows.shape[0]), (0, 0)))
            for tx in range(0, w, tile):
                yield rows[:, tx : tx + tile]


def run_patch_inferer(
    model: torch.nn.Module,
    image: str | Path,
    out: str | Path,
    workdir: str | Path,
    *,
    tile: int,
    overlap: float,
    batch_size: int,
) -> dict[str, Any]:
    """Segment `image` with MONAI's streaming path into the tiled BigTIFF `out` (uint8 labels),
    its zarr stores under `workdir` (removed at the end); returns facts for the row's notes."""
    import tifffile
    from monai.inferers import PatchInferer, WSISlidingWindowSplitter, ZarrAvgMerger

    workdir = Path(workdir)
    stores = {k: workdir / f"monai_{k}.zarr" for k in ("merged", "values", "counts")}
    try:
        splitter = WSISlidingWindowSplitter(patch_size=tile, overlap=overlap, reader="OpenSlide")
        inferer = PatchInferer(
            splitter=splitter,
            merger_cls=ZarrAvgMerger,
            batch_size=batch_size,
            preprocessing=lambda x: x.float().div_(255),
            store=str(stores["merged"]),
            value_store=str(stores["values"]),
            count_store=str(stores["counts"]),
        )
        with torch.inference_mode():
            merged = inferer(str(image), model)  # zarr array (1, C, H, W) of averaged logits
        tifffile.imwrite(
            out,
            _label_tiles(merged, tile),
            shape=merged.shape[2:],
            dtype=np.uint8,
            tile=(tile, tile),
            bigtiff=True,
            photometric="minisblack",
            compression="zlib",
            metadata=None,
        )
        return {"shape": tuple(merged.shape), "chunks": tuple(merged.chunks)}
    finally:
        for path in stores.values():
            shutil.rmtree(path, ignore_errors=True)


def worker(argv: Sequence[str]) -> None:
    """One measurement in this (fresh) process, as `python -m benchmarks.infer_worker monai-streaming
    ...`; prints a JSON line like the other measurements of `benchmarks.infer_worker`."""
    p = argparse.ArgumentParser(prog="benchmarks.infer_worker monai-streaming")
    for name in ("--checkpoint", "--image", "--out", "--blend"):
        p.add_argument(name, required=True)
    p.add_argument("--tile", type=int, required=True)
    p.add_argument("--overlap", type=float, required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)

    import monai.inferers  # noqa: F401  (imports before the baseline, as in the other workers)
    import openslide  # noqa: F401
    import psutil
    import tifffile
    import zarr  # noqa: F401

    from benchmarks.timing import Timed
    from pipeline.inference.engine.memory import peak_rss_mb, reset_peak_rss
    from pipeline.networks import load_model

    if a.threads:
        torch.set_num_threads(a.threads)
    proc = psutil.Process()
    model = Timed(load_model(a.checkpoint))
    with torch.inference_mode():
        model(torch.zeros(a.batch_size, 3, a.tile, a.tile))  # warm-up
    model.seconds = 0.0
    out = Path(a.out) / f"bench_monai_streaming_{Path(a.image).stem}_seg.tif"
    baseline = proc.memory_info().rss / 2**20
    reset_peak_rss()
    cpu0 = sum(proc.cpu_times()[:2])
    start = time.perf_counter()
    facts = run_patch_inferer(model, a.image, out, a.out, tile=a.tile, overlap=a.overlap, batch_size=a.batch_size)
    seconds = time.perf_counter() - start
    cpu, peak = sum(proc.cpu_times()[:2]) - cpu0, peak_rss_mb()
    with tifffile.TiffFile(out) as tif:
        h, w = tif.pages[0].shape[:2]
    out.unlink()
    ys, xs = (window_starts(n, a.tile, a.overlap) for n in (h, w))
    padded = (ys[-1] + a.tile - h, xs[-1] + a.tile - w)
    notes = (
        f"OpenSlide reader, {len(ys) * len(xs)} windows, blending constant (merger average"
        f"{'' if a.blend == 'constant' else f'; ours {a.blend}'}), "
        + (f"image padded by {padded[0]}x{padded[1]} px (ours shifts its last windows inside), " if any(padded) else "")
        + f"zarr chunks {facts['chunks'][2:]}; network {100 * model.seconds / seconds:.0f}% of the wall time; "
        "end to end: read, infer, merge on disk, labels to a tiled TIFF"
    )
    print(
        json.dumps(
            {
                "seconds": seconds,
                "mpx_s": h * w / 1e6 / seconds,
                "cpu_s": cpu,
                "peak_rss_mb": peak,
                "baseline_mb": baseline,
                "notes": notes,
                "net_seconds": model.seconds,
            }
        )
    )
