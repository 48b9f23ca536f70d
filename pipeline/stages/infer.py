"""`segpipe infer`: the entry of streamed inference, the one place it reads `configs/inference.yaml`.

`run_infer` reads the file (DVC params) once into `InferenceSettings`, applies the command line's
overrides and passes the settings down to `infer_files`; everything below takes values. Under
torchrun (WORLD_SIZE > 1) each process runs its share of the inputs (`pipeline.inference.run.shards`).
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Sequence

from pipeline.config import read_config
from pipeline.inference.backends.torch_graph import InferenceNetwork, ModelLike
from pipeline.inference.run.predict import infer_files
from pipeline.inference.run.report import InferenceReport
from pipeline.inference.settings import InferenceSettings, load_settings, parse_threshold, settings_from_config
from pipeline.stages.arguments import finite, precision_arg
from pipeline.torchrun import rank_env

CONFIG_NAME = "inference"


def config_settings() -> InferenceSettings:
    """`configs/inference.yaml` as validated settings (errors name the file and the key)."""
    return read_config(CONFIG_NAME, settings_from_config)


def run_infer(
    model: ModelLike | InferenceNetwork,
    inputs: Sequence[str],
    output_dir: str | os.PathLike[str],
    *,
    save_probabilities: bool | None = None,
    show_progress: bool = True,
    nonfinite: float | None = None,
    class_names: Sequence[str] | None = None,
    **overrides: Any,
) -> list[InferenceReport]:
    """`segpipe infer`: `infer_files` with the settings of `configs/inference.yaml`, the non-None
    `overrides` (`InferenceSettings` fields: tile, overlap, tta, ...) applied on top.

    `save_probabilities` None keeps the file's `save_probabilities`. `nonfinite` replaces non-finite
    input values (None: they are an error). `class_names`: see `infer_files`.
    A failed input is reported and the others still run; SegpipeError at the end lists the failures.
    Under torchrun every process takes its share of the inputs (`pipeline.inference.run.shards.run_shard`)
    and returns the reports of its share.
    """
    settings = load_settings(config_settings(), **overrides)
    env = rank_env()
    if env.distributed:
        from pipeline.inference.run.shards import run_shard

        return run_shard(
            model,
            inputs,
            output_dir,
            settings=settings,
            env=env,
            show_progress=show_progress,
            save_probabilities=save_probabilities,
            nonfinite=nonfinite,
            class_names=class_names,
        )
    return infer_files(
        model,
        inputs,
        output_dir,
        settings=settings,
        save_probabilities=save_probabilities,
        show_progress=show_progress,
        nonfinite=nonfinite,
        class_names=class_names,
    )


def _cmd_infer(args: argparse.Namespace) -> int:
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
        threshold=None if args.threshold is None else parse_threshold(args.threshold, "--threshold"),
        nonfinite=args.nonfinite,
        precision=args.precision,
        backend=args.backend,
        output_format=args.format,
        resume=False if args.no_resume else None,
        class_names=None if args.class_names is None else args.class_names.split(","),
        instances=args.instances,
    )
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Run a trained checkpoint on TIFF/BigTIFF/OME-TIFF, NIfTI, PNG/JPEG or any "
        "SimpleITK image, band by band: memory is bounded by the tile band, not the image. Writes "
        "DIR/NAME_seg.* (uint8 label map; by default a tiled BigTIFF, NIfTI for NIfTI input, OME-TIFF for "
        "OME-TIFF input; see --format), with --save-probabilities DIR/NAME_prob.*, and for models "
        "that record instance settings DIR/NAME_inst.* (object ids; see --instances). "
        "Defaults: configs/inference.yaml."
    )
    p.add_argument(
        "--model",
        required=True,
        metavar="CKPT",
        help="segpipe checkpoint (.pt) or its `segpipe export` (.onnx, runs on ONNX Runtime)",
    )
    p.add_argument(
        "--input",
        required=True,
        action="append",
        metavar="PATH_OR_GLOB",
        help="image file or glob pattern (quote it); repeatable",
    )
    p.add_argument("--output", required=True, metavar="DIR", help="output directory")
    p.add_argument("--tile", type=int, default=None, help="same padding: window side; valid padding: output tile side")
    p.add_argument("--overlap", type=float, default=None, help="window overlap in [0, 1) (same padding)")
    p.add_argument("--blend", choices=("gaussian", "constant"), default=None)
    p.add_argument(
        "--tta",
        default=None,
        metavar="TRANSFORMS",
        help="test-time augmentation, comma separated from h, v, hv (flips), t, th, tv, thv "
        "(transposes, 90-degree rotations); '' = off",
    )
    p.add_argument("--batch-size", type=int, default=None, help="windows per forward pass")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N")
    precision_arg(p, "configs/inference.yaml")
    p.add_argument(
        "--backend",
        choices=("torch", "onnxruntime"),
        default=None,
        help="torch, or onnxruntime (a .pt model is exported in memory; fp32); default: configs/inference.yaml",
    )
    p.add_argument(
        "--preprocess",
        choices=("checkpoint", "intensity"),
        default=None,
        help="checkpoint: the training preprocessing the checkpoint records (channels, CLAHE, "
        "zscore/percentile); intensity: ignore it, scale by the dtype maximum",
    )
    p.add_argument(
        "--threshold",
        default=None,
        metavar="VALUE",
        help="two-class (one-channel) models: label = probability >= VALUE, a number in (0, 1), or the "
        "operating point picked on the validation split and stored in the checkpoint (or .onnx): val = "
        "best F1 over the pooled pixels, val-dice = best mean per-image Dice; default: "
        "configs/inference.yaml output.threshold",
    )
    p.add_argument("--save-probabilities", action="store_true", help="also write NAME_prob.*")
    p.add_argument("--probabilities-dtype", choices=("uint8", "float16", "float32"), default=None)
    p.add_argument(
        "--format",
        choices=("auto", "tiff", "ome-tiff", "ome-zarr", "nifti"),
        default=None,
        help="default: configs/inference.yaml (auto: like the input); tiff: flat tiled BigTIFF; "
        "ome-tiff: pyramidal tiled "
        "OME-TIFF (.ome.tif); ome-zarr: OME-NGFF multiscale image (.ome.zarr); nifti: .nii.gz",
    )
    p.add_argument(
        "--instances",
        choices=("auto", "off"),
        default=None,
        help="auto: also write NAME_inst.* (uint32 object ids, same format) when the model records "
        "instance settings (trained on a dataset with reference instances, e.g. the cell sets); "
        "off: never; default: configs/inference.yaml output.instances",
    )
    p.add_argument(
        "--class-names",
        default=None,
        metavar="NAMES",
        help="comma-separated names of the label values 0, 1, ... for the OME formats' metadata "
        "(default: the names the checkpoint or .onnx records, else class 0, class 1, ...)",
    )
    p.add_argument(
        "--no-resume",
        action="store_true",
        help="start over even if a killed run of the same image, model and settings left its progress "
        "(default: configs/inference.yaml's resume)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--nonfinite",
        type=finite,
        default=None,
        metavar="VALUE",
        help="replace NaN, +-Inf and floats beyond float32 in the input by VALUE (default: such an "
        "input is an error naming the file and the count of bad pixels)",
    )
    p.set_defaults(handler=_cmd_infer)
