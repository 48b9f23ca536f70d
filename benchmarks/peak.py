"""The yardstick of the benchmarks: this machine's convolution peak and FLOP counts (issue 15).

`conv_peak` times a probe convolution (3x3, 256 -> 256 channels, 64 x 64, batch 4, channels-last:
large enough for oneDNN's best kernels) in a precision, in the run that measures the rest, so a
busy machine lowers both alike. `count_flops` counts what a call computes with torch's flop counter
(`torch.utils.flop_counter.FlopCounterMode`: 2 FLOPs per multiply-add of convolutions and matrix
products; element-wise work is not counted), so every figure can be given as achieved GFLOP/s and
as a fraction of the peak of its precision.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.networks.precision import autocast

PROBE = {"channels": 256, "side": 64, "batch": 4}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of `fn` (forward and, if `fn` runs it, backward)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def conv_peak(precision: str, repeats: int = 5, calls: int = 4) -> float:
    """GFLOP/s of the probe convolution in `precision` on the CPU: the best of `repeats` rounds of
    `calls` calls each, after a warm-up."""
    c, s, n = PROBE["channels"], PROBE["side"], PROBE["batch"]
    conv = torch.nn.Conv2d(c, c, 3, padding=1, bias=False).to(memory_format=torch.channels_last).eval()
    x = torch.randn(n, c, s, s).contiguous(memory_format=torch.channels_last)
    device = torch.device("cpu")

    def run() -> None:
        with torch.inference_mode(), autocast(precision, device):
            conv(x)

    flops = count_flops(run)
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            run()
        best = min(best, (time.perf_counter() - start) / calls)
    return flops / best / 1e9


def peak_line(peaks: dict[str, float]) -> str:
    """One line naming the probe and its GFLOP/s per precision."""
    c, s, n = PROBE["channels"], PROBE["side"], PROBE["batch"]
    figures = ", ".join(f"{p} {g:.0f} GFLOP/s" for p, g in peaks.items())
    return (
        f"conv peak (3x3 conv {c}->{c}, {s}x{s}, batch {n}, channels-last, {torch.get_num_threads()} "
        f"threads, best of 5): {figures}"
    )


__all__ = ["PROBE", "conv_peak", "count_flops", "peak_line"]
