"""configs/evaluate.yaml as frozen `EvaluateSettings` (`evaluate_config`), read by the evaluate entry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from pipeline.config import check_bool, check_int, check_keys, check_number, check_str
from pipeline.errors import SegpipeError
from pipeline.inference.settings import InferenceSettings

CONFIG_KEYS = ("results_dir", "threshold", "val_threshold", "overlays", "curve_points", "per_head", "inference")


@dataclass(frozen=True)
class EvaluateSettings:
    """configs/evaluate.yaml, checked (`evaluate_config`)."""

    results_dir: str
    threshold: float
    val_threshold: bool
    overlays: int | None
    curve_points: int
    per_head: bool
    inference: Mapping[str, Any]
    """Overrides of configs/inference.yaml's `InferenceSettings` for evaluation."""


def evaluate_config(cfg: Mapping[str, Any], where: str) -> EvaluateSettings:
    """configs/evaluate.yaml (`cfg`) as settings; errors name `where` and the key."""
    cfg = check_keys(cfg, CONFIG_KEYS, where)
    check_number(cfg["threshold"], "threshold", where, low=0, high=1, low_open=True, high_open=True)
    for key in ("val_threshold", "per_head"):
        check_bool(cfg[key], key, where)
    check_int(cfg["overlays"], "overlays", where, minimum=0, optional=True)
    check_int(cfg["curve_points"], "curve_points", where, minimum=2)
    check_str(cfg["results_dir"], "results_dir", where)
    inference = check_keys(
        cfg["inference"] or {},
        InferenceSettings.__dataclass_fields__,
        f"{where}: inference",
        optional=InferenceSettings.__dataclass_fields__,
    )
    if "intensity" in inference:
        raise SegpipeError(
            f"{where}: inference.intensity cannot be set: evaluation images are preprocessed as "
            "the checkpoint records, so intensity is always 'none'"
        )
    return EvaluateSettings(
        str(cfg["results_dir"]),
        float(cfg["threshold"]),
        bool(cfg["val_threshold"]),
        cfg["overlays"],
        int(cfg["curve_points"]),
        bool(cfg["per_head"]),
        dict(inference),
    )
