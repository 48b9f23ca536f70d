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
from pipeline.commands.arguments import precision_arg
from pipeline.config import setting_argument
from pipeline.commands.dataset import add_dataset_commands
from pipeline.commands.inference import add_inference_commands
from pipeline.commands.transforms import add_transforms_commands

GROUPS = """\
stages and tools, in data-flow order:
  data           download, manifest, dataset add, dataset import
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
    p.add_argument("dataset", help="a dataset with a card, configs/datasets/DATASET.yaml (drive, hela, u373 or "
                   "yours: a folder dataset is hashed, not downloaded)")
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
    p.add_argument("dataset", help="a dataset with a card, configs/datasets/DATASET.yaml")
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

# --- train / evaluate -------------------------------------------------------------------------


def _cmd_train(args: argparse.Namespace) -> int:
    from pipeline.training.settings import deep_merge
    from pipeline.training.stage import train

    overrides: dict = {}
    for item in args.set or []:
        overrides = deep_merge(overrides, item)
    if args.precision:
        overrides["precision"] = args.precision
    result = train(args.dataset, args.network, profile=args.profile, resume=args.resume, overrides=overrides,
                   fold=args.fold)
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
    p.add_argument("--fold", type=int, default=None, metavar="K",
                   help="cross-validation: validate on fold K of the prepared data, train on the others "
                   "(default: configs/train.yaml's `fold`; null there: the prepare split)")
    p.add_argument("--set", action="append", type=setting_argument, metavar="KEY=VALUE",
                   help="override a profile setting for this run, e.g. --set optimizer.lr=0.001 (repeatable)")
    precision_arg(p, "the profile of configs/train.yaml")
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
    precision_arg(p, "configs/inference.yaml")
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
    add_dataset_commands(sub)
    add_transforms_commands(sub)
    add_inference_commands(sub)
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
