"""`segpipe download DATASET`: the entry of the download stage (and of scan_folder for folder datasets).

Reads configs/data.yaml (`download`, `raw_dir`, `manifests_dir`) and the dataset's card
configs/datasets/DATASET.yaml, and calls `pipeline.data.download.download_dataset` with them.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from pipeline.config import cards_dir, read_config
from pipeline.data.cards import load_card
from pipeline.data.download import download_dataset
from pipeline.data.settings import check_data_config


def download(
    dataset: str,
    *,
    from_paths: Sequence[str] | None = None,
    accept_sha256: Sequence[str] | None = None,
    mirror: str | None = None,
) -> Path:
    """Fetch or import the archives of `dataset` (a folder dataset: hash its files); returns data/raw/DATASET."""
    cfg = read_config("data", check_data_config)
    return download_dataset(
        load_card(cards_dir(), dataset), cfg, from_paths=from_paths, accept_sha256=accept_sha256, mirror=mirror
    )


def _cmd_download(args: argparse.Namespace) -> int:
    download(args.dataset, from_paths=args.from_paths, accept_sha256=args.accept_sha256, mirror=args.mirror)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Download a dataset's archives into data/raw/DATASET with resume, retries and sha256 verification. "
        "Mirror: --mirror, $SEGPIPE_MIRROR or configs/data.yaml download.mirror. Air-gapped: --from PATH."
    )
    p.add_argument(
        "dataset",
        help="a dataset with a card, configs/datasets/DATASET.yaml (drive, hela, u373 or "
        "yours: a folder dataset is hashed, not downloaded)",
    )
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
