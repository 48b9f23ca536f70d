"""The `train` stage entry (`segpipe train DATASET NETWORK`): the one place training reads configs/.

It reads configs/train.yaml (the profile), configs/networks.yaml (the network preset),
configs/augment.yaml (the dataset's preset), configs/inference.yaml (the sliding-window settings
of validation), configs/data.yaml (where the prepared data are) and configs/tracking.yaml (MLflow:
system metrics, run groups), and passes values down.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from pipeline.config import config_path, load_config
from pipeline.data.prepared import PreparedDataset, open_prepared, prepared_root
from pipeline.data.settings import load_data_config
from pipeline.inference import settings_from_config
from pipeline.preprocessing.fingerprint import read_fingerprint
from pipeline.tracking import tracking_settings
from pipeline.training.instance_output import median_object_area
from pipeline.training.loop import TrainResult, run_training
from pipeline.training.planning import plan_training
from pipeline.training.settings import TrainConfigs, resolve_settings


def load_train_configs() -> TrainConfigs:
    """configs/train.yaml, networks.yaml and augment.yaml as loaded dicts."""
    return TrainConfigs(load_config("train"), load_config("networks"), load_config("augment"),
                        str(config_path("train")))


def train(
    dataset: str,
    network: str,
    *,
    profile: str | None = None,
    resume: bool = False,
    overrides: Mapping[str, Any] | None = None,
    models_dir: Path | None = None,
    prepared: PreparedDataset | None = None,
    fold: int | None = None,
) -> TrainResult:
    """Train `network` (the DVC matrix name: unet, unetpp, u2net, ...) on `dataset`; `fold` (None:
    configs/train.yaml's `fold`) validates on that cross-validation fold and trains on the others.

    Settings left null (patch_size, batch_size, normalize: auto) are planned from the prepared
    dataset's fingerprint.json (`pipeline.training.planning`); explicit ones win.

    Writes models/<dataset>/<network>/: best.pt, last.pt, log.csv, config.json, plan.json.
    """
    settings = resolve_settings(load_train_configs(), dataset, network, profile, overrides, fold)
    inference = settings_from_config(load_config("inference"), str(config_path("inference")))
    out_dir = Path(models_dir or settings["models_dir"]) / dataset / network
    prepared = (prepared or open_prepared(dataset, prepared_root(load_data_config(), dataset))).with_fold(settings["fold"])
    prepared = prepared.with_target(settings["target"])  # border: background / interior / border of the instances
    fingerprint = read_fingerprint(prepared.root, dataset)
    plan = plan_training(fingerprint, settings)
    tracking = tracking_settings(load_config("tracking"), str(config_path("tracking")))
    return run_training(plan.settings, prepared, out_dir, inference, resume=resume, tracking=tracking,
                        plan=plan.to_dict(), median_area=median_object_area(fingerprint))
