"""What one training runs with: the network, patch loader, loss, optimizer and grad scaler built from
its settings (`build_trainer`), and their state restored from last.pt for `--resume` (`restore`), which
refuses a checkpoint whose `RESUME_KEYS` settings, fold or classes differ."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from pipeline.data.prepared import PreparedDataset
from pipeline.errors import SegpipeError
from pipeline.networks import SegmentationNetwork, build_network, read_checkpoint
from pipeline.networks.precision import check_precision
from pipeline.training.distributed import Dist
from pipeline.training.loader import StepSampler, build_loader, patch_keys
from pipeline.training.optim import build_optimizer
from pipeline.training.settings import TrainSettings
from pipeline.training.supervision import DeepSupervisionLoss, build_loss

RESUME_KEYS = (
    "dataset",
    "network_key",
    "network",
    "network_config",
    "augment",
    "seed",
    "epochs",
    "steps_per_epoch",
    "batch_size",
    "patch_size",
    "optimizer",
    "schedule",
    "grad_clip",
    "loss",
    "weight_map",
    "precision",
    "fold",
)
"""Settings a resumed run must share with the checkpoint (others, e.g. workers, may change)."""


@dataclass
class Trainer:
    """Everything one training step needs, built once (`_build`)."""

    settings: TrainSettings
    ctx: Dist
    model: SegmentationNetwork
    forward: torch.nn.Module
    loader: DataLoader
    sampler: StepSampler
    patches_per_rank: int
    loss_fn: DeepSupervisionLoss
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    layout: torch.memory_format
    class_names: list[str]
    keys: list[str] = field(default_factory=list)


@dataclass
class Progress:
    """Where the training stands: the next epoch, the best validation so far, the log rows, the
    MLflow run id of the training (None: none yet, or a checkpoint written before it was kept) and
    each epoch's MLflow metrics (`epoch` and the metrics; a resumed run logs those it missed)."""

    first_epoch: int = 0
    best: dict[str, Any] = field(default_factory=lambda: {"val_dice": -1.0, "epoch": -1})
    log_rows: list[dict[str, Any]] = field(default_factory=list)
    previous_elapsed: float = 0.0
    run_id: str | None = None
    epoch_metrics: list[dict[str, float]] = field(default_factory=list)


def output_channels(num_classes: int) -> int:
    """The network's output channels for `num_classes` classes: 1 (sigmoid) for 2, else one per class."""
    return 1 if num_classes == 2 else num_classes


def build_trainer(settings: TrainSettings, prepared: PreparedDataset, ctx: Dist) -> Trainer:
    """Network (seeded), patch loader, loss, optimizer and grad scaler of a training."""
    torch.manual_seed(int(settings.seed))
    channels = settings.augment["channels"]
    in_channels = len(channels) if channels else prepared.in_channels
    model = build_network(
        settings.network, in_channels, output_channels(len(prepared.class_names)), **settings.network_config
    )
    layout = torch.channels_last if settings.channels_last else torch.contiguous_format
    model.to(ctx.device, memory_format=layout)
    loader, sampler, patches_per_rank = build_loader(prepared, settings, model, ctx)
    loss_fn = build_loss(settings.loss, network=model, source=f"configs/train.yaml: profiles.{settings.profile}.loss")
    optimizer = build_optimizer(model, settings.optimizer)
    check_precision(settings.precision, ctx.device, f"configs/train.yaml: profiles.{settings.profile}")
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=settings.precision == "fp16")
    net: torch.nn.Module = model
    if ctx.world > 1:
        devices = [ctx.device.index] if ctx.device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=devices)
    forward = torch.compile(net) if settings.compile else net
    return Trainer(
        settings,
        ctx,
        model,
        forward,
        loader,
        sampler,
        patches_per_rank,
        loss_fn,
        optimizer,
        scaler,
        layout,
        prepared.class_names,
        patch_keys(settings),
    )


def restore(trainer: Trainer, path: Path) -> Progress:
    """The state of `last.pt` loaded into the trainer; SegpipeError if the settings changed."""
    if not path.is_file():
        raise SegpipeError(f"{path}: nothing to resume; train without --resume")
    state = read_checkpoint(path)
    saved, current = state.get("settings") or {}, resume_settings(trainer.settings)
    if saved.get("fold") != current["fold"]:
        raise SegpipeError(
            f"{path}: cannot resume with fold {fold_text(current['fold'])}: this checkpoint trained "
            f"fold {fold_text(saved.get('fold'))}; resume with that fold (--fold, configs/train.yaml "
            "fold) or train without --resume to start over"
        )
    changed = [k for k in RESUME_KEYS if saved.get(k) != current[k]]
    if changed:
        raise SegpipeError(
            f"{path}: cannot resume, settings changed since this checkpoint: {changed}; "
            "train without --resume to start over"
        )
    if state.get("class_names", trainer.class_names) != trainer.class_names:
        raise SegpipeError(
            f"{path}: cannot resume, the checkpoint's classes {state['class_names']} differ from the "
            f"prepared dataset's {trainer.class_names}; train without --resume to start over"
        )
    trainer.model.load_state_dict(state["state_dict"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    log_rows = list(state["log"])
    return Progress(
        int(state["epoch"]),
        dict(state["best"]),
        log_rows,
        float(log_rows[-1]["elapsed_seconds"]) if log_rows else 0.0,
        state.get("mlflow_run_id"),
        list(state.get("mlflow_epoch_metrics", [])),
    )


def resume_settings(settings: TrainSettings) -> dict[str, Any]:
    """The RESUME_KEYS of `settings` as plain JSON values (as stored in last.pt)."""
    return json.loads(json.dumps({k: getattr(settings, k) for k in RESUME_KEYS}, default=str))


def fold_text(fold: int | None) -> str:
    return "null (the prepare split)" if fold is None else str(fold)
