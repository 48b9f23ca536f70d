"""UNet++: Zhou, Rahman Siddiquee, Tajbakhsh and Liang, "UNet++: A Nested U-Net Architecture for
Medical Image Segmentation", DLMIA 2018 (Fig. 1, Eq. 1).

Nodes X^{i,j} (i: down-sampling level, j: position along the skip pathway), Eq. 1:
    X^{i,0} = H(X^{i-1,0} max-pooled)                          (backbone; X^{0,0} = H(input))
    X^{i,j} = H([X^{i,0}, ..., X^{i,j-1}, U(X^{i+1,j-1})])     (j >= 1, dense skip pathway)
with H two 3x3 convs + ReLU (optional batch norm and dropout; the authors' Keras code has dropout
after each conv and no batch norm) and U a 2x2 transposed conv to the width of level i. Widths
base_width * 2**i (32, 64, 128, 256, 512 for the paper), or `widths` per level (e.g. 16, 16, 32,
64, 128: on a CPU budget the dense nodes at full resolution are where the FLOPs go). Deep
supervision: 1x1 heads on X^{0,1}, ..., X^{0,depth}; at inference "accurate" averages the heads,
"fast" takes one.

Pruning (Sec. 2, Fig. 1c-d): UNet++ L_p is the sub-network of the nodes X^{i,j} with i + j <= p,
ending in head X^{0,p}. `prune_level=p` builds only those nodes, so a pruned forward computes less;
`UNetPlusPlus.pruned(p)` cuts a trained network down, keeping its weights, and `load_model(path,
prune_level=p, mode=...)` does it at load time (`load_overrides`, `with_overrides`).

"Same" padding: inputs divisible by 2**prune_level keep their size.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.blocks import UpSample
from torch import nn

from pipeline.config import check_bool, check_choice, check_int, check_number
from pipeline.errors import SegpipeError
from pipeline.networks.common import (
    SPATIAL_DIMS,
    HeadView,
    SegmentationNetwork,
    conv_unit,
    head_conv,
    level_widths,
)

MODES = ("accurate", "fast")


def average_heads(heads: list[torch.Tensor]) -> torch.Tensor:
    """Logits whose probabilities are the mean of the heads' probabilities ("accurate" mode).

    The paper averages the segmentation branches' outputs (probabilities). For one channel
    (sigmoid) the result is logit(mean_k sigmoid(l_k)); for C > 1 channels (softmax) it is
    log(mean_k softmax(l_k)), whose softmax is that mean. Computed with logsumexp, so it is
    stable for large logits. heads: K tensors (N, C, H, W) -> (N, C, H, W).
    """
    stacked = torch.stack(heads)
    log_k = math.log(len(heads))
    if stacked.shape[2] == 1:
        log_p = torch.logsumexp(F.logsigmoid(stacked), dim=0) - log_k
        log_not_p = torch.logsumexp(F.logsigmoid(-stacked), dim=0) - log_k
        return log_p - log_not_p
    return torch.logsumexp(F.log_softmax(stacked, dim=2), dim=0) - log_k


class UNetPlusPlus(SegmentationNetwork):
    """UNet++ L_p (Zhou et al. 2018): (N, in_channels, H, W) -> (N, out_channels, H, W).

    H, W divisible by 2**prune_level. train(): (head X^{0,p}, [heads X^{0,1}..X^{0,p-1}]) with deep
    supervision, (head X^{0,p}, []) without. eval(): "fast" -> head X^{0,p}; "accurate" -> the
    average of heads X^{0,1}..X^{0,p} (`average_heads`).
    """

    config_defaults: dict[str, Any] = {
        "base_width": 32,
        "depth": 4,
        "batch_norm": False,
        "dropout": 0.5,
        "deep_supervision": True,
        "mode": "accurate",
        "prune_level": None,
        "widths": None,
    }
    load_overrides: tuple[str, ...] = ("mode", "prune_level")

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        base_width: int = 32,
        depth: int = 4,
        batch_norm: bool = False,
        dropout: float = 0.5,
        deep_supervision: bool = True,
        mode: str = "accurate",
        prune_level: int | None = None,
        widths: list[int] | None = None,
    ) -> None:
        owner = "unetpp"
        check_int(base_width, "base_width", owner, minimum=1)
        check_int(depth, "depth", owner, minimum=1)
        check_bool(batch_norm, "batch_norm", owner)
        check_number(dropout, "dropout", owner, low=0.0, high=1.0, high_open=True)
        check_bool(deep_supervision, "deep_supervision", owner)
        check_choice(mode, "mode", MODES, owner)
        per_level = level_widths(widths, base_width, depth, owner=owner)
        level = depth if prune_level is None else prune_level
        check_int(level, "prune_level", owner, minimum=1)
        if level > depth:
            raise SegpipeError(f"unetpp: prune_level must be in 1..depth={depth}, got {level}")
        config = dict(
            base_width=base_width,
            depth=depth,
            batch_norm=batch_norm,
            dropout=float(dropout),
            deep_supervision=deep_supervision,
            mode=mode,
            prune_level=level,
            widths=None if widths is None else per_level,
        )
        super().__init__("unetpp", config, in_channels, out_channels, size_multiple=2**level)
        self.prune_level = level
        self.deep_supervision = deep_supervision
        self.mode = mode
        widths = per_level[: level + 1]

        def node(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                conv_unit(cin, cout, padding=1, batch_norm=batch_norm, dropout=dropout),
                conv_unit(cout, cout, padding=1, batch_norm=batch_norm, dropout=dropout),
            )

        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        # Only the nodes with i + j <= prune_level exist (UNet++ L_p).
        self.nodes = nn.ModuleDict()
        self.ups = nn.ModuleDict()
        for j in range(level + 1):
            for i in range(level + 1 - j):
                cin = (in_channels if i == 0 else widths[i - 1]) if j == 0 else (j + 1) * widths[i]
                self.nodes[f"x{i}_{j}"] = node(cin, widths[i])
                if j > 0:
                    self.ups[f"x{i}_{j}"] = UpSample(
                        SPATIAL_DIMS, widths[i + 1], widths[i], scale_factor=2, mode="deconv"
                    )
        self.first_head = 1 if deep_supervision else level
        self.heads = nn.ModuleDict(
            {f"x0_{j}": head_conv(widths[0], out_channels) for j in range(self.first_head, level + 1)}
        )

    def head_names(self) -> list[str]:
        """X^{0,p} (main), then X^{0,1}..X^{0,p-1} with deep supervision."""
        return [f"X0,{j}" for j in (self.prune_level, *range(self.first_head, self.prune_level))]

    def head_views(self) -> list[HeadView]:
        """UNet++ L1..Lp: the network pruned at each level in "fast" mode (Sec. 2, Fig. 1c-d); the
        trained level only, without deep supervision."""
        levels = range(1, self.prune_level + 1) if self.deep_supervision else [self.prune_level]
        return [HeadView((f"L{level}",), (f"head_L{level}",), self.pruned(level, "fast")) for level in levels]

    def top_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Eq. 1 over all built nodes; returns X^{0,1}..X^{0,p}, each (N, widths[0], H, W)."""
        grid: list[list[torch.Tensor]] = []  # grid[i][j] = X^{i,j}
        for i in range(self.prune_level + 1):
            x = self.nodes[f"x{i}_0"](x if i == 0 else self.pool(x))
            grid.append([x])
        for j in range(1, self.prune_level + 1):
            for i in range(self.prune_level + 1 - j):
                up = self.ups[f"x{i}_{j}"](grid[i + 1][j - 1])
                grid[i].append(self.nodes[f"x{i}_{j}"](torch.cat(grid[i] + [up], dim=1)))
        return grid[0][1:]

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """(N, in, H, W) -> logits (N, out, H, W); (main, aux heads) in train mode (see class)."""
        features = self.top_features(x)
        if not self.training and self.mode == "fast":
            return self.heads[f"x0_{self.prune_level}"](features[-1])
        outs = [self.heads[f"x0_{j}"](features[j - 1]) for j in range(self.first_head, self.prune_level + 1)]
        if self.training:
            return outs[-1], outs[:-1]
        return average_heads(outs) if len(outs) > 1 else outs[0]

    def with_overrides(self, **overrides: Any) -> UNetPlusPlus:
        """`pruned` at `overrides["prune_level"]` (default: this network's level) in
        `overrides["mode"]` (default: this network's mode)."""
        return self.pruned(overrides.get("prune_level", self.prune_level), overrides.get("mode"))

    def pruned(self, prune_level: int, mode: str | None = None) -> "UNetPlusPlus":
        """A new UNet++ L_`prune_level` holding this network's weights for the nodes it keeps.

        Its "fast" output equals head X^{0,prune_level} of this network. Needs deep supervision
        (otherwise the shallower heads were never built, let alone trained) unless the level is
        unchanged; the level cannot exceed this network's.
        """
        if prune_level != self.prune_level and not self.deep_supervision:
            raise SegpipeError(
                "unetpp: pruning needs a network trained with deep_supervision=true "
                f"(this one has only head X^0,{self.prune_level})"
            )
        if (
            isinstance(prune_level, bool)
            or not isinstance(prune_level, int)
            or not (1 <= prune_level <= self.prune_level)
        ):
            raise SegpipeError(
                f"unetpp: prune_level must be in 1..{self.prune_level} for this network, got {prune_level!r}"
            )
        config = dict(self.config, prune_level=prune_level, mode=mode or self.mode)
        smaller = UNetPlusPlus(self.in_channels, self.out_channels, **config)
        state = self.state_dict()
        smaller.load_state_dict({key: state[key] for key in smaller.state_dict()})
        smaller.train(self.training)
        return smaller.to(next(self.parameters()).device)
