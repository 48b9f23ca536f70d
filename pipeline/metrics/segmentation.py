"""Pixel metrics: Dice, IoU, confusion-based scores, ROC/PR curves, AUC-ROC, best-F1 threshold.

Inputs are numpy arrays or torch tensors of any shape (one image, a stack, or pixels of several
images concatenated); ``mask`` (same shape, bool or {0, 1}) restricts every metric to its nonzero
pixels, e.g. DRIVE's field of view. Binary predictions and ground truths are bool or {0, 1};
``scores`` are foreground probabilities (any real values work for the curves and the AUC).

Thresholding rule everywhere: a pixel is foreground iff ``score >= threshold``.

Empty cases (no foreground in prediction and/or ground truth, counted inside the mask):

- Dice = F1 = IoU = 1 when both are empty, 0 when exactly one is.
- sensitivity is NaN without ground-truth foreground, specificity NaN without ground-truth
  background, precision NaN without predicted foreground, accuracy NaN with no valid pixel.
- AUC-ROC is NaN unless the ground truth holds both classes (as ``monai.metrics.compute_roc_auc``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.errors import SegpipeError

ArrayLike = np.ndarray | torch.Tensor


def to_numpy(x: ArrayLike) -> np.ndarray:
    """A numpy view/copy of an array or (detached, CPU) tensor."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def as_binary(x: ArrayLike, what: str) -> np.ndarray:
    """A bool array from a bool or {0, 1} array/tensor; SegpipeError naming ``what`` otherwise."""
    a = to_numpy(x)
    if a.dtype == bool:
        return a
    if not np.all((a == 0) | (a == 1)):
        raise SegpipeError(f"metrics: {what} must be binary (bool or 0/1), got values {np.unique(a)[:5]}...")
    return a.astype(bool)


def valid_pixels(mask: ArrayLike | None, shape: tuple[int, ...], *arrays: np.ndarray) -> list[np.ndarray]:
    """Flatten arrays to their valid pixels (1-D); checks that shapes agree."""
    for a in arrays:
        if a.shape != shape:
            raise SegpipeError(f"metrics: shape mismatch, {a.shape} vs {shape}")
    if mask is None:
        return [a.reshape(-1) for a in arrays]
    m = as_binary(mask, "mask")
    if m.shape != shape:
        raise SegpipeError(f"metrics: mask shape {m.shape} differs from the data shape {shape}")
    return [a[m] for a in arrays]


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else float("nan")


@dataclass(frozen=True)
class Confusion:
    """Binary confusion counts and the scores derived from them."""

    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def accuracy(self) -> float:
        return _ratio(self.tp + self.tn, self.tp + self.fp + self.fn + self.tn)

    @property
    def sensitivity(self) -> float:
        """Recall, true-positive rate TP / (TP + FN)."""
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def specificity(self) -> float:
        """True-negative rate TN / (TN + FP)."""
        return _ratio(self.tn, self.tn + self.fp)

    @property
    def precision(self) -> float:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def dice(self) -> float:
        """2 TP / (2 TP + FP + FN); 1 when prediction and ground truth are both empty."""
        den = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / den if den else 1.0

    @property
    def f1(self) -> float:
        """Harmonic mean of precision and sensitivity, equal to the Dice coefficient."""
        return self.dice

    @property
    def iou(self) -> float:
        """Jaccard index TP / (TP + FP + FN); 1 when both are empty."""
        den = self.tp + self.fp + self.fn
        return self.tp / den if den else 1.0

    def scores(self) -> dict[str, float]:
        """All derived scores by name."""
        names = ("dice", "iou", "f1", "accuracy", "sensitivity", "specificity", "precision")
        return {name: getattr(self, name) for name in names}


def confusion(pred: ArrayLike, gt: ArrayLike, mask: ArrayLike | None = None) -> Confusion:
    """Confusion counts of a binary prediction against a binary ground truth inside ``mask``."""
    p, g = as_binary(pred, "prediction"), as_binary(gt, "ground truth")
    p, g = valid_pixels(mask, g.shape, p, g)
    tp = int(np.count_nonzero(p & g))
    fp = int(np.count_nonzero(p)) - tp
    fn = int(np.count_nonzero(g)) - tp
    return Confusion(tp=tp, fp=fp, fn=fn, tn=int(g.size) - tp - fp - fn)


def dice(pred: ArrayLike, gt: ArrayLike, mask: ArrayLike | None = None) -> float:
    """Dice coefficient of binary masks (1 when both empty, 0 when one is)."""
    return confusion(pred, gt, mask).dice


def iou(pred: ArrayLike, gt: ArrayLike, mask: ArrayLike | None = None) -> float:
    """Intersection over union of binary masks (1 when both empty, 0 when one is)."""
    return confusion(pred, gt, mask).iou


def per_class(pred: ArrayLike, gt: ArrayLike, num_classes: int, mask: ArrayLike | None = None) -> list[Confusion]:
    """One-vs-rest confusion of every class 0 .. num_classes-1 of integer label maps."""
    p, g = to_numpy(pred), to_numpy(gt)
    p, g = valid_pixels(mask, g.shape, p, g)
    for what, a in (("prediction", p), ("ground truth", g)):
        if a.size and (a.min() < 0 or a.max() >= num_classes or not np.all(a == np.round(a))):
            raise SegpipeError(f"metrics: {what} labels must be integers in 0..{num_classes - 1}")
    return [confusion(p == c, g == c) for c in range(num_classes)]


def dice_per_class(pred: ArrayLike, gt: ArrayLike, num_classes: int, mask: ArrayLike | None = None) -> np.ndarray:
    """Dice of every class (num_classes,) of integer label maps; empty conventions as ``dice``."""
    return np.array([c.dice for c in per_class(pred, gt, num_classes, mask)])


def iou_per_class(pred: ArrayLike, gt: ArrayLike, num_classes: int, mask: ArrayLike | None = None) -> np.ndarray:
    """IoU of every class (num_classes,) of integer label maps; empty conventions as ``iou``."""
    return np.array([c.iou for c in per_class(pred, gt, num_classes, mask)])


@dataclass(frozen=True)
class _Ranking:
    """Cumulative counts at every distinct score, in decreasing order of threshold."""

    thresholds: np.ndarray  # distinct scores, decreasing
    tp: np.ndarray  # positives with score >= threshold
    fp: np.ndarray  # negatives with score >= threshold
    positives: int
    negatives: int


def _ranking(scores: ArrayLike, gt: ArrayLike, mask: ArrayLike | None) -> _Ranking:
    s = to_numpy(scores)
    g = as_binary(gt, "ground truth")
    s, g = valid_pixels(mask, g.shape, s, g)
    if s.dtype == bool:
        s = s.astype(np.uint8)
    if not np.issubdtype(s.dtype, np.number) or np.isnan(s).any():
        raise SegpipeError("metrics: scores must be real numbers without NaN")
    values, inverse = np.unique(s, return_inverse=True)
    inverse = inverse.reshape(-1)
    total = np.bincount(inverse, minlength=values.size)[::-1]
    pos = np.bincount(inverse[g], minlength=values.size)[::-1]
    return _Ranking(
        thresholds=values[::-1],
        tp=np.cumsum(pos),
        fp=np.cumsum(total - pos),
        positives=int(g.sum()),
        negatives=int(g.size - g.sum()),
    )


def _subsample(n: int, max_points: int | None) -> np.ndarray:
    """Indices of at most max_points of n curve points, first and last kept."""
    if max_points is None or n <= max_points:
        return np.arange(n)
    if max_points < 2:
        raise SegpipeError(f"metrics: max_points must be >= 2, got {max_points}")
    return np.unique(np.round(np.linspace(0, n - 1, max_points)).astype(np.int64))


def roc_curve(
    scores: ArrayLike, gt: ArrayLike, mask: ArrayLike | None = None, max_points: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) at every distinct score, decreasing threshold, from (0, 0) at +inf.

    ``max_points`` keeps that many evenly spaced points (end points included) for plotting;
    a rate is NaN when its class is absent from the ground truth.
    """
    r = _ranking(scores, gt, mask)
    fpr = np.concatenate([[0], r.fp]) / r.negatives if r.negatives else np.full(r.fp.size + 1, np.nan)
    tpr = np.concatenate([[0], r.tp]) / r.positives if r.positives else np.full(r.tp.size + 1, np.nan)
    thresholds = np.concatenate([[np.inf], r.thresholds.astype(np.float64)])
    keep = _subsample(thresholds.size, max_points)
    return fpr[keep], tpr[keep], thresholds[keep]


def roc_auc(scores: ArrayLike, gt: ArrayLike, mask: ArrayLike | None = None) -> float:
    """Area under the ROC curve, exact with ties (trapezoids between distinct scores).

    Equals the Mann-Whitney probability P(score_pos > score_neg) + P(tie) / 2. NaN when the
    ground truth (inside the mask) lacks one of the classes.
    """
    r = _ranking(scores, gt, mask)
    if r.positives == 0 or r.negatives == 0:
        return float("nan")
    d_fp = np.diff(r.fp, prepend=0)
    tp_sum = r.tp + np.concatenate([[0], r.tp[:-1]])
    # Integer area twice over: sum of (width in negatives) * (left + right height in positives).
    twice_area = int(np.dot(d_fp.astype(np.int64), tp_sum.astype(np.int64)))
    return twice_area / (2 * r.positives * r.negatives)


def pr_curve(
    scores: ArrayLike, gt: ArrayLike, mask: ArrayLike | None = None, max_points: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, thresholds) at every distinct score, decreasing threshold.

    Every threshold is an observed score, so precision is always defined; recall is NaN without
    ground-truth foreground. ``max_points`` as in ``roc_curve``.
    """
    r = _ranking(scores, gt, mask)
    precision = r.tp / (r.tp + r.fp)
    recall = r.tp / r.positives if r.positives else np.full(r.tp.size, np.nan)
    keep = _subsample(r.thresholds.size, max_points)
    return precision[keep], recall[keep], r.thresholds.astype(np.float64)[keep]


def best_f1_threshold(scores: ArrayLike, gt: ArrayLike, mask: ArrayLike | None = None) -> tuple[float, float]:
    """(threshold, F1) maximising F1 = 2 TP / (2 TP + FP + FN) over all thresholds.

    Pick it on validation data and apply it to test data. The returned threshold is the midpoint
    between the winning score and the next lower distinct score (the lowest score itself when it
    wins), so ``score >= threshold`` reproduces the winning F1 exactly on these data. Ties go to
    the highest threshold. Raises SegpipeError without ground-truth foreground.
    """
    r = _ranking(scores, gt, mask)
    if r.positives == 0:
        raise SegpipeError("metrics: best-F1 threshold needs ground-truth foreground, found none")
    f1 = 2 * r.tp / (r.tp + r.fp + r.positives)
    i = int(np.argmax(f1))
    t = r.thresholds.astype(np.float64)
    threshold = t[i] if i + 1 == t.size else (t[i] + t[i + 1]) / 2
    return float(threshold), float(f1[i])


def binary_scores(
    scores: ArrayLike, gt: ArrayLike, mask: ArrayLike | None = None, threshold: float = 0.5
) -> dict[str, float]:
    """DRIVE's protocol: the confusion scores at ``threshold`` plus AUC-ROC, inside ``mask``.

    Keys: dice, iou, f1, accuracy, sensitivity, specificity, precision, auc.
    """
    s = to_numpy(scores)
    out = confusion(s >= threshold, gt, mask).scores()
    out["auc"] = roc_auc(s, gt, mask)
    return out
