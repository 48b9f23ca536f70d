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
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        default=None,
        help=f"fp32, bf16 (autocast; CPUs with AVX512-BF16/AMX, CUDA) or fp16 (CUDA); default: {default}",
    )
