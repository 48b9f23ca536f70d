"""Multi-class scores of label maps: per-class Dice and IoU, their mean over the foreground classes.

A class is scored one-vs-rest (`per_class`): Dice = 2 TP / (2 TP + FP + FN), IoU = TP / (TP + FP +
FN) of "pixel is class c" in prediction and reference, 1 when both lack the class. Class 0 is the
background: it is reported, but `mean_fg` averages classes 1..K-1 only (as training's validation
Dice, which picks best.pt). Pixel accuracy is the share of pixels whose class is right.

`ClassTally` scores the images of a test set one by one (per-image rows) and pooled over all their
pixels (one confusion per class, summed over the images); keys in `pipeline.evaluation.evaluate`.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import numpy as np
import pandas as pd

from pipeline.errors import SegpipeError
from pipeline.metrics.segmentation import Confusion, per_class
from pipeline.metrics.tally import pooled_confusion

MEAN_FG = "mean_fg"
"""The key suffix of the mean over the foreground classes (dice_mean_fg, iou_mean_fg)."""


def class_keys(names: Sequence[str]) -> list[str]:
    """The classes' names as they appear in metric keys (dice_<key>): characters other than letters,
    digits, '_', '-' and '.' become '_'. SegpipeError when two keys coincide or one is 'mean_fg'."""
    keys = [re.sub(r"[^\w.-]", "_", name) for name in names]
    if len(set(keys)) != len(keys) or MEAN_FG in keys:
        raise SegpipeError(
            f"metrics: class names {list(names)} give the metric keys {keys}; expected distinct "
            f"keys, none of them {MEAN_FG!r}: rename the classes in the dataset card"
        )
    return keys


def pooled_per_class(images: Sequence[Sequence[Confusion]]) -> list[Confusion]:
    """Per-class confusions of several images (each K confusions, `per_class`), summed class by class."""
    if not images or len({len(image) for image in images}) != 1:
        raise SegpipeError("metrics: pooled_per_class needs at least one image, all of the same classes")
    return [pooled_confusion([image[c] for image in images]) for c in range(len(images[0]))]


def pixel_accuracy(confusions: Sequence[Confusion]) -> float:
    """Share of the pixels whose predicted class is the reference's, from the K one-vs-rest
    confusions of one label map (a right pixel is a TP of exactly one class); NaN without pixels."""
    first = confusions[0]
    total = first.tp + first.fp + first.fn + first.tn
    return sum(c.tp for c in confusions) / total if total else math.nan


def class_scores(confusions: Sequence[Confusion], keys: Sequence[str]) -> dict[str, float]:
    """dice_<key> and iou_<key> of every class, dice_mean_fg and iou_mean_fg over classes 1..K-1."""
    out: dict[str, float] = {}
    for name in ("dice", "iou"):
        values = [getattr(c, name) for c in confusions]
        out.update({f"{name}_{key}": value for key, value in zip(keys, values)})
        out[f"{name}_{MEAN_FG}"] = float(np.mean(values[1:]))
    return out


class ClassTally:
    """Per-image rows and pooled per-class confusions of the label maps of a test set."""

    def __init__(self, class_names: Sequence[str]) -> None:
        if len(class_names) < 2:
            raise SegpipeError(f"metrics: expected at least 2 classes, got {list(class_names)}")
        self.keys = class_keys(class_names)
        self.rows: list[dict[str, Any]] = []
        self.confusions: list[list[Confusion]] = []

    def add(
        self, case: str, pred: np.ndarray, label: np.ndarray, mask: np.ndarray | None, seconds: float = math.nan
    ) -> dict[str, Any]:
        """One image: predicted and reference label maps (H, W) of class indices, inside `mask` (H, W)."""
        confusions = per_class(pred, label, len(self.keys), mask)
        self.confusions.append(confusions)
        row = {
            "case": case,
            **class_scores(confusions, self.keys),
            "accuracy": pixel_accuracy(confusions),
            "seconds": seconds,
        }
        self.rows.append(row)
        return row

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)

    def metrics(self) -> dict[str, float]:
        """Means over images of every per-image score (dice_<class>, ..., `mean_accuracy`), `dice` and
        `iou` (= dice_mean_fg, iou_mean_fg), and the pooled scores (pooled_dice_<class>, ...,
        `pooled_accuracy`)."""
        table = self.table()
        names = class_scores(self.confusions[0], self.keys).keys()  # dice_<class>, ..., iou_mean_fg
        means = {name: float(table[name].mean()) for name in names}
        pooled = pooled_per_class(self.confusions)
        return {
            **means,
            "dice": means[f"dice_{MEAN_FG}"],
            "iou": means[f"iou_{MEAN_FG}"],
            "mean_accuracy": float(table["accuracy"].mean()),
            **{f"pooled_{key}": value for key, value in class_scores(pooled, self.keys).items()},
            "pooled_accuracy": pixel_accuracy(pooled),
        }
