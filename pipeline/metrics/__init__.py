"""Evaluation metrics: pixel (Dice, IoU, DRIVE's AUC/F1/...), instance (CTC SEG), saliency (maxF, MAE),
and the running tally of a test set."""
from pipeline.metrics.instances import label_instances, seg_jaccards, seg_measure
from pipeline.metrics.saliency import f_beta_curve, mae, max_f_beta, precision_recall
from pipeline.metrics.segmentation import (
    Confusion,
    best_f1_threshold,
    binary_scores,
    confusion,
    dice,
    dice_per_class,
    iou,
    iou_per_class,
    per_class,
    pr_curve,
    roc_auc,
    roc_curve,
)
from pipeline.metrics.tally import OBSERVER_SCORES, SCORES, Tally, foreground, pooled_confusion

__all__ = [
    "OBSERVER_SCORES",
    "SCORES",
    "Confusion",
    "Tally",
    "best_f1_threshold",
    "binary_scores",
    "confusion",
    "dice",
    "dice_per_class",
    "f_beta_curve",
    "foreground",
    "iou",
    "iou_per_class",
    "label_instances",
    "mae",
    "max_f_beta",
    "per_class",
    "pooled_confusion",
    "pr_curve",
    "precision_recall",
    "roc_auc",
    "roc_curve",
    "seg_jaccards",
    "seg_measure",
]
