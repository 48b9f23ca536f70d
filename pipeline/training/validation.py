"""Validation during training: whole validation images through the project's sliding-window
inference (`pipeline.inference.predict`, the code `segpipe infer` runs), scored inside the FOV (which
leaves out the card's ignore_value)."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from pipeline.data.prepared import PreparedDataset
from pipeline.inference import InferenceSettings, inference_network, load_settings, predict
from pipeline.metrics import confusion, per_class
from pipeline.networks import SegmentationNetwork
from pipeline.transforms.presets import preprocess


def validation_cases(prepared: PreparedDataset, settings: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Validation images normalised like training, with labels (class indices) and the FOV if any."""
    out = []
    for case in prepared.cases("val"):
        arrays = prepared.load(case)
        out.append({
            "case": case,
            "image": preprocess(settings["dataset"], arrays["image"], settings["augment"]),
            "label": arrays["label"][0],
            "fov": arrays["fov"][0] > 0 if "fov" in arrays else None,
        })
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


def validate(model: SegmentationNetwork, cases: list[dict[str, Any]], settings: InferenceSettings) -> tuple[float, float]:
    """Mean Dice and IoU (`validation_scores`) over whole validation images."""
    if not cases:
        return float("nan"), float("nan")
    net = inference_network(model, settings)
    scores = [validation_scores(predict(net, case["image"], settings=settings), case["label"], case["fov"])
              for case in cases]
    dices, ious = zip(*scores)
    return float(np.mean(dices)), float(np.mean(ious))
