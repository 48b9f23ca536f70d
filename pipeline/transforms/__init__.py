"""U-Net training transforms: eq. 2 weight maps, elastic deformation, overlap-tile patches."""
from pipeline.transforms.weightmap import (
    compute_class_weights,
    instances_from_binary,
    unet_weight_map,
    unet_weight_map_reference,
)

__all__ = [
    "compute_class_weights",
    "instances_from_binary",
    "unet_weight_map",
    "unet_weight_map_reference",
]
