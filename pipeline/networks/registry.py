"""The network registry: name -> (builder, config defaults), and `build_network`.

A built-in network is its own file in this folder plus one line in `_BUILDERS`; `register_network`
adds one at run time (e.g. defined in a user's code). Everything downstream reads the contract of
`SegmentationNetwork` (see `pipeline.networks`), never a network's name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pipeline.errors import SegpipeError
from pipeline.networks.common import SegmentationNetwork
from pipeline.networks.u2net import U2Net
from pipeline.networks.unet import UNet
from pipeline.networks.unetpp import UNetPlusPlus

Builder = Callable[..., SegmentationNetwork]
"""`builder(in_channels, out_channels, **config)` returns the network in train() mode."""

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


def config_keys(name: str) -> dict[str, Any]:
    """The config keys `name` accepts with their defaults (the papers' settings)."""
    if name not in _BUILDERS:
        raise SegpipeError(f"unknown network {name!r}; valid networks: {', '.join(_BUILDERS)}")
    return dict(_BUILDERS[name][1])


def load_time_overrides() -> dict[str, tuple[str, ...]]:
    """The registered networks that take settings at load time -> those settings: the
    `load_overrides` of a network registered by its class (a builder function declares none).
    `load_model` names them when it refuses an override."""
    return {
        name: tuple(keys)
        for name, (builder, _) in _BUILDERS.items()
        if (keys := getattr(builder, "load_overrides", ()))
    }


def build_network(name: str, in_channels: int, out_channels: int, **config: Any) -> SegmentationNetwork:
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
