"""The optimiser and the learning rate per step (warm-up, then cosine / poly / step / constant)."""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch


def build_optimizer(model: torch.nn.Module, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """Adam / AdamW, or SGD with (Nesterov) momentum: the U-Net paper uses SGD, momentum 0.99."""
    params, lr, wd = model.parameters(), float(cfg["lr"]), float(cfg["weight_decay"])
    if cfg["name"] == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if cfg["name"] == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    return torch.optim.SGD(
        params, lr=lr, weight_decay=wd, momentum=float(cfg["momentum"]), nesterov=bool(cfg["nesterov"])
    )


def learning_rate(step: int, total: int, steps_per_epoch: int, base: float, cfg: Mapping[str, Any]) -> float:
    """LR at optimizer step `step` of `total`: linear warm-up over warmup_steps, then
    cosine: min + (base - min) (1 + cos(pi t)) / 2;  poly: base (1 - t)^power (nnU-Net, power 0.9);
    step: base * gamma^(epoch // step_epochs);  constant: base;  t = progress after warm-up in [0, 1]."""
    warm = int(cfg["warmup_steps"])
    if step < warm:
        return base * (step + 1) / warm
    t = min(1.0, (step - warm) / max(1, total - warm))
    name, low = cfg["name"], float(cfg["min_lr"])
    if name == "cosine":
        return low + (base - low) * (1 + math.cos(math.pi * t)) / 2
    if name == "poly":
        return max(low, base * (1 - t) ** float(cfg["poly_power"]))
    if name == "step":
        return base * float(cfg["gamma"]) ** ((step // steps_per_epoch) // int(cfg["step_epochs"]))
    return base
