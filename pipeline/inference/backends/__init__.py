"""The network that runs the windows: the optimised torch graph (torch_graph.py: `InferenceNetwork`,
`torch_network`), the ONNX export with its metadata contract (onnx_export.py, onnx_meta.py), ONNX Runtime
(onnx_runtime.py), and the choice between them (select.py: `inference_network`). Training and evaluation
use torch_graph only."""
