"""U2-Net's evaluation (Qin et al. 2020, sec. 4.2): maximal F-measure maxF_beta and MAE.

Protocol of the authors' evaluation tool (xuebinqin/Binary-Segmentation-Evaluation-Tool):
a probability map P in [0, 1] is binarised at 255 thresholds t_k = k / 255, k = 0..254 (a pixel
is foreground iff P >= t_k, i.e. floor(255 P) >= k); precision and recall are computed per
image at every threshold and averaged over the images; F_beta,k = (1 + beta^2) prec_k rec_k /
(beta^2 prec_k + rec_k) with beta^2 = 0.3, and maxF_beta is the maximum over k. MAE is the mean
|P - G| over the pixels of an image, averaged over images.

Empty cases, as in that tool: precision is 0 at a threshold where nothing is predicted, recall is 0
for an image without ground-truth foreground, and F is 0 where precision + recall = 0.

U2-Net's test script min-max normalises each map before saving it; pass probabilities as they
are, or normalise first to reproduce that.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.errors import SegpipeError
from pipeline.metrics.segmentation import ArrayLike, as_binary, to_numpy, valid_pixels

N_THRESHOLDS = 255
BETA2 = 0.3


def _probabilities(x: ArrayLike) -> np.ndarray:
    p = to_numpy(x).astype(np.float64)
    if p.size and (np.isnan(p).any() or p.min() < 0 or p.max() > 1):
        raise SegpipeError("metrics: saliency maps must be probabilities in [0, 1]")
    return p


def precision_recall(pred: ArrayLike, gt: ArrayLike, mask: ArrayLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall (255,) of one image at thresholds k / 255, k = 0..254."""
    g = as_binary(gt, "ground truth")
    p, g = valid_pixels(mask, g.shape, _probabilities(pred), g)
    level = np.minimum(np.floor(p * 255.0), N_THRESHOLDS - 1).astype(np.int64)
    # tp[k], predicted[k]: foreground / all pixels with level >= k.
    tp = np.cumsum(np.bincount(level[g], minlength=N_THRESHOLDS)[::-1])[::-1]
    predicted = np.cumsum(np.bincount(level, minlength=N_THRESHOLDS)[::-1])[::-1]
    precision = np.divide(tp, predicted, out=np.zeros(N_THRESHOLDS), where=predicted > 0)
    positives = int(g.sum())
    recall = tp / positives if positives else np.zeros(N_THRESHOLDS)
    return precision, recall


def f_beta_curve(
    preds: Sequence[ArrayLike],
    gts: Sequence[ArrayLike],
    masks: Sequence[ArrayLike | None] | None = None,
    beta2: float = BETA2,
) -> np.ndarray:
    """F_beta (255,) at thresholds k / 255 from the image-averaged precision and recall."""
    if len(preds) != len(gts) or not preds or (masks is not None and len(masks) != len(preds)):
        raise SegpipeError(
            f"metrics: expected as many predictions as ground truths (and masks), at least one; "
            f"got {len(preds)} and {len(gts)}"
        )
    curves = [precision_recall(p, g, None if masks is None else masks[i]) for i, (p, g) in enumerate(zip(preds, gts))]
    precision = np.mean([c[0] for c in curves], axis=0)
    recall = np.mean([c[1] for c in curves], axis=0)
    num = (1 + beta2) * precision * recall
    den = beta2 * precision + recall
    return np.divide(num, den, out=np.zeros(N_THRESHOLDS), where=den > 0)


def max_f_beta(
    preds: Sequence[ArrayLike],
    gts: Sequence[ArrayLike],
    masks: Sequence[ArrayLike | None] | None = None,
    beta2: float = BETA2,
) -> tuple[float, float]:
    """(maxF_beta, its threshold k / 255) over a set of images (pass one image as a 1-list)."""
    f = f_beta_curve(preds, gts, masks, beta2)
    k = int(np.argmax(f))
    return float(f[k]), k / 255.0


def mae(pred: ArrayLike, gt: ArrayLike, mask: ArrayLike | None = None) -> float:
    """Mean absolute error between a probability map and a binary ground truth, one image."""
    g = as_binary(gt, "ground truth")
    p, g = valid_pixels(mask, g.shape, _probabilities(pred), g)
    return float(np.abs(p - g).mean()) if p.size else float("nan")
