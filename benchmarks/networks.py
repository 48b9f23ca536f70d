"""`segpipe bench networks`: size, speed and memory of each network on a fixed input, this CPU.

For every network: parameters, float32 size, forward time (eval(), inference mode) and
forward+backward time (train(), loss = sum of the means of all outputs), each the median of
`repeats` runs after one warm-up run, and the peak memory of that warm-up run. Peak memory is the
rise of the process's peak resident set size (Linux VmHWM, reset through /proc/self/clear_refs)
over the resident size after building the network and input; every (network, phase) runs in a
fresh spawned process so that allocator caches of one measurement do not hide the next.

MONAI's ready networks with the same widths run side by side (BasicUNet for the same-padded
64-wide U-Net, BasicUNetPlusPlus for UNet++ 32-wide) and the ratio ours / MONAI is printed.
Then UNet++ L1..L4 ("fast" mode, pruned from one network) inference times and conv calls.
Not a test: numbers depend on the (shared) machine.
"""

from __future__ import annotations

import gc
import re
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable

import psutil
import torch
from torch import nn

from pipeline.errors import SegpipeError

_PROC_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass(frozen=True)
class Case:
    """One benchmarked network: `kind` "segpipe" (registry name) or "monai" (a MONAI net)."""

    label: str
    kind: str
    name: str
    config: dict[str, Any] = field(default_factory=dict)
    compare_to: str | None = None  # label of the MONAI case measured side by side


def default_cases() -> list[Case]:
    """The networks of the table: papers' settings, MONAI twins, and the CPU defaults."""
    unet_twin = dict(padding="same", base_width=64, batch_norm=True, dropout=0.0)
    unetpp_twin = dict(base_width=32, batch_norm=True, dropout=0.0, deep_supervision=True)
    return [
        Case("unet paper (valid, 64)", "segpipe", "unet", {}),
        Case("unet same 64 +BN", "segpipe", "unet", unet_twin, compare_to="monai BasicUNet 64"),
        Case("monai BasicUNet 64", "monai", "BasicUNet", {"features": (64, 128, 256, 512, 1024, 64)}),
        Case(
            "unet default (same, 16)",
            "segpipe",
            "unet",
            dict(padding="same", base_width=16, batch_norm=True, dropout=0.0),
        ),
        Case("unetpp paper (32)", "segpipe", "unetpp", {}),
        Case("unetpp 32 +BN", "segpipe", "unetpp", unetpp_twin, compare_to="monai BasicUNet++ 32"),
        Case(
            "monai BasicUNet++ 32",
            "monai",
            "BasicUNetPlusPlus",
            {"features": (32, 64, 128, 256, 512, 32), "deep_supervision": True},
        ),
        Case("unetpp default (16)", "segpipe", "unetpp", dict(base_width=16, batch_norm=True, dropout=0.0)),
        Case("u2net", "segpipe", "u2net"),
        Case("u2netp", "segpipe", "u2netp"),
    ]


def build_case(case: Case, in_channels: int, out_channels: int) -> nn.Module:
    """The network of `case` (MONAI nets: 2D, ReLU, batch norm, no dropout, transposed conv)."""
    if case.kind == "segpipe":
        from pipeline.networks import build_network

        return build_network(case.name, in_channels, out_channels, **case.config)
    from monai.networks import nets

    return getattr(nets, case.name)(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=out_channels,
        act="relu",
        norm="batch",
        dropout=0.0,
        upsample="deconv",
        **case.config,
    )


def input_size_for(model: nn.Module, size: int) -> int:
    """The input size giving an output of at least `size` (MONAI nets: `size`)."""
    if hasattr(model, "valid_output_size"):
        return model.input_size(model.valid_output_size(size))
    return size


def _flatten(outputs: Any) -> list[torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    return [t for item in outputs for t in _flatten(item)]


def _rss_kib() -> int:
    return psutil.Process().memory_info().rss // 1024


def _peak_rss_kib() -> int:
    match = re.search(r"VmHWM:\s+(\d+) kB", _PROC_STATUS.read_text())
    if match is None:
        raise SegpipeError(f"{_PROC_STATUS}: no VmHWM line (peak memory needs Linux /proc)")
    return int(match.group(1))


def _reset_peak_rss() -> None:
    try:
        _CLEAR_REFS.write_text("5")
    except OSError as exc:
        raise SegpipeError(f"{_CLEAR_REFS}: cannot reset the peak RSS ({exc})") from exc


def measure(case: Case, phase: str, size: int, repeats: int, threads: int, channels: tuple[int, int]) -> dict[str, Any]:
    """Time and peak memory of one phase ("forward" or "backward" = forward+backward).

    Meant to run in a fresh process. Returns params, input/output sizes, `seconds` (median),
    `peak_mib` (peak RSS rise during the first run).
    """
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_case(case, *channels)
    side = input_size_for(model, size)
    x = torch.randn(1, channels[0], side, side)

    def forward() -> list[torch.Tensor]:
        with torch.inference_mode():
            return _flatten(model(x))

    def forward_backward() -> list[torch.Tensor]:
        outputs = _flatten(model(x))
        sum(out.mean() for out in outputs).backward()
        model.zero_grad(set_to_none=True)
        return outputs

    model.train(phase == "backward")
    run: Callable[[], list[torch.Tensor]] = forward_backward if phase == "backward" else forward
    gc.collect()
    _reset_peak_rss()
    baseline = _rss_kib()
    outputs = run()
    peak_mib = (_peak_rss_kib() - baseline) / 1024
    out_side = outputs[0].shape[-1]
    del outputs
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    params = sum(p.numel() for p in model.parameters())
    return {
        "params": params,
        "mb": params * 4 / 1e6,
        "input": side,
        "output": out_side,
        "seconds": statistics.median(times),
        "peak_mib": peak_mib,
    }


def count_conv_calls(model: nn.Module, x: torch.Tensor) -> int:
    """Number of Conv2d / ConvTranspose2d modules called by one forward of `model` on `x`."""
    calls = 0

    def hook(*_: Any) -> None:
        nonlocal calls
        calls += 1

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def measure_pruning(size: int, repeats: int, threads: int, channels: tuple[int, int]) -> list[dict[str, Any]]:
    """UNet++ (paper widths) L1..L4 in "fast" mode, pruned from one network: time and conv calls."""
    from pipeline.networks import build_network

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    full = build_network("unetpp", *channels).eval()
    x = torch.randn(1, channels[0], size, size)
    rows = []
    for level in range(1, full.prune_level + 1):
        model = full.pruned(level, mode="fast").eval()
        convs = count_conv_calls(model, x)  # also the warm-up run
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            with torch.inference_mode():
                model(x)
            times.append(time.perf_counter() - start)
        rows.append(
            {
                "level": level,
                "params": sum(p.numel() for p in model.parameters()),
                "convs": convs,
                "seconds": statistics.median(times),
            }
        )
    return rows


def _in_fresh_process(fn: Callable[..., Any], *args: Any) -> Any:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def run_benchmark(
    size: int = 256,
    repeats: int = 3,
    threads: int = 1,
    channels: tuple[int, int] = (1, 2),
    cases: list[Case] | None = None,
    fresh_process: bool = True,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure every case and the UNet++ pruning levels; print the tables with `echo`."""
    if size < 64 or repeats < 1 or threads < 1:  # below 64, U2-Net's deepest maps are 1x1 and
        # batch norm cannot train on one value per channel
        raise SegpipeError("bench networks: need --size >= 64, --repeats >= 1, --threads >= 1")
    cases = default_cases() if cases is None else cases
    call = _in_fresh_process if fresh_process else (lambda fn, *a: fn(*a))
    echo(
        f"# segpipe bench networks: batch 1, {channels[0]} -> {channels[1]} channels, output >= "
        f"{size}x{size}, {threads} thread(s), median of {repeats} runs after 1 warm-up, torch "
        f"{torch.__version__}, {psutil.cpu_count()} CPUs (shared)"
    )
    echo("# peak MiB: rise of peak RSS (VmHWM) over the post-build RSS during the warm-up run,")
    echo("#           fresh process per measurement; fwd = eval() + inference_mode,")
    echo("#           fwd+bwd = train(), backward of the sum of all outputs' means")
    results: dict[str, dict[str, Any]] = {}
    for case in cases:
        fwd = call(measure, case, "forward", size, repeats, threads, channels)
        bwd = call(measure, case, "backward", size, repeats, threads, channels)
        results[case.label] = {"forward": fwd, "backward": bwd}
    header = (
        f"| {'network':<24} | {'params':>11} | {'MB':>6} | {'in->out':>9} | {'fwd s':>6} | "
        f"{'fwd MiB':>7} | {'fwd+bwd s':>9} | {'f+b MiB':>7} | {'time vs MONAI (fwd, f+b)':>24} |"
    )
    echo(header)
    echo("|" + "|".join("-" * (len(cell) + 0) for cell in header.split("|")[1:-1]) + "|")
    for case in cases:
        fwd, bwd = results[case.label]["forward"], results[case.label]["backward"]
        ratio = ""
        if case.compare_to is not None and case.compare_to in results:
            ref = results[case.compare_to]
            ratio = (
                f"{fwd['seconds'] / ref['forward']['seconds']:.2f}x, {bwd['seconds'] / ref['backward']['seconds']:.2f}x"
            )
        echo(
            f"| {case.label:<24} | {fwd['params']:>11,} | {fwd['mb']:>6.1f} | "
            f"{str(fwd['input']) + '->' + str(fwd['output']):>9} | {fwd['seconds']:>6.3f} | "
            f"{fwd['peak_mib']:>7.0f} | {bwd['seconds']:>9.3f} | {bwd['peak_mib']:>7.0f} | "
            f"{ratio:>24} |"
        )
    pruning = call(measure_pruning, size, repeats, threads, channels)
    echo("")
    echo(f"# UNet++ (paper widths 32..512) inference, mode fast, input {size}x{size}, pruned from one network")
    echo(f"| {'level':<5} | {'params':>11} | {'conv calls':>10} | {'fwd s':>6} | {'vs L4':>6} |")
    echo(f"|{'-' * 7}|{'-' * 13}|{'-' * 12}|{'-' * 8}|{'-' * 8}|")
    last = pruning[-1]["seconds"]
    for row in pruning:
        echo(
            f"| L{row['level']:<4} | {row['params']:>11,} | {row['convs']:>10} | "
            f"{row['seconds']:>6.3f} | {row['seconds'] / last:>5.2f}x |"
        )
    return {"networks": results, "pruning": pruning}
