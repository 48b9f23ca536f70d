"""U-Net training transforms (Ronneberger et al. 2015) as MONAI dictionary transforms.

Weight maps (eq. 2), elastic deformation (section 3.1), overlap-tile patches and the grid tiler
(figure 2), and the per-dataset augmentation presets of `configs/augment.yaml`.

The weight-map functions import only numpy/scipy (the prepare stage uses them); the MONAI
transforms are imported on first access, so `from pipeline.transforms import unet_weight_map`
does not load torch and MONAI.
"""

from __future__ import annotations

import importlib
from typing import Any

from pipeline.transforms.weightmap import (
    compute_class_weights,
    instances_from_binary,
    unet_weight_map,
    unet_weight_map_reference,
)

_LAZY = {
    "RandElasticd": "pipeline.transforms.elastic",
    "RandOverlapTilePatchd": "pipeline.transforms.patches",
    "TileGrid": "pipeline.transforms.patches",
    "crop_reflect": "pipeline.transforms.patches",
    "reflect_indices": "pipeline.transforms.patches",
    "build_preprocess_transforms": "pipeline.transforms.presets",
    "build_train_transforms": "pipeline.transforms.presets",
}

__all__ = [
    "compute_class_weights",
    "instances_from_binary",
    "unet_weight_map",
    "unet_weight_map_reference",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'pipeline.transforms' has no attribute '{name}'")
    return getattr(importlib.import_module(_LAZY[name]), name)
