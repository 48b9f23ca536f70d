"""`segpipe export`: a checkpoint's inference graph as an ONNX model that runs without the checkpoint.

The graph is `optimize_network`'s (eval mode, so U2-Net gives its fused logits and UNet++ the
output of its `mode` and `prune_level`; batch norm folded into the convolutions; fp32), traced by
torch's TorchScript exporter (`torch.onnx.export(dynamo=False)`) with dynamic batch, height and
width. Why that exporter: it needs nothing beyond torch (the dynamo exporter needs onnxscript and
onnx-ir), it exports our networks in about a second where the dynamo exporter takes 3 to 16 s, and
the traced shape arithmetic (the valid U-Net's crops, U2-Net's ceil-mode pooling and resizing to
the skip's size) stays symbolic under `dynamic_axes`; it is deprecated since torch 2.9 but present
in every torch this project allows (< 2.14). The export is checked twice: `onnx.checker` (with
shape inference), then ONNX Runtime against torch on an input of another size than the traced one
(a shape traced as a constant would show there).

One op is exported our own way: `log_sigmoid` (UNet++ "accurate" averages its heads' probabilities
with it) as min(x, 0) - log(1 + exp(-|x|)). The exporter's log(sigmoid(x)) is wrong on ONNX Runtime,
whose Sigmoid saturates: log(sigmoid(-15)) comes out as -14.84, and -inf from about -18 on (+-inf
logits, whose blend can be NaN).

The model's `metadata_props` carry what the pipeline needs besides the graph
(`pipeline.inference.backends.onnx_meta`: preprocessing record, network, size contract, class names,
training precision, validation thresholds). Files are written to a temporary name and renamed.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from pipeline.errors import SegpipeError
from pipeline.files import atomic_path, check_name_length
from pipeline.inference.backends.onnx_meta import OnnxMeta, SizeRule
from pipeline.inference.backends.torch_graph import optimize_network, resolve_model

if TYPE_CHECKING:
    import onnx

INPUT, OUTPUT = "input", "logits"
_TRACE_OUTPUT = 64
"""The traced input gives at least this output size (and one step more along the width)."""
_TOLERANCE = 1e-4
"""Largest difference ONNX Runtime may show from torch, relative to the logits' magnitude (>= 1)."""
_ELSEWHERE = ("format", "network", "in_channels", "out_channels", "padding", "halo", "precision")
"""Scalar checkpoint keys the metadata holds under other keys (or that say nothing once exported)."""


def _log_sigmoid(g: Any, x: Any) -> Any:
    """log(sigmoid(x)) = min(x, 0) - log(1 + exp(-|x|)), finite for every finite x."""
    zero, one = (g.op("Constant", value_t=torch.tensor(v, dtype=torch.float32)) for v in (0.0, 1.0))
    tail = g.op("Log", g.op("Add", one, g.op("Exp", g.op("Neg", g.op("Abs", x)))))
    return g.op("Sub", g.op("Min", x, zero), tail)


def _trace(module: nn.Module, x: torch.Tensor, opset: int | None) -> bytes:
    """The ONNX bytes of `module` traced on `x`, with dynamic batch, height and width."""
    axes = {INPUT: {0: "batch", 2: "height", 3: "width"}, OUTPUT: {0: "batch", 2: "out_height", 3: "out_width"}}
    buffer = io.BytesIO()
    torch.onnx.register_custom_op_symbolic("aten::log_sigmoid", _log_sigmoid, 9)
    try:
        with warnings.catch_warnings():
            # the exporter's deprecation notice, and tracer notes on static facts (the channel count);
            # `_verify` runs the graph at another size instead
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(
                module,
                (x,),
                buffer,
                dynamo=False,
                input_names=[INPUT],
                output_names=[OUTPUT],
                opset_version=opset,
                dynamic_axes=axes,
            )
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::log_sigmoid", 9)
    return buffer.getvalue()


def _verify(data: bytes, module: nn.Module, x: torch.Tensor) -> None:
    """SegpipeError unless ONNX Runtime's logits of `x` equal torch's within `_TOLERANCE`."""
    import onnxruntime as ort

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT], {INPUT: x.numpy()})[0]
    with torch.inference_mode():
        want = module(x).numpy()
    scale = max(1.0, float(np.abs(want).max()))
    if got.shape != want.shape or not float(np.abs(got - want).max()) <= _TOLERANCE * scale:
        found = f"shape {got.shape}" if got.shape != want.shape else f"max difference {np.abs(got - want).max():.3g}"
        raise SegpipeError(
            f"ONNX Runtime disagrees with torch on a {tuple(x.shape)} input ({found}, expected "
            f"{want.shape} within {_TOLERANCE:g} x {scale:.3g})"
        )


def _checkpoint_facts(path: Path, record: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint file's name and sha256, and its scalar entries (dataset, epoch, val_dice, ...)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    scalars = {k: v for k, v in record.items() if isinstance(v, (str, int, float, bool)) and k not in _ELSEWHERE}
    return {"file": path.name, "sha256": digest.hexdigest(), **scalars}


def onnx_model(model: nn.Module | str | os.PathLike[str], *, opset: int | None = None) -> "onnx.ModelProto":
    """The checked ONNX model of `model` (a contract network or a checkpoint path), with the segpipe
    metadata; SegpipeError naming the checkpoint if it cannot be exported."""
    import onnx

    from pipeline.networks import read_checkpoint

    source = None if isinstance(model, nn.Module) else Path(model)
    where = str(source) if source is not None else type(model).__name__
    net = resolve_model(model)
    record = read_checkpoint(source) if source is not None else {}
    inet = optimize_network(net, "cpu", channels_last=False)
    name = str(getattr(net, "network_name", type(net).__name__))
    try:
        rule = SizeRule.of(inet, name)
        height = rule.input_size(rule.valid_output_size(_TRACE_OUTPUT))
        width = height + rule.step
        g = torch.Generator().manual_seed(0)  # the caller's random state is left alone
        data = _trace(inet.module, torch.randn(2, inet.in_channels, height, width, generator=g), opset)
        _verify(data, inet.module, torch.randn(1, inet.in_channels, width + rule.step, height, generator=g))
        proto = onnx.load_model_from_string(data)
    except SegpipeError as exc:
        raise SegpipeError(f"{where}: ONNX export failed: {exc}") from exc
    except Exception as exc:  # torch's exporter raises many types; a graph dump may follow the first line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise SegpipeError(f"{where}: ONNX export failed ({type(exc).__name__}: {first})") from exc
    meta = OnnxMeta(
        network=name,
        config=dict(getattr(net, "config", {})),
        padding=inet.padding,
        in_channels=inet.in_channels,
        out_channels=inet.out_channels,
        rule=rule,
        augment=record.get("augment"),
        class_names=record.get("class_names"),
        precision=record.get("precision"),
        checkpoint=_checkpoint_facts(source, record) if source is not None else None,
        thresholds=record.get("thresholds"),
        instances=record.get("instances"),
        export={
            "exporter": "torch.onnx.export (TorchScript, dynamo=False)",
            "torch": torch.__version__,
            "opset": next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
            "input": INPUT,
            "output": OUTPUT,
            "graph": "eval mode, batch norm folded, fp32",
        },
    )
    onnx.helper.set_model_props(proto, meta.props())
    proto.doc_string = f"segpipe export of {source.name if source is not None else name}"
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise SegpipeError(f"{where}: the exported ONNX model does not pass onnx.checker: {exc}") from exc
    return proto


def export_onnx(
    model: nn.Module | str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    *,
    opset: int | None = None,
) -> Path:
    """Write the ONNX model of `model` (see `onnx_model`) to `output` (default: the checkpoint's path
    with .onnx) atomically; returns the path. SegpipeError naming the file on failure."""
    if output is None:
        if isinstance(model, nn.Module):
            raise SegpipeError("exporting a module needs an output path")
        output = Path(model).with_suffix(".onnx")
    output = Path(output)
    check_name_length(output, "ONNX file")
    if not isinstance(model, nn.Module) and output.resolve() == Path(model).resolve():
        raise SegpipeError(f"{output}: the ONNX file would overwrite the checkpoint")
    if output.is_dir():
        raise SegpipeError(f"{output}: is a directory; give the .onnx file's path")
    proto = onnx_model(model, opset=opset)
    try:
        with atomic_path(output) as tmp:
            tmp.write_bytes(proto.SerializeToString())
    except OSError as exc:
        raise SegpipeError(f"{output}: cannot write the ONNX model ({exc.strerror or exc})") from exc
    return output


__all__ = ["INPUT", "OUTPUT", "export_onnx", "onnx_model"]
