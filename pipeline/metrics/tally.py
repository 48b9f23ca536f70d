"""The running tally of a test set: per-image rows and pooled confusions, ROC and PR curves.

`foreground` turns class probabilities into the foreground probability every score uses;
`Tally.add` scores one image (inside its mask), `Tally.metrics` gives the means over images and the
values pooled over all test pixels (as the DRIVE literature reports them; keys in
`pipeline.evaluation.evaluate`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd

from pipeline.errors import SegpipeError
from pipeline.metrics.instances import average_precision, label_instances, matched_iou, rand_and_vi, seg_jaccards
from pipeline.metrics.saliency import mae, max_f_beta
from pipeline.metrics.segmentation import Confusion, confusion, pr_curve, roc_auc, roc_curve

SCORES = ("f1", "accuracy", "sensitivity", "specificity", "precision")
"""Confusion scores reported as mean_<s> and pooled_<s> (F1 = Dice)."""
OBSERVER_SCORES = ("f1", "accuracy", "sensitivity", "specificity")


def foreground(probs: np.ndarray) -> np.ndarray:
    """Probabilities (K, H, W) -> foreground probability (H, W): channel 0 for K = 1 (sigmoid),
    1 - P(background) for K > 1 (softmax, channel 0 = background)."""
    if probs.ndim != 3:
        raise SegpipeError(f"evaluate: expected probabilities (K, H, W), got shape {probs.shape}")
    return probs[0] if probs.shape[0] == 1 else np.clip(1.0 - probs[0], 0.0, 1.0)


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else math.nan


def pooled_confusion(parts: list[Confusion]) -> Confusion:
    """One confusion from the counts of several images."""
    return Confusion(*(sum(getattr(c, k) for c in parts) for k in ("tp", "fp", "fn", "tn")))


class Tally:
    """Per-image rows and the pooled state of the test set (see the module docstring)."""

    def __init__(
        self, thresholds: Mapping[str, float], objects: Callable[[np.ndarray], np.ndarray] | None = None
    ) -> None:
        self.thresholds = dict(thresholds)  # suffix -> threshold: "" and, if picked, "_best"
        self.objects = objects  # probabilities -> the instance map `segpipe infer` writes; None: components
        self.matches: list[tuple[int, int, int]] = []  # (TP, predicted, reference) objects at IoU 0.5 per image
        self.component_jaccards: list[np.ndarray] = []  # with `objects`: the components' SEG Jaccards
        self.rows: list[dict[str, Any]] = []
        self.scores: list[np.ndarray] = []  # valid pixels of each image, 1-D
        self.truth: list[np.ndarray] = []
        self.confusions: dict[str, list[Confusion]] = {s: [] for s in self.thresholds}
        self.jaccards: dict[str, list[np.ndarray]] = {s: [] for s in self.thresholds}
        self.observer2: list[Confusion] = []

    def add(
        self,
        case: str,
        scores: np.ndarray,
        label: np.ndarray,
        mask: np.ndarray | None,
        instances: np.ndarray | None = None,
        label2: np.ndarray | None = None,
        seconds: float = math.nan,
        probs: np.ndarray | None = None,
    ) -> dict[str, Any]:
        """One test image: scores (H, W) in [0, 1], label/mask/label2 (H, W) bool, instances (H, W) ids;
        `probs` (K, H, W) for the instance-map function (default: the scores as one channel)."""
        valid = np.ones(label.shape, bool) if mask is None else mask
        s, g = scores[valid], label[valid]
        self.scores.append(s)
        self.truth.append(g)
        row: dict[str, Any] = {"case": case}
        for suffix, t in self.thresholds.items():
            c = confusion(s >= t, g)
            self.confusions[suffix].append(c)
            row.update({f"{name}{suffix}": value for name, value in c.scores().items()})
            if instances is not None:
                components = label_instances(scores >= t)
                _, jaccard = seg_jaccards(components, instances)
                if suffix == "" and self.objects is not None:
                    self.component_jaccards.append(jaccard)
                    row["seg_components"] = _mean(jaccard)
                    components = self.objects(scores[None] if probs is None else probs)
                    _, jaccard = seg_jaccards(components, instances)
                self.jaccards[suffix].append(jaccard)
                row[f"seg{suffix}"] = _mean(jaccard)
                if suffix == "":
                    row.update(self._object_scores(components, instances))
        row["auc"] = roc_auc(s, g)
        row["mae"] = mae(s, g)
        if label2 is not None:
            c2 = confusion(label2[valid], g)
            self.observer2.append(c2)
            row.update({f"observer2_{name}": getattr(c2, name) for name in OBSERVER_SCORES})
        row["seconds"] = seconds
        self.rows.append(row)
        return row

    def _object_scores(self, objects: np.ndarray, instances: np.ndarray) -> dict[str, float]:
        """AP at IoU 0.5, adapted Rand error and VI of one image's instance output."""
        tp, n_pred, n_ref = matched_iou(objects, instances)
        self.matches.append((tp, n_pred, n_ref))
        rand_error, vi = rand_and_vi(objects, instances)
        return {"ap50": average_precision(tp, n_pred, n_ref), "rand_error": rand_error, "vi": vi}

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)

    def metrics(self) -> dict[str, float]:
        """Means over images and pooled values (module docstring for the keys)."""
        table = self.table()
        out: dict[str, float] = {}
        for suffix in self.thresholds:
            out[f"dice{suffix}"] = table[f"dice{suffix}"].mean()
            out[f"iou{suffix}"] = table[f"iou{suffix}"].mean()
            out.update({f"mean_{name}{suffix}": table[f"{name}{suffix}"].mean() for name in SCORES})
            pooled = pooled_confusion(self.confusions[suffix])
            out.update({f"pooled_{name}{suffix}": getattr(pooled, name) for name in SCORES + ("iou",)})
            if self.jaccards[suffix]:
                jaccards = np.concatenate(self.jaccards[suffix])
                out[f"seg{suffix}"] = float(jaccards.mean()) if jaccards.size else math.nan
                out[f"mean_seg{suffix}"] = table[f"seg{suffix}"].mean()
        if self.matches:
            out["ap50"] = average_precision(*(int(sum(m[i] for m in self.matches)) for i in range(3)))
            out["mean_ap50"], out["rand_error"], out["vi"] = (table[k].mean() for k in ("ap50", "rand_error", "vi"))
            if self.component_jaccards:  # pooled over all reference objects, as `seg`
                out["seg_components"] = _mean(np.concatenate(self.component_jaccards))
        s, g = np.concatenate(self.scores), np.concatenate(self.truth)
        out["mean_auc"] = table["auc"].mean()
        out["pooled_auc"] = roc_auc(s, g)
        out["maxf"], out["maxf_threshold"] = max_f_beta(self.scores, self.truth)
        out["mae"] = table["mae"].mean()
        if self.observer2:
            out.update({f"observer2_mean_{n}": table[f"observer2_{n}"].mean() for n in OBSERVER_SCORES})
            pooled2 = pooled_confusion(self.observer2)
            out.update({f"observer2_pooled_{n}": getattr(pooled2, n) for n in OBSERVER_SCORES})
        return {k: float(v) for k, v in out.items()}

    def curves(self, max_points: int) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Pooled test ROC (fpr, tpr) and PR (recall, precision) curves, at most max_points each."""
        s, g = np.concatenate(self.scores), np.concatenate(self.truth)
        fpr, tpr, _ = roc_curve(s, g, max_points=max_points)
        precision, recall, _ = pr_curve(s, g, max_points=max_points)
        return pd.DataFrame({"fpr": fpr, "tpr": tpr}), pd.DataFrame({"recall": recall, "precision": precision})
