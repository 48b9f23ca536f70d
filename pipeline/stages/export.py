"""`segpipe export`: a checkpoint's inference graph as an ONNX model (a user command, not a DVC stage)."""

from __future__ import annotations

import argparse

from pipeline.inference.backends.onnx_export import export_onnx


def _cmd_export(args: argparse.Namespace) -> int:
    path = export_onnx(args.model, args.output, opset=args.opset)
    print(f"segpipe export: {args.model} -> {path} ({path.stat().st_size / 2**20:.1f} MB)")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Export the inference graph of a checkpoint (eval mode, batch norm folded, fp32) with "
        "dynamic batch, height and width, its training preprocessing, network, size contract, class names "
        "and training precision in the model's metadata, checked with onnx.checker and against torch on "
        "ONNX Runtime. `segpipe infer --model MODEL.onnx` runs it."
    )
    p.add_argument("--model", required=True, metavar="CKPT", help="segpipe checkpoint (.pt)")
    p.add_argument("--format", choices=("onnx",), default="onnx", help="export format (default onnx)")
    p.add_argument(
        "--opset", type=int, default=None, metavar="N", help="ONNX opset (default: torch's exporter default)"
    )
    p.add_argument("--output", default=None, metavar="PATH", help="output file (default: CKPT with .onnx)")
    p.set_defaults(handler=_cmd_export)
