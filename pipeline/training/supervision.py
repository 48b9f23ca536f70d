"""Deep supervision: the loss over every head of a network's train() output.

The network says how its heads combine (`SegmentationNetwork.deep_supervision_mode`, with the names
of its heads in `head_names()`); the ``loss`` section of the params file may override it:

``deep_supervision`` ("auto" | "mean" | "sum" | "main", "auto")
    How the losses of the heads of ``(main_logits, [aux_logits, ...])`` are combined: "mean" is
    UNet++ (Zhou et al. 2018, the loss averaged over the supervised heads), "sum" is U2-Net
    (Qin et al. 2020, eq. 1: fused output plus the six side outputs), "main" ignores the auxiliary
    heads. "auto" takes the network's own ``deep_supervision_mode`` (UNet++: mean, U2-Net: sum; a
    single-head network's loss is its main head's loss either way).
``head_weights`` (list of float >= 0, or null)
    One weight per head, main head first, then the auxiliary heads in the network's order
    (U2-Net eq. 1's w_fuse, w_side^(1..6)); null means all 1. "sum" computes sum_i w_i l_i,
    "mean" the weighted mean sum_i w_i l_i / sum_i w_i.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from pipeline.config import check_bool, check_choice, check_keys, check_list, check_number
from pipeline.errors import SegpipeError
from pipeline.networks import SegmentationNetwork
from pipeline.training.losses import CE_NORMALIZATIONS, LOSS_DEFAULTS, SegmentationLoss, plain, prepare_inputs

DEEP_SUPERVISION_MODES = ("auto", "mean", "sum", "main")
NetworkOutput = torch.Tensor | tuple[torch.Tensor, Sequence[torch.Tensor]]


class DeepSupervisionLoss(nn.Module):
    """Combine a per-head loss over the heads of a network output.

    ``output`` is what the network returns: in train() mode ``(main_logits, [aux_logits, ...])``,
    every head at the output resolution; in eval() mode the main logits tensor alone. mode "mean"
    is UNet++'s average over heads, "sum" U2-Net's eq. 1 L = w_fuse l_fuse + sum_m w_side^m l_side^m,
    "main" uses the main head only. With no auxiliary head the result is the main head's loss
    (``head_weights`` apply only when auxiliary heads are present).
    """

    def __init__(
        self,
        loss: SegmentationLoss,
        mode: str = "mean",
        head_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("mean", "sum", "main"):
            raise SegpipeError(f"loss: deep_supervision {mode!r} unknown, expected mean, sum or main")
        if head_weights is not None:
            if mode == "main":
                raise SegpipeError("loss: head_weights has no use with deep_supervision 'main'")
            if any(w < 0 for w in head_weights) or not any(w > 0 for w in head_weights):
                raise SegpipeError(f"loss: head_weights {list(head_weights)} must be >= 0 with at least one > 0")
        self.loss = loss
        self.mode = mode
        self.head_weights = None if head_weights is None else [float(w) for w in head_weights]

    @staticmethod
    def split_output(output: NetworkOutput) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(main_logits, [aux_logits, ...]) from a train() tuple or an eval() tensor."""
        if isinstance(output, torch.Tensor):
            return output, []
        if isinstance(output, (tuple, list)) and len(output) == 2 and isinstance(output[0], torch.Tensor):
            return output[0], list(output[1])
        raise SegpipeError(
            "loss: network output must be a logits tensor or (main_logits, [aux_logits, ...]), "
            f"got {type(output).__name__}"
        )

    def head_losses(
        self,
        output: NetworkOutput,
        target: torch.Tensor,
        weight: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """One scalar loss per head used: the main head first, then the auxiliary heads."""
        main, aux = self.split_output(output)
        heads = [plain(h) for h in ([main] if self.mode == "main" else [main, *aux])]
        for i, head in enumerate(heads[1:], start=1):
            if head.shape != heads[0].shape:
                raise SegpipeError(
                    f"loss: auxiliary head {i} has shape {tuple(head.shape)}, expected the main "
                    f"head's {tuple(heads[0].shape)}"
                )
        prepared = prepare_inputs(heads[0], target, weight, mask)
        return [self.loss.prepared_terms(head, prepared)["loss"] for head in heads]

    def combine(self, losses: Sequence[torch.Tensor]) -> torch.Tensor:
        """The total loss from ``head_losses`` (main first)."""
        if len(losses) == 1:
            return losses[0]
        weights = [1.0] * len(losses) if self.head_weights is None else self.head_weights
        if len(weights) != len(losses):
            raise SegpipeError(
                f"loss: head_weights has {len(weights)} entries but the network output has "
                f"{len(losses)} heads (main + {len(losses) - 1} auxiliary)"
            )
        total = sum(w * loss for w, loss in zip(weights, losses))
        return total / sum(weights) if self.mode == "mean" else total

    def forward(
        self,
        output: NetworkOutput,
        target: torch.Tensor,
        weight: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Total loss (scalar) of a network output against target (N, 1, *S) or (N, *S)."""
        return self.combine(self.head_losses(output, target, weight, mask))


def build_loss(
    config: Mapping[str, Any] | None = None,
    *,
    network: SegmentationNetwork | None = None,
    source: str = "loss config",
) -> DeepSupervisionLoss:
    """The training loss of `network` from the ``loss`` config section (keys: module docstrings).

    "auto" takes ``network.deep_supervision_mode`` ("mean" without a network); ``head_weights``
    must then have one entry per ``network.head_names()``. ``source`` names where the config came
    from (e.g. "configs/train.yaml: profiles.default.loss") in errors.
    """
    cfg = {**LOSS_DEFAULTS, **check_keys(config or {}, LOSS_DEFAULTS, source, optional=LOSS_DEFAULTS)}
    ce_weight = check_number(cfg["ce_weight"], "ce_weight", source, low=0)
    dice_weight = check_number(cfg["dice_weight"], "dice_weight", source, low=0)
    if ce_weight == 0 and dice_weight == 0:
        raise SegpipeError(f"{source}: ce_weight and dice_weight are both 0, expected one > 0")
    mode = check_choice(cfg["deep_supervision"], "deep_supervision", DEEP_SUPERVISION_MODES, source)
    if mode == "auto":
        mode = network.deep_supervision_mode if network is not None else "mean"
    head_weights = check_list(cfg["head_weights"], "head_weights", source, optional=True, nonempty=True)
    if head_weights is not None:
        head_weights = [check_number(w, "head_weights[]", source, low=0) for w in head_weights]
        if network is not None and len(head_weights) != len(network.head_names()):
            raise SegpipeError(
                f"{source}: head_weights has {len(head_weights)} entries, network "
                f"{network.network_name} has {len(network.head_names())} heads {network.head_names()}"
            )
    segmentation_loss = SegmentationLoss(
        ce_weight=ce_weight,
        dice_weight=dice_weight,
        ce_normalization=check_choice(cfg["ce_normalization"], "ce_normalization", CE_NORMALIZATIONS, source),
        dice_include_background=check_bool(cfg["dice_include_background"], "dice_include_background", source),
        dice_batch=check_bool(cfg["dice_batch"], "dice_batch", source),
        dice_smooth=check_number(cfg["dice_smooth"], "dice_smooth", source, low=0, low_open=True),
    )
    try:
        return DeepSupervisionLoss(segmentation_loss, mode, head_weights)
    except SegpipeError as exc:
        raise SegpipeError(f"{source}: {exc}") from exc
