"""Validation during training: whole validation images through the project's sliding-window
inference (`pipeline.inference.predict`, the code `segpipe infer` runs), scored inside the FOV (which
leaves out the card's ignore_value).

Two classes (a one-channel network) also give the operating points `segpipe infer --threshold val`
uses (`validation_thresholds`), from the same probabilities: each image's in-FOV foreground
probabilities are kept as a histogram (`pipeline.metrics.score_histogram`, 1000 bins, negatives and
positives apart), never as pixels, so memory does not grow with the images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

from pipeline.data.prepared import PreparedDataset
from pipeline.inference.backends.torch_graph import torch_network
from pipeline.inference.engine.sliding_window import predict
from pipeline.inference.settings import InferenceSettings, load_settings
from pipeline.metrics import (
    confusion,
    histogram_best_f1,
    histogram_best_mean_dice,
    per_class,
    score_histogram,
)
from pipeline.networks import SegmentationNetwork
from pipeline.training.settings import TrainSettings
from pipeline.transforms.presets import preprocess


def validation_cases(prepared: PreparedDataset, settings: TrainSettings) -> list[dict[str, Any]]:
    """Validation images normalised like training, with labels (class indices) and the FOV if any."""
    out = []
    for case in prepared.cases("val"):
        arrays = prepared.load(case)
        out.append(
            {
                "case": case,
                "image": preprocess(settings.dataset, arrays["image"], settings.augment),
                "label": arrays["label"][0],
                "fov": arrays["fov"][0] > 0 if "fov" in arrays else None,
            }
        )
    return out


def validation_settings(inference: InferenceSettings, device: torch.device) -> InferenceSettings:
    """configs/inference.yaml's settings as validation uses them: images already normalised, no TTA."""
    return load_settings(inference, intensity="none", device=device.type, tta=())


def validation_scores(probs: np.ndarray, label: np.ndarray, fov: np.ndarray | None) -> tuple[float, float]:
    """(Dice, IoU) of one image inside `fov`. probs (K, H, W), label (H, W) class indices. One channel:
    foreground probability >= 0.5 against label > 0. K channels: the argmax label map, each
    foreground class 1..K-1 one-vs-rest, Dice and IoU averaged over those classes."""
    if probs.shape[0] == 1:
        scores = confusion(probs[0] >= 0.5, label > 0, fov)
        return scores.dice, scores.iou
    classes = per_class(probs.argmax(0), label, probs.shape[0], fov)[1:]
    return float(np.mean([c.dice for c in classes])), float(np.mean([c.iou for c in classes]))


@dataclass(frozen=True)
class Validation:
    """One validation pass: mean Dice and IoU (`validation_scores`) over the images, and for a
    one-channel network each image's in-FOV score histogram (images, 2, bins), else None."""

    dice: float
    iou: float
    histograms: np.ndarray | None = None


def validate(model: SegmentationNetwork, cases: list[dict[str, Any]], settings: InferenceSettings) -> Validation:
    """Whole validation images through `predict`: their scores and, one channel, histograms."""
    if not cases:
        return Validation(float("nan"), float("nan"))
    net = torch_network(model, settings)
    scores, histograms = [], []
    for case in cases:
        probs = predict(net, case["image"], settings=settings)
        scores.append(validation_scores(probs, case["label"], case["fov"]))
        if probs.shape[0] == 1:
            histograms.append(score_histogram(probs[0], case["label"] > 0, case["fov"]))
    dices, ious = zip(*scores)
    return Validation(float(np.mean(dices)), float(np.mean(ious)), np.stack(histograms) if histograms else None)


def validation_thresholds(histograms: np.ndarray | None) -> dict[str, float | int] | None:
    """The validation operating points of a one-channel network, as checkpoints store them:
    best_f1 = the threshold maximising F1 over the pooled in-FOV pixels of all validation images
    (`histogram_best_f1`), val_f1 that F1; best_dice = the threshold maximising the mean over images
    of per-image Dice (`histogram_best_mean_dice`), val_dice that mean; cases = the images. Both are
    on the grid 0.001 .. 0.999 (step 0.001), exact to that bin width. None for a K-channel network
    (argmax, no threshold), without validation images, or without foreground in them."""
    if histograms is None or not len(histograms) or not histograms[:, 1].any():
        return None
    best_f1, val_f1 = histogram_best_f1(histograms.sum(axis=0))
    best_dice, val_dice = histogram_best_mean_dice(histograms)
    return {
        "best_f1": best_f1,
        "best_dice": best_dice,
        "val_f1": val_f1,
        "val_dice": val_dice,
        "cases": len(histograms),
    }


def threshold_metrics(thresholds: Mapping[str, float | int] | None) -> dict[str, float]:
    """The MLflow metrics of `validation_thresholds` (none for None)."""
    if thresholds is None:
        return {}
    return {
        "val_threshold_best_f1": float(thresholds["best_f1"]),
        "val_f1_at_best_f1": float(thresholds["val_f1"]),
        "val_threshold_best_dice": float(thresholds["best_dice"]),
        "val_dice_at_best_dice": float(thresholds["val_dice"]),
    }
