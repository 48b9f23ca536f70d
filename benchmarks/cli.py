"""`segpipe bench NAME`: each benchmark's arguments and handler, in data-flow order (not tests).

Every benchmark measures ours side by side with its anchor (MONAI, torch eager) in the same run and
prints ratios; the work lives in the sibling modules, imported when the command runs.
"""

from __future__ import annotations

import argparse
from typing import Callable

from pipeline.config import setting_argument


def _cmd_bench_networks(args: argparse.Namespace) -> int:
    from benchmarks.networks import run_benchmark

    run_benchmark(
        size=args.size,
        repeats=args.repeats,
        threads=args.threads,
        channels=(args.in_channels, args.out_channels),
    )
    return 0


def _bench_networks_args(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Parameters, MB, forward and forward+backward time and peak memory of each network "
        "(MONAI's BasicUNet / BasicUNetPlusPlus side by side), then UNet++ L1..L4 inference times."
    )
    p.add_argument("--size", type=int, default=256, help="output side to reach (default 256)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up (default 3)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--in-channels", type=int, default=1)
    p.add_argument("--out-channels", type=int, default=2)
    p.set_defaults(handler=_cmd_bench_networks)


def _cmd_bench_transforms(args: argparse.Namespace) -> int:
    from benchmarks.transforms import run

    return run(
        halo=args.halo,
        patch=args.patch,
        repeat=args.repeat,
        rounds=args.rounds,
        large_weightmap=not args.skip_large_weightmap,
    )


def _bench_transforms_args(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Training-chain patches/s on DRIVE- and CTC-sized images, elastic ms per patch and the "
        "weight-map speed-up over brute force, each side by side with MONAI / the reference."
    )
    p.add_argument("--halo", type=int, default=92, help="network halo (default 92, the paper's U-Net)")
    p.add_argument("--patch", type=int, default=128, help="output patch size (default 128)")
    p.add_argument("--repeat", type=int, default=10, help="calls per timed round (default 10)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds, best kept (default 3)")
    p.add_argument(
        "--skip-large-weightmap",
        action="store_true",
        help="skip the 2048^2 / 300-cell weight map (its brute force takes minutes)",
    )
    p.set_defaults(handler=_cmd_bench_transforms)


def _cmd_bench_infer(args: argparse.Namespace) -> int:
    from benchmarks.inference import run_benchmark

    run_benchmark(
        sizes=args.size,
        tile=args.tile,
        overlap=args.overlap,
        blend=args.blend,
        batch_size=args.batch_size,
        threads=args.threads,
        preset=args.preset,
        workdir=args.workdir,
        monai=not args.skip_monai,
        valid=not args.skip_valid,
        compile=args.compile,
        timeout=args.timeout,
        precisions=args.precision,
        onnxruntime=not args.skip_onnxruntime,
        monai_streaming=not args.skip_monai_streaming,
        formats=args.formats,
    )
    return 0


def _formats(text: str) -> list[str]:
    """`--formats tiff,ome-zarr` -> ["tiff", "ome-zarr"] (`run_benchmark` checks the names)."""
    return list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))


def _bench_infer_args(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Same network, tile, overlap and blending through (a) segpipe predict_file on a synthetic "
        "RGB image on disk, (b) MONAI SlidingWindowInferer on the image in memory and (c) MONAI's "
        "streaming path (PatchInferer + WSISlidingWindowSplitter on OpenSlide + ZarrAvgMerger, disk to "
        "disk), each in its own subprocess: Mpx/s, peak RSS and their ratios; then the valid-padding U-Net's "
        "overlap-tile throughput. Ours in fp32 and bf16, and on ONNX Runtime (fp32, with its ratio to torch), "
        "each also as GFLOP/s and as a fraction of the machine's conv peak (probe in the same run), with "
        "the network's share of the wall time."
    )
    p.add_argument("--size", type=int, nargs="+", default=[8192], help="image sides (default 8192)")
    p.add_argument("--tile", type=int, default=None, help="default: configs/inference.yaml")
    p.add_argument("--overlap", type=float, default=None, help="default: configs/inference.yaml")
    p.add_argument("--blend", choices=("gaussian", "constant"), default=None)
    p.add_argument("--batch-size", type=int, default=None, help="default: configs/inference.yaml")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--preset", default="default", help="U-Net config preset of configs/networks.yaml")
    p.add_argument("--workdir", default=None, help="where the synthetic images go (default: a temp dir)")
    p.add_argument("--skip-monai", action="store_true")
    p.add_argument("--skip-valid", action="store_true")
    p.add_argument("--skip-onnxruntime", action="store_true", help="no ONNX Runtime rows")
    p.add_argument(
        "--skip-monai-streaming",
        action="store_true",
        help="no row for MONAI's PatchInferer + ZarrAvgMerger streaming path",
    )
    p.add_argument(
        "--formats",
        type=_formats,
        default=["tiff"],
        metavar="FMT[,FMT...]",
        help="output formats of our same-padding rows, each its own row: tiff, ome-tiff, ome-zarr (default: tiff)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile our graph too")
    p.add_argument("--timeout", type=float, default=None, help="seconds per measurement (default none)")
    p.add_argument(
        "--precision",
        nargs="+",
        choices=("fp32", "bf16"),
        default=["fp32", "bf16"],
        help="precisions of ours, side by side (default: fp32 bf16; MONAI runs fp32)",
    )
    p.set_defaults(handler=_cmd_bench_infer)


def _cmd_bench_shards(args: argparse.Namespace) -> int:
    from benchmarks.shards import run_benchmark

    run_benchmark(
        images=args.images,
        size=args.size,
        preset=args.preset,
        workdir=args.workdir,
        single_thread=not args.skip_single_thread,
        timeout=args.timeout,
    )
    return 0


def _bench_shards_args(p: argparse.ArgumentParser) -> None:
    p.description = (
        "`segpipe infer` on N synthetic RGB images as 2 processes x 1 thread (torchrun, the inputs shared "
        "between the processes) against 1 process x 2 threads (and 1 x 1), each timed end to end: Mpx/s "
        "and the scaling efficiency. Defaults: configs/inference.yaml, except threads."
    )
    p.add_argument("--images", type=int, default=8, help="number of images (default 8)")
    p.add_argument("--size", type=int, default=4096, help="image side (default 4096)")
    p.add_argument("--preset", default="default", help="U-Net config preset of configs/networks.yaml")
    p.add_argument("--workdir", default=None, help="where the images go, kept for the next run (default: a temp dir)")
    p.add_argument("--skip-single-thread", action="store_true", help="no 1 process x 1 thread reference")
    p.add_argument("--timeout", type=float, default=None, help="seconds per layout (default none)")
    p.set_defaults(handler=_cmd_bench_shards)


def _cmd_bench_train(args: argparse.Namespace) -> int:
    from benchmarks.training import run_benchmark

    run_benchmark(
        args.network,
        steps=args.steps,
        batch_size=args.batch_size,
        patch_size=args.patch_size,
        workers=args.workers,
        threads=args.threads,
        dataset=args.dataset,
        precisions=tuple(args.precision),
    )
    return 0


def _bench_train_args(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Training throughput (patches/s) and data-wait share per network: our loader (overlap-tile "
        "patches + U-Net elastic deformation) vs a MONAI-standard loader (RandCropByPosNegLabeld + "
        "Rand2DElasticd), same network, loss and optimizer, side by side; ours in fp32 and bf16; every "
        "rate also as GFLOP/s and as a fraction of the machine's conv peak (probe in the same run). "
        "Defaults: configs/train.yaml."
    )
    p.add_argument("--network", nargs="+", default=["unet", "unetpp", "u2net"])
    p.add_argument("--steps", type=int, default=20, help="timed steps per loader (after one warm-up step)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--patch-size", type=int, default=None)
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (both loaders)")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--dataset", default="drive", help="prepared dataset to read (synthetic images if absent)")
    p.add_argument(
        "--precision",
        nargs="+",
        choices=("fp32", "bf16"),
        default=["fp32", "bf16"],
        help="precisions of our training, side by side (default: fp32 bf16)",
    )
    p.set_defaults(handler=_cmd_bench_train)


def _cmd_bench_quality(args: argparse.Namespace) -> int:
    from benchmarks.training import run_quality
    from pipeline.training.settings import deep_merge

    overrides: dict = {}
    for item in args.set or []:
        overrides = deep_merge(overrides, item)

    run_quality(
        args.dataset,
        args.network,
        baseline_seconds=args.baseline_seconds,
        baseline_input=args.baseline_input,
        threads=args.threads,
        workdir=args.workdir,
        equal_steps=args.equal_steps,
        overrides=overrides,
    )
    return 0


def _bench_quality_args(p: argparse.ArgumentParser) -> None:
    p.description = (
        "The quality bar side by side: `segpipe train` with the current profile (its step count) vs "
        "the MONAI-standard baseline (BasicUNet, DiceCELoss, 64x64 patches, Adam 1e-3, batch 32, "
        "SlidingWindowInferer 128 gaussian) for the wall time our training took; both scored on "
        "the test split (DRIVE protocol, pixels pooled inside the FOV; cells: SEG of the connected "
        "components and of the instance maps)."
    )
    p.add_argument("--dataset", default="drive")
    p.add_argument("--network", default="unet")
    p.add_argument(
        "--baseline-seconds",
        type=float,
        default=None,
        help="the baseline's training budget (default: the wall time of our training)",
    )
    p.add_argument(
        "--baseline-input",
        choices=("monai", "ours"),
        default="monai",
        help="monai: RGB z-scored per channel; ours: our preprocessing (green, CLAHE)",
    )
    p.add_argument(
        "--equal-steps",
        action="store_true",
        help="train the baseline for our step count with our batch and patch size (default: for "
        "our wall time with its own batch 32 of 64x64)",
    )
    p.add_argument(
        "--set",
        action="append",
        type=setting_argument,
        metavar="KEY=VALUE",
        help="override a setting of our training, as `segpipe train --set` (repeatable)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--workdir", default=None, help="keep checkpoints here (default: a temp dir)")
    p.set_defaults(handler=_cmd_bench_quality)


# `segpipe bench NAME`: each area's function adds its arguments and a handler, in data-flow order.
BENCHES: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "transforms": _bench_transforms_args,
    "networks": _bench_networks_args,
    "infer": _bench_infer_args,
    "shards": _bench_shards_args,
    "train": _bench_train_args,
    "quality": _bench_quality_args,
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`segpipe bench`'s arguments (pipeline.cli runs this entry lazily, as it does the stages')."""
    bench_sub = p.add_subparsers(dest="bench", metavar="WHAT", required=True)
    for name, add_args in BENCHES.items():
        add_args(bench_sub.add_parser(name, help=f"benchmark: {name}"))
