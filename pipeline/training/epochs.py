"""What each epoch of a training records: its row of log.csv, its console line and its MLflow
metrics (step = epoch; a resumed run logs the epochs its MLflow run missed)."""

from __future__ import annotations

import csv
import io
from typing import Any, Mapping

import torch

LOG_COLUMNS = (
    "epoch",
    "step",
    "lr",
    "train_loss",
    "val_dice",
    "val_iou",
    "patches_per_s",
    "data_wait_share",
    "seconds",
    "elapsed_seconds",
)
"""log.csv: `seconds` = the epoch's training steps; `elapsed_seconds` = wall time of the training so
far (set-up, validation and checkpoints included; a resumed run adds to the killed run's time)."""


def epoch_metrics(row: Mapping[str, Any], means: torch.Tensor) -> dict[str, float]:
    """The MLflow metrics of one epoch."""
    metrics = {k: float(row[k]) for k in ("train_loss", "lr", "patches_per_s", "data_wait_share")}
    if len(means) > 2:
        metrics.update({f"train_loss_head{i}": float(v) for i, v in enumerate(means[1:])})
    if row["val_dice"] != "":
        metrics.update(val_dice=float(row["val_dice"]), val_iou=float(row["val_iou"]))
    return metrics


def log_epochs(tracker: Any, metrics: list[dict[str, float]], after: int) -> None:
    """Log the metrics of the epochs after epoch `after` (step = epoch number)."""
    for item in metrics:
        if int(item["epoch"]) > after:
            tracker.log_metrics({k: v for k, v in item.items() if k != "epoch"}, step=int(item["epoch"]))


def logged_epochs(tracker: Any) -> int:
    """The last epoch whose train_loss the active run holds (0: none)."""
    from mlflow.tracking import MlflowClient

    history = MlflowClient().get_metric_history(tracker.active_run().info.run_id, "train_loss")
    return max((m.step for m in history), default=0)


def log_text(rows: list[dict[str, Any]]) -> str:
    """log.csv of `rows`."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LOG_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def epoch_summary(row: Mapping[str, Any], epochs: int) -> str:
    """The console line of an epoch."""
    val = f" | val Dice {row['val_dice']:.4f} IoU {row['val_iou']:.4f}" if row["val_dice"] != "" else ""
    return (
        f"epoch {row['epoch']}/{epochs}  loss {row['train_loss']:.4f}{val} | lr {row['lr']:.2e}  "
        f"{row['patches_per_s']:.0f} patches/s  data wait {100 * row['data_wait_share']:.0f}%  "
        f"{row['seconds']:.0f} s"
    )


__all__ = ["LOG_COLUMNS", "epoch_metrics", "epoch_summary", "log_epochs", "log_text", "logged_epochs"]
