"""The wall time a network spends in its forward calls, for the inference benchmarks' rows."""

from __future__ import annotations

import time

import torch


class Timed(torch.nn.Module):
    """The network's module, adding up the wall time of its forward calls."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module, self.seconds = module, 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = self.module(x)
        self.seconds += time.perf_counter() - start
        return out
