"""The short table `segpipe evaluate` prints at the end: the key scores of metrics.json."""

from __future__ import annotations

from typing import Any, Mapping

import pandas as pd

from pipeline.metrics import MEAN_FG


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"


def binary_table(summary: Mapping[str, Any]) -> str:
    """Two classes: the key scores at the threshold(s), and the threshold-free ones."""
    columns = [("", f"t = {summary['threshold']:g}")]
    if "threshold_best" in summary:
        columns.append(("_best", f"val-best t = {summary['threshold_best']:.3f}"))
    rows = [
        ("Dice (mean)", "dice"),
        ("IoU (mean)", "iou"),
        ("F1 (pooled)", "pooled_f1"),
        ("accuracy (pooled)", "pooled_accuracy"),
        ("sensitivity (pooled)", "pooled_sensitivity"),
        ("specificity (pooled)", "pooled_specificity"),
        ("SEG", "seg"),
        ("SEG of connected components", "seg_components"),
        ("AP at IoU 0.5", "ap50"),
        ("adapted Rand error (mean)", "rand_error"),
        ("VI (mean, bits)", "vi"),
    ]
    table = {label: [_fmt(summary.get(key + suffix)) for suffix, _ in columns] for label, key in rows if key in summary}
    free = [
        ("AUC-ROC (pooled)", "pooled_auc"),
        ("maxF_beta", "maxf"),
        ("MAE (mean)", "mae"),
        ("2nd observer F1 (pooled)", "observer2_pooled_f1"),
    ]
    table.update({label: [_fmt(summary[key])] + [""] * (len(columns) - 1) for label, key in free if key in summary})
    return pd.DataFrame.from_dict(table, orient="index", columns=[c for _, c in columns]).to_string()


def class_table(summary: Mapping[str, Any]) -> str:
    """K > 2 classes: Dice and IoU of every class and their mean over the foreground classes."""
    keys = [*summary["classes"], MEAN_FG]
    table = {
        key: [_fmt(summary.get(f"{prefix}{name}_{key}")) for prefix in ("", "pooled_") for name in ("dice", "iou")]
        for key in keys
    }
    columns = ["Dice (mean)", "IoU (mean)", "Dice (pooled)", "IoU (pooled)"]
    return pd.DataFrame.from_dict(table, orient="index", columns=columns).to_string()


def summary_text(summary: Mapping[str, Any], timings: Mapping[str, float], heads: pd.DataFrame) -> str:
    """The short table printed at the end of `segpipe evaluate`."""
    head = (
        f"{summary['dataset']}/{summary['network']} ({summary['network_used']}, epoch "
        f"{summary['checkpoint_epoch']}): {summary['test_images']} test images, "
        f"{timings['seconds']:.1f} s ({timings['inference_seconds']:.1f} s inference)"
    )
    parts = [head, class_table(summary) if "classes" in summary else binary_table(summary)]
    if not heads.empty:
        parts.append(heads.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return "\n".join(parts)
