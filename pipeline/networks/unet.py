"""U-Net: Ronneberger, Fischer and Brox, "U-Net: Convolutional Networks for Biomedical Image
Segmentation", MICCAI 2015 (Fig. 1).

Contracting path: `depth` levels of two 3x3 convs + ReLU followed by 2x2 max-pooling (stride 2),
doubling the width each level (64 -> 1024 for depth 4). Expanding path: 2x2 up-convolution halving
the width, concatenation with the cropped feature map of the same level ("copy and crop"), two 3x3
convs + ReLU. A final 1x1 conv maps to the classes. With `padding="valid"` (the paper) every 3x3
conv loses one pixel per side, so a 572x572 input gives a 388x388 output (halo 92); with
`padding="same"` the output has the input's size. "Drop-out layers at the end of the contracting
path" (Sec. 3.1) are dropout after the two deepest levels here (off with `dropout=0`).

The size rule of the valid network, per axis, for depth d: the encoder maps s -> (s - 4) / 2 (each
value before pooling must be even), the bottom s -> s - 4, each decoder level s -> 2 s - 4. Hence
output = input - 2 * halo with halo = 6 * 2**d - 4, and the reachable outputs are 4 + k * 2**d
(k >= 0, all intermediate sizes positive). The helpers below implement it for tiling.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from monai.networks.blocks import UpSample
from torch import nn

from pipeline.config import check_bool, check_choice, check_int, check_number
from pipeline.errors import SegpipeError
from pipeline.networks.common import (
    SPATIAL_DIMS,
    SegmentationNetwork,
    center_crop,
    conv_unit,
    head_conv,
    level_widths,
    same_output_size,
)

PADDINGS = ("valid", "same")
UPSAMPLINGS = ("transposed", "bilinear")
_LOSS_PER_LEVEL = 4  # two unpadded 3x3 convs lose 2 pixels each along an axis


def _check_size_args(size: Any, depth: int, padding: str, what: str) -> None:
    check_int(depth, "depth", "unet", minimum=1)
    check_choice(padding, "padding", PADDINGS, "unet")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise SegpipeError(f"unet: {what} must be a positive integer, got {size!r}")


def unet_halo(depth: int, padding: str = "valid") -> int:
    """Pixels lost on each side, (input - output) / 2: 6 * 2**depth - 4 for valid (92 at depth 4)."""
    check_int(depth, "depth", "unet", minimum=1)
    check_choice(padding, "padding", PADDINGS, "unet")
    return 6 * 2**depth - 4 if padding == "valid" else 0


def _decode(bottom: int, depth: int) -> int | None:
    """Output size for a bottom-level output size, or None if a decoder level would be empty."""
    size = bottom
    for _ in range(depth):
        size = 2 * size - _LOSS_PER_LEVEL
        if size < 1:
            return None
    return size


def _smallest_output(depth: int) -> int:
    bottom = 1
    while _decode(bottom, depth) is None:
        bottom += 1
    return _decode(bottom, depth)  # type: ignore[return-value]


def unet_output_size(input_size: int, depth: int = 4, padding: str = "valid") -> int:
    """Output size along one axis for `input_size` (572 -> 388 for valid, depth 4).

    SegpipeError if the input cannot be taken: for valid padding a size before a pooling is odd or
    some level becomes empty (the message names the nearest valid inputs); for same padding the
    input is not divisible by 2**depth.
    """
    _check_size_args(input_size, depth, padding, "input size")
    if padding == "same":
        return same_output_size(input_size, 2**depth, "unet")
    size = input_size
    valid = True
    for _ in range(depth):
        size -= _LOSS_PER_LEVEL
        if size < 2 or size % 2:
            valid = False
            break
        size //= 2
    bottom = size - _LOSS_PER_LEVEL
    out = _decode(bottom, depth) if valid and bottom >= 1 else None
    if out is not None:
        return out
    low, high = _neighbour_inputs(input_size, depth)
    raise SegpipeError(
        f"unet: input size {input_size} is not valid for an unpadded U-Net of depth {depth} "
        f"(a size before pooling is odd or a level is empty); nearest valid inputs: "
        + (f"{low} or {high}" if low else f"{high}")
    )


def _neighbour_inputs(input_size: int, depth: int) -> tuple[int | None, int]:
    """The valid input sizes just below (None if none) and just above `input_size`."""
    halo2 = 2 * unet_halo(depth)
    smallest = _smallest_output(depth) + halo2
    step = 2**depth
    if input_size < smallest:
        return None, smallest
    low = smallest + (input_size - smallest) // step * step
    return low, low + step


def unet_input_size(output_size: int, depth: int = 4, padding: str = "valid") -> int:
    """Input size that gives `output_size` along one axis (388 -> 572 for valid, depth 4).

    SegpipeError if that output is not reachable (valid: output must be 4 + k * 2**depth and at
    least the smallest output; same: divisible by 2**depth).
    """
    _check_size_args(output_size, depth, padding, "output size")
    if padding == "same":
        return same_output_size(output_size, 2**depth, "unet")
    step = 2**depth
    smallest = _smallest_output(depth)
    if output_size < smallest or (output_size - smallest) % step:
        raise SegpipeError(
            f"unet: output size {output_size} is not reachable by an unpadded U-Net of depth "
            f"{depth}; reachable sizes are {smallest} + k * {step}, e.g. "
            f"{unet_valid_output_size(output_size, depth, padding)}"
        )
    size = output_size
    for _ in range(depth):  # decoder, backwards: s -> (s + 4) / 2
        size = (size + _LOSS_PER_LEVEL) // 2
    size += _LOSS_PER_LEVEL  # bottom convs
    for _ in range(depth):  # encoder, backwards: s -> 2 s + 4
        size = 2 * size + _LOSS_PER_LEVEL
    return size


def unet_valid_output_size(at_least: int, depth: int = 4, padding: str = "valid") -> int:
    """The smallest reachable output size >= `at_least` along one axis."""
    check_int(at_least, "at_least", "unet", minimum=0)
    check_int(depth, "depth", "unet", minimum=1)
    check_choice(padding, "padding", PADDINGS, "unet")
    step = 2**depth
    if padding == "same":
        return max(1, math.ceil(at_least / step)) * step
    smallest = _smallest_output(depth)
    return smallest + max(0, math.ceil((at_least - smallest) / step)) * step


class UNet(SegmentationNetwork):
    """U-Net (Ronneberger et al. 2015, Fig. 1): (N, in_channels, H, W) -> (N, out_channels, H', W').

    H' = `output_size(H)`: H - 2 * halo for valid padding (halo 92 at depth 4), H for same padding
    (H divisible by 2**depth). Widths base_width * 2**level, level 0..depth (64..1024 by default),
    or `widths` given per level (e.g. [16, 16, 32, 64, 128]: a CPU budget spends its FLOPs at full
    resolution, where the thin structures are; the doubling rule costs the same at every level).
    train(): returns (logits, []); eval(): logits.
    """

    config_defaults: dict[str, Any] = {
        "padding": "valid",
        "base_width": 64,
        "depth": 4,
        "batch_norm": False,
        "dropout": 0.5,
        "upsampling": "transposed",
        "widths": None,
    }

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        padding: str = "valid",
        base_width: int = 64,
        depth: int = 4,
        batch_norm: bool = False,
        dropout: float = 0.5,
        upsampling: str = "transposed",
        widths: list[int] | None = None,
    ) -> None:
        owner = "unet"
        check_choice(padding, "padding", PADDINGS, owner)
        check_int(base_width, "base_width", owner, minimum=1)
        check_int(depth, "depth", owner, minimum=1)
        check_bool(batch_norm, "batch_norm", owner)
        check_number(dropout, "dropout", owner, low=0.0, high=1.0, high_open=True)
        check_choice(upsampling, "upsampling", UPSAMPLINGS, owner)
        per_level = level_widths(widths, base_width, depth, owner=owner)
        config = dict(
            padding=padding,
            base_width=base_width,
            depth=depth,
            batch_norm=batch_norm,
            dropout=float(dropout),
            upsampling=upsampling,
            widths=None if widths is None else per_level,
        )
        super().__init__(
            "unet",
            config,
            in_channels,
            out_channels,
            padding=padding,
            halo=unet_halo(depth, padding),
            size_multiple=2**depth,
        )
        self.depth = depth
        pad = 1 if padding == "same" else 0
        widths = per_level

        def double_conv(cin: int, cout: int, drop: float = 0.0) -> nn.Sequential:
            return nn.Sequential(
                conv_unit(cin, cout, padding=pad, batch_norm=batch_norm),
                conv_unit(cout, cout, padding=pad, batch_norm=batch_norm, dropout=drop),
            )

        # The two deepest levels (the last contracting level and the bottom) end with dropout.
        self.encoder = nn.ModuleList(
            double_conv(
                in_channels if lv == 0 else widths[lv - 1],
                widths[lv],
                dropout if lv >= depth - 1 else 0.0,
            )
            for lv in range(depth + 1)
        )
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        # 2x2 up-convolution halving the channels; "bilinear": 1x1 conv then bilinear x2.
        self.up = nn.ModuleList(
            UpSample(
                SPATIAL_DIMS,
                widths[lv + 1],
                widths[lv],
                scale_factor=2,
                mode="deconv" if upsampling == "transposed" else "nontrainable",
                interp_mode="bilinear",
                align_corners=False,
            )
            for lv in range(depth)
        )
        self.decoder = nn.ModuleList(double_conv(2 * widths[lv], widths[lv]) for lv in range(depth))
        self.head = head_conv(widths[0], out_channels)

    def output_size(self, input_size: int) -> int:
        return unet_output_size(input_size, self.depth, self.padding)

    def input_size(self, output_size: int) -> int:
        return unet_input_size(output_size, self.depth, self.padding)

    def valid_output_size(self, at_least: int) -> int:
        return unet_valid_output_size(at_least, self.depth, self.padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """(N, in, H, W) -> logits (N, out, H', W'); a tuple (logits, []) in train mode."""
        skips: list[torch.Tensor] = []
        for level, block in enumerate(self.encoder):
            x = block(x if level == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for level in range(self.depth - 1, -1, -1):
            x = self.up[level](x)
            skip = center_crop(skips[level], x.shape[-2], x.shape[-1])
            x = self.decoder[level](torch.cat([skip, x], dim=1))
        logits = self.head(x)
        if self.training:
            return logits, []
        return logits
