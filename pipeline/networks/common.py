"""Pieces shared by the three networks: the contract base class, the conv unit and size rules.

Every network of the registry derives from `SegmentationNetwork`, which holds the attributes the
training and inference code rely on (see `pipeline.networks` for the contract) and implements the
size rule of "same"-padded networks: output size = input size, for inputs divisible by
`size_multiple` (2**depth when max-pooling floors odd sizes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from monai.networks.blocks import Convolution
from torch import nn

from pipeline.config import check_int
from pipeline.errors import SegpipeError

SPATIAL_DIMS = 2
"""All networks here are 2D (DRIVE, HeLa, U373 are 2D images)."""


def level_widths(widths: Any, base_width: int, depth: int, *, owner: str) -> list[int]:
    """Channels per level 0..depth: `widths` (a list of depth + 1 integers >= 1) or, when it is
    None, base_width * 2**level (the papers' doubling); SegpipeError naming `owner` otherwise."""
    if widths is None:
        return [base_width * 2**level for level in range(depth + 1)]
    if not isinstance(widths, (list, tuple)) or len(widths) != depth + 1:
        raise SegpipeError(
            f"{owner}: widths must be null or a list of depth + 1 = {depth + 1} integers, got {widths!r}"
        )
    return [check_int(w, "widths[]", owner, minimum=1) for w in widths]


def conv_unit(
    in_channels: int,
    out_channels: int,
    *,
    padding: int,
    batch_norm: bool,
    dropout: float = 0.0,
    dilation: int = 1,
) -> Convolution:
    """3x3 conv (+ batch norm) (+ dropout) + ReLU: (N, in, H, W) -> (N, out, H', W').

    H' = H - 2*dilation + 2*padding. MONAI's `Convolution` with the "NDA" order (norm, dropout,
    activation); dropout before ReLU equals dropout after it, since ReLU commutes with zeroing and
    scaling by 1/(1-p).
    """
    return Convolution(
        SPATIAL_DIMS,
        in_channels,
        out_channels,
        kernel_size=3,
        padding=padding * dilation,
        dilation=dilation,
        act="relu",
        norm="batch" if batch_norm else None,
        dropout=dropout if dropout > 0 else None,
        adn_ordering="NDA",
    )


def head_conv(in_channels: int, out_channels: int, kernel_size: int = 1) -> nn.Conv2d:
    """A plain conv producing logits (no norm, no activation), size preserving."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)


def same_output_size(input_size: int, multiple: int, owner: str) -> int:
    """Output size of a "same"-padded network: the input size, which must divide by `multiple`."""
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1:
        raise SegpipeError(f"{owner}: an input size must be a positive integer, got {input_size!r}")
    if input_size % multiple:
        lower = input_size // multiple * multiple
        options = f"{lower} or {lower + multiple}" if lower else f"{multiple}"
        raise SegpipeError(f"{owner}: input size {input_size} is not divisible by {multiple}; use {options}")
    return input_size


@dataclass(frozen=True)
class HeadView:
    """A network whose eval() output is the logits of some heads of another, for per-head scores.

    `network` returns (N, len(labels) * K, H, W): K channels per head, in the order of `labels`
    (the rows of heads.csv, e.g. "L2", "S3") and `keys` (the metric prefixes, e.g. "head_L2",
    "side_3"). It follows the `SegmentationNetwork` contract, so it runs through the same
    sliding-window inference as the network itself.
    """

    labels: tuple[str, ...]
    keys: tuple[str, ...]
    network: "SegmentationNetwork"


class SegmentationNetwork(nn.Module):
    """Base of every registry network: the contract attributes, the "same" size rule and the heads.

    Attributes (see `pipeline.networks`): `network_name`, `config` (the exact kwargs that rebuild
    the network), `in_channels`, `out_channels`, `padding` ("valid" or "same"), `halo` (pixels
    lost per side, (input - output) / 2). A network with deep supervision overrides `head_names`,
    `deep_supervision_mode` and `head_views`; losses and evaluation read them, nothing else needs
    to know the network. A network with settings that may change after training (UNet++'s `mode`
    and `prune_level`) lists them in `load_overrides` and applies them in `with_overrides`.
    """

    deep_supervision_mode: str = "mean"
    """How the training loss combines the heads of the train() output: "mean" (UNet++, Zhou et al.
    2018: the loss averaged over the heads) or "sum" (U2-Net, Qin et al. 2020 eq. 1). With a single
    head both are the main head's loss."""

    load_overrides: tuple[str, ...] = ()
    """The config keys `load_model(path, **overrides)` may change on a trained network (inference-only
    settings, applied by `with_overrides`); none by default, so any override is refused."""

    def __init__(
        self,
        network_name: str,
        config: dict[str, Any],
        in_channels: int,
        out_channels: int,
        *,
        padding: str = "same",
        halo: int = 0,
        size_multiple: int = 1,
    ) -> None:
        super().__init__()
        self.network_name = network_name
        self.config = dict(config)
        self.in_channels = check_int(in_channels, "in_channels", network_name, minimum=1)
        self.out_channels = check_int(out_channels, "out_channels", network_name, minimum=1)
        self.padding = padding
        self.halo = halo
        self.size_multiple = size_multiple

    def output_size(self, input_size: int) -> int:
        """Output size along one spatial axis; SegpipeError if the network cannot take `input_size`."""
        return same_output_size(input_size, self.size_multiple, self.network_name)

    def input_size(self, output_size: int) -> int:
        """Input size giving `output_size` along one axis; SegpipeError if unreachable."""
        return same_output_size(output_size, self.size_multiple, self.network_name)

    def valid_output_size(self, at_least: int) -> int:
        """The smallest reachable output size >= `at_least` (at least one multiple)."""
        check_int(at_least, "at_least", self.network_name, minimum=0)
        return max(1, math.ceil(at_least / self.size_multiple)) * self.size_multiple

    def head_names(self) -> list[str]:
        """Names of the heads of the train() output `(main, [aux, ...])`, main first."""
        return ["main"]

    def head_views(self) -> list[HeadView]:
        """The heads `segpipe evaluate` scores one by one (per_head); none for a single-head network."""
        return []

    def with_overrides(self, **overrides: Any) -> SegmentationNetwork:
        """This network with load-time `overrides` applied (keys of `load_overrides`, checked by
        `load_model`). A network that declares `load_overrides` implements it."""
        raise NotImplementedError(
            f"{type(self).__name__} lists load_overrides {self.load_overrides} but does not implement "
            f"with_overrides (asked for {sorted(overrides)})"
        )

    def extra_repr(self) -> str:
        return f"network_name={self.network_name!r}, config={self.config}"


def center_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Crop (N, C, H, W) to (N, C, height, width) around the centre (U-Net "copy and crop")."""
    top = (x.shape[-2] - height) // 2
    left = (x.shape[-1] - width) // 2
    return x[..., top : top + height, left : left + width]
