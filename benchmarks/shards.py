"""`segpipe bench shards`: `segpipe infer` as 2 processes x 1 thread against 1 process x 2 threads.

N synthetic RGB images of S² (`synthetic_image`, tiled BigTIFFs) and a seeded random same-padding
U-Net of a preset of `configs/networks.yaml` (RGB -> 2 classes) are written to a work directory;
then `segpipe infer` runs on all the images, each layout in its own fresh command, timed end to end
(wall clock, interpreter start, imports and model load included, as a user sees it):

- 1 process x 2 threads (`threads: 2`),
- `torchrun --standalone --nproc_per_node 2` x 1 thread each (`threads: 1`; the inputs shared by
  `pipeline.inference.run.shards`),
- 1 process x 1 thread (reference for the speed-up; `--skip-single-thread` drops it).

The thread counts go in through a copy of the configs with `threads` set (`SEGPIPE_CONFIG_DIR`);
everything else is the shipped `configs/inference.yaml`. Prints Mpx/s per layout and the scaling
efficiency: throughput(2 x 1) / throughput(1 x 2), and the speed-up of 2 x 1 over 1 x 1 (ideal 2).
Checks that every layout wrote every output with the same pixels. Not a test: the CPU may be shared.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

LAYOUTS: dict[str, tuple[int, int]] = {
    "1 process x 2 threads": (1, 2),
    "2 processes x 1 thread": (2, 1),
    "1 process x 1 thread": (1, 1),
}
"""Each measured layout: (processes, torch threads per process)."""
_IMAGE_LINE = re.compile(r"^(?:\[rank (\d+)/\d+\] )?\S.*: \d+x\d+x\d+ .*?, ([\d.]+) s, [\d.]+ Mpx/s")
"""An image's summary line of `segpipe infer` (rank prefix under torchrun) and its seconds."""


def _checkpoint(root: Path, preset: str) -> tuple[Path, dict[str, Any]]:
    """A seeded random same-padding U-Net of `preset` (RGB in, 2 classes) as a checkpoint."""
    import torch

    from pipeline.config import config_path, load_config
    from pipeline.networks import build_network, network_config, save_checkpoint

    config = network_config(load_config("networks"), "unet", preset, str(config_path("networks")))
    torch.manual_seed(0)
    net = build_network("unet", 3, 2, **{**config, "padding": "same"})
    return save_checkpoint(net, root / "unet_same.pt"), config


def _config_dir(root: Path, threads: int) -> Path:
    """A copy of the configs directory with `threads` set in inference.yaml."""
    import yaml

    from pipeline.config import config_dir, load_config

    target = root / f"configs-threads-{threads}"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(config_dir(), target)
    cfg = load_config("inference")
    cfg["threads"] = threads
    (target / "inference.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return target


def _command(processes: int, model: Path, pattern: str, output: Path) -> list[str]:
    infer = [
        "-m",
        "pipeline",
        "infer",
        "--model",
        str(model),
        "--input",
        pattern,
        "--output",
        str(output),
        "--no-progress",
    ]
    if processes == 1:
        return [sys.executable, *infer]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), *infer]


def _pixels_digest(path: Path) -> str:
    import tifffile

    return hashlib.sha256(tifffile.imread(path).tobytes()).hexdigest()


def _run_layout(
    name: str, processes: int, threads: int, root: Path, model: Path, inputs: list[Path], timeout: float | None
) -> dict[str, Any]:
    """One `segpipe infer` command over every input; wall seconds and the outputs' pixel digests."""
    from pipeline.inference.writers.formats import output_paths

    output = root / f"out-{processes}x{threads}"
    if output.exists():
        shutil.rmtree(output)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env["SEGPIPE_CONFIG_DIR"] = str(_config_dir(root, threads))
    env["OMP_NUM_THREADS"] = str(threads)
    cmd = _command(processes, model, str(inputs[0].parent / "*.tif"), output)
    row: dict[str, Any] = {"layout": name, "processes": processes, "threads": threads}
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**row, "error": f"timed out after {timeout:.0f} s"}
    row["seconds"] = time.perf_counter() - start
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {**row, "error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    segs = [output_paths(p, output)[0] for p in inputs]
    missing = [p.name for p in segs if not p.is_file()]
    if missing:
        return {**row, "error": f"outputs missing: {', '.join(missing)}"}
    row["digests"] = [_pixels_digest(p) for p in segs]
    row["busy_seconds"] = _busy_seconds(proc.stdout, len(inputs))
    shutil.rmtree(output)
    return row


def _busy_seconds(stdout: str, images: int) -> float | None:
    """The images' own seconds (no startup, imports, model load) of the busiest process, from the
    summary lines; None unless every image has its line."""
    busy: dict[int, float] = {}
    lines = [m for m in map(_IMAGE_LINE.match, stdout.splitlines()) if m]
    for m in lines:
        rank = int(m.group(1) or 0)
        busy[rank] = busy.get(rank, 0.0) + float(m.group(2))
    return max(busy.values()) if len(lines) == images else None


def run_benchmark(
    images: int = 8,
    size: int = 4096,
    *,
    preset: str = "default",
    workdir: str | os.PathLike[str] | None = None,
    single_thread: bool = True,
    timeout: float | None = None,
) -> list[dict[str, Any]]:
    """Run the layouts and print the table and efficiencies; returns one dict per layout."""
    from benchmarks.inference import synthetic_image
    from pipeline.stages.infer import config_settings

    if images < 1 or size < 1:
        raise ValueError(f"images and size must be >= 1, got {images} and {size}")
    tmp = None if workdir is not None else tempfile.TemporaryDirectory(prefix="segpipe-bench-shards-")
    root = Path(workdir) if workdir is not None else Path(tmp.name)  # type: ignore[union-attr]
    results: list[dict[str, Any]] = []
    try:
        (root / "in").mkdir(parents=True, exist_ok=True)
        model, config = _checkpoint(root, preset)
        inputs = []
        start = time.perf_counter()
        for i in range(images):
            path = root / "in" / f"synthetic_{size}_{i}.tif"
            inputs.append(path if path.exists() else synthetic_image(path, size, seed=i))
        for stale in set((root / "in").glob("*.tif")) - set(inputs):
            stale.unlink()  # a previous run's other images would be inputs too
        megapixels = images * size * size / 1e6
        s = config_settings()
        print(
            f"segpipe bench shards: {images} synthetic RGB images of {size}² ({megapixels:.1f} Mpx, written in "
            f"{time.perf_counter() - start:.0f} s), U-Net preset {preset!r} {config} -> 2 classes; tile {s.tile}, "
            f"overlap {s.overlap}, {s.precision}, {s.backend}; {os.cpu_count()} CPUs (shared: timings vary); "
            f"wall clock of each `segpipe infer` command, startup included; workdir {root}",
            flush=True,
        )
        for name, (processes, threads) in LAYOUTS.items():
            if processes == threads == 1 and not single_thread:
                continue
            row = _run_layout(name, processes, threads, root, model, inputs, timeout)
            if "seconds" in row and "error" not in row:
                row["mpx_s"] = megapixels / row["seconds"]
                busy = row.get("busy_seconds")
                alone = "" if not busy else f"   images alone {busy:7.1f} s  {megapixels / busy:7.3f} Mpx/s"
                print(f"  {name:<24} {row['seconds']:8.1f} s  {row['mpx_s']:7.3f} Mpx/s{alone}", flush=True)
            else:
                print(f"  {name:<24} {row['error']}", flush=True)
            results.append(row)
        _print_efficiency(results)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return results


def _print_efficiency(results: list[dict[str, Any]]) -> None:
    rows = {(r["processes"], r["threads"]): r for r in results if "mpx_s" in r}
    if len(rows) > 1:
        same = len({tuple(r["digests"]) for r in rows.values()}) == 1
        print(f"  outputs identical across layouts: {'yes' if same else 'NO'}", flush=True)
    for a, b, what in (
        ((2, 1), (1, 2), "scaling efficiency"),
        ((2, 1), (1, 1), "speed-up"),
        ((1, 2), (1, 1), "speed-up"),
    ):
        if a not in rows or b not in rows:
            continue
        ratios = [rows[a]["mpx_s"] / rows[b]["mpx_s"]]
        if rows[a].get("busy_seconds") and rows[b].get("busy_seconds"):
            ratios.append(rows[b]["busy_seconds"] / rows[a]["busy_seconds"])
        said = " (end to end)" + (f", {ratios[1]:.2f} (images alone)" if len(ratios) > 1 else "")
        ideal = "" if b == (1, 2) else f"; ideal 2.00, efficiency {50 * ratios[0]:.0f} %"
        print(
            f"  {what}, {a[0]} x {a[1]} / {b[0]} x {b[1]} (processes x threads): {ratios[0]:.2f}{said}{ideal}",
            flush=True,
        )


__all__ = ["LAYOUTS", "run_benchmark"]
