"""Test-time augmentation: a window's logits averaged over symmetries of the square window.

The flips are nnU-Net's mirroring; with the transposes they make the dihedral group D4 (the 8
symmetries of the square). Each transformed window's output is mapped back by the inverse.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

TTA_TRANSFORMS: dict[str, tuple[tuple[int, ...], bool]] = {
    "h": ((-1,), False),
    "v": ((-2,), False),
    "hv": ((-2, -1), False),
    "t": ((), True),
    "th": ((-1,), True),
    "tv": ((-2,), True),
    "thv": ((-2, -1), True),
}
"""Test-time augmentation by the symmetries of the square window (the dihedral group D4): name ->
(flipped axes, then transposed?). "h" mirrors left-right, "v" top-bottom, "hv" both (a 180 degree
rotation); "t" transposes (swaps rows and columns), "th" / "tv" are rotations by 90 degrees, "thv"
the anti-transpose. The 7 together with the identity are all 8 symmetries."""


def tta_logits(net: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
    """`net(x)` averaged with `net` of the `names` transforms of the square windows `x` (N, C, T, T),
    each output mapped back by the inverse transform; out of place (`net` may return
    inference-mode tensors)."""
    out = net(x)
    for name in names:
        dims, transpose = TTA_TRANSFORMS[name]
        y = x.flip(dims) if dims else x
        y = net(y.transpose(-2, -1) if transpose else y)
        y = y.transpose(-2, -1) if transpose else y
        out = out + (y.flip(dims) if dims else y)
    return out / (1 + len(names)) if names else out


__all__ = ["TTA_TRANSFORMS", "tta_logits"]
