"""`predict` for an image held in memory, on the model's backend: the public `pipeline.inference.predict`."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.inference.backends.select import inference_network
from pipeline.inference.backends.torch_graph import InferenceNetwork, ModelLike
from pipeline.inference.engine import sliding_window
from pipeline.inference.settings import InferenceSettings, load_settings


def predict(
    model: ModelLike | InferenceNetwork,
    image: np.ndarray | torch.Tensor,
    *,
    settings: InferenceSettings | None = None,
    **options: Any,
) -> np.ndarray:
    """Class probabilities (K, H, W) float32 of an image (C, H, W): `engine.sliding_window.predict` on
    `inference_network(model, settings)`, so a .onnx export (or `backend: onnxruntime`) runs on ONNX
    Runtime. `options` (tile, overlap, blend, tta, ...) override `settings` as in the engine's."""
    settings = load_settings(settings, **options)
    return sliding_window.predict(inference_network(model, settings), image, settings=settings)
