"""Operating points of a foreground probability from score histograms: memory bounded by the bins.

`score_histogram` counts the valid pixels of one image per bin of width 1 / bins of [0, 1], negatives
(row 0) and positives (row 1) apart; bin k holds scores in [k / bins, (k + 1) / bins), 1.0 the last.
At a threshold t_k = k / bins (k = 1 .. bins - 1, all inside (0, 1)) a pixel is foreground iff its bin
is >= k, which is `score >= t_k` (the rule of `pipeline.metrics.segmentation`) up to floating-point
rounding at the bin edges. So the counts at every t_k are exact, and the best threshold on this grid
is within one bin width of the best over all thresholds (`best_f1_threshold` on the pixels).

- `histogram_best_f1`: the t_k maximising F1 = 2 TP / (2 TP + FP + FN) over the pixels of all images
  pooled (the sum of their histograms).
- `histogram_best_mean_dice`: the t_k maximising the mean over images of each image's Dice (1 for an
  image where prediction and ground truth are both empty, 0 where only one is).

Ties go to the highest threshold, as in `best_f1_threshold`.
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import SegpipeError
from pipeline.metrics.segmentation import ArrayLike, as_binary, to_numpy, valid_pixels

BINS = 1000
"""Default histogram bins: thresholds 0.001 .. 0.999 in steps of 0.001."""


def score_histogram(scores: ArrayLike, gt: ArrayLike, mask: ArrayLike | None = None, bins: int = BINS) -> np.ndarray:
    """(2, bins) int64 counts of the valid negative (row 0) and positive (row 1) pixels per score bin
    (module docstring); scores must be probabilities in [0, 1]."""
    g = as_binary(gt, "ground truth")
    s, g = valid_pixels(mask, g.shape, to_numpy(scores).astype(np.float64), g)
    if s.size and (np.isnan(s).any() or s.min() < 0 or s.max() > 1):
        raise SegpipeError("metrics: score histograms need probabilities in [0, 1]")
    level = np.minimum(np.floor(s * bins), bins - 1).astype(np.int64)
    positives = np.bincount(level[g], minlength=bins)
    return np.stack([np.bincount(level, minlength=bins) - positives, positives])


def _counts_above(histograms: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(TP, FP, positives) at the thresholds t_1 .. t_{bins-1}, over the last axis of (..., 2, bins)."""
    above = np.cumsum(histograms[..., ::-1], axis=-1)[..., ::-1][..., 1:]  # pixels with bin >= k, k = 1..
    return above[..., 1, :], above[..., 0, :], histograms[..., 1, :].sum(axis=-1, keepdims=True)


def _highest_best(values: np.ndarray, bins: int) -> tuple[float, float]:
    """(t_k, value) of the largest of `values` at t_1 .. t_{bins-1}, ties to the highest threshold."""
    i = values.size - 1 - int(np.argmax(values[::-1]))
    return (i + 1) / bins, float(values[i])


def histogram_best_f1(histogram: np.ndarray) -> tuple[float, float]:
    """(threshold, F1) maximising the pooled F1 of a (2, bins) histogram (sum images' histograms first);
    exact to the bin width. SegpipeError without ground-truth foreground."""
    tp, fp, positives = _counts_above(_checked(histogram, 2))
    if positives.item() == 0:
        raise SegpipeError("metrics: best-F1 threshold needs ground-truth foreground, found none")
    return _highest_best(2 * tp / (tp + fp + positives), histogram.shape[-1])


def histogram_best_mean_dice(histograms: np.ndarray) -> tuple[float, float]:
    """(threshold, mean Dice) maximising the mean over images of per-image Dice, from their (images, 2,
    bins) histograms; exact to the bin width. SegpipeError without images."""
    tp, fp, positives = _counts_above(_checked(histograms, 3))
    if tp.shape[0] == 0:
        raise SegpipeError("metrics: best mean Dice needs at least one image")
    den = tp + fp + positives
    dice = np.divide(2 * tp, den, out=np.ones(den.shape), where=den > 0)
    return _highest_best(dice.mean(axis=0), histograms.shape[-1])


def _checked(histograms: np.ndarray, ndim: int) -> np.ndarray:
    """`histograms` if it has `ndim` axes, 2 rows (negatives, positives) and at least 2 bins."""
    h = np.asarray(histograms)
    if h.ndim != ndim or h.shape[-2] != 2 or h.shape[-1] < 2:
        want = "(images, 2, bins)" if ndim == 3 else "(2, bins)"
        raise SegpipeError(f"metrics: expected score histograms of shape {want} with bins >= 2, got {h.shape}")
    return h


__all__ = ["BINS", "histogram_best_f1", "histogram_best_mean_dice", "score_histogram"]
