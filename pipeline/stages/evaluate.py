"""`segpipe evaluate DATASET NETWORK`: the entry of the evaluate stage.

Reads configs/evaluate.yaml, configs/inference.yaml (with evaluate.yaml's `inference` overrides, then
`--precision`), configs/train.yaml (`models_dir`), configs/data.yaml (`prepared_dir`) and
configs/tracking.yaml (MLflow), and calls `pipeline.evaluation.evaluate.evaluate_checkpoint`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pipeline.config import load_config, read_config
from pipeline.data.prepared import open_prepared, prepared_root
from pipeline.data.settings import check_data_config
from pipeline.evaluation.evaluate import evaluate_checkpoint
from pipeline.evaluation.settings import evaluate_config
from pipeline.inference.settings import load_settings, settings_from_config
from pipeline.stages.arguments import precision_arg
from pipeline.tracking import tracking_settings


def evaluate(
    dataset: str,
    network: str,
    *,
    models_dir: Path | None = None,
    results_dir: Path | None = None,
    precision: str | None = None,
) -> dict[str, Any]:
    """models/DATASET/NETWORK/best.pt on the test split into results/DATASET/NETWORK/; returns
    metrics.json's dict with the timings of timings.json added. `models_dir`/`results_dir` None: the configs'."""
    cfg = read_config("evaluate", evaluate_config)
    base = read_config("inference", settings_from_config)
    settings = load_settings(load_settings(base, **cfg.inference, intensity="none"), precision=precision)
    models = Path(models_dir if models_dir is not None else load_config("train")["models_dir"])
    data = open_prepared(dataset, prepared_root(read_config("data", check_data_config), dataset))
    out_dir = Path(results_dir if results_dir is not None else cfg.results_dir) / dataset / network
    return evaluate_checkpoint(
        models / dataset / network / "best.pt",
        data,
        network,
        cfg,
        settings,
        out_dir,
        tracking=read_config("tracking", tracking_settings),
    )


def _cmd_evaluate(args: argparse.Namespace) -> int:
    evaluate(args.dataset, args.network, precision=args.precision)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Whole-image sliding-window inference on the test split with the best checkpoint; writes "
        "results/DATASET/NETWORK/ (metrics.json, per_image.csv, curves, overlays). Settings: "
        "configs/evaluate.yaml and configs/inference.yaml."
    )
    p.add_argument("dataset")
    p.add_argument("network")
    precision_arg(p, "configs/inference.yaml")
    p.set_defaults(handler=_cmd_evaluate)
