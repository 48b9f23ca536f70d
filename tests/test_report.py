"""`segpipe report`: results/*/*/metrics.json -> results/summary.csv and results/report.md."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from pipeline.config import REPO_ROOT
from pipeline.errors import SegpipeError
from pipeline.stages.report import report


def write_metrics(results: Path, dataset: str, network: str, **metrics: Any) -> None:
    folder = results / dataset / network
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"dataset": dataset, "network": network, **metrics}))


def write_log(models: Path, dataset: str, network: str, seconds: list[float]) -> None:
    folder = models / dataset / network
    folder.mkdir(parents=True)
    pd.DataFrame(
        {
            "epoch": range(1, len(seconds) + 1),
            "step": range(len(seconds)),
            "lr": 0.001,
            "train_loss": 0.5,
            "val_dice": 0.7,
            "val_iou": 0.6,
            "patches_per_s": 100.0,
            "data_wait_share": 0.1,
            "seconds": seconds,
            "elapsed_seconds": np.cumsum(seconds) + 5.0,  # + set-up
        }
    ).to_csv(folder / "log.csv", index=False)


@pytest.fixture
def results(tmp_path: Path) -> Path:
    out = tmp_path / "results"
    write_metrics(
        out,
        "u373",
        "unet",
        network_used="unet",
        dice=0.91,
        iou=0.84,
        pooled_f1=0.92,
        seg=0.77,
        ap50=0.81,
        maxf=0.93,
        mae=0.02,
        pooled_auc=0.99,
        pooled_accuracy=0.97,
    )
    write_metrics(
        out,
        "drive",
        "u2net",
        network_used="u2netp",
        dice=0.78,
        iou=0.64,
        pooled_f1=0.79,
        pooled_f1_best=0.80,
        pooled_auc=0.975,
        pooled_accuracy=0.955,
        maxf=0.81,
        mae=0.05,
        observer2_pooled_f1=0.7889,
        observer2_pooled_accuracy=0.9637,
    )
    write_metrics(
        out,
        "drive",
        "unet",
        network_used="unet",
        dice=0.8123456,
        iou=0.68,
        pooled_f1=0.8251,
        pooled_f1_best=0.8262,
        pooled_auc=0.9812,
        pooled_accuracy=0.9561,
        maxf=0.83,
        mae=0.04,
        observer2_pooled_f1=0.7889,
        observer2_pooled_accuracy=0.9637,
    )
    write_log(tmp_path / "models", "drive", "unet", [60.0, 90.0, 30.0])
    return out


def test_report_table_and_summary(results: Path) -> None:
    path = report(results, models_dir=results.parent / "models")
    assert path == results / "report.md"
    summary = pd.read_csv(results / "summary.csv")
    assert list(zip(summary["dataset"], summary["network"])) == [
        ("drive", "unet"),
        ("drive", "u2net"),
        ("u373", "unet"),
    ]
    assert summary.loc[0, "train_minutes"] == pytest.approx(185.0 / 60) and summary.loc[0, "epochs"] == 3
    assert summary["train_minutes"].isna().tolist() == [False, True, True]
    assert summary.loc[2, "seg"] == pytest.approx(0.77)

    lines = path.read_text().splitlines()
    table = [line for line in lines if line.startswith("|")]
    assert table[0] == (
        "| dataset | network | checkpoint | Dice | IoU | F1 pooled | F1 pooled @ val t | AUC-ROC | "
        "accuracy | SEG | AP@0.5 | maxFβ | MAE | train min | epochs |"
    )
    assert table[2] == (
        "| drive | unet | unet | 0.8123 | 0.6800 | 0.8251 | 0.8262 | 0.9812 | 0.9561 | – | – | "
        "0.8300 | 0.0400 | 3.1 | 3 |"
    )
    assert table[3].startswith("| drive | u2net | u2netp | 0.7800 |") and table[3].endswith("| – | – |")
    assert table[4] == "| drive | 2nd observer | – | – | – | 0.7889 | – | – | 0.9637 | – | – | – | – | – | – |"
    assert table[5].startswith(
        "| u373 | unet | unet | 0.9100 | 0.8400 | 0.9200 | – | 0.9900 | 0.9700 | 0.7700 | 0.8100 |"
    )
    assert len(table) == 6
    assert not [p for p in results.iterdir() if p.name.startswith(".")]


def test_report_filters(results: Path) -> None:
    report(results, datasets=["drive"], networks=["u2net"], models_dir=results.parent / "models")
    summary = pd.read_csv(results / "summary.csv")
    assert list(zip(summary["dataset"], summary["network"])) == [("drive", "u2net")]
    with pytest.raises(SegpipeError, match="networks \\['unetpp'\\].*segpipe evaluate"):
        report(results, networks=["unetpp"], models_dir=results.parent / "models")


def test_report_without_metrics_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SegpipeError, match=r"no <dataset>/<network>/metrics\.json found; run `segpipe evaluate"):
        report(tmp_path / "results", models_dir=tmp_path / "models")


def test_report_rejects_broken_inputs(results: Path) -> None:
    (results / "drive" / "unet" / "metrics.json").write_text("{not json")
    with pytest.raises(SegpipeError, match=r"drive/unet/metrics\.json: not valid JSON"):
        report(results, models_dir=results.parent / "models")
    (results / "drive" / "unet" / "metrics.json").write_text("{}")
    (results.parent / "models" / "drive" / "unet" / "log.csv").write_text("epoch,loss\n1,0.5\n")
    with pytest.raises(SegpipeError, match=r"log\.csv: missing column\(s\) \['elapsed_seconds'\]"):
        report(results, models_dir=results.parent / "models")


def test_report_defaults_come_from_configs(results: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = results.parent
    shutil.copytree(REPO_ROOT / "configs", root / "configs")
    monkeypatch.chdir(root)
    monkeypatch.setenv("SEGPIPE_CONFIG_DIR", str(root / "configs"))
    assert report() == Path("results") / "report.md"
    assert pd.read_csv(root / "results" / "summary.csv").loc[0, "train_minutes"] == pytest.approx(185.0 / 60)


def test_report_lists_mlflow_runs_and_pairs_not_evaluated(results: Path) -> None:
    record = {"run_id": "0a1b2c", "experiment_id": "1", "tracking_uri": "sqlite:///mlflow.db"}
    (results / "drive" / "unet" / "mlflow.json").write_text(json.dumps(record))
    matrix = [(d, n) for d in ("drive", "u373") for n in ("unet", "u2net")]
    path = report(results, models_dir=results.parent / "models", matrix=matrix)
    summary = pd.read_csv(results / "summary.csv")
    assert summary.loc[0, "mlflow_run_id"] == "0a1b2c" and summary["mlflow_run_id"].isna().tolist() == [
        False,
        True,
        True,
    ]
    assert summary.loc[0, "mlflow_tracking_uri"] == "sqlite:///mlflow.db"
    text = path.read_text()
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert table[0].endswith("| train min | epochs | MLflow run |")
    assert table[2].endswith("| 3.1 | 3 | 0a1b2c |") and table[3].endswith("| – | – | – |")
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db" in text
    assert "## Not evaluated yet" in text and "failed to load some metrics" in text
    assert [line for line in text.splitlines() if line.startswith("- ")] == [
        "- drive: http://127.0.0.1:5000/#/experiments/1?workflowType=machine_learning",
        "- u373 × u2net: `dvc repro evaluate@u373-u2net` "
        "(or `segpipe train u373 u2net && segpipe evaluate u373 u2net`)",
    ]
    report(results, datasets=["drive"], models_dir=results.parent / "models", matrix=matrix)
    assert "Not evaluated yet" not in (results / "report.md").read_text()  # filtered to drive: nothing missing
    (results / "drive" / "unet" / "mlflow.json").write_text("{oops")
    with pytest.raises(SegpipeError, match=r"drive/unet/mlflow\.json: not valid JSON"):
        report(results, models_dir=results.parent / "models", matrix=matrix)
