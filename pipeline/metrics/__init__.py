"""Evaluation metrics: pixel (Dice, IoU, DRIVE's AUC/F1/...), instance (CTC SEG), saliency (maxF, MAE),
multi-class (per-class Dice/IoU of label maps), the running tallies of a test set, and best-F1 / best
mean Dice thresholds from score histograms."""

from pipeline.metrics.classes import MEAN_FG, ClassTally, class_keys, class_scores, pixel_accuracy, pooled_per_class
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
from pipeline.metrics.thresholds import histogram_best_f1, histogram_best_mean_dice, score_histogram

__all__ = [
    "MEAN_FG",
    "OBSERVER_SCORES",
    "SCORES",
    "ClassTally",
    "Confusion",
    "Tally",
    "best_f1_threshold",
    "binary_scores",
    "class_keys",
    "class_scores",
    "confusion",
    "dice",
    "dice_per_class",
    "f_beta_curve",
    "foreground",
    "histogram_best_f1",
    "histogram_best_mean_dice",
    "iou",
    "iou_per_class",
    "label_instances",
    "mae",
    "max_f_beta",
    "per_class",
    "pixel_accuracy",
    "pooled_confusion",
    "pooled_per_class",
    "pr_curve",
    "precision_recall",
    "roc_auc",
    "roc_curve",
    "score_histogram",
    "seg_jaccards",
    "seg_measure",
]
