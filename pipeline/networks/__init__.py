"""The U-Net family behind one registry: `build_network`, `save_checkpoint`, `load_model`.

Networks (one file each, written from the papers):
    "unet"    U-Net, Ronneberger et al. 2015           (`pipeline.networks.unet.UNet`)
    "unetpp"  UNet++, Zhou et al. 2018                 (`pipeline.networks.unetpp.UNetPlusPlus`)
    "u2net"   U2-Net, Qin et al. 2020, full (44.0 M)   (`pipeline.networks.u2net.U2Net`)
    "u2netp"  U2-Net-lite (1.13 M)                     (`pipeline.networks.u2net.U2Net(lite=True)`)

`register_network` adds a network (e.g. one defined in a user's code); everything downstream reads
the contract below, never a network's name.

Config keys (defaults = the papers' settings; `configs/networks.yaml` holds the presets):
    unet:   padding ("valid"|"same"), base_width, depth, batch_norm, dropout,
            upsampling ("transposed"|"bilinear"), widths (null or one width per level)
    unetpp: base_width, depth, batch_norm, dropout, deep_supervision, mode ("accurate"|"fast"),
            prune_level (1..depth, default depth), widths (null or one width per level)
    u2net, u2netp: none (Table 1 fixes them)

Output contract (all networks; 2D, input (N, in_channels, H, W)):
    * train() mode: forward returns `(main_logits, [aux_logits, ...])`, every tensor
      (N, out_channels, H_out, W_out). aux is empty for U-Net, the deep-supervision heads
      X^{0,1}..X^{0,p-1} for UNet++ (main = X^{0,p}), the six side outputs S1..S6 for U2-Net
      (main = the fused output).
    * eval() mode: forward returns the main logits tensor only, (N, out_channels, H_out, W_out);
      for UNet++ after the mode choice ("fast": head X^{0,p}; "accurate": the heads' probabilities
      averaged, returned as logits: logit(mean sigmoid) for one channel, log(mean softmax) for more).
    * Logits, never probabilities: the loss / post-processing applies sigmoid (1 channel) or
      softmax (more).
    * Sizes per spatial axis: H_out = `net.output_size(H)`; `net.padding` is "valid" (U-Net paper,
      H_out = H - 2 * net.halo) or "same" (H_out = H, halo 0); `net.input_size(H_out)` inverts it
      and `net.valid_output_size(n)` rounds n up to a reachable output size. Sizes the network
      cannot take raise SegpipeError.
    * Heads: `net.head_names()` names the train() outputs (main first),
      `net.deep_supervision_mode` says how the loss combines them ("mean" or "sum") and
      `net.head_views()` gives the networks whose outputs `segpipe evaluate` scores per head.

Checkpoints (`save_checkpoint` / `load_model`) describe themselves: a dict with format
"segpipe-checkpoint/1", network, config, in_channels, out_channels, padding, halo, state_dict and
any extra keys (optimizer, epoch, ...; a training's checkpoints hold `class_names`, the dataset's
classes in class-index order, which inference and the ONNX export read). Loading rebuilds the network from the file alone, using
`torch.load(weights_only=True)`: extras must be tensors, numbers, strings, lists or dicts.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from pipeline.errors import SegpipeError
from pipeline.networks.common import HeadView, SegmentationNetwork
from pipeline.networks.u2net import U2Net
from pipeline.networks.unet import (
    UNet,
    unet_halo,
    unet_input_size,
    unet_output_size,
    unet_valid_output_size,
)
from pipeline.networks.unetpp import UNetPlusPlus, average_heads

CHECKPOINT_FORMAT = "segpipe-checkpoint/1"

Builder = Callable[..., SegmentationNetwork]
_BUILDERS: dict[str, tuple[Builder, dict[str, Any]]] = {
    "unet": (UNet, UNet.config_defaults),
    "unetpp": (UNetPlusPlus, UNetPlusPlus.config_defaults),
    "u2net": (lambda cin, cout: U2Net(cin, cout, lite=False), U2Net.config_defaults),
    "u2netp": (lambda cin, cout: U2Net(cin, cout, lite=True), U2Net.config_defaults),
}


def register_network(name: str, builder: Builder, config_defaults: Mapping[str, Any]) -> None:
    """Add a network to the registry: `builder(in_channels, out_channels, **config)` returns a
    `SegmentationNetwork` whose `network_name` is `name`; `config_defaults` are the config keys it
    takes. Training, evaluation and inference then use it like the built-in ones."""
    if name in _BUILDERS:
        raise SegpipeError(f"network {name!r} is registered already")
    _BUILDERS[name] = (builder, dict(config_defaults))


def network_names() -> tuple[str, ...]:
    """The registered networks' names."""
    return tuple(_BUILDERS)

__all__ = [
    "CHECKPOINT_FORMAT",
    "HeadView",
    "SegmentationNetwork",
    "U2Net",
    "UNet",
    "UNetPlusPlus",
    "average_heads",
    "build_network",
    "config_keys",
    "load_model",
    "network_config",
    "network_names",
    "read_checkpoint",
    "register_network",
    "save_checkpoint",
    "unet_halo",
    "unet_input_size",
    "unet_output_size",
    "unet_valid_output_size",
]


def config_keys(name: str) -> dict[str, Any]:
    """The config keys `name` accepts with their defaults (the papers' settings)."""
    if name not in _BUILDERS:
        raise SegpipeError(
            f"unknown network {name!r}; valid networks: {', '.join(_BUILDERS)}"
        )
    return dict(_BUILDERS[name][1])


def build_network(
    name: str, in_channels: int, out_channels: int, **config: Any
) -> SegmentationNetwork:
    """Build network `name` ("unet", "unetpp", "u2net", "u2netp") in train() mode.

    Unknown names or config keys raise SegpipeError listing the valid ones; bad values raise
    SegpipeError naming the key. The result's `config` holds every key, defaults included.
    """
    valid = config_keys(name)
    unknown = sorted(set(config) - set(valid))
    if unknown:
        raise SegpipeError(
            f"network {name!r}: unknown config key(s) {', '.join(unknown)}; valid keys: "
            + (", ".join(valid) if valid else "none")
        )
    builder = _BUILDERS[name][0]
    return builder(in_channels, out_channels, **config)


def network_config(presets: Mapping[str, Any], name: str, preset: str, where: str) -> dict[str, Any]:
    """The config of network `name` under `preset` of `presets` (configs/networks.yaml, read by the
    stage entry; `where` names it in errors)."""
    if preset not in presets or not isinstance(presets[preset], dict):
        raise SegpipeError(f"{where}: no preset {preset!r}; presets: {', '.join(map(str, presets))}")
    if name not in presets[preset]:
        raise SegpipeError(f"{where}: preset {preset!r} has no entry for network {name!r}")
    config = presets[preset][name] or {}
    if not isinstance(config, dict):
        raise SegpipeError(f"{where}: {preset}.{name} must be a mapping of config keys")
    return dict(config)


def save_checkpoint(model: SegmentationNetwork, path: str | os.PathLike[str], **extra: Any) -> Path:
    """Write `model` and `extra` atomically (temp file + os.replace) as a self-describing checkpoint.

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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a checkpoint is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _load_failure(exc: Exception) -> str:
    """What torch's safe loader said about a file it refused, without its advice to load it unsafely."""
    text = str(exc)
    if "weights_only" not in text:
        return f"{type(exc).__name__}: {text.strip().splitlines()[0] if text.strip() else 'no details'}"
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    reason = "; ".join(line.strip() for line in text.splitlines()
                       if line.strip() and not line.strip().startswith(boilerplate))
    return f"it is not a file of tensors and plain values, and segpipe never unpickles anything else: {reason}"


def read_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """The checkpoint dict in `path`, checked to be a segpipe checkpoint (SegpipeError if not)."""
    path = Path(path)
    if not path.is_file():
        raise SegpipeError(f"{path}: checkpoint file not found")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for foreign or corrupt files
        raise SegpipeError(f"{path}: not a readable segpipe checkpoint: expected a best.pt or last.pt written by "
                           f"`segpipe train` ({_load_failure(exc)})") from exc
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise SegpipeError(f"{path}: not a segpipe checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    required = ("network", "config", "in_channels", "out_channels", "padding", "halo", "state_dict")
    missing = [key for key in required if key not in data]
    if missing:
        raise SegpipeError(f"{path}: checkpoint lacks the key(s) {', '.join(missing)}")
    return data


def load_model(
    path: str | os.PathLike[str], map_location: Any = "cpu", **overrides: Any
) -> SegmentationNetwork:
    """Rebuild the network saved in `path` from the file alone; returned in eval() mode.

    `overrides` change inference-only UNet++ settings of a trained network: `mode` and/or
    `prune_level` (<= the trained level; the network is cut down with `UNetPlusPlus.pruned`).
    Any other override, or a file that is not a segpipe checkpoint, raises SegpipeError naming it.
    """
    data = read_checkpoint(path, map_location)
    try:
        model = build_network(
            data["network"], data["in_channels"], data["out_channels"], **data["config"]
        )
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
        allowed = {"mode", "prune_level"}
        if not isinstance(model, UNetPlusPlus) or set(overrides) - allowed:
            raise SegpipeError(
                f"{path}: cannot override {sorted(overrides)} for network {data['network']!r} "
                "(only unetpp takes mode / prune_level at load time)"
            )
        model = model.pruned(
            overrides.get("prune_level", model.prune_level), overrides.get("mode")
        )
    return model.eval()
