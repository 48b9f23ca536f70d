"""U2-Net: Qin, Zhang, Huang, Dehghan, Zaiane and Jagersand, "U2-Net: Going deeper with nested
U-structure for salient object detection", Pattern Recognition 106 (2020) 107404.

RSU-L (Sec. 3.1, Fig. 2e): an input conv F1 (Cin -> Cout), a U-Net of height L on its output
(L - 1 encoder convs with L - 2 max-poolings, a dilated (d=2) bottom conv, L - 1 decoder convs on
the concatenation of the up-sampled deeper map and the skip, the last back to Cout), and the
residual sum F1(x) + U(F1(x)) (Eq. 2). RSU-4F replaces pooling/up-sampling by dilations 1, 2, 4, 8.
Every conv is 3x3 conv + batch norm + ReLU (conv with bias, as in the authors' code).

U2-Net (Sec. 3.2, Fig. 5): six encoder stages En_1..En_6 (RSU-7, -6, -5, -4, -4F, -4F) with 2x2
max-pooling between them, five decoder stages De_5..De_1 taking the concatenation of the
up-sampled deeper map and the encoder map, six side outputs (3x3 conv on De_1..De_5 and En_6,
bilinearly up-sampled to the input size) and the fused output (1x1 conv over their
concatenation, Eq. 3's S_fuse). Table 1 gives the stage widths (in, mid, out) of the full
`u2net` (44.0 M parameters) and the lite `u2netp` (1.13 M).

Pooling uses ceil mode and up-sampling targets the skip's exact size (as in the authors' code), so
any input size is accepted and kept. Outputs are logits: the loss applies sigmoid or softmax.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.networks.common import HeadView, SegmentationNetwork, conv_unit, head_conv

Stage = tuple[int, bool, int | None, int, int]
"""Table 1 row: (height L, dilated RSU-LF?, in channels (None: the network's), mid, out)."""

FULL_ENCODER: list[Stage] = [  # En_1 .. En_6
    (7, False, None, 32, 64),
    (6, False, 64, 32, 128),
    (5, False, 128, 64, 256),
    (4, False, 256, 128, 512),
    (4, True, 512, 256, 512),
    (4, True, 512, 256, 512),
]
FULL_DECODER: list[Stage] = [  # De_1 .. De_5
    (7, False, 128, 16, 64),
    (6, False, 256, 32, 64),
    (5, False, 512, 64, 128),
    (4, False, 1024, 128, 256),
    (4, True, 1024, 256, 512),
]
LITE_ENCODER: list[Stage] = [
    (7, False, None, 16, 64),
    (6, False, 64, 16, 64),
    (5, False, 64, 16, 64),
    (4, False, 64, 16, 64),
    (4, True, 64, 16, 64),
    (4, True, 64, 16, 64),
]
LITE_DECODER: list[Stage] = [
    (7, False, 128, 16, 64),
    (6, False, 128, 16, 64),
    (5, False, 128, 16, 64),
    (4, False, 128, 16, 64),
    (4, True, 128, 16, 64),
]


def upsample_like(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Bilinear resize of (N, C, h, w) to target's (H, W) (align_corners=False)."""
    return F.interpolate(x, size=target.shape[-2:], mode="bilinear", align_corners=False)


class RSU(nn.Module):
    """Residual U-block RSU-L / RSU-LF (Fig. 2e, Eq. 2): (N, Cin, H, W) -> (N, Cout, H, W).

    RSU-L: L - 2 poolings (ceil mode), bottom conv dilation 2. RSU-LF (`dilated`): no pooling,
    encoder dilations 1, 2, ..., 2**(L-2), bottom 2**(L-1), the decoder mirroring the encoder.
    """

    def __init__(self, height: int, dilated: bool, in_channels: int, mid: int, out: int) -> None:
        super().__init__()
        self.dilated = dilated
        enc_dilations = [2**k if dilated else 1 for k in range(height - 1)]
        self.conv_in = conv_unit(in_channels, out, padding=1, batch_norm=True)
        self.encoder = nn.ModuleList(
            conv_unit(out if k == 0 else mid, mid, padding=1, batch_norm=True, dilation=d)
            for k, d in enumerate(enc_dilations)
        )
        bottom_dilation = 2 ** (height - 1) if dilated else 2
        self.bottom = conv_unit(mid, mid, padding=1, batch_norm=True, dilation=bottom_dilation)
        # decoder[k] works at the level of encoder[k]; its output width is Cout for k = 0.
        self.decoder = nn.ModuleList(
            conv_unit(2 * mid, out if k == 0 else mid, padding=1, batch_norm=True, dilation=d)
            for k, d in enumerate(enc_dilations)
        )
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_in = self.conv_in(x)
        skips: list[torch.Tensor] = []
        h = x_in
        for k, conv in enumerate(self.encoder):
            h = conv(h if k == 0 or self.dilated else self.pool(h))
            skips.append(h)
        h = self.bottom(h)
        for k in range(len(self.decoder) - 1, -1, -1):
            skip = skips[k]
            if not self.dilated and k < len(self.decoder) - 1:
                h = upsample_like(h, skip)
            h = self.decoder[k](torch.cat([h, skip], dim=1))
        return h + x_in


class U2Net(SegmentationNetwork):
    """U2-Net / U2-Net-lite (Qin et al. 2020, Fig. 5, Table 1): (N, in, H, W) -> (N, out, H, W).

    Any H, W. train(): (fused logits, [side logits S1..S6]), all (N, out, H, W); eval(): fused.
    """

    config_defaults: dict[str, Any] = {}

    def __init__(self, in_channels: int, out_channels: int, *, lite: bool = False) -> None:
        super().__init__("u2netp" if lite else "u2net", {}, in_channels, out_channels)
        encoder_table = LITE_ENCODER if lite else FULL_ENCODER
        decoder_table = LITE_DECODER if lite else FULL_DECODER

        def stage(height: int, dilated: bool, cin: int | None, mid: int, cout: int) -> RSU:
            return RSU(height, dilated, in_channels if cin is None else cin, mid, cout)

        self.encoder = nn.ModuleList(stage(*row) for row in encoder_table)  # En_1 .. En_6
        self.decoder = nn.ModuleList(stage(*row) for row in decoder_table)  # De_1 .. De_5
        side_widths = [stage[4] for stage in decoder_table] + [encoder_table[-1][4]]
        self.sides = nn.ModuleList(head_conv(width, out_channels, 3) for width in side_widths)
        self.fuse = head_conv(len(side_widths) * out_channels, out_channels, 1)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)

    deep_supervision_mode = "sum"  # eq. 1: L = w_fuse l_fuse + sum_m w_side^m l_side^m

    def head_names(self) -> list[str]:
        return ["fused"] + [f"S{k}" for k in range(1, len(self.sides) + 1)]

    def head_views(self) -> list[HeadView]:
        """One pass gives the six side outputs and the fused one (Fig. 5)."""
        sides = [f"S{k}" for k in range(1, len(self.sides) + 1)]
        return [HeadView((*sides, "fused"), (*(f"side_{s[1:]}" for s in sides), "fused"), U2NetSides(self))]

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """(N, in, H, W) -> fused logits (N, out, H, W); (fused, [S1..S6]) in train mode."""
        fused, sides = self.fused_and_sides(x)
        if self.training:
            return fused, sides
        return fused

    def fused_and_sides(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The fused logits and the side logits S1..S6, all (N, out, H, W), in any mode."""
        encoded: list[torch.Tensor] = []
        h = x
        for k, stage in enumerate(self.encoder):
            h = stage(h if k == 0 else self.pool(h))
            encoded.append(h)
        decoded: list[torch.Tensor] = [h]  # De_k outputs from k = 5 down to 1, after En_6
        for k in range(len(self.decoder) - 1, -1, -1):
            skip = encoded[k]
            h = self.decoder[k](torch.cat([upsample_like(h, skip), skip], dim=1))
            decoded.append(h)
        decoded.reverse()  # [De_1, ..., De_5, En_6]
        sides = [upsample_like(side(feat), x) for side, feat in zip(self.sides, decoded)]
        return self.fuse(torch.cat(sides, dim=1)), sides


class U2NetSides(SegmentationNetwork):
    """A U2-Net whose output is [S1 | ... | S6 | fused]: (N, in, H, W) -> (N, 7 K, H, W), K channels
    per head (Qin et al. 2020, Fig. 5), for scoring every side output of a trained network."""

    def __init__(self, net: U2Net) -> None:
        heads = len(net.sides) + 1
        super().__init__(f"{net.network_name}-sides", {}, net.in_channels, heads * net.out_channels)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused, sides = self.net.fused_and_sides(x)
        return torch.cat([*sides, fused], dim=1)
