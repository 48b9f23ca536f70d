"""Validation during training: whole validation images through the project's sliding-window
inference (`pipeline.inference.predict`, the code `segpipe infer` runs), scored inside the FOV."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from pipeline.data.prepared import PreparedDataset
from pipeline.inference import InferenceSettings, inference_network, load_settings, predict
from pipeline.metrics import confusion
from pipeline.networks import SegmentationNetwork
from pipeline.transforms.presets import preprocess


def validation_cases(prepared: PreparedDataset, settings: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Validation images normalised like training, with labels and the FOV if any."""
    out = []
    for case in prepared.cases("val"):
        arrays = prepared.load(case)
        out.append({
            "case": case,
            "image": preprocess(settings["dataset"], arrays["image"], settings["augment"]),
            "label": arrays["label"][0] > 0,
            "fov": arrays["fov"][0] > 0 if "fov" in arrays else None,
        })
    return out


def validation_settings(inference: InferenceSettings, device: torch.device) -> InferenceSettings:
    """configs/inference.yaml's settings as validation uses them: images already normalised, no TTA."""
    return load_settings(inference, intensity="none", device=device.type, tta=())


def validate(model: SegmentationNetwork, cases: list[dict[str, Any]], settings: InferenceSettings) -> tuple[float, float]:
    """Mean Dice and IoU over whole validation images (threshold 0.5 on the foreground, inside the
    FOV when the dataset has one)."""
    if not cases:
        return float("nan"), float("nan")
    net = inference_network(model, settings)
    dices, ious = [], []
    for case in cases:
        probs = predict(net, case["image"], settings=settings)
        pred = probs[0] >= 0.5 if probs.shape[0] == 1 else probs.argmax(0) > 0
        scores = confusion(pred, case["label"], case["fov"]).scores()
        dices.append(scores["dice"])
        ious.append(scores["iou"])
    return float(np.mean(dices)), float(np.mean(ious))
