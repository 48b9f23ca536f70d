"""Overlay PNGs of a prediction against the reference.

Two classes: one panel, TP green, FP red, FN blue. K > 2 classes: two panels side by side, the
reference's classes (left) and the prediction's (right), each foreground class 1..K-1 in its colour
of the Okabe-Ito colour-blind-safe palette (Okabe & Ito 2008; cycled beyond 7 classes), the
background uncoloured."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.files import atomic_path

OVERLAY_COLOURS = {"tp": (0, 200, 0), "fp": (230, 0, 0), "fn": (0, 90, 255)}
OVERLAY_ALPHA = 0.6
CLASS_PALETTE = (
    (230, 159, 0),
    (86, 180, 233),
    (0, 158, 115),
    (240, 228, 66),
    (0, 114, 178),
    (213, 94, 0),
    (204, 121, 167),
)
"""Okabe-Ito orange, sky blue, bluish green, yellow, blue, vermillion, reddish purple: classes 1, 2, ..."""


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


def class_colour(index: int) -> tuple[int, int, int]:
    """The overlay colour of foreground class `index` (1..K-1)."""
    return CLASS_PALETTE[(index - 1) % len(CLASS_PALETTE)]


def class_panel(rgb: np.ndarray, classes: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """`rgb` (H, W, 3) float with every foreground class of the label map `classes` (H, W) blended in
    its colour inside `valid` (H, W) bool."""
    out = rgb.copy()
    for index in np.unique(classes[valid]):
        if index > 0:
            sel = (classes == index) & valid
            out[sel] = (1 - OVERLAY_ALPHA) * out[sel] + OVERLAY_ALPHA * np.array(class_colour(int(index)), np.float32)
    return out


def class_overlay(image: np.ndarray, pred: np.ndarray, label: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """RGB uint8 (H, 2 W, 3): the reference label map `label` (left) and the predicted one `pred`
    (right), (H, W) class indices, coloured by class over `render_rgb(image)`; nothing outside the mask."""
    rgb = render_rgb(image).astype(np.float32)
    valid = np.ones(label.shape, bool) if mask is None else mask
    panels = [class_panel(rgb, classes, valid) for classes in (label, pred)]
    return np.concatenate(panels, axis=1).round().astype(np.uint8)


def write_png(path: Path, rgb: np.ndarray) -> None:
    """An RGB uint8 image as PNG, atomically."""
    import imageio.v3 as iio

    with atomic_path(path) as tmp:
        iio.imwrite(tmp, rgb, extension=".png")
