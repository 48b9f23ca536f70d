"""Sliding-window inference on images of any size, streamed from disk to disk.

`predict(model, image, ...)` -> probabilities (K, H, W) float32 for an image in memory;
`predict_file(model, input_path, output_path, ...)` -> the same result streamed band by band from
a TIFF/BigTIFF/OME-TIFF, NIfTI, PNG/JPEG or any SimpleITK format into a tiled BigTIFF or NIfTI.
The network's padding picks the strategy: "same" -> MONAI-identical blended windows, "valid" -> the
U-Net paper's overlap-tile. `model` is a `pipeline.networks` module or a checkpoint path.
"""
from pipeline.inference.optimize import InferenceNetwork, optimize_network
from pipeline.inference.sliding import InferenceSettings, load_settings, plan_tiles, predict
from pipeline.inference.streaming import InferenceReport, output_paths, predict_file

__all__ = [
    "InferenceNetwork",
    "InferenceReport",
    "InferenceSettings",
    "load_settings",
    "optimize_network",
    "output_paths",
    "plan_tiles",
    "predict",
    "predict_file",
]
