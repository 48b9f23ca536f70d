"""From class probabilities to separate objects: the instance label map of a cell image.

Four methods (`InstanceSettings.method`), each on the foreground probability p (one sigmoid channel,
or 1 - P(background) of a softmax) and its mask p >= `threshold`:

* ``components``: the mask's connected components (4-connected), the U-Net paper's protocol.
* ``watershed``: marker-controlled watershed (Beucher & Meyer 1993) on the Euclidean distance
  transform D of the mask: markers are the local maxima of D at least `min_distance` pixels apart,
  the flooding runs on -D inside the mask, so touching round objects split along their neck.
* ``cores``: markers are the components of the confident cores p >= `core_threshold`; the flooding
  runs on -p inside the mask (the thin low-probability gap between touching cells is the ridge).
* ``border``: a three-class network (background / interior / border, `border_target`): markers are
  the components of the argmax == interior, grown by the watershed on -P(interior) into the mask.

Every method gives a mask component without a marker an id of its own (nothing predicted is lost)
and drops objects smaller than `min_size` pixels. Ids are 1..n in raster order of their first pixel.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

import numpy as np
from scipy import ndimage
from skimage.feature import peak_local_max
from skimage.measure import label
from skimage.segmentation import find_boundaries, watershed

from pipeline.errors import SegpipeError

METHODS = ("components", "watershed", "cores", "border")
BORDER_CLASSES = ("background", "interior", "border")
"""The classes of the border-aware target, in channel order."""


@dataclass(frozen=True)
class InstanceSettings:
    """How probabilities become objects (module docstring); recorded in checkpoints and ONNX metadata."""

    method: str = "components"
    threshold: float = 0.5
    min_distance: int = 10
    core_threshold: float = 0.9
    min_size: int = 0
    halo: int = 64  # rows of context around each streamed block (`pipeline.postprocessing.stitching`)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise SegpipeError(f"instances: method {self.method!r} is not one of {', '.join(METHODS)}")
        for name in ("threshold", "core_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise SegpipeError(f"instances: {name} is {value!r}; expected a number in (0, 1)")
        for name in ("min_distance", "min_size", "halo"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SegpipeError(f"instances: {name} is {value!r}; expected an integer >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str) -> "InstanceSettings":
        """The settings a checkpoint or ONNX model records; SegpipeError naming `where` if malformed."""
        known = {f.name for f in fields(cls)}
        if not isinstance(raw, Mapping) or set(raw) - known or "method" not in raw:
            raise SegpipeError(
                f"{where}: instance settings {raw!r} are malformed; expected keys among {sorted(known)} with 'method'"
            )
        try:
            return cls(**dict(raw))
        except SegpipeError as exc:
            raise SegpipeError(f"{where}: {exc}") from exc

    def describe(self) -> str:
        extra = {
            "watershed": f", markers >= {self.min_distance} px apart",
            "cores": f", cores p >= {self.core_threshold:g}",
        }.get(self.method, "")
        return f"{self.method}: p >= {self.threshold:g}{extra}, min size {self.min_size} px"


def foreground_probability(probs: np.ndarray) -> np.ndarray:
    """(K, H, W) probabilities -> (H, W) foreground probability: channel 0 for K = 1, else 1 - P(background)."""
    if probs.ndim != 3:
        raise SegpipeError(f"instances: expected probabilities (K, H, W), got shape {probs.shape}")
    return probs[0] if probs.shape[0] == 1 else np.clip(1.0 - probs[0], 0.0, 1.0)


def extract_instances(probs: np.ndarray, settings: InstanceSettings) -> np.ndarray:
    """The instance label map (H, W) uint32 of the probabilities (K, H, W) (module docstring)."""
    fg = foreground_probability(probs)
    mask = fg >= settings.threshold
    if settings.method == "components":
        objects = label(mask, connectivity=1)
    elif settings.method == "watershed":
        distance = ndimage.distance_transform_edt(mask)
        peaks = peak_local_max(
            distance, min_distance=max(settings.min_distance, 1), labels=label(mask), exclude_border=False
        )
        objects = _flood(-distance, _points(peaks, mask.shape), mask)
    elif settings.method == "cores":
        objects = _flood(-fg, label(fg >= settings.core_threshold, connectivity=1), mask)
    else:
        if probs.shape[0] != len(BORDER_CLASSES):
            raise SegpipeError(
                f"instances: method 'border' needs the {len(BORDER_CLASSES)} channels "
                f"{BORDER_CLASSES} of a border-target network, got {probs.shape[0]}"
            )
        interior = (probs.argmax(0) == 1) & mask
        objects = _flood(-probs[1], label(interior, connectivity=1), mask)
    return _finish(objects, settings.min_size)


def _points(peaks: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    markers = np.zeros(shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return markers


def _flood(relief: np.ndarray, markers: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Watershed of `relief` from `markers` inside `mask`; mask components without a marker get ids too."""
    grown = watershed(relief, markers, mask=mask) if markers.any() else np.zeros(mask.shape, np.int64)
    orphans = label(mask & (grown == 0), connectivity=1)
    return np.where(orphans > 0, orphans + grown.max(), grown)


def _finish(objects: np.ndarray, min_size: int) -> np.ndarray:
    """Objects below `min_size` pixels dropped, ids renumbered 1..n in raster order, uint32."""
    objects = objects.astype(np.int64, copy=False)
    if min_size > 0 and objects.any():
        sizes = np.bincount(objects.ravel())
        objects = np.where(sizes[objects] < min_size, 0, objects)
    flat = objects.ravel()
    present = flat > 0
    _, first = np.unique(flat[present], return_index=True)
    order = np.zeros(int(flat.max(initial=0)) + 1, np.int64)
    values = flat[present][np.sort(first)]
    order[values] = np.arange(1, len(values) + 1)
    return order[objects].astype(np.uint32)


def border_target(instances: np.ndarray, width: int = 2) -> np.ndarray:
    """The three-class target (H, W) uint8 of an instance map: 0 background, 1 interior, 2 border (the
    object pixels within `width` pixels of another object or the background)."""
    if width < 1:
        raise SegpipeError(f"instances: border width {width}; expected >= 1")
    edges = find_boundaries(instances, connectivity=1, mode="inner")
    if width > 1:
        edges = ndimage.binary_dilation(edges, iterations=width - 1) & (instances > 0)
    out = (instances > 0).astype(np.uint8)
    out[edges] = 2
    return out
