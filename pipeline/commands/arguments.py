"""Argument types shared by the commands of `segpipe` (argparse errors for bad values)."""
from __future__ import annotations

import argparse


def finite(text: str, low: float | None = None) -> float:
    """An option's value as a finite number (>= `low`), else argparse's error (NaN and inf refused)."""
    from pipeline.config import ConfigError, check_number

    try:
        return float(check_number(float(text), "value", "option", low=low))
    except (ValueError, ConfigError):
        bound = "" if low is None else f" >= {low:g}"
        raise argparse.ArgumentTypeError(f"expected a finite number{bound}, got {text!r}") from None


def nonnegative(text: str) -> float:
    return finite(text, low=0.0)


def precision_arg(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None,
                   help=f"fp32, bf16 (autocast; CPUs with AVX512-BF16/AMX, CUDA) or fp16 (CUDA); default: {default}")


def setting(text: str) -> dict:
    """KEY=VALUE with a dotted key and a YAML value -> nested dict ("optimizer.lr=1e-3")."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. optimizer.lr=0.001), got {text!r}")
    out: dict = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = yaml.safe_load(value)
    return out


def merged_settings(items: list[dict] | None) -> dict:
    """The `--set` values of a command, merged in order (later wins)."""
    from pipeline.training.settings import deep_merge

    out: dict = {}
    for item in items or []:
        out = deep_merge(out, item)
    return out
