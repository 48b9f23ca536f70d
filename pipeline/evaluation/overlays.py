"""Overlay PNGs of a prediction against the reference: TP green, FP red, FN blue."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data.io import atomic_path

OVERLAY_COLOURS = {"tp": (0, 200, 0), "fp": (230, 0, 0), "fn": (0, 90, 255)}
OVERLAY_ALPHA = 0.6


def render_rgb(image: np.ndarray) -> np.ndarray:
    """A stored image (C, H, W) as RGB uint8 (H, W, 3): three channels as RGB, otherwise the first
    as gray; uint8 as stored, other types stretched from their 0.5..99.5 percentiles."""
    a = image[:3] if image.shape[0] == 3 else image[:1]
    if a.dtype != np.uint8:
        a = a.astype(np.float64)
        lo, hi = np.percentile(a, (0.5, 99.5))
        a = (np.clip((a - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0) * 255).round().astype(np.uint8)
    rgb = np.repeat(a, 3, axis=0) if a.shape[0] == 1 else a
    return np.ascontiguousarray(rgb.transpose(1, 2, 0))


def overlay(image: np.ndarray, pred: np.ndarray, label: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """RGB uint8 (H, W, 3): TP green, FP red, FN blue blended over `render_rgb(image)`; pred, label,
    mask (H, W) bool; nothing is coloured outside the mask."""
    rgb = render_rgb(image).astype(np.float32)
    valid = np.ones(label.shape, bool) if mask is None else mask
    for where, colour in ((pred & label, "tp"), (pred & ~label, "fp"), (~pred & label, "fn")):
        sel = where & valid
        rgb[sel] = (1 - OVERLAY_ALPHA) * rgb[sel] + OVERLAY_ALPHA * np.array(OVERLAY_COLOURS[colour], np.float32)
    return rgb.round().astype(np.uint8)


def write_png(path: Path, rgb: np.ndarray) -> None:
    """An RGB uint8 image as PNG, atomically."""
    import imageio.v3 as iio

    with atomic_path(path) as tmp:
        iio.imwrite(tmp, rgb, extension=".png")
