"""Segmentation losses: U-Net's pixel-weighted cross-entropy, soft Dice, their sum, deep supervision.

All losses take raw logits ``(N, C, H, W)`` (any number of spatial axes works the same way) and
integer class targets ``(N, 1, H, W)`` or ``(N, H, W)``:

- ``C == 1``: binary segmentation, foreground probability ``sigmoid(logit)``; targets in {0, 1}.
- ``C >= 2``: multi-class segmentation, class probabilities ``softmax(logits, dim=1)``; targets in
  ``0 .. C-1``.

Two optional per-pixel inputs, both ``(N, 1, H, W)`` or ``(N, H, W)``:

- ``weight``: the U-Net weight map w(x) of eq. 2 (prepared with the data), used by the cross-entropy.
- ``mask``: valid pixels (bool or {0, 1}, e.g. DRIVE's field of view); pixels outside it contribute
  nothing to any loss term.

Loss config keys (``build_loss``; the ``loss`` section of the params file), defaults in
``LOSS_DEFAULTS``:

``ce_weight`` (float >= 0, 1.0)
    Factor of the cross-entropy term.
``dice_weight`` (float >= 0, 1.0)
    Factor of the soft Dice term. ``ce_weight: 1, dice_weight: 0`` is U-Net's eq. 1 loss (and,
    without a weight map and with one output channel, U2-Net's BCE).
``ce_normalization`` ("pixels" | "weights", "pixels")
    Eq. 1 is a sum over pixels; "pixels" divides it by the number of valid pixels, "weights" by the
    sum of the weights of the valid pixels (a weighted mean). Both equal the plain mean
    cross-entropy when every weight is 1.
``dice_include_background`` (bool, False)
    Multi-class only: include channel 0 in the Dice average (nnU-Net leaves it out).
``dice_batch`` (bool, True)
    Sum intersections and unions over the whole batch before dividing (nnU-Net's "batch Dice"),
    instead of averaging per-image Dice values; stabler on patches with little foreground.
``dice_smooth`` (float > 0, 1e-5)
    Added to the numerator and the denominator of the Dice ratio.
``deep_supervision`` ("auto" | "mean" | "sum" | "main", "auto")
    How the losses of the heads of ``(main_logits, [aux_logits, ...])`` are combined: "mean" is
    UNet++ (Zhou et al. 2018, the loss averaged over the supervised heads), "sum" is U2-Net
    (Qin et al. 2020, eq. 1: fused output plus the six side outputs), "main" ignores the auxiliary
    heads. "auto" picks by network: unetpp -> mean, u2net/u2netp -> sum, unet -> mean (it has
    no auxiliary head, so the loss is the main loss).
``head_weights`` (list of float >= 0, or null)
    One weight per head, main head first, then the auxiliary heads in the network's order
    (U2-Net eq. 1's w_fuse, w_side^(1..6)); null means all 1. "sum" computes sum_i w_i l_i,
    "mean" the weighted mean sum_i w_i l_i / sum_i w_i.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss, MaskedDiceLoss
from monai.networks.utils import one_hot
from torch import nn

from pipeline.errors import SegpipeError

LOSS_DEFAULTS: dict[str, Any] = {
    "ce_weight": 1.0,
    "dice_weight": 1.0,
    "ce_normalization": "pixels",
    "dice_include_background": False,
    "dice_batch": True,
    "dice_smooth": 1e-5,
    "deep_supervision": "auto",
    "head_weights": None,
}
CE_NORMALIZATIONS = ("pixels", "weights")
DEEP_SUPERVISION_MODES = ("auto", "mean", "sum", "main")
# "auto" resolution per network name (the registry names of the networks contract).
AUTO_DEEP_SUPERVISION = {"unet": "mean", "unetpp": "mean", "u2net": "sum", "u2netp": "sum"}

NetworkOutput = torch.Tensor | tuple[torch.Tensor, Sequence[torch.Tensor]]


def _plain(x: torch.Tensor) -> torch.Tensor:
    """Drop MONAI MetaTensor metadata (batches from MONAI datasets carry it) for plain tensor maths."""
    as_tensor = getattr(x, "as_tensor", None)
    return as_tensor() if callable(as_tensor) else x


def _pixel_map(x: torch.Tensor | None, logits: torch.Tensor, what: str) -> torch.Tensor | None:
    """Bring a per-pixel map (N, 1, *S) or (N, *S) to shape (N, 1, *S), checked against the logits."""
    if x is None:
        return None
    x = _plain(x)
    if x.dim() == logits.dim() - 1:
        x = x.unsqueeze(1)
    expected = (logits.shape[0], 1, *logits.shape[2:])
    if tuple(x.shape) != expected:
        raise SegpipeError(
            f"loss: {what} has shape {tuple(x.shape)}, expected {expected} or "
            f"{(expected[0], *expected[2:])} to match logits {tuple(logits.shape)}"
        )
    return x


def prepare_target(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Class indices as int64 (N, 1, *S), checked against the logits (N, C, *S).

    Floating targets (MONAI loaders return float32 labels) are accepted when their values are
    integers. Raises SegpipeError on a shape mismatch or a value outside {0, 1} (C == 1) or
    0 .. C-1 (C >= 2).
    """
    target = _pixel_map(target, logits, "target")
    assert target is not None
    if target.is_floating_point():
        if not torch.equal(target, target.round()):
            raise SegpipeError("loss: target holds non-integer values, expected class indices")
    elif target.dtype == torch.bool:
        target = target.to(torch.uint8)
    n_classes = max(int(logits.shape[1]), 2)
    lo, hi = (int(v) for v in torch.aminmax(target))
    if lo < 0 or hi >= n_classes:
        raise SegpipeError(
            f"loss: target values span {lo}..{hi}, expected 0..{n_classes - 1} for "
            f"{logits.shape[1]} output channel(s)"
        )
    return target.long()


def _check_normalization(normalization: str) -> None:
    if normalization not in CE_NORMALIZATIONS:
        raise SegpipeError(
            f"loss: ce_normalization {normalization!r} unknown, expected one of {CE_NORMALIZATIONS}"
        )


Prepared = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]


def prepare_inputs(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> Prepared:
    """Checked (target int64, weight, mask as float 0/1), all (N, 1, *S); done once per batch.

    The mask is at least float32 so that pixel counts stay exact under bf16/fp16 autocast.
    """
    target = prepare_target(target, logits)
    weight = _pixel_map(weight, logits, "weight map")
    mask = _pixel_map(mask, logits, "mask")
    if mask is not None:
        mask = (mask != 0).to(torch.promote_types(logits.dtype, torch.float32))
    return target, weight, mask


def _cross_entropy(logits: torch.Tensor, prepared: Prepared, normalization: str) -> torch.Tensor:
    target, weight, mask = prepared
    if logits.shape[1] == 1:
        nll = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none")
    else:
        nll = F.cross_entropy(logits, target[:, 0], reduction="none").unsqueeze(1)
    nll = nll.to(torch.promote_types(nll.dtype, torch.float32))  # sums stay accurate for bf16/fp16
    w = torch.ones_like(nll) if weight is None else weight.to(nll.dtype)
    if mask is not None:
        w = w * mask
    if normalization == "weights":
        denominator = w.sum()
    else:
        denominator = nll.new_tensor(float(nll.numel())) if mask is None else mask.sum()
    # An empty mask (or all-zero weights) gives 0 / 0: clamp so that the loss is 0, not NaN.
    return (nll * w).sum() / denominator.clamp_min(torch.finfo(nll.dtype).tiny)


def weighted_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    normalization: str = "pixels",
) -> torch.Tensor:
    """U-Net eq. 1, E = -sum_x w(x) log p_l(x)(x), normalised; a scalar tensor.

    logits (N, C, *S); target (N, 1, *S) or (N, *S) class indices; weight and mask (N, 1, *S) or
    (N, *S). C == 1 uses the sigmoid (binary cross-entropy, the same as a 2-class softmax on logits
    (0, z)); C >= 2 the softmax. The sum runs over valid pixels (mask != 0) and is divided by their
    number ("pixels") or by their total weight ("weights"). With no valid pixel the loss is 0
    (still attached to the graph).
    """
    _check_normalization(normalization)
    logits = _plain(logits)
    return _cross_entropy(logits, prepare_inputs(logits, target, weight, mask), normalization)


class WeightedCrossEntropyLoss(nn.Module):
    """U-Net eq. 1 as a module; see ``weighted_cross_entropy``."""

    def __init__(self, normalization: str = "pixels") -> None:
        super().__init__()
        _check_normalization(normalization)
        self.normalization = normalization

    def forward(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        weight: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return weighted_cross_entropy(logits, target, weight, mask, self.normalization)


class SoftDiceLoss(nn.Module):
    """Soft Dice loss 1 - (2 sum p g + s) / (sum p + sum g + s) (Milletari et al. 2016), via MONAI.

    C == 1: Dice of the sigmoid foreground; C >= 2: mean over classes of the softmax (channel 0
    only if ``include_background``). The target is one-hot encoded here, before the mask is
    applied: MONAI's ``MaskedDiceLoss(to_onehot_y=True)`` masks the index map first, which turns
    masked-out pixels into background and counts them as missed background.
    """

    def __init__(self, include_background: bool = False, batch: bool = True, smooth: float = 1e-5) -> None:
        super().__init__()
        # One MONAI loss per (binary, masked) case; none of them holds parameters.
        self._losses: dict[tuple[bool, bool], DiceLoss] = {
            (binary, masked): (MaskedDiceLoss if masked else DiceLoss)(
                include_background=True if binary else include_background,
                sigmoid=binary,
                softmax=not binary,
                smooth_nr=smooth,
                smooth_dr=smooth,
                batch=batch,
                reduction="mean",
            )
            for binary in (True, False)
            for masked in (True, False)
        }

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """logits (N, C, *S), target (N, 1, *S) or (N, *S), mask (N, 1, *S) or (N, *S) -> scalar."""
        logits = _plain(logits)
        return self.prepared(logits, prepare_inputs(logits, target, None, mask))

    def prepared(self, logits: torch.Tensor, prepared: Prepared) -> torch.Tensor:
        """The loss from ``prepare_inputs`` output (the weight map is not used by Dice)."""
        target, _, mask = prepared
        binary = logits.shape[1] == 1
        target = target.to(logits.dtype) if binary else one_hot(target, logits.shape[1], dtype=logits.dtype)
        if mask is None:
            return self._losses[binary, False](logits, target)
        return self._losses[binary, True](logits, target, mask=mask)


class SegmentationLoss(nn.Module):
    """``ce_weight * weighted_cross_entropy + dice_weight * soft Dice`` for one output head.

    A term whose factor is 0 is not computed.
    """

    def __init__(
        self,
        ce_weight: float = 1.0,
        dice_weight: float = 1.0,
        ce_normalization: str = "pixels",
        dice_include_background: bool = False,
        dice_batch: bool = True,
        dice_smooth: float = 1e-5,
    ) -> None:
        super().__init__()
        if ce_weight < 0 or dice_weight < 0 or ce_weight + dice_weight == 0:
            raise SegpipeError(
                f"loss: ce_weight {ce_weight} and dice_weight {dice_weight} must be >= 0, one of them > 0"
            )
        self.ce_weight = float(ce_weight)
        self.dice_weight = float(dice_weight)
        self.ce = WeightedCrossEntropyLoss(ce_normalization)
        self.dice = SoftDiceLoss(dice_include_background, dice_batch, dice_smooth)

    def terms(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        weight: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """{"ce": ..., "dice": ..., "loss": weighted sum}, scalars; terms with factor 0 left out."""
        logits = _plain(logits)
        return self.prepared_terms(logits, prepare_inputs(logits, target, weight, mask))

    def prepared_terms(self, logits: torch.Tensor, prepared: Prepared) -> dict[str, torch.Tensor]:
        """``terms`` from ``prepare_inputs`` output (checked once, shared by all heads)."""
        out: dict[str, torch.Tensor] = {}
        if self.ce_weight:
            out["ce"] = _cross_entropy(logits, prepared, self.ce.normalization)
        if self.dice_weight:
            out["dice"] = self.dice.prepared(logits, prepared)
        out["loss"] = sum(getattr(self, f"{name}_weight") * value for name, value in out.items())
        return out

    def forward(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        weight: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """logits (N, C, *S), target (N, 1, *S) or (N, *S), weight/mask (N, 1, *S) -> scalar."""
        return self.terms(logits, target, weight, mask)["loss"]


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
                raise SegpipeError(
                    f"loss: head_weights {list(head_weights)} must be >= 0 with at least one > 0"
                )
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
        heads = [_plain(h) for h in ([main] if self.mode == "main" else [main, *aux])]
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
        total = sum(w * l for w, l in zip(weights, losses))
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


def _check_number(config: Mapping[str, Any], key: str, source: str, positive: bool = False) -> float:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise SegpipeError(f"{source}: {key} must be a number {bound}, got {value!r}")
    return float(value)


def _check_bool(config: Mapping[str, Any], key: str, source: str) -> bool:
    value = config[key]
    if not isinstance(value, bool):
        raise SegpipeError(f"{source}: {key} must be true or false, got {value!r}")
    return value


def build_loss(
    network_name: str, config: Mapping[str, Any] | None = None, source: str = "loss config"
) -> DeepSupervisionLoss:
    """The training loss of a network from the ``loss`` config section (keys: module docstring).

    ``source`` names where the config came from (e.g. "configs/default.yaml: loss") in errors.
    Unknown keys or bad values raise SegpipeError.
    """
    config = dict(config or {})
    unknown = sorted(set(config) - set(LOSS_DEFAULTS))
    if unknown:
        raise SegpipeError(f"{source}: unknown key(s) {unknown}; valid keys: {sorted(LOSS_DEFAULTS)}")
    cfg = {**LOSS_DEFAULTS, **config}
    ce_weight = _check_number(cfg, "ce_weight", source)
    dice_weight = _check_number(cfg, "dice_weight", source)
    if ce_weight == 0 and dice_weight == 0:
        raise SegpipeError(f"{source}: ce_weight and dice_weight are both 0, expected one > 0")
    if cfg["ce_normalization"] not in CE_NORMALIZATIONS:
        raise SegpipeError(
            f"{source}: ce_normalization {cfg['ce_normalization']!r}, expected one of {CE_NORMALIZATIONS}"
        )
    mode = cfg["deep_supervision"]
    if mode not in DEEP_SUPERVISION_MODES:
        raise SegpipeError(f"{source}: deep_supervision {mode!r}, expected one of {DEEP_SUPERVISION_MODES}")
    if mode == "auto":
        if network_name not in AUTO_DEEP_SUPERVISION:
            raise SegpipeError(
                f"{source}: deep_supervision 'auto' does not know network {network_name!r}; "
                f"known: {sorted(AUTO_DEEP_SUPERVISION)} (or set mean, sum or main)"
            )
        mode = AUTO_DEEP_SUPERVISION[network_name]
    head_weights = cfg["head_weights"]
    if head_weights is not None:
        if not isinstance(head_weights, (list, tuple)) or not head_weights:
            raise SegpipeError(f"{source}: head_weights must be null or a list of numbers, got {head_weights!r}")
        head_weights = [_check_number({"head_weights": w}, "head_weights", source) for w in head_weights]
    segmentation_loss = SegmentationLoss(
        ce_weight=ce_weight,
        dice_weight=dice_weight,
        ce_normalization=cfg["ce_normalization"],
        dice_include_background=_check_bool(cfg, "dice_include_background", source),
        dice_batch=_check_bool(cfg, "dice_batch", source),
        dice_smooth=_check_number(cfg, "dice_smooth", source, positive=True),
    )
    try:
        return DeepSupervisionLoss(segmentation_loss, mode, head_weights)
    except SegpipeError as exc:
        raise SegpipeError(f"{source}: {exc}") from exc
