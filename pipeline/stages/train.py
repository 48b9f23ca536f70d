"""`segpipe train DATASET NETWORK`: the entry of the train stage, the one place training reads configs/.

It reads configs/train.yaml (the profile), configs/networks.yaml (the network preset),
configs/augment.yaml (the dataset's preset), configs/inference.yaml (the sliding-window settings
of validation), configs/data.yaml (where the prepared data are) and configs/tracking.yaml (MLflow:
system metrics, run groups), and passes values down.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Mapping

from pipeline.config import config_path, load_config, read_config, setting_argument
from pipeline.data.prepared import PreparedDataset, open_prepared, prepared_root
from pipeline.data.settings import check_data_config
from pipeline.inference.settings import settings_from_config
from pipeline.preprocessing.fingerprint import read_fingerprint
from pipeline.stages.arguments import precision_arg
from pipeline.tracking import tracking_settings
from pipeline.training.instance_output import median_object_area
from pipeline.training.loop import TrainResult, run_training
from pipeline.training.planning import plan_training
from pipeline.training.settings import TrainConfigs, deep_merge, resolve_settings
from pipeline.transforms.presets import preset_section


def load_train_configs(dataset: str) -> TrainConfigs:
    """configs/train.yaml and networks.yaml as loaded, and `dataset`'s preset of configs/augment.yaml."""
    augment = preset_section(load_config("augment"), dataset)
    return TrainConfigs(load_config("train"), load_config("networks"), augment, str(config_path("train")))


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
    settings = resolve_settings(load_train_configs(dataset), dataset, network, profile, overrides, fold)
    inference = read_config("inference", settings_from_config)
    out_dir = Path(models_dir or settings.models_dir) / dataset / network
    if prepared is None:
        prepared = open_prepared(dataset, prepared_root(read_config("data", check_data_config), dataset))
    prepared = prepared.with_fold(settings.fold)
    prepared = prepared.with_target(settings.target)  # border: background / interior / border of the instances
    fingerprint = read_fingerprint(prepared.root, dataset)
    plan = plan_training(fingerprint, settings)
    tracking = read_config("tracking", tracking_settings)
    return run_training(
        plan.settings,
        prepared,
        out_dir,
        inference,
        resume=resume,
        tracking=tracking,
        plan=plan.to_dict(),
        median_area=median_object_area(fingerprint),
    )


def _cmd_train(args: argparse.Namespace) -> int:
    overrides: dict = {}
    for item in args.set or []:
        overrides = deep_merge(overrides, item)
    if args.precision:
        overrides["precision"] = args.precision
    result = train(
        args.dataset, args.network, profile=args.profile, resume=args.resume, overrides=overrides, fold=args.fold
    )
    if result.stopped_early:
        print(
            f"segpipe train: stopped by max_minutes after {result.steps} steps: this model depends on the "
            "machine's speed, not only on params and data (exit 3)",
            file=sys.stderr,
        )
        return 3
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Patch training with validation on whole images, best/last checkpoints, "
        "--resume and MLflow logging; writes models/DATASET/NETWORK/. Settings: the profile of "
        "configs/train.yaml. Under torchrun: DistributedDataParallel."
    )
    p.add_argument("dataset", help="drive, hela or u373 (prepared with `segpipe prepare`)")
    p.add_argument("network", help="unet, unetpp or u2net (the profile may substitute, e.g. u2netp)")
    p.add_argument("--profile", default=None, help="profile of configs/train.yaml (default: its `profile`)")
    p.add_argument("--resume", action="store_true", help="continue from models/DATASET/NETWORK/last.pt")
    p.add_argument(
        "--fold",
        type=int,
        default=None,
        metavar="K",
        help="cross-validation: validate on fold K of the prepared data, train on the others "
        "(default: configs/train.yaml's `fold`; null there: the prepare split)",
    )
    p.add_argument(
        "--set",
        action="append",
        type=setting_argument,
        metavar="KEY=VALUE",
        help="override a profile setting for this run, e.g. --set optimizer.lr=0.001 (repeatable)",
    )
    precision_arg(p, "the profile of configs/train.yaml")
    p.set_defaults(handler=_cmd_train)
