"""Resolved training settings: a profile of `configs/train.yaml` merged with its overrides.

`resolve_settings(dataset, network)` returns one flat-ish dict that the trainer, the checkpoint
and MLflow all see: the profile's keys, then `overrides.<network>`, `overrides.<dataset>` and
`overrides.<dataset>/<network>` merged in (later wins), then the caller's overrides; plus the
network actually built (`substitute`), its config (configs/networks.yaml) and the dataset's
augmentation preset (configs/augment.yaml).
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

from pipeline.config import config_dir, load_config
from pipeline.errors import SegpipeError

PROFILE_KEYS = {
    "network_preset", "substitute", "seed", "epochs", "steps_per_epoch", "batch_size", "patch_size",
    "optimizer", "schedule", "grad_clip", "amp", "channels_last", "compile", "workers", "val_every", "max_minutes",
    "weight_map", "loss", "overrides",
}
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "poly", "step", "constant")
AMP_DTYPES = ("bf16", "fp16", "fp32")
OPTIMIZER_KEYS = {"name", "lr", "weight_decay", "momentum", "nesterov"}
SCHEDULE_KEYS = {"name", "warmup_steps", "min_lr", "poly_power", "step_epochs", "gamma"}


def deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `update` merged in recursively (mappings merge, other values replace)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _positive_int(cfg: Mapping[str, Any], key: str, where: str, minimum: int = 1) -> None:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SegpipeError(f"{where}: {key} must be an integer >= {minimum}, got {value!r}")


def _validate(cfg: Mapping[str, Any], where: str) -> None:
    missing, unknown = sorted(PROFILE_KEYS - set(cfg)), sorted(set(cfg) - PROFILE_KEYS)
    if missing or unknown:
        raise SegpipeError(f"{where}: missing keys {missing}, unknown keys {unknown}; expected {sorted(PROFILE_KEYS)}")
    for key in ("seed",):
        _positive_int(cfg, key, where, minimum=0)
    for key in ("epochs", "steps_per_epoch", "batch_size", "patch_size", "val_every"):
        _positive_int(cfg, key, where)
    _positive_int(cfg, "workers", where, minimum=0)
    opt, sched = cfg["optimizer"], cfg["schedule"]
    if not isinstance(opt, Mapping) or set(opt) != OPTIMIZER_KEYS:
        raise SegpipeError(f"{where}: optimizer must have exactly the keys {sorted(OPTIMIZER_KEYS)}, got {opt!r}")
    if opt["name"] not in OPTIMIZERS:
        raise SegpipeError(f"{where}: optimizer.name must be one of {OPTIMIZERS}, got {opt['name']!r}")
    if not isinstance(sched, Mapping) or set(sched) != SCHEDULE_KEYS:
        raise SegpipeError(f"{where}: schedule must have exactly the keys {sorted(SCHEDULE_KEYS)}, got {sched!r}")
    if sched["name"] not in SCHEDULES:
        raise SegpipeError(f"{where}: schedule.name must be one of {SCHEDULES}, got {sched['name']!r}")
    if cfg["amp"] not in AMP_DTYPES:
        raise SegpipeError(f"{where}: amp must be one of {AMP_DTYPES}, got {cfg['amp']!r}")
    for key in ("channels_last", "compile", "weight_map"):
        if not isinstance(cfg[key], bool):
            raise SegpipeError(f"{where}: {key} must be true or false, got {cfg[key]!r}")
    for key in ("grad_clip", "max_minutes"):
        value = cfg[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise SegpipeError(f"{where}: {key} must be null or a number > 0, got {value!r}")
    if not isinstance(cfg["loss"], Mapping):
        raise SegpipeError(f"{where}: loss must be a mapping of loss keys, got {cfg['loss']!r}")


def resolve_settings(
    dataset: str,
    network: str,
    profile: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The training settings of (`dataset`, `network`) under `profile` (default: the file's)."""
    from pipeline.networks import NETWORK_NAMES, network_config
    from pipeline.transforms.presets import preset

    path = config_dir() / "train.yaml"
    full = load_config("train")
    for key in ("profile", "profiles", "models_dir", "networks"):
        if key not in full:
            raise SegpipeError(f"{path}: missing top-level key {key!r}")
    name = profile or full["profile"]
    profiles = full["profiles"]
    if not isinstance(profiles, Mapping) or name not in profiles:
        raise SegpipeError(f"{path}: no profile {name!r}; profiles: {sorted(profiles or {})}")
    cfg = copy.deepcopy(profiles[name])
    where = f"{path}: profiles.{name}"
    if not isinstance(cfg, dict) or not isinstance(cfg.get("overrides", {}), Mapping):
        raise SegpipeError(f"{where}: expected a mapping with an `overrides` mapping")
    for key in (network, dataset, f"{dataset}/{network}"):
        cfg = deep_merge(cfg, cfg.get("overrides", {}).get(key) or {})
    cfg = deep_merge(cfg, overrides or {})
    _validate(cfg, where)
    actual = (cfg["substitute"] or {}).get(network, network)
    if actual not in NETWORK_NAMES:
        raise SegpipeError(f"{where}: network {actual!r} unknown; networks: {NETWORK_NAMES}")
    cfg.pop("overrides")
    return {
        **cfg,
        "profile": name,
        "dataset": dataset,
        "network_key": network,
        "network": actual,
        "network_config": network_config(actual, cfg["network_preset"]),
        "augment": dict(preset(dataset)),
        "models_dir": str(full["models_dir"]),
    }
