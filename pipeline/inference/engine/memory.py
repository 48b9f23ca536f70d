"""Memory of streamed inference: the process's peak RSS (what `segpipe infer` reports and the bench
measures) and the check, before anything is allocated, that an image's windows and bands fit."""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from typing import Callable

from pipeline.errors import SegpipeError
from pipeline.inference.backends.torch_graph import InferenceNetwork
from pipeline.inference.engine.tiling import plan_tiles
from pipeline.inference.readers.images import ImageReader
from pipeline.inference.settings import InferenceSettings

_ACTIVATION_FLOATS = 64
"""A rough count of the network's activations per window pixel, for the memory estimate."""


def peak_rss_mb() -> float:
    """Peak resident memory of this process since start or `reset_peak_rss()`, in MB.

    Linux: VmHWM of /proc/self/status (the high-water mark `reset_peak_rss` restarts; ru_maxrss
    also keeps the peak seen when any thread exited, which cannot be reset). Other POSIX systems
    ru_maxrss; Windows the peak working set (psutil).
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    if sys.platform == "win32":
        import psutil

        return psutil.Process().memory_info().peak_wset / 2**20
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def reset_peak_rss() -> bool:
    """Restart the peak-RSS high-water mark at the current RSS (Linux /proc/self/clear_refs "5").

    Import-time spikes then no longer mask the peak of what follows. False where unsupported.
    """
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, None where the C library has none (musl, macOS, Windows)."""
    if sys.platform == "win32":
        return None
    try:
        trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    except OSError:
        return None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_memory() -> None:
    """Hand the pages of freed heap blocks back to the OS (glibc `malloc_trim(0)`; elsewhere nothing
    to do). Streamed inference calls it once per band of final rows: the per-window buffers of the
    network's runtime (ONNX Runtime's above all) otherwise leave freed holes that stay resident, and
    the peak RSS drifts up with the image's height (16384² on ONNX Runtime: 728 -> 698 MB)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _available_bytes() -> int | None:
    """Memory available to this process (MemAvailable, else physical memory), None if unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(net: InferenceNetwork, reader: ImageReader, settings: InferenceSettings) -> None:
    """SegpipeError, before anything is allocated, if the windows and bands of `settings.tile` for this
    image would need more memory than is available (a rough estimate: inputs, logits, activations)."""
    c, h, w = reader.shape
    plan = plan_tiles(net, h, w, settings.tile, settings.overlap)
    k, t_in, t_out = net.out_channels, plan.in_tile, plan.out_tile
    width = w + plan.cols.pad_before + plan.cols.pad_after
    windows = settings.batch_size * t_in * t_in * 4 * (c + 2 * k + _ACTIVATION_FLOATS)
    bands = 4 * (2 * c * t_in * width + 3 * k * t_out * w + t_in * t_in)
    need, available = windows + bands, _available_bytes()
    if available is not None and need > available:
        raise SegpipeError(
            f"{reader.path}: tile {settings.tile} (windows of {t_in} x {t_in}, batch {settings.batch_size}) on this "
            f"{w} x {h} image needs about {need / 2**30:.1f} GB, more than the {available / 2**30:.1f} GB "
            "available; use a smaller --tile (or batch size)"
        )


__all__ = ["check_memory", "peak_rss_mb", "release_freed_memory", "reset_peak_rss"]
