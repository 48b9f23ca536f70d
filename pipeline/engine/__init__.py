"""Training engine: losses (U-Net eq. 1 weighted cross-entropy, soft Dice, deep supervision)."""
from pipeline.engine.losses import (
    LOSS_DEFAULTS,
    DeepSupervisionLoss,
    SegmentationLoss,
    SoftDiceLoss,
    WeightedCrossEntropyLoss,
    build_loss,
    weighted_cross_entropy,
)

__all__ = [
    "LOSS_DEFAULTS",
    "DeepSupervisionLoss",
    "SegmentationLoss",
    "SoftDiceLoss",
    "WeightedCrossEntropyLoss",
    "build_loss",
    "weighted_cross_entropy",
]
