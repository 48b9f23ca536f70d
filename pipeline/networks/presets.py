"""Network config presets: `network_config` picks one network's config from configs/networks.yaml.

The stage entry reads the file and passes it in; a network the preset does not list runs with its
registered defaults (`config_keys`), so a new network needs no preset entry.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline.errors import SegpipeError
from pipeline.networks.registry import config_keys


def network_config(presets: Mapping[str, Any], name: str, preset: str, where: str) -> dict[str, Any]:
    """The config of network `name` under `preset` of `presets` (configs/networks.yaml, read by the
    stage entry; `where` names it in errors). Without an entry for `name` in the preset, the
    network's registered defaults (`config_keys`; SegpipeError for an unregistered name)."""
    if preset not in presets or not isinstance(presets[preset], dict):
        raise SegpipeError(f"{where}: no preset {preset!r}; presets: {', '.join(map(str, presets))}")
    if name not in presets[preset]:
        return config_keys(name)
    config = presets[preset][name] or {}
    if not isinstance(config, dict):
        raise SegpipeError(f"{where}: {preset}.{name} must be a mapping of config keys")
    return dict(config)
