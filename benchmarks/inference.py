"""`segpipe bench infer`: streamed sliding-window inference against MONAI's, side by side.

For each image side: a synthetic RGB uint8 image is written to disk as a tiled BigTIFF (streamed,
never whole in memory), then each measurement runs in its own subprocess so that peak RSS
(`ru_maxrss`) belongs to it alone:

(a) segpipe `predict_file`, disk to disk (read, decode, infer, blend, write), same-padding U-Net;
(b) MONAI `SlidingWindowInferer` on the image loaded in memory (timed: the inferer call and the
    argmax to labels; loading the image is not timed), the same network (not optimised), tile,
    overlap, blending and batch size; skipped with the reason when its buffers would not fit in
    the memory available now (it holds the image, its float copy, the float output and count map);
(c) segpipe `predict_file` with the valid-padding U-Net of the same preset: overlap-tile throughput;
(d) MONAI's streaming path, disk to disk: `PatchInferer` + `WSISlidingWindowSplitter` (OpenSlide)
    + `ZarrAvgMerger`, labels written to a tiled TIFF (`benchmarks.monai_streaming`).

(a) and (c) run in each precision asked for (default fp32 and bf16), MONAI in fp32, and (unless
skipped) once more on ONNX Runtime (the network's `segpipe export`, fp32); (a) writes each output
format asked for (default `tiff`). Prints Mpx/s, peak RSS (and RSS above the process's baseline
after imports and model load) and the ratios ours / MONAI, ours / MONAI streaming (every backend
and format of (a)) and onnxruntime / torch fp32; and against the machine's limit (`benchmarks.peak`: the probe
runs at the start and again in each row's worker right after its measurement, so the load of a
shared machine at that moment weighs on both): the FLOPs of every window (torch's flop counter on
one window x the windows of the plan) per wall second as GFLOP/s and as a fraction of the conv peak of that
precision, the share of the wall time spent in the network's forward (the rest: reading,
preprocessing, blending, writing), the network's own GFLOP/s, and the windows' redundancy (window
pixels / image pixels: the overlap's cost). The CPU may be shared: numbers vary between runs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

ORT = "onnxruntime"
"""The ONNX Runtime rows' method suffix."""
STREAMING = "MONAI PatchInferer + ZarrAvgMerger (streaming)"
"""MONAI's streaming row (`benchmarks.monai_streaming`)."""
_MONAI_BYTES_PER_PIXEL = 3 + 4 * 3 + 4 * 2 + 4 + 8 + 1
"""MONAI's peak per pixel: uint8 image, float32 input (3 ch), float32 output (2 ch), count map,
int64 argmax, uint8 labels."""
_MONAI_STREAMING_DISK_PER_PIXEL = 2 * 4 + 2 + 2 * 4 + 1
"""Disk of MONAI's streaming path per pixel, uncompressed: zarr sums (2 ch float32), counts (2 ch
uint8), averages (2 ch float32), then the labels."""
FORMATS = ("tiff", "ome-tiff", "ome-zarr")
"""Our output formats `--formats` can measure."""


def synthetic_image(path: Path, size: int, tile: int = 256, seed: int = 0) -> Path:
    """A size x size RGB uint8 tiled BigTIFF (zlib) with smooth structure plus noise, streamed.

    OpenSlide reads it too (as "generic-tiff"), so MONAI's streaming row reads the same file."""
    import tifffile

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:tile, 0:tile].astype(np.float32)

    def tiles() -> Iterator[np.ndarray]:
        for y in range(0, size, tile):
            for x in range(0, size, tile):
                base = 96 + 64 * np.sin((yy + y) / 37.0) * np.cos((xx + x) / 53.0)
                noise = rng.integers(0, 48, (tile, tile, 3))
                yield np.clip(base[..., None] + noise, 0, 255).astype(np.uint8)

    tmp = path.with_suffix(".tmp.tif")
    tifffile.imwrite(
        tmp,
        tiles(),
        shape=(size, size, 3),
        dtype=np.uint8,
        tile=(tile, tile),
        bigtiff=True,
        photometric="rgb",
        compression="zlib",
        metadata=None,
    )
    os.replace(tmp, path)
    return path


def _checkpoints(workdir: Path, config: dict[str, Any], onnx: bool) -> dict[str, Path]:
    """Seeded random U-Nets of `config` (RGB in, 2 classes), same and valid padding, as checkpoints;
    with `onnx` each also exported beside it (unet_PADDING.onnx)."""
    from pipeline.inference import export_onnx
    from pipeline.networks import build_network, save_checkpoint

    out = {}
    for padding in ("same", "valid"):
        torch.manual_seed(0)
        net = build_network("unet", 3, 2, **{**config, "padding": padding})
        out[padding] = save_checkpoint(net, workdir / f"unet_{padding}.pt")
        if onnx:
            export_onnx(out[padding])
    return out


def _run_worker(args: list[str], timeout: float | None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.infer_worker", *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_benchmark(
    sizes: Sequence[int] = (8192,),
    *,
    tile: int | None = None,
    overlap: float | None = None,
    blend: str | None = None,
    batch_size: int | None = None,
    threads: int | None = None,
    preset: str = "default",
    workdir: str | os.PathLike[str] | None = None,
    monai: bool = True,
    valid: bool = True,
    compile: bool = False,
    timeout: float | None = None,
    precisions: Sequence[str] = ("fp32", "bf16"),
    onnxruntime: bool = True,
    monai_streaming: bool = True,
    formats: Sequence[str] = ("tiff",),
) -> list[dict[str, Any]]:
    """Run the measurements and print the table; returns one dict per measurement.

    `formats` (of `FORMATS`): the output formats our same-padding rows write, each its own row.

    tile, overlap, blend and batch_size left at None come from `configs/inference.yaml`.
    """
    import shutil

    from pipeline.errors import SegpipeError

    if not formats or any(fmt not in FORMATS for fmt in formats):
        raise SegpipeError(f"--formats {','.join(formats)}: give a comma-separated list of {', '.join(FORMATS)}")
    if monai_streaming and importlib.util.find_spec("openslide") is None:
        raise SegpipeError(
            "MONAI's streaming row reads through OpenSlide, which is not installed: "
            "pip install -e '.[bench]' (or --skip-monai-streaming)"
        )

    import psutil

    from pipeline.config import config_path, load_config
    from pipeline.inference import load_settings
    from pipeline.networks import network_config
    from pipeline.stages.infer import config_settings

    settings = load_settings(config_settings(), tile=tile, overlap=overlap, blend=blend, batch_size=batch_size)
    config = network_config(load_config("networks"), "unet", preset, str(config_path("networks")))
    tile, overlap, blend, batch_size = settings.tile, settings.overlap, settings.blend, settings.batch_size

    tmp = None if workdir is not None else tempfile.TemporaryDirectory(prefix="segpipe-bench-infer-")
    root = Path(workdir) if workdir is not None else Path(tmp.name)  # type: ignore[union-attr]
    root.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    try:
        ckpts = _checkpoints(root, config, onnxruntime)
        print(
            f"segpipe bench infer: U-Net preset {preset!r} {config}, RGB -> 2 classes; tile {tile}, "
            f"overlap {overlap}, {blend}, batch {batch_size}, torch threads {threads or 'default'}, "
            f"{os.cpu_count()} CPUs (shared: timings vary); workdir {root}",
            flush=True,
        )
        common = ["--tile", str(tile), "--overlap", str(overlap), "--blend", blend, "--batch-size", str(batch_size)] + (
            ["--threads", str(threads)] if threads else []
        )
        peaks = _run_worker(
            ["peak", *dict.fromkeys(("fp32", *precisions)), *(["--threads", str(threads)] if threads else [])], timeout
        )
        print(f"  {peaks.pop('line', peaks.get('error'))}", flush=True)
        for size in sizes:
            image = root / f"synthetic_{size}.tif"
            if not image.exists():
                t0 = time.perf_counter()
                synthetic_image(image, size)
                print(
                    f"  wrote {image.name} ({image.stat().st_size / 2**20:.0f} MB) in {time.perf_counter() - t0:.0f} s",
                    flush=True,
                )
            ours = ["--compile"] if compile else []
            runs: list[tuple[str, list[str] | None, str]] = []
            for fmt in formats:
                to = ["--format", fmt]
                runs += [
                    (
                        f"segpipe predict_file, same{_tag(p, precisions)}{_fmt(fmt)}",
                        ["ours", "--checkpoint", str(ckpts["same"]), "--precision", p, *ours, *to],
                        "",
                    )
                    for p in precisions
                ]
                runs += [
                    (
                        f"segpipe predict_file, same, {ORT}{_fmt(fmt)}",
                        ["ours", "--checkpoint", str(ckpts["same"]), "--onnxruntime", *to],
                        "",
                    )
                ] * onnxruntime
            if monai:
                need = size * size * _MONAI_BYTES_PER_PIXEL / 2**30 + 1.0
                avail = psutil.virtual_memory().available / 2**30
                if need > 0.8 * avail:
                    runs.append(
                        (
                            "MONAI SlidingWindowInferer",
                            None,
                            f"skipped: needs about {need:.1f} GB in memory, {avail:.1f} GB available",
                        )
                    )
                else:
                    runs.append(("MONAI SlidingWindowInferer", ["monai", "--checkpoint", str(ckpts["same"])], ""))
            if monai_streaming:
                need = size * size * _MONAI_STREAMING_DISK_PER_PIXEL / 2**30
                free = shutil.disk_usage(root).free / 2**30
                runs.append(
                    (STREAMING, ["monai-streaming", "--checkpoint", str(ckpts["same"])], "")
                    if need < 0.8 * free
                    else (STREAMING, None, f"skipped: needs up to {need:.1f} GB of disk, {free:.1f} GB free")
                )
            if valid:
                runs += [
                    (
                        f"segpipe predict_file, valid (overlap-tile){_tag(p, precisions)}",
                        ["ours", "--checkpoint", str(ckpts["valid"]), "--precision", p, *ours],
                        "",
                    )
                    for p in precisions
                ]
                runs += [
                    (
                        f"segpipe predict_file, valid (overlap-tile), {ORT}",
                        ["ours", "--checkpoint", str(ckpts["valid"]), "--onnxruntime"],
                        "",
                    )
                ] * onnxruntime
            for name, worker, reason in runs:
                row: dict[str, Any] = {"size": size, "method": name}
                if worker is None:
                    row["error"] = reason
                else:
                    row.update(_run_worker(worker + ["--image", str(image), "--out", str(root)] + common, timeout))
                    _add_peak_fractions(row, peaks)
                results.append(row)
                _print_row(row)
            _print_ratio(size, results, precisions)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return results


def _fmt(output_format: str) -> str:
    """The method's output-format suffix (none for tiff, the default, as before formats were a knob)."""
    return "" if output_format == "tiff" else f", {output_format}"


def _tag(precision: str, precisions: Sequence[str]) -> str:
    """The method's precision suffix (none when only fp32 runs, as before precision was a knob)."""
    return "" if list(precisions) == ["fp32"] else f", {precision}"


def _add_peak_fractions(row: dict[str, Any], peaks: dict[str, Any]) -> None:
    """Achieved GFLOP/s of the whole run and of the network alone, as fractions of the peak probed
    right after the row (the run's first probe for rows without one)."""
    if "error" in row or "gflop" not in row:
        return
    peak = row.get("peak", peaks.get(row["precision"]))
    row["peak"] = peak
    row["gflop_s"] = row["gflop"] / row["seconds"]
    row["net_gflop_s"] = row["gflop"] / row["net_seconds"]
    if isinstance(peak, float):
        row["of_peak"], row["net_of_peak"] = row["gflop_s"] / peak, row["net_gflop_s"] / peak


def _print_row(row: dict[str, Any]) -> None:
    if "error" in row:
        print(f"  {row['size']:>6}  {row['method']:<44} {row['error']}", flush=True)
        return
    print(
        f"  {row['size']:>6}  {row['method']:<44} {row['mpx_s']:7.3f} Mpx/s  {row['seconds']:8.1f} s "
        f"(CPU {row['cpu_s']:.0f} s)  "
        f"peak RSS {row['peak_rss_mb']:7.0f} MB  (+{row['peak_rss_mb'] - row['baseline_mb']:.0f} MB over "
        f"baseline {row['baseline_mb']:.0f})  {row.get('notes', '')}",
        flush=True,
    )
    if "gflop_s" in row:
        print(
            f"  {'':>6}  {'':<44} {row['gflop_s']:7.1f} GFLOP/s = {100 * row.get('of_peak', float('nan')):.0f}% "
            f"of the {row['precision']} peak ({_gflops(row['peak'])} GFLOP/s, probed after the row); "
            f"network {100 * row['net_seconds'] / row['seconds']:.0f}% of the wall "
            f"time at {row['net_gflop_s']:.1f} GFLOP/s ({100 * row.get('net_of_peak', float('nan')):.0f}% of peak); "
            f"windows cover the image {row['redundancy']:.2f}x",
            flush=True,
        )


def _gflops(peak: Any) -> str:
    """A probe's GFLOP/s, or "?" when it failed."""
    return f"{peak:.0f}" if isinstance(peak, float) else "?"


def _print_ratio(size: int, results: list[dict[str, Any]], precisions: Sequence[str]) -> None:
    rows = {r["method"]: r for r in results if r["size"] == size and "error" not in r}
    for kind in ("same", "valid (overlap-tile)"):
        torch_row, ort_row = (
            rows.get(f"segpipe predict_file, {kind}{_tag('fp32', precisions)}"),
            rows.get(f"segpipe predict_file, {kind}, {ORT}"),
        )
        if torch_row and ort_row:
            print(
                f"  {size:>6}  ratio {ORT} / torch fp32, {kind}: throughput "
                f"{ort_row['mpx_s'] / torch_row['mpx_s']:.2f}x, peak RSS "
                f"{ort_row['peak_rss_mb'] / torch_row['peak_rss_mb']:.2f}x",
                flush=True,
            )
    peer = rows.get("MONAI SlidingWindowInferer")
    for precision in precisions:
        ours = rows.get(f"segpipe predict_file, same{_tag(precision, precisions)}")
        if not (ours and peer):
            continue
        above = (ours["peak_rss_mb"] - ours["baseline_mb"]) / max(peer["peak_rss_mb"] - peer["baseline_mb"], 1)
        print(
            f"  {size:>6}  ratio segpipe{_tag(precision, precisions)} / MONAI: throughput "
            f"{ours['mpx_s'] / peer['mpx_s']:.2f}x, "
            f"peak RSS {ours['peak_rss_mb'] / peer['peak_rss_mb']:.2f}x "
            f"(above baseline {above:.2f}x)",
            flush=True,
        )
    peer, same = rows.get(STREAMING), "segpipe predict_file, same"
    for name, ours in rows.items() if peer else ():
        if name.startswith(same):  # every backend and output format of the same-padding network
            speed, rss = ours["mpx_s"] / peer["mpx_s"], ours["peak_rss_mb"] / peer["peak_rss_mb"]
            bar = "met" if speed >= 3 and rss <= 1 else "MISSED"
            print(
                f"  {size:>6}  ratio segpipe{name[len(same) :]} / MONAI streaming: throughput {speed:.2f}x, "
                f"peak RSS {rss:.2f}x (issue 17's bar, >= 3x at <= 1x: {bar})",
                flush=True,
            )


__all__ = ["FORMATS", "ORT", "STREAMING", "run_benchmark", "synthetic_image"]
