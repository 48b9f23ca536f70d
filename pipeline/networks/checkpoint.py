"""Self-describing checkpoints: `save_checkpoint`, `read_checkpoint` and `load_model`.

A checkpoint is a dict with format "segpipe-checkpoint/1", network, config, in_channels,
out_channels, padding, halo, state_dict and any extra keys (optimizer, epoch, ...; a training's
checkpoints hold `class_names`, the dataset's classes in class-index order, which inference and the
ONNX export read). Loading rebuilds the network through the registry from the file alone, using
`torch.load(weights_only=True)`: extras must be tensors, numbers, strings, lists or dicts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import SegpipeError
from pipeline.files import atomic_path
from pipeline.networks.common import SegmentationNetwork
from pipeline.networks.registry import build_network, load_time_overrides

CHECKPOINT_FORMAT = "segpipe-checkpoint/1"


def save_checkpoint(model: SegmentationNetwork, path: str | os.PathLike[str], **extra: Any) -> Path:
    """Write `model` and `extra` atomically (`pipeline.files.atomic_path`) as a self-describing checkpoint.

    Extra keys must not collide with the checkpoint's own keys.
    """
    path = Path(path)
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "network": model.network_name,
        "config": dict(model.config),
        "in_channels": model.in_channels,
        "out_channels": model.out_channels,
        "padding": model.padding,
        "halo": model.halo,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    clash = sorted(set(extra) & set(payload))
    if clash:
        raise SegpipeError(f"{path}: extra checkpoint keys clash with reserved ones: {clash}")
    payload.update(extra)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def _load_failure(exc: Exception) -> str:
    """What torch's safe loader said about a file it refused, without its advice to load it unsafely."""
    text = str(exc)
    if "weights_only" not in text:
        return f"{type(exc).__name__}: {text.strip().splitlines()[0] if text.strip() else 'no details'}"
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    reason = "; ".join(
        line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith(boilerplate)
    )
    return f"it is not a file of tensors and plain values, and segpipe never unpickles anything else: {reason}"


def read_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """The checkpoint dict in `path`, checked to be a segpipe checkpoint (SegpipeError if not)."""
    path = Path(path)
    if not path.is_file():
        raise SegpipeError(f"{path}: checkpoint file not found")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for foreign or corrupt files
        raise SegpipeError(
            f"{path}: not a readable segpipe checkpoint: expected a best.pt or last.pt written by "
            f"`segpipe train` ({_load_failure(exc)})"
        ) from exc
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise SegpipeError(f"{path}: not a segpipe checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    required = ("network", "config", "in_channels", "out_channels", "padding", "halo", "state_dict")
    missing = [key for key in required if key not in data]
    if missing:
        raise SegpipeError(f"{path}: checkpoint lacks the key(s) {', '.join(missing)}")
    return data


def _overrides_hint() -> str:
    """Which registered networks take which settings at load time, e.g. "only unetpp takes mode /
    prune_level at load time"."""
    takers = load_time_overrides()
    if not takers:
        return "no network takes settings at load time"
    return "only " + "; ".join(f"{name} takes {' / '.join(keys)}" for name, keys in takers.items()) + " at load time"


def load_model(path: str | os.PathLike[str], map_location: Any = "cpu", **overrides: Any) -> SegmentationNetwork:
    """Rebuild the network saved in `path` from the file alone; returned in eval() mode.

    `overrides` change inference-only settings of a trained network: the keys its class lists in
    `load_overrides`, applied by its `with_overrides` (UNet++: `mode` and/or `prune_level` <= the
    trained level; the network is cut down with `UNetPlusPlus.pruned`). Any other override, or a
    file that is not a segpipe checkpoint, raises SegpipeError naming it.
    """
    data = read_checkpoint(path, map_location)
    try:
        model = build_network(data["network"], data["in_channels"], data["out_channels"], **data["config"])
        model.load_state_dict(data["state_dict"])
    except (SegpipeError, RuntimeError, TypeError) as exc:
        raise SegpipeError(f"{path}: checkpoint does not rebuild its network: {exc}") from exc
    if (model.padding, model.halo) != (data["padding"], data["halo"]):
        raise SegpipeError(
            f"{path}: checkpoint says padding={data['padding']!r} halo={data['halo']}, the rebuilt "
            f"network has padding={model.padding!r} halo={model.halo}"
        )
    model = model.to(map_location) if isinstance(map_location, (str, torch.device)) else model
    if overrides:
        if set(overrides) - set(model.load_overrides):
            raise SegpipeError(
                f"{path}: cannot override {sorted(overrides)} for network {data['network']!r} ({_overrides_hint()})"
            )
        model = model.with_overrides(**overrides)
    return model.eval()
