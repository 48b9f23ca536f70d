"""`segpipe prepare DATASET`: the entry of the prepare stage.

Reads configs/data.yaml (`prepare`, `raw_dir`, `prepared_dir`, `manifests_dir`), the dataset's card
configs/datasets/DATASET.yaml and configs/tracking.yaml (MLflow), and calls
`pipeline.preprocessing.prepare.prepare_dataset` with them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.config import cards_dir, read_config
from pipeline.data.cards import load_card
from pipeline.data.settings import check_data_config
from pipeline.preprocessing.prepare import prepare_dataset
from pipeline.tracking import tracking_settings


def prepare(dataset: str) -> Path:
    """Prepare `dataset` (unpack, validate, convert, split, weight maps); returns data/prepared/DATASET."""
    cfg = read_config("data", check_data_config)
    tracking = read_config("tracking", tracking_settings)
    return prepare_dataset(load_card(cards_dir(), dataset), cfg, tracking)


def _cmd_prepare(args: argparse.Namespace) -> int:
    prepare(args.dataset)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Unpack data/raw/DATASET, validate every file against data_manifests/, and write "
        "data/prepared/DATASET (NIfTI images/labels, weight maps, manifest.csv, fingerprint.json)."
    )
    p.add_argument("dataset", help="a dataset with a card, configs/datasets/DATASET.yaml")
    p.set_defaults(handler=_cmd_prepare)
