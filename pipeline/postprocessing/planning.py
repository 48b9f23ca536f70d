"""Choosing the instance method and its parameters on the validation images, by CTC SEG.

Like the best-F1 threshold, the instance settings are picked where the test set is never seen: each
candidate (`candidates`) turns the validation probabilities into objects as `segpipe infer` does
(`instances_of`), and
the one with the highest SEG over all validation reference objects wins (ties: the first, simplest
method in `METHODS` order). Sizes come from the fingerprint's median object area A (its equivalent
diameter d = sqrt(4 A / pi)): marker distances 0.15-0.5 d, the smallest kept object 5 % of A, and
the streamed blocks' context (`halo`) 2 d, rounded up to a multiple of 16 rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from tqdm import tqdm

from pipeline.errors import SegpipeError
from pipeline.metrics.instances import seg_jaccards
from pipeline.postprocessing.instances import BORDER_CLASSES, InstanceSettings
from pipeline.postprocessing.stitching import instances_of

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
DISTANCE_FRACTIONS = (0.15, 0.25, 0.35, 0.5)
CORE_THRESHOLDS = (0.7, 0.8, 0.9, 0.95, 0.98)
MIN_SIZE_FRACTION = 0.05


@dataclass(frozen=True)
class InstancePlan:
    """The chosen settings, their validation SEG, and every candidate's (settings, SEG) for the record."""

    settings: InstanceSettings
    val_seg: float
    tried: tuple[tuple[InstanceSettings, float], ...]

    def record(self) -> dict[str, object]:
        """What checkpoints, instances.json and MLflow keep."""
        return {"settings": self.settings.to_dict(), "val_seg": self.val_seg, "candidates": len(self.tried)}


def candidates(median_area: float, channels: int) -> list[InstanceSettings]:
    """The settings tried for objects of median area `median_area` px and a `channels`-channel network."""
    if not math.isfinite(median_area) or median_area <= 0:
        raise SegpipeError(f"instances: median object area {median_area!r}; expected > 0 pixels")
    diameter = math.sqrt(4 * median_area / math.pi)
    sizes = {"min_size": int(round(MIN_SIZE_FRACTION * median_area)), "halo": 16 * math.ceil(2 * diameter / 16)}
    out = [InstanceSettings("components", t, **sizes) for t in THRESHOLDS]
    distances = sorted({max(1, int(round(f * diameter))) for f in DISTANCE_FRACTIONS})
    out += [InstanceSettings("watershed", t, min_distance=d, **sizes) for t in THRESHOLDS for d in distances]
    out += [
        InstanceSettings("cores", t, core_threshold=c, **sizes) for t in THRESHOLDS for c in CORE_THRESHOLDS if c > t
    ]
    if channels == len(BORDER_CLASSES):
        out += [InstanceSettings("border", t, **sizes) for t in THRESHOLDS]
    return out


def pooled_seg(pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> float:
    """SEG over all reference objects of (predicted, reference) instance maps; NaN without any."""
    jaccards = [seg_jaccards(pred, ref)[1] for pred, ref in pairs]
    pooled = np.concatenate(jaccards) if jaccards else np.zeros(0)
    return float(pooled.mean()) if pooled.size else float("nan")


def plan_instances(
    cases: Sequence[tuple[np.ndarray, np.ndarray]], median_area: float, desc: str = "instances"
) -> InstancePlan:
    """The best candidate on `cases` (probabilities (K, H, W), reference instances (H, W)) by pooled SEG."""
    if not cases:
        raise SegpipeError("instances: no validation images with reference objects to choose the method on")
    channels = {probs.shape[0] for probs, _ in cases}
    if len(channels) != 1:
        raise SegpipeError(f"instances: validation probabilities disagree in channels {sorted(channels)}")
    tried = []
    for settings in tqdm(candidates(median_area, channels.pop()), desc=desc, unit="candidate", leave=False):
        seg = pooled_seg((instances_of(probs, settings), ref) for probs, ref in cases)
        tried.append((settings, seg))
    if all(math.isnan(seg) for _, seg in tried):
        raise SegpipeError("instances: the validation images have no reference objects")
    best = max(range(len(tried)), key=lambda i: (tried[i][1], -i))
    return InstancePlan(tried[best][0], tried[best][1], tuple(tried))
