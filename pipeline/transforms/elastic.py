"""Elastic deformation of the U-Net paper (Ronneberger et al., MICCAI 2015, section 3.1).

Random displacement vectors on a coarse `grid_size` x `grid_size` grid, drawn from a Gaussian
with `sigma` px standard deviation, are interpolated bicubically to a per-pixel field; every key is
resampled through the same field (`torch.nn.functional.grid_sample`), image bilinear or bicubic,
label nearest (no new values), weight map bilinear, mirrored at the borders (reflection about the
edge pixels, numpy's "reflect"). `sigma = 0` is the identity.

The transform can also trim: each key may ask for a centred output smaller than its input
(`output_size`), e.g. the image with the network's halo and label/weight at the network's output
size, all cut from one same-size input so that the pixels around the output move in from real
context instead of from a mirror of the patch. Only the output pixels are resampled.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform

from pipeline.errors import SegpipeError

MODES = ("bilinear", "bicubic", "nearest")


def as_plain_tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A torch view of a numpy array or tensor, without MONAI metadata (MetaTensor -> Tensor)."""
    if isinstance(x, torch.Tensor):
        return x.as_tensor() if hasattr(x, "as_tensor") else x
    return torch.as_tensor(np.ascontiguousarray(x))


@lru_cache(maxsize=64)
def cubic_weights(grid_size: int, n: int) -> torch.Tensor:
    """(n, grid_size) bicubic interpolation matrix along one axis: the weights PyTorch's bicubic
    upsampling (cubic convolution, align_corners=True) gives each coarse node at each pixel."""
    basis = torch.eye(grid_size).reshape(grid_size, 1, grid_size, 1)
    up = F.interpolate(basis, size=(n, 1), mode="bicubic", align_corners=True)
    return up.reshape(grid_size, n).T.contiguous()


def dense_displacement(coarse: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic upsampling of a coarse field (2, G, G) to (2, H, W); the grid nodes sit on the
    corner and equally spaced pixel centres of the (H, W) region. Bicubic interpolation is
    separable, so this is Wy @ coarse @ Wx^T, equal to F.interpolate(mode="bicubic",
    align_corners=True) up to float rounding, and faster for a few hundred pixels (`segpipe bench transforms`)."""
    g = coarse.shape[-1]
    return cubic_weights(g, size[0]) @ coarse @ cubic_weights(g, size[1]).T


def sampling_grid(displacement: torch.Tensor, offset: tuple[float, float], in_size: tuple[int, int]) -> torch.Tensor:
    """grid_sample grid (1, h, w, 2) reading output pixel p from input p + offset + displacement[:, p].

    displacement: (2, h, w) in pixels (dy, dx); in_size: the input (H, W). Normalised coordinates
    -1 and 1 are the centres of the first and last input pixels (align_corners=True).
    """
    out_h, out_w = displacement.shape[1:]
    ys = torch.arange(out_h, dtype=torch.float32) + offset[0]
    xs = torch.arange(out_w, dtype=torch.float32) + offset[1]
    gy = (ys[:, None] + displacement[0]) * (2.0 / max(in_size[0] - 1, 1)) - 1.0
    gx = (xs[None, :] + displacement[1]) * (2.0 / max(in_size[1] - 1, 1)) - 1.0
    return torch.stack((gx, gy), dim=-1)[None]


def warp(image: torch.Tensor, grid: torch.Tensor, mode: str) -> torch.Tensor:
    """Resample `image` (C, H, W) through `grid` (1, h, w, 2): float32 (C, h, w), positions outside
    mirrored about the edge pixels (reflection with align_corners=True is numpy's "reflect")."""
    src = image.to(torch.float32)[None]
    return F.grid_sample(src, grid, mode=mode, padding_mode="reflection", align_corners=True)[0]


def _center_crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    top = (x.shape[-2] - size[0]) // 2
    left = (x.shape[-1] - size[1]) // 2
    return x[..., top : top + size[0], left : left + size[1]]


def _as_pair(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        return (size, size)
    if len(size) != 2:
        raise SegpipeError(f"elastic: a size is an int or (h, w), got {size}")
    return (int(size[0]), int(size[1]))


class RandElasticd(RandomizableTransform, MapTransform):
    """Dictionary transform: U-Net elastic deformation (section 3.1), one field for all keys.

    keys: entries (C, H, W) sharing one spatial shape (numpy or torch); outputs are torch tensors.
    mode: per key (or one for all) "bilinear" | "bicubic" | "nearest"; nearest keeps the dtype,
    the others give float32. output_size: the centred output size, int or (h, w), one for all keys
    or a mapping key -> size (keys left out, or None: the input size); input minus output must
    be even. The coarse grid spans the largest output; smaller outputs use the centre of the same
    field. prob: chance of deforming; otherwise (and for sigma = 0) the keys are only trimmed to
    their output size (exactly the identity when untrimmed).
    """

    def __init__(
        self,
        keys: KeysCollection,
        sigma: float = 10.0,
        grid_size: int = 3,
        prob: float = 1.0,
        mode: str | Sequence[str] = "bilinear",
        output_size: int | Sequence[int] | Mapping[Hashable, int | Sequence[int] | None] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if sigma < 0:
            raise SegpipeError(f"elastic: sigma must be >= 0, got {sigma}")
        if grid_size < 2:
            raise SegpipeError(f"elastic: grid_size must be >= 2, got {grid_size}")
        n = len(self.keys)
        modes = [mode] * n if isinstance(mode, str) else list(mode)
        if len(modes) != n or any(m not in MODES for m in modes):
            raise SegpipeError(f"elastic: mode must be one of {MODES} or one per key ({n}), got {mode}")
        if output_size is None or not isinstance(output_size, Mapping):
            sizes = {k: output_size for k in self.keys}
        else:
            unknown = set(output_size) - set(self.keys)
            if unknown:
                raise SegpipeError(f"elastic: output_size names keys {sorted(map(str, unknown))} not in {self.keys}")
            sizes = {k: output_size.get(k) for k in self.keys}
        self.sigma = float(sigma)
        self.grid_size = int(grid_size)
        self.modes = dict(zip(self.keys, modes))
        self.output_sizes = {k: _as_pair(s) for k, s in sizes.items()}
        self._coarse = torch.zeros(2, self.grid_size, self.grid_size)

    def randomize(self, data: object = None) -> None:
        super().randomize(None)
        if self._do_transform and self.sigma > 0:
            field = self.R.normal(0.0, self.sigma, size=(2, self.grid_size, self.grid_size))
            self._coarse = torch.from_numpy(field.astype(np.float32))

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        tensors = {k: as_plain_tensor(d[k]) for k in keys}
        shape = tensors[keys[0]].shape[1:]
        for k in keys:
            if tensors[k].ndim != 3 or tensors[k].shape[1:] != shape:
                raise SegpipeError(
                    f"elastic: key '{k}' must be (C, H, W) with the spatial shape {tuple(shape)} of "
                    f"'{keys[0]}', got {tuple(tensors[k].shape)}"
                )
        out_sizes = {k: self.output_sizes[k] or (int(shape[0]), int(shape[1])) for k in keys}
        for k, (oh, ow) in out_sizes.items():
            if oh > shape[0] or ow > shape[1] or (shape[0] - oh) % 2 or (shape[1] - ow) % 2:
                raise SegpipeError(
                    f"elastic: output size {(oh, ow)} of key '{k}' must fit centred in the input "
                    f"{tuple(shape)} (difference even)"
                )
        self.randomize()
        if not self._do_transform or self.sigma == 0:
            for k in keys:
                kept = _center_crop(tensors[k], out_sizes[k])
                d[k] = kept.clone() if self.modes[k] == "nearest" else kept.to(torch.float32, copy=True)
            return d
        big = (max(s[0] for s in out_sizes.values()), max(s[1] for s in out_sizes.values()))
        field = dense_displacement(self._coarse, big)
        grids: dict[tuple[int, int], torch.Tensor] = {}
        for k in keys:
            size = out_sizes[k]
            if size not in grids:
                offset = ((shape[0] - size[0]) / 2, (shape[1] - size[1]) / 2)
                grids[size] = sampling_grid(_center_crop(field, size), offset, (int(shape[0]), int(shape[1])))
            out = warp(tensors[k], grids[size], self.modes[k])
            d[k] = out.to(tensors[k].dtype) if self.modes[k] == "nearest" else out
        return d
