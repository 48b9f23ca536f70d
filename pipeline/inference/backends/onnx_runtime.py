"""ONNX Runtime as the inference backend: an `InferenceNetwork` whose module is an ONNX Runtime session.

`onnx_network` builds it from a `segpipe export` file (.onnx) or, exporting in memory
(`pipeline.inference.backends.onnx_export`), from a checkpoint or a contract network. The contract facts the
tiler reads (padding, halo, channels, size helpers) and the preprocessing record come from the
model's segpipe metadata (`pipeline.inference.backends.onnx_meta`), so `stream_probabilities`, `predict`,
`predict_file` and `infer_files` run it unchanged: the same windows, blending, test-time
augmentation, preprocessing and outputs as the torch backend.

The session: CPUExecutionProvider, or CUDAExecutionProvider first for device cuda[:N] (an
onnxruntime build with it is needed: onnxruntime-gpu); every graph optimisation; intra-op threads
from the `threads` setting (None: ONNX Runtime's default, one per physical core); idle pool threads
do not spin, so they leave the CPU to the reading, blending and writing between calls. Tensors stay
on the host (ONNX Runtime copies them to the GPU itself). The graph is fp32: precision must be fp32.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pipeline.errors import SegpipeError
from pipeline.inference.backends.onnx_meta import read_meta
from pipeline.inference.backends.torch_graph import InferenceNetwork, ModelLike
from pipeline.inference.settings import InferenceSettings

if TYPE_CHECKING:
    import onnxruntime


class SessionModule(nn.Module):
    """An ONNX Runtime session as a module: (N, C, H, W) float32 CPU tensor -> float32 logits tensor."""

    def __init__(self, session: "onnxruntime.InferenceSession") -> None:
        super().__init__()
        self.session = session
        self.input, self.output = session.get_inputs()[0].name, session.get_outputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run([self.output], {self.input: x.contiguous().numpy()})[0])


def is_onnx_file(model: Any) -> bool:
    """True for a path naming a .onnx file (which always runs on ONNX Runtime)."""
    return isinstance(model, (str, os.PathLike)) and Path(model).suffix.lower() == ".onnx"


def _providers(device: str) -> list[Any]:
    """The execution providers for `device` (cpu, cuda or cuda:N), CPU last as the fallback for any op."""
    import onnxruntime as ort

    if not device.startswith("cuda"):
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise SegpipeError(
            f"device {device!r} with backend onnxruntime needs the CUDAExecutionProvider, which this "
            "onnxruntime lacks (install onnxruntime-gpu), or use device cpu"
        )
    return [("CUDAExecutionProvider", {"device_id": int(device.partition(":")[2] or 0)}), "CPUExecutionProvider"]


def _session(source: str | bytes, settings: InferenceSettings, where: str) -> "onnxruntime.InferenceSession":
    """An ONNX Runtime session of a model file or of serialised model bytes; SegpipeError naming `where`."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = settings.threads or 0
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.enable_cpu_mem_arena = False  # the arena keeps its high-water mark; the bands' buffers vary in size
    options.log_severity_level = 3  # errors only: ONNX Runtime's warnings are about its own placement choices
    providers = _providers(settings.device)
    try:
        return ort.InferenceSession(source, options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own types for unreadable or invalid models
        raise SegpipeError(f"{where}: not a loadable ONNX model ({type(exc).__name__}: {exc})") from exc


def onnx_network(model: ModelLike, settings: InferenceSettings) -> InferenceNetwork:
    """The ONNX Runtime inference network of a .onnx file (`segpipe export`), or of a checkpoint path or
    contract network exported in memory; SegpipeError naming the file if it cannot run."""
    import onnxruntime as ort

    if settings.precision != "fp32":
        raise SegpipeError(
            f"backend onnxruntime runs the exported fp32 graph; precision {settings.precision!r} "
            "is the torch backend's autocast (use precision fp32)"
        )
    path = None if isinstance(model, nn.Module) else Path(model)
    where = str(path) if path is not None else type(model).__name__
    notes = [f"onnxruntime {ort.__version__}"]
    if is_onnx_file(model):
        if not path.is_file():  # type: ignore[union-attr]
            raise SegpipeError(f"{where}: ONNX model file not found")
        session = _session(str(path), settings, where)
    else:
        from pipeline.inference.backends.onnx_export import onnx_model

        session = _session(onnx_model(model).SerializeToString(), settings, where)
        notes.append("exported in memory")
    meta = read_meta(session.get_modelmeta().custom_metadata_map, where)
    channels = session.get_inputs()[0].shape[1]
    if channels != meta.in_channels:
        raise SegpipeError(
            f"{where}: the graph takes {channels} input channel(s), its metadata says {meta.in_channels}"
        )
    notes += [session.get_providers()[0], f"{settings.threads} threads" if settings.threads else "default threads"]
    rule = meta.rule
    return InferenceNetwork(
        module=SessionModule(session),
        padding=meta.padding,
        halo=rule.halo,
        in_channels=meta.in_channels,
        out_channels=meta.out_channels,
        output_size=rule.output_size,
        input_size=rule.input_size,
        valid_output_size=rule.valid_output_size,
        device=torch.device("cpu"),
        channels_last=False,
        precision="fp32",
        fixed_batch=False,
        notes=notes,
        augment=meta.augment,
        source=path,
        class_names=meta.class_names,
        thresholds=meta.thresholds,
        instances=meta.instances,
    )


__all__ = ["SessionModule", "is_onnx_file", "onnx_network"]
