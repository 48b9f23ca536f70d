"""Instance metrics for the cell datasets (PhC-U373, DIC-HeLa): the Cell Tracking Challenge SEG,
average precision at IoU 0.5 (StarDist, Cellpose), adapted Rand error and variation of information
(the ISBI 2012 EM measures, for membrane-style data).

SEG (Maška et al. 2014; Ulman et al. 2017): a reference object R is matched by the predicted object
S covering more than half of it, |R ∩ S| > 0.5 |R| (at most one S can), and scores the Jaccard index
|R ∩ S| / |R ∪ S|; an unmatched reference object scores 0; predicted objects matching nothing are
not penalised. SEG is the mean over reference objects. The challenge averages over all reference
objects of a sequence, so a dataset's SEG is the mean of the concatenated ``seg_jaccards``, not
the mean of per-image SEG values. An image without reference objects has no SEG (NaN).

The "IOU" of the U-Net paper's Table 2 (ISBI cell tracking challenge 2015) was computed by the
challenge organisers with this measure; the pixel-wise foreground IoU is
``pipeline.metrics.segmentation.iou(pred > 0, ref > 0)``.

Label images: integer arrays of any shape, 0 = background, each positive value one object
(values need not be consecutive).
"""

from __future__ import annotations

import numpy as np
from skimage.measure import label
from skimage.metrics import adapted_rand_error, variation_of_information

from pipeline.errors import SegpipeError
from pipeline.metrics.segmentation import ArrayLike, to_numpy


def _labels(x: ArrayLike, what: str) -> np.ndarray:
    a = to_numpy(x)
    if a.dtype == bool or not np.issubdtype(a.dtype, np.integer):
        raise SegpipeError(f"metrics: {what} must be an integer label image, got dtype {a.dtype}")
    if a.size and a.min() < 0:
        raise SegpipeError(f"metrics: {what} has negative labels, expected 0 (background) or > 0")
    return a


def label_instances(foreground: ArrayLike, connectivity: int = 1) -> np.ndarray:
    """Objects of a binary foreground mask as connected components (int32 labels 1..n).

    ``connectivity`` 1 joins pixels sharing a face (4-neighbourhood in 2-D), ``ndim`` also
    diagonal neighbours (skimage.measure.label).
    """
    fg = to_numpy(foreground)
    if not np.all((fg == 0) | (fg == 1)):
        raise SegpipeError("metrics: foreground must be binary (bool or 0/1)")
    return label(fg.astype(bool), connectivity=connectivity).astype(np.int32)


def seg_jaccards(pred: ArrayLike, ref: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(reference labels, Jaccard of each reference object) per the SEG matching rule.

    Both arrays have one entry per reference object, in increasing label order; Jaccard is 0 for
    an unmatched object.
    """
    p, r = _labels(pred, "predicted instances"), _labels(ref, "reference instances")
    if p.shape != r.shape:
        raise SegpipeError(f"metrics: predicted instances {p.shape} and reference {r.shape} differ in shape")
    p, r = p.reshape(-1), r.reshape(-1)
    ref_values, ref_index = np.unique(r, return_inverse=True)
    pred_values, pred_index = np.unique(p, return_inverse=True)
    ref_size = np.bincount(ref_index)
    pred_size = np.bincount(pred_index)
    both = (r > 0) & (p > 0)
    pairs = ref_index[both].astype(np.int64) * pred_values.size + pred_index[both]
    pair_keys, overlap = np.unique(pairs, return_counts=True)
    pair_ref, pair_pred = np.divmod(pair_keys, pred_values.size)
    jaccard = np.zeros(ref_values.size)
    matched = 2 * overlap > ref_size[pair_ref]
    inter = overlap[matched]
    union = ref_size[pair_ref[matched]] + pred_size[pair_pred[matched]] - inter
    jaccard[pair_ref[matched]] = inter / union
    objects = ref_values > 0
    return ref_values[objects], jaccard[objects]


def seg_measure(pred: ArrayLike, ref: ArrayLike) -> float:
    """SEG of one image: mean Jaccard over reference objects; NaN without reference objects."""
    _, jaccard = seg_jaccards(pred, ref)
    return float(jaccard.mean()) if jaccard.size else float("nan")


def matched_iou(pred: ArrayLike, ref: ArrayLike) -> tuple[int, int, int]:
    """(true positives, predicted objects, reference objects) with a true positive a pair of IoU > 0.5
    (unique: each object has at most one such partner, since IoU > 0.5 rules out a second)."""
    p, r = _labels(pred, "predicted instances").reshape(-1), _labels(ref, "reference instances").reshape(-1)
    if p.size != r.size:
        raise SegpipeError(f"metrics: predicted instances ({p.size} px) and reference ({r.size} px) differ in size")
    pred_values, pred_index = np.unique(p, return_inverse=True)
    ref_values, ref_index = np.unique(r, return_inverse=True)
    both = (p > 0) & (r > 0)
    pairs = ref_index[both].astype(np.int64) * pred_values.size + pred_index[both]
    keys, overlap = np.unique(pairs, return_counts=True)
    pair_ref, pair_pred = np.divmod(keys, pred_values.size)
    union = np.bincount(ref_index)[pair_ref] + np.bincount(pred_index)[pair_pred] - overlap
    return int((overlap > 0.5 * union).sum()), int((pred_values > 0).sum()), int((ref_values > 0).sum())


def average_precision(tp: int, n_pred: int, n_ref: int) -> float:
    """AP at IoU 0.5 as the StarDist (Schmidt et al. 2018, eq. 1) and Cellpose papers report it:
    TP / (TP + FP + FN); NaN with no object on either side."""
    total = n_pred + n_ref - tp
    return tp / total if total else float("nan")


def rand_and_vi(pred: ArrayLike, ref: ArrayLike) -> tuple[float, float]:
    """(adapted Rand error, variation of information) of the ISBI 2012 EM challenge (Arganda-Carreras
    et al. 2015): 1 - F-score of the Rand split and merge scores over the reference's object pixels
    (skimage.metrics.adapted_rand_error), and VI = H(ref | pred) + H(pred | ref)
    (skimage.metrics.variation_of_information, in bits); both 0 for a perfect match."""
    p, r = _labels(pred, "predicted instances"), _labels(ref, "reference instances")
    if p.shape != r.shape:
        raise SegpipeError(f"metrics: predicted instances {p.shape} and reference {r.shape} differ in shape")
    if not (r > 0).any():
        return float("nan"), float(sum(variation_of_information(r, p)))
    error, _, _ = adapted_rand_error(r, p)
    return float(error), float(sum(variation_of_information(r, p)))
