"""The DVC params files in `configs/` and the one set of helpers that validate settings.

Every knob lives in `configs/<name>.yaml` (DVC params). Only a stage's entry (the function a
`segpipe` command calls) reads them, with `load_config`; it validates them with the helpers below
and passes typed values down, so library functions never look a file up. The directory is, in
order: the `SEGPIPE_CONFIG_DIR` environment variable, `./configs` in the working directory (where
DVC runs the stages), or the `configs/` folder of the source checkout.

The helpers take a value, the key it came from and `where` (the file and section, e.g.
"configs/train.yaml: profiles.default"), and raise `ConfigError` naming all three. Numbers must be
finite: NaN and infinities are refused everywhere.
"""

from __future__ import annotations

import argparse
import difflib
import math
import os
from pathlib import Path
from typing import Any, Callable, Collection, Mapping, Sequence, TypeVar

import yaml

from pipeline.errors import SegpipeError

REPO_ROOT = Path(__file__).resolve().parent.parent
CARDS_FOLDER = "datasets"  # configs/datasets/NAME.yaml: the dataset cards
T = TypeVar("T")


class ConfigError(SegpipeError, ValueError):
    """A config file or a setting is missing or does not hold what is expected."""


def config_dir() -> Path:
    """The directory the params files are read from."""
    env = os.environ.get("SEGPIPE_CONFIG_DIR")
    if env:
        return Path(env)
    local = Path.cwd() / "configs"
    return local if local.is_dir() else REPO_ROOT / "configs"


def config_path(name: str) -> Path:
    """`configs/<name>.yaml` in `config_dir()`."""
    return config_dir() / f"{name}.yaml"


def cards_dir() -> Path:
    """`configs/datasets/`: the dataset cards beside the params files."""
    return config_dir() / CARDS_FOLDER


def read_config(name: str, check: Callable[[Mapping[str, Any], str], T]) -> T:
    """`configs/<name>.yaml` read and turned into typed settings by `check(cfg, where)` (entries only)."""
    return check(load_config(name), str(config_path(name)))


def load_config(name: str) -> dict[str, Any]:
    """Read `configs/<name>.yaml` as a dict; a clear error names the file when it is wrong."""
    return read_yaml(config_path(name))


def read_yaml(path: Path) -> dict[str, Any]:
    """The YAML mapping in `path`; a clear error names the file when it is missing or wrong."""
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


# --- validation -----------------------------------------------------------------------------------


def _bad(where: str, key: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"{where}: {key} must be {expected}, got {value!r}")


def check_keys(section: Any, expected: Collection[str], where: str, optional: Collection[str] = ()) -> dict[str, Any]:
    """`section` as a dict holding every key of `expected` (those in `optional` may be absent) and no
    other; the error lists the missing and the unknown keys."""
    if not isinstance(section, Mapping):
        raise ConfigError(f"{where}: expected a mapping with keys {sorted(expected)}, got {section!r}")
    missing = sorted(set(expected) - set(optional) - set(section))
    unknown = sorted(set(section) - set(expected))
    if missing or unknown:
        problems = ([f"missing keys {missing}"] if missing else []) + ([f"unknown keys {unknown}"] if unknown else [])
        hint = "; ".join(
            f"{key!r}: did you mean {close[0]!r}?"
            for key in unknown
            if (close := difflib.get_close_matches(str(key), [str(k) for k in expected], n=1, cutoff=0.8))
        )
        detail = ", ".join(problems) + (f" ({hint})" if hint else "")
        raise ConfigError(f"{where}: {detail}; expected {sorted(expected)}")
    return dict(section)


def check_int(
    value: Any, key: str, where: str, *, minimum: int | None = None, maximum: int | None = None, optional: bool = False
) -> int | None:
    """An integer (not a bool) in [minimum, maximum]; None passes when `optional`."""
    if value is None and optional:
        return None
    bounds = " ".join(
        part
        for part in (f">= {minimum}" if minimum is not None else "", f"<= {maximum}" if maximum is not None else "")
        if part
    )
    expected = ("null or " if optional else "") + f"an integer {bounds}".rstrip()
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(where, key, expected, value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise _bad(where, key, expected, value)
    return value


def check_number(
    value: Any,
    key: str,
    where: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    optional: bool = False,
) -> float | None:
    """A finite number in the interval given by low/high (closed unless `*_open`); None passes when
    `optional`."""
    if value is None and optional:
        return None
    left = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
    right = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
    expected = (
        ("null or " if optional else "")
        + "a finite number"
        + (f" {left}" if left else "")
        + (f"{' and' if left else ''} {right}" if right else "")
    )
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(where, key, expected, value)
    if low is not None and (value <= low if low_open else value < low):
        raise _bad(where, key, expected, value)
    if high is not None and (value >= high if high_open else value > high):
        raise _bad(where, key, expected, value)
    return float(value)


def check_bool(value: Any, key: str, where: str) -> bool:
    """True or false, nothing else (YAML's yes/no are read as bools already)."""
    if not isinstance(value, bool):
        raise _bad(where, key, "true or false", value)
    return value


def check_choice(value: Any, key: str, choices: Sequence[Any], where: str) -> Any:
    """One of `choices`."""
    if value not in choices:
        raise _bad(where, key, f"one of {', '.join(map(str, choices))}", value)
    return value


def check_str(value: Any, key: str, where: str) -> str:
    """A non-empty string (a path or a name)."""
    if not isinstance(value, str) or not value:
        raise _bad(where, key, "a non-empty string", value)
    return value


def check_list(value: Any, key: str, where: str, *, optional: bool = False, nonempty: bool = False) -> list[Any] | None:
    """A list (or tuple) as a list; None passes when `optional`."""
    if value is None and optional:
        return None
    if not isinstance(value, (list, tuple)) or (nonempty and not value):
        raise _bad(where, key, ("null or " if optional else "") + ("a non-empty list" if nonempty else "a list"), value)
    return list(value)


def setting_argument(text: str) -> dict:
    """`--set KEY=VALUE` as an argparse type: dotted key, YAML value -> nested dict ("optimizer.lr=1e-3")."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. optimizer.lr=0.001), got {text!r}")
    out: dict = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = _number_or_yaml(value)
    return out


def _number_or_yaml(text: str) -> Any:
    """A `--set` value: a number as people type it (1e-3, 5E4, 0.5, 3: YAML 1.1 reads 1e-3 as text), else
    the YAML value (true, null, [1, 2], {a: 1}, text)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return yaml.safe_load(text)
    return number if text.strip().lower().lstrip("+-") not in ("nan", "inf", "infinity") else yaml.safe_load(text)
