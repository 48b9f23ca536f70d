"""Loading the DVC params files in `configs/`.

Every knob lives in `configs/<name>.yaml` (DVC params). The directory is found from, in order:
the `SEGPIPE_CONFIG_DIR` environment variable, `./configs` in the working directory (where DVC
runs the stages), or the `configs/` folder of the source checkout.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import SegpipeError

REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(SegpipeError, ValueError):
    """A config file is missing or does not hold what is expected."""


def config_dir() -> Path:
    """The directory the params files are read from."""
    env = os.environ.get("SEGPIPE_CONFIG_DIR")
    if env:
        return Path(env)
    local = Path.cwd() / "configs"
    return local if local.is_dir() else REPO_ROOT / "configs"


def load_config(name: str) -> dict[str, Any]:
    """Read `configs/<name>.yaml` as a dict; a clear error names the file when it is wrong."""
    path = config_dir() / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found (expected a YAML mapping)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a YAML mapping at the top level, got {type(data).__name__}")
    return data


def resolve_path(value: str | os.PathLike[str]) -> Path:
    """A path from a config, relative to the working directory (the repo root under DVC)."""
    return Path(value).expanduser()
