"""The numeric precision a network runs in: `fp32`, `bf16` (CPU and CUDA) or `fp16` (CUDA only).

bf16 and fp16 run under `torch.autocast`: weights stay fp32 (the optimizer's master copy), the
convolutions and matrix products run in the low precision, and the callers take the network's
output back to fp32 for the loss, the softmax and the blending. The precision is a parameter
(`configs/train.yaml`, `configs/inference.yaml`, `--precision`) and nothing here changes it by
itself: on a CPU without native bf16 instructions (AVX512-BF16 or AMX) bf16 still runs, emulated by
oneDNN, and the caller gets a warning saying that it is slower than fp32 there.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, ContextManager

import torch

from pipeline.config import ConfigError, check_choice

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class PrecisionWarning(UserWarning):
    """bf16 asked for on a CPU that emulates it."""


def native_cpu_bf16() -> bool:
    """True when oneDNN runs bf16 convolutions natively on this CPU (AVX512-BF16 or AMX)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def check_precision(precision: str, device: torch.device | str, where: str) -> str:
    """`precision` after checking it suits `device`; ConfigError naming `where` otherwise.

    fp16 is refused on the CPU (no fast kernels there; bf16 is the CPU's half precision). bf16 on a
    CPU without native bf16 instructions warns (PrecisionWarning) and still runs: results depend on
    the parameters, never on the machine.
    """
    check_choice(precision, "precision", PRECISIONS, where)
    kind = torch.device(device).type
    if precision == "fp16" and kind != "cuda":
        raise ConfigError(f"{where}: precision fp16 needs a CUDA device (on the CPU use bf16 or fp32)")
    if precision == "bf16" and kind == "cpu" and not native_cpu_bf16():
        warnings.warn(
            f"{where}: precision bf16 on a CPU without AVX512-BF16/AMX instructions is emulated and "
            "runs slower than fp32, not about 2x faster as on CPUs that have them; set precision: fp32 "
            "for speed on this machine",
            PrecisionWarning,
            stacklevel=2,
        )
    return precision


def autocast(precision: str, device: torch.device) -> ContextManager[object]:
    """The autocast context of `precision` on `device` (a no-op context for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


def fp32_output(output: Any) -> Any:
    """A training-mode network output (logits, or (main, [auxiliary heads])) in fp32, for the loss."""
    if isinstance(output, torch.Tensor):
        return output.float()
    main, aux = output
    return main.float(), [a.float() for a in aux]


__all__ = ["PRECISIONS", "PrecisionWarning", "autocast", "check_precision", "fp32_output", "native_cpu_bf16"]
