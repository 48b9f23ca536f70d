"""`segpipe dataset add` / `segpipe dataset import`: folders of images and labels, an nnU-Net v2 raw
folder or a MONAI datalist becomes a dataset (tools, not DVC stages).

The entry names the files a dataset is registered in (configs/data.yaml, configs/augment.yaml,
configs/datasets/) and calls `pipeline.data.registry`.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from pipeline.config import cards_dir, config_path
from pipeline.data.cards import FolderSource
from pipeline.data.registry import ConfigFiles, add_dataset, import_dataset


def config_files() -> ConfigFiles:
    """Where `segpipe dataset add/import` registers a dataset."""
    return ConfigFiles(config_path("data"), config_path("augment"), cards_dir())


def _cmd_dataset_add(args: argparse.Namespace) -> int:
    source = FolderSource(
        args.images,
        args.labels,
        masks=args.masks,
        instances=args.instances,
        test_images=args.test_images,
        test_labels=args.test_labels,
        test_masks=args.test_masks,
        test_instances=args.test_instances,
    )
    add_dataset(
        config_files(),
        args.name,
        source,
        class_names=None if args.classes is None else args.classes.split(","),
        ignore_value=args.ignore_value,
        test_fraction=args.test_fraction,
    )
    return 0


def _cmd_dataset_import(args: argparse.Namespace) -> int:
    import_dataset(
        config_files(),
        args.name,
        args.path,
        base_dir=args.base_dir,
        class_names=None if args.classes is None else args.classes.split(","),
        ignore_value=args.ignore_value,
        test_fraction=args.test_fraction,
    )
    return 0


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), got {text!r}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    what = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = what.add_parser(
        "add",
        help="write configs/datasets/NAME.yaml and add NAME to the DVC matrix",
        description="Pair images and labels by file stem, read the label values and channels, and write the "
        "dataset card configs/datasets/NAME.yaml; add NAME to configs/data.yaml (datasets, folder_datasets) and "
        "its augmentation preset to configs/augment.yaml. Then `dvc repro evaluate@NAME-unet` (or `segpipe "
        "prepare NAME`, `segpipe train NAME unet`, `segpipe evaluate NAME unet`).",
    )
    p.add_argument("name", help="the dataset's name: lower-case letters, digits and _")
    p.add_argument(
        "--images", required=True, type=Path, metavar="DIR", help="2-D images (PNG, TIFF, JPEG, NIfTI, MHA, NRRD)"
    )
    p.add_argument("--labels", required=True, type=Path, metavar="DIR", help="label images, one per image (same stem)")
    p.add_argument(
        "--masks", type=Path, metavar="DIR", help="masks of the pixels that count (a field of view), one per image"
    )
    p.add_argument(
        "--instances",
        type=Path,
        metavar="DIR",
        help="instance masks, one per image: integer ids, 0 = background (PNG, TIFF, NIfTI, MHA, NRRD); "
        "the U-Net weight map's borders and, for two classes, evaluate's CTC SEG",
    )
    p.add_argument("--test-images", type=Path, metavar="DIR", help="a separate test set (else --test-fraction)")
    p.add_argument("--test-labels", type=Path, metavar="DIR")
    p.add_argument("--test-masks", type=Path, metavar="DIR")
    p.add_argument("--test-instances", type=Path, metavar="DIR")
    p.add_argument(
        "--classes",
        metavar="NAMES",
        help="class names in label-value order, e.g. background,vessel (default: from the label values)",
    )
    p.add_argument("--ignore-value", type=int, metavar="V", help="a label value left out of the loss and the metrics")
    p.add_argument(
        "--test-fraction",
        type=_fraction,
        default=0.2,
        metavar="F",
        help="share of the cases held out for testing without test folders (default 0.2; seed: prepare.seed)",
    )
    p.set_defaults(handler=_cmd_dataset_add)
    _add_import_command(what)


def _add_import_command(what: argparse._SubParsersAction) -> None:
    p = what.add_parser(
        "import",
        help="write the card of an nnU-Net v2 raw folder or a MONAI datalist (files read in place)",
        description="PATH is an nnU-Net v2 raw dataset folder (dataset.json, imagesTr/labelsTr, optional "
        "imagesTs/labelsTs; classes, ignore label and channels from dataset.json) or a MONAI datalist JSON "
        "(training / validation / test lists of {image, label}). Writes configs/datasets/NAME.yaml whose source "
        "points at the files (nothing is copied) and registers NAME as `dataset add` does.",
    )
    p.add_argument("path", type=Path, metavar="PATH", help="an nnU-Net raw dataset folder or a datalist .json")
    p.add_argument("--name", required=True, help="the dataset's name: lower-case letters, digits and _")
    p.add_argument(
        "--base-dir",
        type=Path,
        metavar="DIR",
        help="datalists: the folder its paths are relative to (default: the JSON's folder)",
    )
    p.add_argument(
        "--classes",
        metavar="NAMES",
        help="datalists: class names in label-value order (default: from the label values)",
    )
    p.add_argument(
        "--ignore-value", type=int, metavar="V", help="datalists: a label value left out of the loss and the metrics"
    )
    p.add_argument(
        "--test-fraction",
        type=_fraction,
        default=0.2,
        metavar="F",
        help="share of the training cases held out for testing when the source has no labelled test "
        "cases (default 0.2; seed: prepare.seed)",
    )
    p.set_defaults(handler=_cmd_dataset_import)
