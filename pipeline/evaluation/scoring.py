"""How `segpipe evaluate` scores a network's output: two classes or K > 2 classes.

Two classes (`BinaryScoring`): the foreground probability (`foreground`: the sigmoid channel, or
1 - P(background) of a softmax) at the evaluation's thresholds, DRIVE's protocol, AUC, CTC SEG and
maxF (`pipeline.metrics.Tally`). K > 2 classes (`ClassScoring`): the label map is the argmax over the
K softmax channels, scored per class (`pipeline.metrics.ClassTally`); the metrics that need one
foreground score (AUC-ROC, the best-F1 threshold, ROC/PR curves, maxF, MAE) or one foreground class
(CTC SEG) do not apply. Both score inside the field of view (which leaves out the card's ignore_value).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from pipeline.data.prepared import PreparedDataset
from pipeline.errors import SegpipeError
from pipeline.evaluation.overlays import class_overlay, overlay
from pipeline.metrics import MEAN_FG, ClassTally, Tally, class_scores, confusion, foreground, per_class
from pipeline.postprocessing.instances import BORDER_CLASSES, InstanceSettings
from pipeline.postprocessing.stitching import instances_of

CURVE_COLUMNS = (("fpr", "tpr"), ("recall", "precision"))
"""The columns of roc.csv and pr.csv."""


@dataclass
class Case:
    """A loaded case, reduced to what evaluation uses: image (C, H, W) as stored, label (H, W) class
    indices, the other roles 2-D."""

    name: str
    image: np.ndarray
    label: np.ndarray
    mask: np.ndarray | None
    instances: np.ndarray | None
    label2: np.ndarray | None

    @staticmethod
    def load(data: PreparedDataset, case: str) -> "Case":
        arrays = data.load(case)

        def plane(role: str, dtype: Any) -> np.ndarray | None:
            return arrays[role][0].astype(dtype) if role in arrays else None

        return Case(
            case,
            arrays["image"],
            plane("label", np.int64),
            plane("fov", bool),
            plane("instances", np.int64),
            plane("label2", bool),
        )

    @property
    def foreground(self) -> np.ndarray:
        """The reference's foreground (H, W) bool: every class but the background."""
        return self.label > 0


def check_classes(path: Path, ckpt: Mapping[str, Any], out_channels: int, data: PreparedDataset) -> list[str]:
    """The dataset's class names, once the checkpoint `path` fits them: the classes it records (if any)
    are the dataset's, and it has 1 output channel (or 2, softmax) for 2 classes, K for K > 2."""
    names = data.class_names
    if ckpt.get("target") == "border":  # background / interior / border: scored as 1 - P(background)
        if list(ckpt.get("class_names") or []) != list(BORDER_CLASSES) or out_channels != len(BORDER_CLASSES):
            raise SegpipeError(
                f"{path}: a border-target checkpoint must record the classes {list(BORDER_CLASSES)} "
                f"and have {len(BORDER_CLASSES)} output channels"
            )
        if len(names) != 2:
            raise SegpipeError(f"{path}: a border-target checkpoint is scored on two classes; {data.name} has {names}")
        return names
    recorded = ckpt.get("class_names")
    if recorded is not None and list(recorded) != names:
        raise SegpipeError(
            f"{path}: trained on the classes {list(recorded)}, but {data.root / 'stats.json'} has "
            f"{names}; run `segpipe train {data.name} NETWORK` again"
        )
    expected = (1, 2) if len(names) == 2 else (len(names),)
    if out_channels not in expected:
        raise SegpipeError(
            f"{path}: the network has {out_channels} output channel(s); the {len(names)} classes "
            f"{names} of {data.name} need {' or '.join(map(str, expected))}"
        )
    return names


class BinaryScoring:
    """Two classes: the foreground probability at `thresholds` (suffix -> threshold, "" the main one)."""

    def __init__(self, thresholds: Mapping[str, float], objects: InstanceSettings | None = None) -> None:
        self.thresholds = dict(thresholds)
        self.tally = Tally(thresholds, None if objects is None else lambda probs: instances_of(probs, objects))

    @staticmethod
    def reduce(probs: np.ndarray) -> np.ndarray:
        """Probabilities (K, H, W) -> the foreground probability (H, W)."""
        return foreground(probs)

    def add(self, case: Case, out: np.ndarray, seconds: float, probs: np.ndarray | None = None) -> None:
        """One test image: its foreground probability `out` and (for the instance maps) its `probs` (K, H, W)."""
        self.tally.add(case.name, out, case.foreground, case.mask, case.instances, case.label2, seconds, probs)

    def head_score(self, case: Case, out: np.ndarray) -> tuple[float, float]:
        """(Dice, IoU) of a head's foreground probability at the main threshold."""
        c = confusion(out >= self.thresholds[""], case.foreground, case.mask)
        return c.dice, c.iou

    def overlay(self, case: Case, out: np.ndarray) -> np.ndarray:
        return overlay(case.image, out >= self.thresholds[""], case.foreground, case.mask)

    def metrics(self) -> dict[str, float]:
        return self.tally.metrics()

    def table(self) -> pd.DataFrame:
        return self.tally.table()

    def curves(self, max_points: int) -> tuple[pd.DataFrame, pd.DataFrame]:
        return self.tally.curves(max_points)


class ClassScoring:
    """K > 2 classes: the argmax label map, per-class Dice and IoU."""

    def __init__(self, class_names: Sequence[str]) -> None:
        self.tally = ClassTally(class_names)

    @staticmethod
    def reduce(probs: np.ndarray) -> np.ndarray:
        """Probabilities (K, H, W) -> the label map (H, W) of class indices."""
        return probs.argmax(0)

    def add(self, case: Case, out: np.ndarray, seconds: float, probs: np.ndarray | None = None) -> None:
        self.tally.add(case.name, out, case.label, case.mask, seconds)

    def head_score(self, case: Case, out: np.ndarray) -> tuple[float, float]:
        """(Dice, IoU) of a head's label map, each the mean over the foreground classes."""
        keys = self.tally.keys
        scores = class_scores(per_class(out, case.label, len(keys), case.mask), keys)
        return scores[f"dice_{MEAN_FG}"], scores[f"iou_{MEAN_FG}"]

    def overlay(self, case: Case, out: np.ndarray) -> np.ndarray:
        return class_overlay(case.image, out, case.label, case.mask)

    def metrics(self) -> dict[str, float]:
        return self.tally.metrics()

    def table(self) -> pd.DataFrame:
        return self.tally.table()

    @staticmethod
    def curves(max_points: int) -> tuple[pd.DataFrame, pd.DataFrame]:
        """No ROC or PR curve for K > 2 classes: roc.csv and pr.csv hold their header only."""
        roc, pr = (pd.DataFrame(columns=list(columns)) for columns in CURVE_COLUMNS)
        return roc, pr


Scoring = BinaryScoring | ClassScoring
