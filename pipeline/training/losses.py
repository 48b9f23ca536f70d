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

Loss config keys (``pipeline.training.supervision.build_loss``; the ``loss`` section of the
params file), defaults in ``LOSS_DEFAULTS`` (the deep-supervision keys: that module):

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
"""

from __future__ import annotations

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


def plain(x: torch.Tensor) -> torch.Tensor:
    """Drop MONAI MetaTensor metadata (batches from MONAI datasets carry it) for plain tensor maths."""
    as_tensor = getattr(x, "as_tensor", None)
    return as_tensor() if callable(as_tensor) else x


def _pixel_map(x: torch.Tensor | None, logits: torch.Tensor, what: str) -> torch.Tensor | None:
    """Bring a per-pixel map (N, 1, *S) or (N, *S) to shape (N, 1, *S), checked against the logits."""
    if x is None:
        return None
    x = plain(x)
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
            f"loss: target values span {lo}..{hi}, expected 0..{n_classes - 1} for {logits.shape[1]} output channel(s)"
        )
    return target.long()


def _check_normalization(normalization: str) -> None:
    if normalization not in CE_NORMALIZATIONS:
        raise SegpipeError(f"loss: ce_normalization {normalization!r} unknown, expected one of {CE_NORMALIZATIONS}")


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
    logits = plain(logits)
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

    def forward(self, logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """logits (N, C, *S), target (N, 1, *S) or (N, *S), mask (N, 1, *S) or (N, *S) -> scalar."""
        logits = plain(logits)
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
        logits = plain(logits)
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
