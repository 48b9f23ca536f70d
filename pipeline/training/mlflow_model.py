"""The best model of a training as an MLflow model, logged with its train run and registered.

`log_best_model` logs `best.pt` as the MLflow pyfunc model `model` of the active run and, with
`register`, registers it as `segpipe-DATASET-NETWORK` (`registered_name`) with the tags dataset,
network, architecture, precision, val_dice and best_epoch. The model:

- code: `pipeline/training/pyfunc_model.py`, logged as code (MLflow's "models from code": MLflow
  runs that file when it loads the model, nothing is unpickled), and the `pipeline` package itself
  (`code_paths`), which MLflow puts first on `sys.path` when it loads the model: loading needs no
  installed segpipe, only its dependencies;
- artifacts: `checkpoint` = best.pt, read by `pipeline.networks`' safe loader (`torch.load` with
  `weights_only=True`), and `settings` = the sliding-window settings of configs/inference.yaml as
  JSON (`write_settings`; `preprocess` is `checkpoint` and `intensity` `none`: the model always
  applies the checkpoint's recorded preprocessing, whose output is float);
- signature (`model_signature`): input one image, float32 (C, H, W) as stored (before the
  preprocessing), no batch; output the label map uint8 (H, W) of class indices (argmax over K
  channels, threshold on one), or with the param `output` = `probabilities` the class probabilities
  float32 (K, H, W); the param `threshold` (one channel): a number in (0, 1), `val` or `val-dice`
  (the checkpoint's validation thresholds, as `segpipe infer --threshold`), by default the settings';
- requirements (`pinned_requirements`): segpipe's runtime dependencies at the installed versions.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from pipeline.errors import SegpipeError
from pipeline.inference.settings import InferenceSettings, load_settings
from pipeline.training.settings import TrainSettings

if TYPE_CHECKING:
    from mlflow.models import ModelSignature

MODEL_NAME = "model"
"""The name of the logged model in its run (`runs:/RUN_ID/model`)."""
CHECKPOINT_ARTIFACT = "checkpoint"
SETTINGS_ARTIFACT = "settings"
OUTPUT_PARAM = "output"
OUTPUTS = ("labels", "probabilities")
"""Values of the `output` param; the first is the default."""
THRESHOLD_PARAM = "threshold"
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
"""The model's code file (MLflow's models from code)."""
PACKAGE_DIR = Path(__file__).resolve().parents[1]
"""The `pipeline` package, logged with the model (`code_paths`)."""
NOT_SERVED = frozenset({"dvc", "openslide-python", "openslide-bin"})
"""segpipe dependencies the model never imports (dvc runs the pipeline, OpenSlide serves a benchmark's
MONAI row), left out of its requirements."""


def registered_name(dataset: str, network: str) -> str:
    """The registry name of a training's model: `segpipe-DATASET-NETWORK` (the DVC matrix's network key)."""
    return f"segpipe-{dataset}-{network}"


def write_settings(settings: InferenceSettings, path: Path) -> None:
    """`settings` as the model's JSON artifact (`read_settings` reads it back)."""
    path.write_text(json.dumps(asdict(settings), indent=2) + "\n", encoding="utf-8")


def read_settings(path: str | Path) -> InferenceSettings:
    """The inference settings of a model's JSON artifact, validated (unknown keys are an error)."""
    return load_settings(None, **json.loads(Path(path).read_text(encoding="utf-8")))


def model_signature(threshold: float | str = InferenceSettings().threshold) -> ModelSignature:
    """The `ModelSignature`: float32 (C, H, W) in, uint8 (H, W) out, the string params `output` and
    `threshold` (default: `threshold`, the settings' own)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1))]),
        params=ParamSchema(
            [ParamSpec(OUTPUT_PARAM, "string", OUTPUTS[0]), ParamSpec(THRESHOLD_PARAM, "string", str(threshold))]
        ),
    )


def pinned_requirements() -> list[str]:
    """segpipe's runtime dependencies (no extras, no `NOT_SERVED`) as `name==installed version`;
    a local version label is dropped (torch 2.13.0+cpu -> torch==2.13.0)."""
    from importlib.metadata import PackageNotFoundError, requires, version

    from packaging.requirements import Requirement
    from packaging.version import Version

    try:
        declared = [Requirement(line) for line in requires("segpipe") or []]
        return [
            f"{req.name}=={Version(version(req.name)).public}"
            for req in declared
            if req.name not in NOT_SERVED and (req.marker is None or req.marker.evaluate({"extra": ""}))
        ]
    except PackageNotFoundError as exc:
        raise SegpipeError(
            f"cannot pin the model's requirements: {exc.name} is not installed "
            "(install segpipe with pip, as the Makefile does)"
        ) from exc


def model_tags(settings: TrainSettings, best: Mapping[str, Any]) -> dict[str, str]:
    """The tags of the logged model and its registered version."""
    return {
        "dataset": settings.dataset,
        "network": settings.network_key,
        "architecture": settings.network,
        "precision": settings.precision,
        "val_dice": f"{float(best['val_dice']):.6f}",
        "best_epoch": str(best["epoch"]),
    }


def _log_pyfunc(checkpoint: Path, inference: InferenceSettings, tags: Mapping[str, str]) -> str:
    """Log the pyfunc model `model` of `checkpoint` in the active MLflow run; returns its model URI."""
    import mlflow

    with tempfile.TemporaryDirectory(prefix="segpipe-model-") as tmp:
        settings_file = Path(tmp) / "inference_settings.json"
        write_settings(load_settings(inference, preprocess="checkpoint", intensity="none"), settings_file)
        with warnings.catch_warnings():  # the signature says what an input example would
            warnings.filterwarnings("ignore", ".*An input example was not provided")
            return mlflow.pyfunc.log_model(
                name=MODEL_NAME,
                python_model=str(PYFUNC_CODE),
                code_paths=[str(PACKAGE_DIR)],
                artifacts={CHECKPOINT_ARTIFACT: str(checkpoint), SETTINGS_ARTIFACT: str(settings_file)},
                signature=model_signature(inference.threshold),
                pip_requirements=pinned_requirements(),
                tags=dict(tags),
            ).model_uri


def log_best_model(
    checkpoint: Path,
    settings: TrainSettings,
    inference: InferenceSettings,
    best: Mapping[str, Any],
    *,
    register: bool,
) -> str:
    """Log `checkpoint` (best.pt) as the pyfunc model `model` of the active MLflow run, with the
    sliding-window settings `inference`; `settings` are the training's, `best` its best epoch
    ({"val_dice", "epoch"}). With `register`, register it as `registered_name(...)`. Prints and
    returns the model's URI (`models:/NAME/VERSION` when registered); any failure raises a
    SegpipeError naming the model, from MLflow's exception."""
    import mlflow

    tags = model_tags(settings, best)
    name = registered_name(settings.dataset, settings.network_key)
    try:
        uri = _log_pyfunc(checkpoint, inference, tags)
        if register:
            uri = f"models:/{name}/{mlflow.register_model(uri, name, tags=tags).version}"
    except Exception as exc:
        raise SegpipeError(
            f"{checkpoint}: logging it as an MLflow model (registry name {name!r}) failed "
            f"({type(exc).__name__}: {exc}); the training's files are kept: "
            f"`segpipe train {settings.dataset} {settings.network_key} --resume` "
            "logs the model again without training, or set log_model: false in configs/tracking.yaml"
        ) from exc
    print(f"{settings.dataset}/{settings.network_key}: MLflow model {uri}")
    return uri
