"""Sliding-window inference on images of any size, streamed from disk to disk: the public API.

`predict(model, image, ...)` -> probabilities (K, H, W) float32 for an image in memory;
`predict_file(model, input_path, output_path, ...)` / `infer_files(...)` -> the same streamed band by
band from a TIFF/BigTIFF/OME-TIFF, NIfTI, PNG/JPEG or any SimpleITK format into a tiled BigTIFF,
NIfTI, pyramidal OME-TIFF or OME-Zarr (`OUTPUT_FORMATS`). A model is a `pipeline.networks` module, a
checkpoint path, or an `InferenceNetwork` from `inference_network` (which runs a .onnx export of
`export_onnx` on ONNX Runtime). Settings are values (`InferenceSettings`, `load_settings`; defaults
equal to configs/inference.yaml, which only the `segpipe infer` entry reads).

The subpackages, each importing only those before it:

    readers/   images in (TIFF, NIfTI, SimpleITK, arrays) and the checkpoint's preprocessing on the fly
    backends/  the network: torch graph (torch_graph), ONNX export, metadata and runtime, the choice (select)
    engine/    tiling, sliding-window blending, TTA, memory checks, probabilities -> labels
    writers/   tiled TIFF, OME-TIFF, OME-Zarr, NIfTI, their OME metadata, pyramids, spools; formats.py
    run/       predict_file / infer_files (run/predict.py), predict on any backend (run/in_memory.py),
               resume, torchrun shards, input globs

The names below load their module on first use, so `import pipeline.inference.engine.tiling` runs no
writer. The package's own modules import from the subpackages, never from here (tests/test_layers.py).
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> its module
_API: dict[str, str] = {
    "InferenceSettings": "pipeline.inference.settings",
    "load_settings": "pipeline.inference.settings",
    "InferenceNetwork": "pipeline.inference.backends.torch_graph",
    "inference_network": "pipeline.inference.backends.select",
    "export_onnx": "pipeline.inference.backends.onnx_export",
    "predict": "pipeline.inference.run.in_memory",
    "to_labels": "pipeline.inference.engine.labels",
    "OUTPUT_FORMATS": "pipeline.inference.writers.formats",
    "predict_file": "pipeline.inference.run.predict",
    "infer_files": "pipeline.inference.run.predict",
    "InferenceReport": "pipeline.inference.run.report",
}
_ATTRIBUTE = {"OUTPUT_FORMATS": "FORMATS"}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), _ATTRIBUTE.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
