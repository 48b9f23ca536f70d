"""segpipe's MLflow pyfunc model, logged as code by `pipeline.training.mlflow_model` (MLflow's
models from code): MLflow runs this file when it loads the model, so nothing is unpickled; the
network is rebuilt from the `checkpoint` artifact (best.pt) by `pipeline.networks`' safe loader.
The package never imports this file (running it sets MLflow's current model).

`predict(image)` takes one image (C, H, W) float32 as stored, applies the preprocessing the
checkpoint recorded from training (`pipeline.transforms.presets.preprocess`: channels, CLAHE,
z-score or percentiles, as `segpipe evaluate` does) and runs the project's sliding-window
`pipeline.inference.predict` with the `settings` artifact; it returns the label map uint8 (H, W) of
class indices (a K-channel network: the argmax over the classes; one channel: the foreground
probability >= the threshold), or with `params={"output": "probabilities"}` the
probabilities float32 (K, H, W). The threshold is `params={"threshold": ...}`: a number in (0, 1) as a
string, `val` or `val-dice` (the checkpoint's validation thresholds, `pipeline.inference.resolve_threshold`),
by default the settings' threshold.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel, PythonModelContext

from pipeline.errors import SegpipeError
from pipeline.inference.backends.torch_graph import torch_network
from pipeline.inference.engine.labels import to_labels
from pipeline.inference.engine.sliding_window import predict
from pipeline.inference.settings import parse_threshold, resolve_threshold
from pipeline.networks import read_checkpoint
from pipeline.training.mlflow_model import (
    CHECKPOINT_ARTIFACT,
    OUTPUT_PARAM,
    OUTPUTS,
    SETTINGS_ARTIFACT,
    THRESHOLD_PARAM,
    read_settings,
)
from pipeline.transforms.presets import preprocess


class SegmentationModel(PythonModel):
    """best.pt behind MLflow's pyfunc interface (module docstring)."""

    def load_context(self, context: PythonModelContext) -> None:
        """The network and its recorded preprocessing from the checkpoint, the inference settings."""
        checkpoint = Path(context.artifacts[CHECKPOINT_ARTIFACT])
        state = read_checkpoint(checkpoint)
        if not isinstance(state.get("augment"), dict):
            raise SegpipeError(f"{checkpoint}: the checkpoint records no training preprocessing (augment)")
        self.checkpoint = checkpoint
        self.dataset = str(state.get("dataset", "the checkpoint"))
        self.augment = dict(state["augment"])
        self.settings = read_settings(context.artifacts[SETTINGS_ARTIFACT])
        self.net = torch_network(checkpoint, self.settings)

    def predict(
        self, context: PythonModelContext, model_input: np.ndarray, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        """Label map (H, W) uint8, or probabilities (K, H, W) float32, of one image (C, H, W)."""
        params = params or {}
        output = params.get(OUTPUT_PARAM, OUTPUTS[0])
        if output not in OUTPUTS:
            raise MlflowException.invalid_parameter_value(
                f"{OUTPUT_PARAM} must be one of {', '.join(OUTPUTS)}, got {output!r}"
            )
        asked = params.get(THRESHOLD_PARAM, self.settings.threshold)
        threshold = self._threshold(asked) if output == "labels" else None
        image = np.asarray(model_input)
        if image.ndim != 3:
            raise MlflowException.invalid_parameter_value(f"expected one image (C, H, W), got shape {image.shape}")
        try:
            probs = predict(self.net, preprocess(self.dataset, image, self.augment), settings=self.settings)
        except SegpipeError as exc:  # a bad input (e.g. fewer channels than the preprocessing selects)
            raise MlflowException.invalid_parameter_value(str(exc)) from exc
        return probs if threshold is None else to_labels(probs, threshold)[0]

    def _threshold(self, value: float | str) -> float:
        """The number the threshold param (or setting) `value` stands for; MLflow's invalid-parameter error."""
        try:
            return resolve_threshold(
                parse_threshold(str(value), f"param {THRESHOLD_PARAM}"),
                self.net.thresholds,
                self.net.out_channels,
                str(self.checkpoint),
            )
        except SegpipeError as exc:
            raise MlflowException.invalid_parameter_value(str(exc)) from exc


set_model(SegmentationModel())
