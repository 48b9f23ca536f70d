"""One measurement of `segpipe bench infer` (`benchmarks.inference`) in this fresh process, so
that its peak RSS is its own: `ours` (predict_file, torch or ONNX Runtime), `monai` (the in-memory
SlidingWindowInferer), `monai-streaming` (`benchmarks.monai_streaming`) or `peak` (the conv
probe, `benchmarks.peak`). Prints one JSON line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from benchmarks.inference import FORMATS


def main(argv: Sequence[str]) -> None:
    """One measurement in this (fresh) process; prints a JSON line."""
    p = argparse.ArgumentParser(prog="benchmarks.infer_worker")
    if argv[0] == "peak":
        _peak_worker(argv[1:])
        return
    if argv[0] == "monai-streaming":
        from benchmarks.monai_streaming import worker as streaming_worker

        streaming_worker(argv[1:])
        return
    p.add_argument("kind", choices=("ours", "monai"))
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tile", type=int, required=True)
    p.add_argument("--overlap", type=float, required=True)
    p.add_argument("--blend", required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--onnxruntime", action="store_true", help="run CHECKPOINT's .onnx beside it on ONNX Runtime")
    p.add_argument("--format", default="tiff", choices=FORMATS, help="our output format")
    a = p.parse_args(argv)

    import psutil

    from pipeline.inference.engine.memory import peak_rss_mb, reset_peak_rss
    from pipeline.networks import load_model

    if a.threads:
        torch.set_num_threads(a.threads)
    proc = psutil.Process()
    if a.kind == "ours":
        import shutil

        from benchmarks.timing import Timed
        from pipeline.inference import inference_network, load_settings, predict_file
        from pipeline.inference.writers.formats import output_paths

        settings = load_settings(
            None,
            tile=a.tile,
            overlap=a.overlap,
            blend=a.blend,
            batch_size=a.batch_size,
            tta=(),
            intensity="scale",
            device="cpu",
            compile=a.compile,
            threads=a.threads,
            precision=a.precision,
        )
        model = Path(a.checkpoint).with_suffix(".onnx") if a.onnxruntime else a.checkpoint
        net = inference_network(model, settings)
        tile_in = net.input_size(net.valid_output_size(a.tile)) if net.padding == "valid" else a.tile
        net(torch.zeros(a.batch_size, 3, tile_in, tile_in))  # warm-up (and compilation, if any)
        net.module = Timed(net.module)
        baseline = proc.memory_info().rss / 2**20
        reset_peak_rss()
        cpu0 = sum(proc.cpu_times()[:2])
        out = output_paths(f"bench_{Path(a.checkpoint).stem}_{Path(a.image).stem}.tif", a.out, a.format)[0]
        report = predict_file(net, a.image, out, settings=settings, output_format=a.format)
        cpu, peak = sum(proc.cpu_times()[:2]) - cpu0, peak_rss_mb()
        if out.is_dir():  # ome-zarr
            shutil.rmtree(out)
        else:
            out.unlink()
        # FLOPs counted by torch's flop counter after the measurement: its tracing holds ~60 MB that is
        # no part of inference (ONNX Runtime's rows: torch's network of the same checkpoint counts them)
        counted = inference_network(a.checkpoint, settings) if a.onnxruntime else net
        net_seconds = net.module.seconds
        flops = _window_flops(counted, tile_in, a)
        # the machine's peak right after the row, so a shared machine's load of the moment weighs on both
        from benchmarks.peak import conv_peak

        row_peak = conv_peak(a.precision)
        seconds, pixels = report.seconds, report.megapixels
        notes = f"{report.plan}; {', '.join(report.notes)}"
        extra = {"precision": a.precision, "net_seconds": net_seconds, "peak": row_peak, **flops}
    else:
        import tifffile
        from monai.inferers import SlidingWindowInferer

        model = load_model(a.checkpoint)
        with torch.inference_mode():
            model(torch.zeros(a.batch_size, 3, a.tile, a.tile))  # warm-up
        baseline = proc.memory_info().rss / 2**20
        reset_peak_rss()
        image = tifffile.imread(a.image)  # (H, W, 3) uint8
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float().div_(255)
        inferer = SlidingWindowInferer(
            roi_size=a.tile, sw_batch_size=a.batch_size, overlap=a.overlap, mode=a.blend, sigma_scale=0.125
        )
        cpu0 = sum(proc.cpu_times()[:2])
        start = time.perf_counter()
        with torch.inference_mode():
            logits = inferer(x, model)
            labels = logits.argmax(1).to(torch.uint8)
        seconds = time.perf_counter() - start
        cpu, peak = sum(proc.cpu_times()[:2]) - cpu0, peak_rss_mb()
        pixels = labels.numel() / 1e6
        notes = "inferer + argmax timed (image load not)"
        extra = {}
    print(
        json.dumps(
            {
                "seconds": seconds,
                "mpx_s": pixels / seconds,
                "cpu_s": cpu,
                "peak_rss_mb": peak,
                "baseline_mb": baseline,
                "notes": notes,
                **extra,
            }
        )
    )


def _window_flops(net: Any, tile_in: int, a: argparse.Namespace) -> dict[str, float]:
    """GFLOP of all the windows of the image (one window counted x the plan's windows) and the
    windows' redundancy (window output pixels / image pixels)."""
    import tifffile

    from benchmarks.peak import count_flops
    from pipeline.inference.engine.tiling import plan_tiles

    with tifffile.TiffFile(a.image) as tif:
        h, w = tif.pages[0].shape[:2]
    plan = plan_tiles(net, h, w, a.tile, a.overlap)
    per_window = count_flops(lambda: net(torch.zeros(1, 3, tile_in, tile_in)))
    return {"gflop": per_window * plan.n_windows / 1e9, "redundancy": plan.n_windows * plan.out_tile**2 / (h * w)}


def _peak_worker(argv: Sequence[str]) -> None:
    """The conv peak of each precision in `argv` (optionally `--threads N`); prints a JSON line."""
    from benchmarks.peak import conv_peak, peak_line

    args = list(argv)
    if "--threads" in args:
        i = args.index("--threads")
        torch.set_num_threads(int(args[i + 1]))
        del args[i : i + 2]
    peaks = {p: conv_peak(p) for p in args}
    print(json.dumps({**peaks, "line": peak_line(peaks)}))


__all__ = ["main"]


if __name__ == "__main__":
    main(sys.argv[1:])
