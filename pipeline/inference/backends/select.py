"""Which backend runs a model: ONNX Runtime for a .onnx file or `backend: onnxruntime`, else torch.

`segpipe infer` and the public API choose here; training's validation and `segpipe evaluate` run the
checkpoint in torch (`torch_graph.torch_network`) and never load this module.
"""

from __future__ import annotations

from pipeline.inference.backends.onnx_runtime import is_onnx_file, onnx_network
from pipeline.inference.backends.torch_graph import InferenceNetwork, ModelLike, torch_network
from pipeline.inference.settings import InferenceSettings


def inference_network(model: ModelLike | InferenceNetwork, settings: InferenceSettings) -> InferenceNetwork:
    """The network of `model` on its backend: ONNX Runtime's (`onnx_network`) for `backend: onnxruntime`
    or a .onnx file, else the optimised torch graph (`torch_network`); an InferenceNetwork passes through."""
    if not isinstance(model, InferenceNetwork) and (settings.backend == "onnxruntime" or is_onnx_file(model)):
        return onnx_network(model, settings)
    return torch_network(model, settings)
