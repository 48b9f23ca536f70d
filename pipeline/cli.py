"""`segpipe` command line: a thin layer over the package, one subcommand per DVC stage.

Each subcommand parses its arguments and calls one function of the package; the work and the
defaults live in the package and in `configs/`. Heavy modules are imported inside the handlers so
that `segpipe --help` stays fast.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from pipeline.bench.commands import add_bench_commands

GROUPS = """\
stages and tools, in data-flow order:
  data           download, manifest
  preprocessing  prepare
  transforms     weightmap
  inference      infer, export
  training       train
  evaluation     evaluate, report
  bench          bench transforms | networks | infer | train | quality
"""


# --- data -------------------------------------------------------------------------------------


def _cmd_download(args: argparse.Namespace) -> int:
    from pipeline.data.download import download_dataset

    download_dataset(
        args.dataset,
        from_paths=args.from_paths,
        accept_sha256=args.accept_sha256,
        mirror=args.mirror,
    )
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from pipeline.preprocessing.prepare import prepare_dataset

    prepare_dataset(args.dataset)
    return 0


def _cmd_manifest(args: argparse.Namespace) -> int:
    from pipeline.data.manifest import write_file_manifest

    write_file_manifest(args.dataset, args.source, args.output)
    return 0


def _add_data_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "download",
        help="fetch (or import) a dataset's archives, verified by sha256",
        description="Download a dataset's archives into data/raw/DATASET with resume, retries and "
        "sha256 verification. Mirror: --mirror, $SEGPIPE_MIRROR or configs/data.yaml "
        "download.mirror. Air-gapped: --from PATH.",
    )
    p.add_argument("dataset", help="drive, hela or u373 (see data_manifests/sources.yaml)")
    p.add_argument(
        "--from",
        dest="from_paths",
        action="append",
        default=None,
        metavar="PATH",
        help="import an archive already on disk instead of downloading (repeatable)",
    )
    p.add_argument(
        "--accept-sha256",
        action="append",
        default=None,
        metavar="HASH",
        help="explicitly accept an archive whose sha256 differs from the manifest (repeatable)",
    )
    p.add_argument("--mirror", default=None, metavar="URL", help="base URL of a mirror: URL/DATASET/FILE")
    p.set_defaults(handler=_cmd_download)

    p = sub.add_parser(
        "prepare",
        help="validate, convert to NIfTI, split and compute weight maps",
        description="Unpack data/raw/DATASET, validate every file against data_manifests/, and write "
        "data/prepared/DATASET (NIfTI images/labels, weight maps, manifest.csv).",
    )
    p.add_argument("dataset", help="drive, hela or u373")
    p.set_defaults(handler=_cmd_prepare)

    p = sub.add_parser(
        "manifest",
        help="(maintainers) write a per-file manifest CSV from a verified copy of a dataset",
    )
    p.add_argument("dataset")
    p.add_argument("source", help="an archive or unpacked folder of a verified copy")
    p.add_argument("--output", default=None, help="CSV path (default: data_manifests/DATASET_files.csv)")
    p.set_defaults(handler=_cmd_manifest)


# --- end data ---------------------------------------------------------------------------------

# --- transforms -------------------------------------------------------------------------------


def _cmd_weightmap(args: argparse.Namespace) -> int:
    from pipeline.transforms.weightmap import write_weight_map_file

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


def _finite(text: str, low: float | None = None) -> float:
    """An option's value as a finite number (>= `low`), else argparse's error (NaN and inf refused)."""
    from pipeline.config import ConfigError, check_number

    try:
        return float(check_number(float(text), "value", "option", low=low))
    except (ValueError, ConfigError):
        bound = "" if low is None else f" >= {low:g}"
        raise argparse.ArgumentTypeError(f"expected a finite number{bound}, got {text!r}") from None


def _nonnegative(text: str) -> float:
    return _finite(text, low=0.0)


def _class_weights_arg(text: str) -> str | tuple[float, float]:
    if text in ("auto", "none"):
        return text
    parts = text.split(",")
    try:
        if len(parts) != 2:
            raise ValueError(text)
        return _nonnegative(parts[0]), _nonnegative(parts[1])
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(
            f"expected auto, none or W_BG,W_FG (finite numbers >= 0), got {text!r}") from None


def _add_transforms_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "weightmap",
        help="U-Net eq. 2 weight map of a label image (NIfTI or TIFF) with a PNG preview",
        description="Write the U-Net loss weight map w = w_c + w0 exp(-(d1 + d2)^2 / (2 sigma^2)) of "
        "one label image (instance ids, or a binary mask split into connected components), and a "
        "PNG heat map over the image beside it.",
    )
    p.add_argument("label_image", help="label image: NIfTI, TIFF, PNG, GIF ...")
    p.add_argument(
        "--output",
        default=None,
        help="weight map .nii.gz/.nii or .tif/.tiff (default: LABEL_weight.nii.gz for NIfTI labels, "
        "else LABEL_weight.tif, beside the label); the preview is the same path with .png",
    )
    p.add_argument("--w0", type=_nonnegative, default=10.0, help="border weight w0 (paper: 10)")
    p.add_argument("--sigma", type=_nonnegative, default=5.0,
                   help="border width sigma in pixels (paper: 5)")
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


# --- end transforms ---------------------------------------------------------------------------

# --- inference --------------------------------------------------------------------------------


def _cmd_infer(args: argparse.Namespace) -> int:
    from pipeline.inference.stage import run_infer

    run_infer(
        args.model,
        args.input,
        args.output,
        save_probabilities=args.save_probabilities or None,
        show_progress=not args.no_progress,
        tile=args.tile,
        overlap=args.overlap,
        blend=args.blend,
        tta=None if args.tta is None else [t for t in args.tta.split(",") if t],
        batch_size=args.batch_size,
        device=args.device,
        preprocess=args.preprocess,
        probabilities_dtype=args.probabilities_dtype,
        nonfinite=args.nonfinite,
        precision=args.precision,
        backend=args.backend,
        output_format=args.format,
        class_names=None if args.class_names is None else args.class_names.split(","),
    )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from pipeline.inference import export_onnx

    path = export_onnx(args.model, args.output, opset=args.opset)
    print(f"segpipe export: {args.model} -> {path} ({path.stat().st_size / 2**20:.1f} MB)")
    return 0


def _precision_arg(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None,
                   help=f"fp32, bf16 (autocast; CPUs with AVX512-BF16/AMX, CUDA) or fp16 (CUDA); default: {default}")


def _add_inference_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "infer",
        help="segment images of any size, streamed from disk to disk (sliding window)",
        description="Run a trained checkpoint on TIFF/BigTIFF/OME-TIFF, NIfTI, PNG/JPEG or any "
        "SimpleITK image, band by band: memory is bounded by the tile band, not the image. Writes "
        "DIR/NAME_seg.* (uint8 label map; by default a tiled BigTIFF, NIfTI for NIfTI input, OME-TIFF for "
        "OME-TIFF input; see --format) and with --save-probabilities DIR/NAME_prob.*. "
        "Defaults: configs/inference.yaml.",
    )
    p.add_argument("--model", required=True, metavar="CKPT",
                   help="segpipe checkpoint (.pt) or its `segpipe export` (.onnx, runs on ONNX Runtime)")
    p.add_argument("--input", required=True, action="append", metavar="PATH_OR_GLOB",
                   help="image file or glob pattern (quote it); repeatable")
    p.add_argument("--output", required=True, metavar="DIR", help="output directory")
    p.add_argument("--tile", type=int, default=None,
                   help="same padding: window side; valid padding: output tile side")
    p.add_argument("--overlap", type=float, default=None, help="window overlap in [0, 1) (same padding)")
    p.add_argument("--blend", choices=("gaussian", "constant"), default=None)
    p.add_argument("--tta", default=None, metavar="TRANSFORMS",
                   help="test-time augmentation, comma separated from h, v, hv (flips), t, th, tv, thv "
                        "(transposes, 90-degree rotations); '' = off")
    p.add_argument("--batch-size", type=int, default=None, help="windows per forward pass")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N")
    _precision_arg(p, "configs/inference.yaml")
    p.add_argument("--backend", choices=("torch", "onnxruntime"), default=None,
                   help="torch, or onnxruntime (a .pt model is exported in memory; fp32); default: "
                   "configs/inference.yaml")
    p.add_argument("--preprocess", choices=("checkpoint", "intensity"), default=None,
                   help="checkpoint: the training preprocessing the checkpoint records (channels, CLAHE, "
                   "zscore/percentile); intensity: ignore it, scale by the dtype maximum")
    p.add_argument("--save-probabilities", action="store_true", help="also write NAME_prob.*")
    p.add_argument("--probabilities-dtype", choices=("uint8", "float16", "float32"), default=None)
    p.add_argument("--format", choices=("auto", "tiff", "ome-tiff", "ome-zarr", "nifti"), default=None,
                   help="default: configs/inference.yaml (auto: like the input); tiff: flat tiled BigTIFF; ome-tiff: pyramidal tiled "
                   "OME-TIFF (.ome.tif); ome-zarr: OME-NGFF multiscale image (.ome.zarr); nifti: .nii.gz")
    p.add_argument("--class-names", default=None, metavar="NAMES",
                   help="comma-separated names of the label values 0, 1, ... for the OME formats' metadata "
                   "(default: class 0, class 1, ...)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--nonfinite", type=_finite, default=None, metavar="VALUE",
                   help="replace NaN, +-Inf and floats beyond float32 in the input by VALUE (default: such an "
                   "input is an error naming the file and the count of bad pixels)")
    p.set_defaults(handler=_cmd_infer)

    p = sub.add_parser(
        "export",
        help="a checkpoint's inference graph as an ONNX model carrying its preprocessing and size contract",
        description="Export the inference graph of a checkpoint (eval mode, batch norm folded, fp32) with "
        "dynamic batch, height and width, its training preprocessing, network, size contract, class names "
        "and training precision in the model's metadata, checked with onnx.checker and against torch on "
        "ONNX Runtime. `segpipe infer --model MODEL.onnx` runs it.",
    )
    p.add_argument("--model", required=True, metavar="CKPT", help="segpipe checkpoint (.pt)")
    p.add_argument("--format", choices=("onnx",), default="onnx", help="export format (default onnx)")
    p.add_argument("--opset", type=int, default=None, metavar="N",
                   help="ONNX opset (default: torch's exporter default)")
    p.add_argument("--output", default=None, metavar="PATH", help="output file (default: CKPT with .onnx)")
    p.set_defaults(handler=_cmd_export)


# --- end inference ----------------------------------------------------------------------------

# --- train / evaluate -------------------------------------------------------------------------


def _setting(text: str) -> dict:
    """KEY=VALUE with a dotted key and a YAML value -> nested dict ("optimizer.lr=1e-3")."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. optimizer.lr=0.001), got {text!r}")
    out: dict = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = yaml.safe_load(value)
    return out


def _cmd_train(args: argparse.Namespace) -> int:
    from pipeline.training.settings import deep_merge
    from pipeline.training.stage import train

    overrides: dict = {}
    for item in args.set or []:
        overrides = deep_merge(overrides, item)
    if args.precision:
        overrides["precision"] = args.precision
    result = train(args.dataset, args.network, profile=args.profile, resume=args.resume, overrides=overrides)
    if result.stopped_early:
        print(f"segpipe train: stopped by max_minutes after {result.steps} steps: this model depends on the "
              "machine's speed, not only on params and data (exit 3)", file=sys.stderr)
        return 3
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from pipeline.evaluation.evaluate import evaluate

    evaluate(args.dataset, args.network, precision=args.precision)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from pipeline.evaluation.report import report

    report()
    return 0


def _add_training_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a network on a prepared dataset (DVC stage train@DATASET-NETWORK)",
        description="Patch training with validation on whole images, best/last checkpoints, "
        "--resume and MLflow logging; writes models/DATASET/NETWORK/. Settings: the profile of "
        "configs/train.yaml. Under torchrun: DistributedDataParallel.",
    )
    p.add_argument("dataset", help="drive, hela or u373 (prepared with `segpipe prepare`)")
    p.add_argument("network", help="unet, unetpp or u2net (the profile may substitute, e.g. u2netp)")
    p.add_argument("--profile", default=None, help="profile of configs/train.yaml (default: its `profile`)")
    p.add_argument("--resume", action="store_true", help="continue from models/DATASET/NETWORK/last.pt")
    p.add_argument("--set", action="append", type=_setting, metavar="KEY=VALUE",
                   help="override a profile setting for this run, e.g. --set optimizer.lr=0.001 (repeatable)")
    _precision_arg(p, "the profile of configs/train.yaml")
    p.set_defaults(handler=_cmd_train)
    p = sub.add_parser(
        "evaluate",
        help="test-set metrics, curves and overlays of a trained network (DVC stage evaluate@...)",
        description="Whole-image sliding-window inference on the test split with the best "
        "checkpoint; writes results/DATASET/NETWORK/ (metrics.json, per_image.csv, curves, "
        "overlays). Settings: configs/evaluate.yaml and configs/inference.yaml.",
    )
    p.add_argument("dataset")
    p.add_argument("network")
    _precision_arg(p, "configs/inference.yaml")
    p.set_defaults(handler=_cmd_evaluate)
    p = sub.add_parser("report", help="one table of every evaluated dataset x network (results/report.md)")
    p.set_defaults(handler=_cmd_report)


# --- end train / evaluate ---------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segpipe",
        description="U-Net family segmentation pipeline (MONAI + PyTorch, DVC, MLflow).",
        epilog=GROUPS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_data_commands(sub)
    _add_transforms_commands(sub)
    _add_inference_commands(sub)
    _add_training_commands(sub)
    add_bench_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; errors of input or setup print one line naming the file and exit 2."""
    from pipeline.errors import SegpipeError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.handler(args) or 0)
    except SegpipeError as exc:
        print(f"segpipe {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"segpipe {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
