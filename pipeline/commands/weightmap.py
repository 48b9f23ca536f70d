"""`segpipe weightmap`: the U-Net eq. 2 weight map of one label image (a tool, not a DVC stage)."""

from __future__ import annotations

import argparse

from pipeline.stages.arguments import nonnegative
from pipeline.transforms.weightmap import write_weight_map_file


def _cmd_weightmap(args: argparse.Namespace) -> int:
    output, preview = write_weight_map_file(
        args.label_image,
        output=args.output,
        w0=args.w0,
        sigma=args.sigma,
        class_weights=args.class_weights,
        mode=args.mode,
        image_path=args.image,
    )
    print(f"weight map: {output}\npreview:    {preview}")
    return 0


def _class_weights_arg(text: str) -> str | tuple[float, float]:
    if text in ("auto", "none"):
        return text
    parts = text.split(",")
    try:
        if len(parts) != 2:
            raise ValueError(text)
        return nonnegative(parts[0]), nonnegative(parts[1])
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(
            f"expected auto, none or W_BG,W_FG (finite numbers >= 0), got {text!r}"
        ) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Write the U-Net loss weight map w = w_c + w0 exp(-(d1 + d2)^2 / (2 sigma^2)) of "
        "one label image (instance ids, or a binary mask split into connected components), and a "
        "PNG heat map over the image beside it."
    )
    p.add_argument("label_image", help="label image: NIfTI, TIFF, PNG, GIF ...")
    p.add_argument(
        "--output",
        default=None,
        help="weight map .nii.gz/.nii or .tif/.tiff (default: LABEL_weight.nii.gz for NIfTI labels, "
        "else LABEL_weight.tif, beside the label); the preview is the same path with .png",
    )
    p.add_argument("--w0", type=nonnegative, default=10.0, help="border weight w0 (paper: 10)")
    p.add_argument("--sigma", type=nonnegative, default=5.0, help="border width sigma in pixels (paper: 5)")
    p.add_argument(
        "--class-weights",
        type=_class_weights_arg,
        default="auto",
        metavar="auto|none|W_BG,W_FG",
        help="w_c: auto = frequency balancing over this image (default), none = 1.0, or two numbers",
    )
    p.add_argument(
        "--mode",
        choices=("auto", "binary", "instances"),
        default="auto",
        help="instances: ids as stored; binary: connected components; auto: binary if <= 2 values",
    )
    p.add_argument("--image", default=None, help="image to draw the preview over (default: the label)")
    p.set_defaults(handler=_cmd_weightmap)
