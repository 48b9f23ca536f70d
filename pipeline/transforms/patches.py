"""Overlap-tile strategy of the U-Net paper (Ronneberger et al., MICCAI 2015, figure 2).

A network with unpadded ("valid") convolutions predicts an output tile smaller than its input by
`halo` pixels on each side; the input is the output region plus that context. Where the context
leaves the image it is filled by mirroring the image (numpy's "reflect": about the edge pixels,
repeatedly for any distance), never zeros. For "same" padding networks `halo` is 0.

* `RandOverlapTilePatchd`: random training patches, class-balanced, centred inside the FOV.
* `TileGrid`: the grid tiler and stitcher for whole images; tile -> identity -> stitch gives the
  image back bit for bit, for any halo and any image size (also smaller than one tile).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform

from pipeline.errors import SegpipeError

Array = np.ndarray | torch.Tensor


def reflect_indices(start: int, stop: int, n: int) -> np.ndarray:
    """Indices of positions start..stop-1 into an axis of length n, mirrored about the edge
    pixels (period 2(n-1); what np.pad(mode="reflect") gives for any pad width). n = 1 repeats."""
    idx = np.arange(start, stop)
    if n == 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    idx = np.mod(idx, period)
    return np.where(idx >= n, period - idx, idx)


def crop_reflect(x: Array, top: int, left: int, height: int, width: int) -> Array:
    """x[..., top:top+height, left:left+width] of a (..., H, W) array or tensor, the parts outside
    the image mirrored (reflect). Returns a new array of the input's type."""
    h, w = x.shape[-2:]
    if top >= 0 and left >= 0 and top + height <= h and left + width <= w:
        region = x[..., top : top + height, left : left + width]
        return region.clone() if isinstance(x, torch.Tensor) else region.copy()
    iy = reflect_indices(top, top + height, h)
    ix = reflect_indices(left, left + width, w)
    if isinstance(x, torch.Tensor):
        iy_t = torch.as_tensor(iy, device=x.device)
        ix_t = torch.as_tensor(ix, device=x.device)
        return x.index_select(-2, iy_t).index_select(-1, ix_t)
    return x.take(iy, axis=-2).take(ix, axis=-1)


def _pair(size: int | Sequence[int], what: str) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
    if len(pair) != 2 or min(pair) < 1:
        raise SegpipeError(f"{what}: expected a positive int or (h, w), got {size}")
    return pair  # type: ignore[return-value]


def _plain(x: object) -> Array:
    if isinstance(x, torch.Tensor):
        return x.as_tensor() if hasattr(x, "as_tensor") else x
    return np.asarray(x)


class RandOverlapTilePatchd(RandomizableTransform, MapTransform):
    """Dictionary transform: class-balanced overlap-tile training patches (U-Net figure 2).

    A centre pixel is drawn from the positive pixels (label > 0 in any channel) with probability
    pos / (pos + neg), else from the negative ones, both restricted to `fov_key` > 0 when given
    (DRIVE). The output patch (`patch_size`) is placed around it and shifted to lie inside the
    image (when the image is at least that large). Crops, concentric around the output patch:
    `image_keys` (default: the key "image" if among `keys`) with `halo` context on each side,
    the other keys with `label_halo` (0: the output size; give them the image's context when a
    following transform such as `RandElasticd(output_size=...)` moves pixels in from outside the
    output and trims).

    Input entries are (C, H, W) numpy arrays or tensors of one spatial shape; outputs have the
    input's type (MetaTensor -> Tensor). Returns a list of `num_samples` dicts, like MONAI's
    RandCropByPosNegLabeld; other entries are passed through by reference.
    """

    def __init__(
        self,
        keys: KeysCollection,
        label_key: str,
        patch_size: int | Sequence[int],
        halo: int = 0,
        label_halo: int = 0,
        image_keys: Sequence[str] | None = None,
        fov_key: str | None = None,
        pos: float = 1.0,
        neg: float = 1.0,
        num_samples: int = 1,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob=1.0)
        if halo < 0 or label_halo < 0:
            raise SegpipeError(f"patches: halo and label_halo must be >= 0, got {halo}, {label_halo}")
        if pos < 0 or neg < 0 or pos + neg <= 0:
            raise SegpipeError(f"patches: pos and neg must be >= 0 with a positive sum, got {pos}, {neg}")
        if num_samples < 1:
            raise SegpipeError(f"patches: num_samples must be >= 1, got {num_samples}")
        if image_keys is None:
            image_keys = [k for k in self.keys if k == "image"]
        missing = [k for k in image_keys if k not in self.keys]
        if missing:
            raise SegpipeError(f"patches: image_keys {missing} are not among the keys {list(self.keys)}")
        self.label_key = label_key
        self.patch_size = _pair(patch_size, "patches: patch_size")
        self.halo = int(halo)
        self.label_halo = int(label_halo)
        self.image_keys = set(image_keys)
        self.fov_key = fov_key
        self.pos_ratio = pos / (pos + neg)
        self.num_samples = int(num_samples)
        self._centers: list[tuple[int, int]] = []

    def randomize(self, candidates: tuple[np.ndarray, np.ndarray], width: int) -> None:  # type: ignore[override]
        """Draw `num_samples` centre pixels (y, x) from the (positive, negative) flat indices."""
        positive, negative = candidates
        self._centers = []
        for _ in range(self.num_samples):
            use_pos = self.R.random_sample() < self.pos_ratio
            pool = positive if (use_pos and positive.size) or not negative.size else negative
            flat = int(pool[self.R.randint(pool.size)])
            self._centers.append(divmod(flat, width))

    def _candidates(self, d: Mapping[Hashable, object]) -> tuple[np.ndarray, np.ndarray]:
        label = _plain(d[self.label_key])
        label_np = label.cpu().numpy() if isinstance(label, torch.Tensor) else label
        if label_np.ndim != 3:
            raise SegpipeError(f"patches: '{self.label_key}' must be (C, H, W), got shape {label_np.shape}")
        positive = (label_np > 0).any(axis=0)
        inside = np.ones_like(positive)
        if self.fov_key is not None:
            fov = _plain(d[self.fov_key])
            fov_np = fov.cpu().numpy() if isinstance(fov, torch.Tensor) else fov
            if fov_np.shape[-2:] != positive.shape:
                raise SegpipeError(
                    f"patches: '{self.fov_key}' shape {fov_np.shape} does not match '{self.label_key}' {label_np.shape}"
                )
            inside = (fov_np > 0).reshape(-1, *positive.shape).any(axis=0)
        pos_idx = np.flatnonzero(positive & inside)
        neg_idx = np.flatnonzero(~positive & inside)
        if pos_idx.size + neg_idx.size == 0:
            raise SegpipeError(f"patches: '{self.fov_key}' is empty: no pixel to centre a patch on")
        return pos_idx, neg_idx

    def __call__(self, data: Mapping[Hashable, object]) -> list[dict[Hashable, object]]:  # type: ignore[override]
        d = dict(data)
        keys = list(self.key_iterator(d))
        arrays = {k: _plain(d[k]) for k in keys}
        h, w = _plain(d[self.label_key]).shape[-2:]
        for k in keys:
            if arrays[k].ndim != 3 or tuple(arrays[k].shape[-2:]) != (h, w):
                raise SegpipeError(
                    f"patches: '{k}' must be (C, {h}, {w}) like '{self.label_key}', got {tuple(arrays[k].shape)}"
                )
        self.randomize(self._candidates(d), w)
        ph, pw = self.patch_size
        out = []
        for cy, cx in self._centers:
            top = min(max(cy - ph // 2, 0), h - ph) if h >= ph else (h - ph) // 2
            left = min(max(cx - pw // 2, 0), w - pw) if w >= pw else (w - pw) // 2
            sample = dict(d)
            for k in keys:
                c = self.halo if k in self.image_keys else self.label_halo
                sample[k] = crop_reflect(arrays[k], top - c, left - c, ph + 2 * c, pw + 2 * c)
            out.append(sample)
        return out


@dataclass(frozen=True)
class TileGrid:
    """Overlap-tile grid over an (H, W) image: output tiles of `tile_size` that cover the image,
    inputs with `halo` context mirrored at the borders (U-Net figure 2).

    Along an axis the tiles start at 0, t, 2t, ... and the last one is shifted back to end at the
    image border (a one-tile image smaller than t is mirror-extended). Each image pixel is written
    by exactly one tile: where two tiles overlap, the boundary is the middle of the overlap. So
    no averaging, and an identity network stitches back bit for bit.
    """

    image_size: tuple[int, int]
    tile_size: tuple[int, int]
    halo: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", _pair(self.image_size, "tiles: image_size"))
        object.__setattr__(self, "tile_size", _pair(self.tile_size, "tiles: tile_size"))
        if self.halo < 0:
            raise SegpipeError(f"tiles: halo must be >= 0, got {self.halo}")

    @classmethod
    def for_network(cls, network: object, image_size: int | Sequence[int], tile_size: int) -> "TileGrid":
        """A grid for a network of the registry: its halo, and the smallest output tile size
        >= tile_size it can produce (`network.valid_output_size`)."""
        out = int(network.valid_output_size(tile_size))  # type: ignore[attr-defined]
        halo = int(network.halo)  # type: ignore[attr-defined]
        return cls(image_size=_pair(image_size, "tiles: image_size"), tile_size=(out, out), halo=halo)

    @staticmethod
    def _axis(n: int, t: int) -> list[tuple[int, int, int]]:
        """(tile start, write from, write to) along one axis, image coordinates."""
        starts = list(range(0, max(n - t, 0), t)) + [max(n - t, 0)]
        bounds = [0] + [(a + t + b) // 2 for a, b in zip(starts, starts[1:])] + [n]
        return [(s, bounds[i], bounds[i + 1]) for i, s in enumerate(starts)]

    @cached_property
    def tiles(self) -> list[tuple[tuple[int, int, int], tuple[int, int, int]]]:
        """Per tile, for (y, x): (start, write from, write to) in image coordinates."""
        ys = self._axis(self.image_size[0], self.tile_size[0])
        xs = self._axis(self.image_size[1], self.tile_size[1])
        return [(y, x) for y in ys for x in xs]

    def __len__(self) -> int:
        return len(self.tiles)

    @property
    def input_tile_size(self) -> tuple[int, int]:
        return (self.tile_size[0] + 2 * self.halo, self.tile_size[1] + 2 * self.halo)

    def split(self, image: Array) -> Array:
        """(C, H, W) -> (N, C, th + 2 halo, tw + 2 halo) input tiles, same type as the image."""
        if tuple(image.shape[-2:]) != self.image_size or image.ndim != 3:
            raise SegpipeError(
                f"tiles: expected a (C, {self.image_size[0]}, {self.image_size[1]}) image, got {tuple(image.shape)}"
            )
        ih, iw = self.input_tile_size
        tiles = [crop_reflect(image, y[0] - self.halo, x[0] - self.halo, ih, iw) for y, x in self.tiles]
        return torch.stack(tiles) if isinstance(image, torch.Tensor) else np.stack(tiles)

    def stitch(self, outputs: Array) -> Array:
        """(N, C', th, tw) output tiles -> (C', H, W), each pixel from exactly one tile."""
        n, c = outputs.shape[:2]
        if n != len(self) or tuple(outputs.shape[-2:]) != self.tile_size or outputs.ndim != 4:
            raise SegpipeError(
                f"tiles: expected ({len(self)}, C, {self.tile_size[0]}, {self.tile_size[1]}) output tiles, "
                f"got {tuple(outputs.shape)}"
            )
        shape = (c, *self.image_size)
        if isinstance(outputs, torch.Tensor):
            canvas = torch.empty(shape, dtype=outputs.dtype, device=outputs.device)
        else:
            canvas = np.empty(shape, dtype=outputs.dtype)
        for tile, ((sy, y0, y1), (sx, x0, x1)) in zip(outputs, self.tiles):
            canvas[:, y0:y1, x0:x1] = tile[:, y0 - sy : y1 - sy, x0 - sx : x1 - sx]
        return canvas
