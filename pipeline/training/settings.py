"""Resolved training settings: a profile of `configs/train.yaml` merged with its overrides.

`resolve_settings(configs, dataset, network)` returns one validated, frozen `TrainSettings` that the
trainer, the checkpoint (config.json, last.pt: `to_dict()`) and MLflow all see: the profile's keys, then
`overrides.<network>`, `overrides.<dataset>` and `overrides.<dataset>/<network>` merged in (later
wins), then the caller's overrides; plus the network actually built (`substitute`), its config
(configs/networks.yaml), the dataset's augmentation preset (configs/augment.yaml, checked) and the
cross-validation `fold` (the file's top-level `fold`, or the caller's). Every value
is checked up front (type, range, missing and unknown keys), so a bad `--set` fails before any
work with a message naming the key.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping

from pipeline.config import check_bool, check_choice, check_int, check_keys, check_number, check_str
from pipeline.errors import SegpipeError
from pipeline.networks import network_config, network_names
from pipeline.networks.precision import PRECISIONS
from pipeline.training.losses import LOSS_DEFAULTS
from pipeline.transforms.presets import preset

PROFILE_KEYS = {
    "network_preset",
    "substitute",
    "seed",
    "epochs",
    "steps_per_epoch",
    "batch_size",
    "patch_size",
    "optimizer",
    "schedule",
    "grad_clip",
    "precision",
    "channels_last",
    "compile",
    "workers",
    "val_every",
    "max_minutes",
    "weight_map",
    "target",
    "loss",
    "plan",
    "overrides",
}
TARGETS = ("labels", "border")
"""`target`: the dataset's classes, or the border-aware three classes of its instances (cells)."""
PLAN_KEYS = ("memory_budget_mb", "max_patch_size", "max_batch_size")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "poly", "step", "constant")
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


@dataclass(frozen=True)
class TrainConfigs:
    """The params files a training reads, as loaded by the stage entry (`pipeline.stages.train`):
    configs/train.yaml, configs/networks.yaml and the dataset's preset of configs/augment.yaml (the
    entry looks it up, `pipeline.transforms.presets.preset_section`)."""

    train: Mapping[str, Any]
    networks: Mapping[str, Any]
    augment: Mapping[str, Any]
    where: str = "configs/train.yaml"
    """How errors name configs/train.yaml."""


@dataclass(frozen=True)
class TrainSettings:
    """The resolved settings of one training (`resolve_settings`); `plan_training` fills the planned
    ones (patch_size, batch_size None: planned; the preset's channels, clahe, normalize)."""

    profile: str
    dataset: str
    network_key: str
    """The DVC matrix name (unet, unetpp, u2net)."""
    network: str
    """The registry network built (after `substitute`, e.g. u2netp)."""
    network_config: Mapping[str, Any]
    augment: Mapping[str, Any]
    """The dataset's preset of configs/augment.yaml."""
    models_dir: str
    fold: int | None
    network_preset: str
    substitute: Mapping[str, str] | None
    seed: int
    epochs: int
    steps_per_epoch: int
    batch_size: int | None
    patch_size: int | None
    optimizer: Mapping[str, Any]
    schedule: Mapping[str, Any]
    grad_clip: float | None
    precision: str
    channels_last: bool
    compile: bool
    workers: int
    val_every: int
    max_minutes: float | None
    weight_map: bool
    target: str
    loss: Mapping[str, Any]
    plan: Mapping[str, int]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy (config.json, the checkpoints' `settings`, MLflow params)."""
        return copy.deepcopy(asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainSettings:
        """The settings a `to_dict()` wrote (a training's config.json)."""
        missing = sorted({f.name for f in fields(cls)} - set(data))
        if missing:
            raise SegpipeError(f"training settings: missing {missing} (expected a training's config.json)")
        return cls(**{f.name: data[f.name] for f in fields(cls)})

    def with_changes(self, **changes: Any) -> TrainSettings:
        """A copy with `changes` (field -> value)."""
        return replace(self, **changes)


def _validate(cfg: Mapping[str, Any], where: str) -> None:
    check_keys(cfg, PROFILE_KEYS, where)
    check_int(cfg["seed"], "seed", where, minimum=0)
    for key in ("epochs", "steps_per_epoch", "val_every"):
        check_int(cfg[key], key, where, minimum=1)
    for key in ("batch_size", "patch_size"):  # null: planned from the data (pipeline.training.planning)
        check_int(cfg[key], key, where, minimum=1, optional=True)
    plan = check_keys(cfg["plan"], PLAN_KEYS, f"{where}.plan")
    for key in PLAN_KEYS:
        check_int(plan[key], f"plan.{key}", where, minimum=1)
    check_int(cfg["workers"], "workers", where, minimum=0)
    opt = check_keys(cfg["optimizer"], OPTIMIZER_KEYS, f"{where}.optimizer")
    check_choice(opt["name"], "optimizer.name", OPTIMIZERS, where)
    check_number(opt["lr"], "optimizer.lr", where, low=0, low_open=True)
    check_number(opt["weight_decay"], "optimizer.weight_decay", where, low=0)
    check_number(opt["momentum"], "optimizer.momentum", where, low=0, high=1, high_open=True)
    check_bool(opt["nesterov"], "optimizer.nesterov", where)
    sched = check_keys(cfg["schedule"], SCHEDULE_KEYS, f"{where}.schedule")
    check_choice(sched["name"], "schedule.name", SCHEDULES, where)
    check_int(sched["warmup_steps"], "schedule.warmup_steps", where, minimum=0)
    check_number(sched["min_lr"], "schedule.min_lr", where, low=0)
    check_number(sched["poly_power"], "schedule.poly_power", where, low=0, low_open=True)
    check_int(sched["step_epochs"], "schedule.step_epochs", where, minimum=1)
    check_number(sched["gamma"], "schedule.gamma", where, low=0, low_open=True)
    check_choice(cfg["precision"], "precision", PRECISIONS, where)
    check_choice(cfg["target"], "target", TARGETS, where)
    for key in ("channels_last", "compile", "weight_map"):
        check_bool(cfg[key], key, where)
    for key in ("grad_clip", "max_minutes"):
        check_number(cfg[key], key, where, low=0, low_open=True, optional=True)
    check_keys(cfg["loss"], LOSS_DEFAULTS, f"{where}.loss", optional=LOSS_DEFAULTS)
    check_keys(cfg["substitute"] or {}, network_names(), f"{where}.substitute", optional=network_names())
    check_str(cfg["network_preset"], "network_preset", where)


def resolve_settings(
    configs: TrainConfigs,
    dataset: str,
    network: str,
    profile: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    fold: int | None = None,
) -> TrainSettings:
    """The training settings of (`dataset`, `network`) under `profile` (default: the file's); `fold`
    (None: the file's) is the cross-validation fold validated on (`PreparedDataset.with_fold`)."""
    full, path = configs.train, configs.where
    for key in ("profile", "profiles", "models_dir", "networks", "fold"):
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
    if actual not in network_names():
        raise SegpipeError(f"{where}: network {actual!r} unknown; networks: {network_names()}")
    cfg.pop("overrides")
    fold = (
        check_int(full["fold"], "fold", path, minimum=0, optional=True)
        if fold is None
        else check_int(fold, "fold", "segpipe train --fold", minimum=0)
    )
    return TrainSettings(
        **cfg,
        profile=name,
        dataset=dataset,
        network_key=network,
        network=actual,
        network_config=network_config(configs.networks, actual, cfg["network_preset"], "configs/networks.yaml"),
        augment=dict(preset(dataset, configs.augment)),
        models_dir=str(full["models_dir"]),
        fold=fold,
    )
