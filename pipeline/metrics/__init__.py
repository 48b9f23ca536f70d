"""Evaluation metrics: pixel (Dice, IoU, DRIVE's AUC/F1/...), instance (CTC SEG), saliency (maxF, MAE)."""
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

__all__ = [
    "Confusion",
    "best_f1_threshold",
    "binary_scores",
    "confusion",
    "dice",
    "dice_per_class",
    "f_beta_curve",
    "iou",
    "iou_per_class",
    "label_instances",
    "mae",
    "max_f_beta",
    "per_class",
    "pr_curve",
    "precision_recall",
    "roc_auc",
    "roc_curve",
    "seg_jaccards",
    "seg_measure",
]
