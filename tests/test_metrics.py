"""Metrics against hand-computed cases, brute-force definitions and MONAI's implementations."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from monai.metrics import (
    DiceMetric,
    MeanIoU,
    compute_confusion_matrix_metric,
    compute_roc_auc,
    get_confusion_matrix,
)
from scipy.stats import rankdata

from pipeline.errors import SegpipeError
from pipeline.metrics import (
    best_f1_threshold,
    binary_scores,
    confusion,
    dice,
    dice_per_class,
    f_beta_curve,
    iou,
    iou_per_class,
    label_instances,
    mae,
    max_f_beta,
    pr_curve,
    precision_recall,
    roc_auc,
    roc_curve,
    seg_jaccards,
    seg_measure,
)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


# ----------------------------------------------------------------------------------------------
# pixel metrics


def test_confusion_hand_case():
    pred = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 0]])
    gt = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1]])
    c = confusion(pred, gt)
    assert (c.tp, c.fp, c.fn, c.tn) == (2, 1, 2, 4)
    assert c.dice == c.f1 == pytest.approx(4 / 7)
    assert c.iou == pytest.approx(2 / 5)
    assert c.accuracy == pytest.approx(6 / 9)
    assert c.sensitivity == pytest.approx(2 / 4)
    assert c.specificity == pytest.approx(4 / 5)
    assert c.precision == pytest.approx(2 / 3)
    # The mask keeps the first two rows only.
    mask = np.array([[1, 1, 1], [1, 1, 1], [0, 0, 0]], dtype=bool)
    c = confusion(pred, gt, mask)
    assert (c.tp, c.fp, c.fn, c.tn) == (2, 1, 1, 2)
    assert dice(torch.tensor(pred), torch.tensor(gt), torch.tensor(mask)) == pytest.approx(4 / 6)
    assert iou(pred, gt, mask) == pytest.approx(2 / 4)


def test_empty_conventions():
    empty = np.zeros((4, 4), dtype=bool)
    some = empty.copy()
    some[1, 1] = True
    both = confusion(empty, empty)
    assert both.dice == both.iou == both.f1 == 1.0
    assert both.accuracy == 1.0 and both.specificity == 1.0
    assert math.isnan(both.sensitivity) and math.isnan(both.precision)
    assert dice(empty, some) == iou(empty, some) == 0.0  # empty prediction
    assert dice(some, empty) == iou(some, empty) == 0.0  # empty ground truth
    assert math.isnan(confusion(some, empty).sensitivity)
    nothing_valid = confusion(some, some, mask=empty)
    assert nothing_valid.dice == 1.0 and math.isnan(nothing_valid.accuracy)
    full = ~empty
    assert math.isnan(confusion(full, full).specificity)


def test_input_errors():
    with pytest.raises(SegpipeError, match="binary"):
        dice(np.full((2, 2), 0.7), np.ones((2, 2)))
    with pytest.raises(SegpipeError, match="shape"):
        dice(np.ones((2, 3)), np.ones((2, 2)))
    with pytest.raises(SegpipeError, match="mask shape"):
        dice(np.ones((2, 2)), np.ones((2, 2)), mask=np.ones((3, 3)))
    with pytest.raises(SegpipeError, match="labels"):
        dice_per_class(np.array([0, 3]), np.array([0, 1]), num_classes=3)
    with pytest.raises(SegpipeError, match="NaN"):
        roc_auc(np.array([0.1, np.nan]), np.array([0, 1]))


def _onehot(labels: np.ndarray, c: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.as_tensor(labels), c).permute(0, 3, 1, 2).float()


def test_per_class_dice_iou_against_monai(rng):
    c = 4
    gt = rng.integers(0, 3, size=(3, 16, 16))  # class 3 absent from the ground truth
    pred = np.where(rng.random(gt.shape) < 0.7, gt, rng.integers(0, c, size=gt.shape))
    pred[1][pred[1] == 2] = 0  # class 2 absent from image 1's prediction
    pred[2][pred[2] == 3] = 1  # class 3 absent from both in image 2: Dice 1
    dice_metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    iou_metric = MeanIoU(include_background=True, reduction="none", ignore_empty=False)
    monai_dice = dice_metric(_onehot(pred, c), _onehot(gt, c)).numpy()
    monai_iou = iou_metric(_onehot(pred, c), _onehot(gt, c)).numpy()
    for i in range(gt.shape[0]):
        np.testing.assert_allclose(dice_per_class(pred[i], gt[i], c), monai_dice[i], rtol=1e-6)
        np.testing.assert_allclose(iou_per_class(pred[i], gt[i], c), monai_iou[i], rtol=1e-6)
    assert dice_per_class(pred[2], gt[2], c)[3] == 1.0  # absent from both
    assert (pred[0] == 3).any() and dice_per_class(pred[0], gt[0], c)[3] == 0.0  # absent from gt


def test_binary_dice_iou_against_monai_including_empty(rng):
    gt = (rng.random((4, 1, 12, 12)) < 0.3).astype(np.float32)
    pred = (rng.random(gt.shape) < 0.3).astype(np.float32)
    gt[1] = 0  # empty ground truth
    pred[2] = 0  # empty prediction
    gt[3] = pred[3] = 0  # both empty
    monai_dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)(
        torch.as_tensor(pred), torch.as_tensor(gt)
    )
    monai_iou = MeanIoU(include_background=True, reduction="none", ignore_empty=False)(
        torch.as_tensor(pred), torch.as_tensor(gt)
    )
    ours_dice = [dice(pred[i], gt[i]) for i in range(4)]
    ours_iou = [iou(pred[i], gt[i]) for i in range(4)]
    np.testing.assert_allclose(ours_dice, monai_dice[:, 0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(ours_iou, monai_iou[:, 0].numpy(), rtol=1e-6)
    assert ours_dice[1:] == [0.0, 0.0, 1.0]


def test_confusion_scores_against_monai(rng):
    gt = (rng.random((1, 1, 20, 20)) < 0.4).astype(np.float32)
    pred = (rng.random(gt.shape) < 0.5).astype(np.float32)
    matrix = get_confusion_matrix(torch.as_tensor(pred), torch.as_tensor(gt), include_background=True)
    ours = confusion(pred, gt)
    names = {
        "accuracy": "accuracy",
        "sensitivity": "sensitivity",
        "specificity": "specificity",
        "f1 score": "f1",
        "precision": "precision",
    }
    for monai_name, attr in names.items():
        expected = compute_confusion_matrix_metric(monai_name, matrix).item()
        assert getattr(ours, attr) == pytest.approx(expected, rel=1e-6), monai_name


# ----------------------------------------------------------------------------------------------
# AUC, curves, thresholds


def _auc_pairs(scores: np.ndarray, gt: np.ndarray) -> float:
    """P(score_pos > score_neg) + P(tie) / 2 over all pairs, by brute force."""
    pos, neg = scores[gt.astype(bool)], scores[~gt.astype(bool)]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def test_auc_hand_cases_with_ties():
    assert roc_auc(np.array([0.1, 0.4, 0.4, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(3.5 / 4)
    assert roc_auc(np.array([0.5, 0.5, 0.5]), np.array([1, 0, 1])) == pytest.approx(0.5)
    assert roc_auc(np.array([0.1, 0.2, 0.9]), np.array([0, 0, 1])) == 1.0
    assert roc_auc(np.array([0.1, 0.2, 0.9]), np.array([1, 1, 0])) == 0.0
    assert math.isnan(roc_auc(np.array([0.1, 0.2]), np.array([1, 1])))
    # binary scores (e.g. the second observer's segmentation) are accepted
    assert roc_auc(np.array([True, False, True]), np.array([1, 0, 0])) == pytest.approx(0.75)
    # mask: only the first three pixels count
    assert roc_auc(np.array([0.1, 0.4, 0.9, 0.0]), np.array([0, 1, 1, 1]), np.array([1, 1, 1, 0])) == 1.0


@pytest.mark.parametrize("levels", [3, 20, None])
def test_auc_against_brute_force_ranks_and_monai(levels, rng):
    gt = rng.random(600) < 0.3
    scores = rng.random(600) * 0.6 + 0.4 * gt
    if levels:  # heavy ties
        scores = np.round(scores * levels) / levels
    expected = _auc_pairs(scores, gt)
    assert roc_auc(scores, gt) == pytest.approx(expected, abs=1e-12)
    ranks = rankdata(scores)  # midranks: Mann-Whitney U
    p, n = gt.sum(), (~gt).sum()
    assert roc_auc(scores, gt) == pytest.approx((ranks[gt].sum() - p * (p + 1) / 2) / (p * n), abs=1e-12)
    monai = compute_roc_auc(torch.as_tensor(scores), torch.as_tensor(gt.astype(np.int64)))
    assert roc_auc(torch.as_tensor(scores), torch.as_tensor(gt)) == pytest.approx(float(monai), abs=1e-12)


def test_auc_against_sklearn_if_present(rng):
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    gt = rng.random(2000) < 0.2
    scores = np.round(rng.random(2000) + 0.3 * gt, 2)
    assert roc_auc(scores, gt) == pytest.approx(sklearn_metrics.roc_auc_score(gt, scores), abs=1e-12)


def test_roc_curve_shape_and_area(rng):
    gt = rng.random(500) < 0.4
    scores = np.round(rng.random(500) + 0.5 * gt, 2)
    fpr, tpr, thresholds = roc_curve(scores, gt)
    assert (fpr[0], tpr[0], thresholds[0]) == (0.0, 0.0, np.inf)
    assert fpr[-1] == tpr[-1] == 1.0 and thresholds[-1] == scores.min()
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0) and np.all(np.diff(thresholds) < 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(scores, gt), abs=1e-12)
    # each point is the rates of `score >= threshold`
    for k in (1, len(thresholds) // 2, len(thresholds) - 1):
        c = confusion(scores >= thresholds[k], gt)
        assert (fpr[k], tpr[k]) == pytest.approx((1 - c.specificity, c.sensitivity))
    f2, t2, th2 = roc_curve(scores, gt, max_points=10)
    assert len(f2) == 10 and th2[0] == np.inf and f2[-1] == t2[-1] == 1.0
    with pytest.raises(SegpipeError):
        roc_curve(scores, gt, max_points=1)


def test_pr_curve_hand_case():
    precision, recall, thresholds = pr_curve(np.array([0.9, 0.8, 0.8, 0.3]), np.array([1, 0, 1, 0]))
    np.testing.assert_allclose(thresholds, [0.9, 0.8, 0.3])
    np.testing.assert_allclose(precision, [1.0, 2 / 3, 2 / 4])
    np.testing.assert_allclose(recall, [0.5, 1.0, 1.0])
    _, _, kept = pr_curve(np.array([0.9, 0.8, 0.8, 0.3]), np.array([1, 0, 1, 0]), max_points=2)
    np.testing.assert_allclose(kept, [0.9, 0.3])


def test_best_f1_threshold_against_exhaustive_search(rng):
    gt = rng.random(400) < 0.3
    scores = np.round(rng.random(400) * 0.7 + 0.3 * gt, 2)
    threshold, f1 = best_f1_threshold(scores, gt)
    candidates = np.unique(scores)
    best = max(confusion(scores >= t, gt).f1 for t in candidates)
    assert f1 == pytest.approx(best)
    assert confusion(scores >= threshold, gt).f1 == pytest.approx(f1)
    assert threshold not in candidates or threshold == candidates.min()  # a midpoint
    # hand case: threshold between 0.6 and 0.4 gives F1 1; ties go to the higher threshold
    assert best_f1_threshold(np.array([0.9, 0.6, 0.4, 0.1]), np.array([1, 1, 0, 0])) == pytest.approx((0.5, 1.0))
    t, f = best_f1_threshold(np.array([0.8, 0.8, 0.2]), np.array([1, 0, 1]))
    assert f == pytest.approx(0.8) and t == pytest.approx(0.2)  # all positive: 2*2/(2*2+1)
    with pytest.raises(SegpipeError, match="foreground"):
        best_f1_threshold(np.array([0.3, 0.4]), np.array([0, 0]))


def test_binary_scores_drive_protocol(rng):
    gt = rng.random((2, 10, 10)) < 0.3
    prob = np.clip(rng.random(gt.shape) * 0.8 + 0.3 * gt, 0, 1)
    prob[0, 0, 0] = 0.5  # the rule is score >= threshold
    fov = rng.random(gt.shape) < 0.8
    out = binary_scores(torch.as_tensor(prob), gt, fov, threshold=0.5)
    expected = confusion(prob >= 0.5, gt, fov)
    assert set(out) == {"dice", "iou", "f1", "accuracy", "sensitivity", "specificity", "precision", "auc"}
    for key in ("dice", "iou", "f1", "accuracy", "sensitivity", "specificity", "precision"):
        assert out[key] == pytest.approx(getattr(expected, key))
    assert out["auc"] == pytest.approx(_auc_pairs(prob[fov], gt[fov]))


# ----------------------------------------------------------------------------------------------
# instances (Cell Tracking Challenge SEG)


def _seg_naive(pred: np.ndarray, ref: np.ndarray) -> list[float]:
    out = []
    for r in np.unique(ref[ref > 0]):
        region = ref == r
        j = 0.0
        for s in np.unique(pred[region & (pred > 0)]):
            obj = pred == s
            inter = (region & obj).sum()
            if inter > 0.5 * region.sum():
                j = inter / (region | obj).sum()
        out.append(j)
    return out


def test_seg_hand_case():
    ref = np.array(
        [
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0, 7],
            [0, 0, 0, 0, 0, 7],
            [4, 4, 0, 0, 0, 0],
        ],
        dtype=np.uint16,
    )
    pred = np.array(
        [
            [2, 2, 2, 2, 2, 0],  # 2 and 3 cover 4 of object 1's 8 pixels each: exactly 50 %, no match
            [3, 3, 3, 3, 0, 9],
            [0, 0, 0, 0, 0, 9],
            [5, 5, 5, 0, 0, 6],  # object 4 matched by 5 (2 of 2 pixels), J = 2/3; 6 matches nothing
        ],
        dtype=np.int32,
    )
    labels, jaccard = seg_jaccards(pred, ref)
    np.testing.assert_array_equal(labels, [1, 4, 7])
    np.testing.assert_allclose(jaccard, [0.0, 2 / 3, 1.0])
    assert seg_measure(pred, ref) == pytest.approx((0 + 2 / 3 + 1) / 3)
    pred[0, 3] = 3  # 3 covers 5 of 8: match, J = 5 / 8 (3 lies inside 1)
    assert seg_jaccards(pred, ref)[1][0] == pytest.approx(5 / 8)


def test_seg_empty_cases():
    ref = np.zeros((5, 5), dtype=np.uint16)
    assert math.isnan(seg_measure(np.zeros((5, 5), dtype=np.int32), ref))
    assert math.isnan(seg_measure(np.ones((5, 5), dtype=np.int32), ref))
    ref[1:3, 1:3] = 3
    assert seg_measure(np.zeros((5, 5), dtype=np.int32), ref) == 0.0  # empty prediction
    assert seg_measure(ref.astype(np.int64), ref) == 1.0
    with pytest.raises(SegpipeError, match="integer label image"):
        seg_measure(ref.astype(np.float32), ref)
    with pytest.raises(SegpipeError, match="shape"):
        seg_measure(ref[:4], ref)


def test_seg_against_naive_loop():
    for seed in range(3):
        rng = np.random.default_rng(seed)
        ref = label_instances(rng.random((40, 40)) < 0.55)
        noisy = np.where(rng.random(ref.shape) < 0.1, ~(ref > 0), ref > 0)
        pred = label_instances(noisy, connectivity=2)
        np.testing.assert_allclose(seg_jaccards(pred, ref)[1], _seg_naive(pred, ref))


def test_label_instances_connectivity():
    fg = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0]])
    assert label_instances(fg).max() == 2
    assert label_instances(fg, connectivity=2).max() == 1
    with pytest.raises(SegpipeError):
        label_instances(np.array([[0, 2]]))


# ----------------------------------------------------------------------------------------------
# saliency (U2-Net maxF_beta, MAE)


def _pr_naive(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision/recall at thresholds k/255 by explicit binarisation, the tool's conventions."""
    precision, recall = np.zeros(255), np.zeros(255)
    for k in range(255):
        binary = pred * 255 >= k
        tp = (binary & gt).sum()
        precision[k] = tp / binary.sum() if binary.sum() else 0.0
        recall[k] = tp / gt.sum() if gt.sum() else 0.0
    return precision, recall


def test_precision_recall_against_explicit_thresholding(rng):
    gt = rng.random((12, 12)) < 0.3
    pred = np.clip(rng.random(gt.shape) * 0.7 + 0.3 * gt, 0, 1)
    pred[0, :4] = [0.0, 1.0, 10 / 255, 254 / 255]  # levels at the bin edges
    for got, want in zip(precision_recall(pred, gt), _pr_naive(pred, gt)):
        np.testing.assert_allclose(got, want)


def test_max_f_beta_hand_case_and_averaging():
    gt = np.array([[1, 1, 0, 0]], dtype=bool)
    pred = np.array([[0.9, 0.5, 0.5, 0.1]])
    f, t = max_f_beta([pred], [gt])
    # thresholds <= 0.1: P=0.5, R=1; (0.1, 0.5]: P=2/3, R=1; (0.5, 0.9]: P=1, R=0.5
    fb = lambda p, r: 1.3 * p * r / (0.3 * p + r)  # noqa: E731
    assert f == pytest.approx(max(fb(0.5, 1), fb(2 / 3, 1), fb(1, 0.5)))
    assert f == pytest.approx(fb(1, 0.5)) and 0.5 < t <= 0.9
    # two images: precision and recall are averaged over images before F (the authors' tool)
    gt2 = np.array([[1, 0, 0, 0]], dtype=bool)
    pred2 = np.array([[0.2, 0.6, 0.0, 0.0]])
    p1, r1 = _pr_naive(pred, gt)
    p2, r2 = _pr_naive(pred2, gt2)
    p, r = (p1 + p2) / 2, (r1 + r2) / 2
    expected = np.where(0.3 * p + r > 0, 1.3 * p * r / np.maximum(0.3 * p + r, 1e-300), 0)
    np.testing.assert_allclose(f_beta_curve([pred, pred2], [gt, gt2]), expected)
    assert max_f_beta([pred, pred2], [gt, gt2])[0] == pytest.approx(expected.max())


def test_saliency_empty_cases_and_errors():
    gt_empty = np.zeros((3, 3), dtype=bool)
    precision, recall = precision_recall(np.zeros((3, 3)), gt_empty)
    assert not recall.any() and precision[0] == 0.0 and not precision[1:].any()
    assert max_f_beta([np.zeros((3, 3))], [gt_empty]) == (0.0, 0.0)
    with pytest.raises(SegpipeError, match=r"\[0, 1\]"):
        precision_recall(np.full((2, 2), 1.5), np.ones((2, 2)))
    with pytest.raises(SegpipeError, match="as many"):
        max_f_beta([np.zeros((2, 2))], [])


def test_mae():
    pred = np.array([[0.0, 0.25], [1.0, 0.5]])
    gt = np.array([[0, 1], [1, 0]])
    assert mae(pred, gt) == pytest.approx((0 + 0.75 + 0 + 0.5) / 4)
    assert mae(pred, gt, mask=np.array([[1, 1], [0, 0]])) == pytest.approx(0.75 / 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(mae(pred, gt, mask=np.zeros((2, 2))))
