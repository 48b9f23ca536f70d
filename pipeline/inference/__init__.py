"""Sliding-window inference on images of any size, streamed from disk to disk: the public API.

`predict(model, image, ...)` -> probabilities (K, H, W) float32 for an image in memory;
`predict_file(model, input_path, output_path, ...)` -> the same result streamed band by band from
a TIFF/BigTIFF/OME-TIFF, NIfTI, PNG/JPEG or any SimpleITK format into a tiled BigTIFF, NIfTI,
pyramidal OME-TIFF or OME-Zarr (`OUTPUT_FORMATS`).
The network's padding picks the strategy: "same" -> MONAI-identical blended windows, "valid" -> the
U-Net paper's overlap-tile. `model` is a `pipeline.networks` module, a checkpoint path or its
`export_onnx` (.onnx, run by ONNX Runtime: `onnx_network`).
Settings are values (`InferenceSettings`, defaults equal to `configs/inference.yaml`); only the
`segpipe infer` entry (`pipeline.inference.stage`) reads that file. Other packages import from
here, not from the submodules.
"""
from pipeline.inference.export import export_onnx, onnx_model
from pipeline.inference.onnx_backend import onnx_network
from pipeline.inference.optimize import InferenceNetwork, ModelLike, optimize_network, recorded_preprocessing
from pipeline.inference.outputs import FORMATS as OUTPUT_FORMATS
from pipeline.inference.outputs import output_paths
from pipeline.inference.settings import (
    InferenceSettings,
    load_settings,
    parse_threshold,
    resolve_threshold,
    settings_from_config,
)
from pipeline.inference.sliding import RowStream, inference_network, predict, probabilities, stream_probabilities
from pipeline.inference.memory import peak_rss_mb, reset_peak_rss
from pipeline.inference.inputs import expand_inputs
from pipeline.inference.streaming import InferenceReport, infer_files, predict_file
from pipeline.inference.tiling import TilePlan, output_period, plan_tiles, source_index
from pipeline.inference.tta import TTA_TRANSFORMS, tta_logits
from pipeline.inference.writers import to_labels

__all__ = [
    "OUTPUT_FORMATS",
    "TTA_TRANSFORMS",
    "InferenceNetwork",
    "InferenceReport",
    "InferenceSettings",
    "ModelLike",
    "RowStream",
    "TilePlan",
    "expand_inputs",
    "export_onnx",
    "infer_files",
    "inference_network",
    "load_settings",
    "onnx_model",
    "onnx_network",
    "optimize_network",
    "output_paths",
    "output_period",
    "parse_threshold",
    "peak_rss_mb",
    "plan_tiles",
    "predict",
    "predict_file",
    "probabilities",
    "recorded_preprocessing",
    "reset_peak_rss",
    "resolve_threshold",
    "settings_from_config",
    "source_index",
    "stream_probabilities",
    "to_labels",
    "tta_logits",
]
