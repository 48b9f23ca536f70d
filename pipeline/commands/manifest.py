"""`segpipe manifest DATASET SOURCE` (maintainers): the per-file manifest CSV of a verified copy."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.config import read_config
from pipeline.data.manifest import write_file_manifest
from pipeline.data.settings import check_data_config


def _cmd_manifest(args: argparse.Namespace) -> int:
    cfg = read_config("data", check_data_config)
    write_file_manifest(args.dataset, args.source, cfg, output=args.output)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Hash and describe every file of a verified copy (folder or archive) of a dataset into "
        "data_manifests/DATASET_files.csv, which `segpipe prepare` checks every file against."
    )
    p.add_argument("dataset")
    p.add_argument("source", type=Path, help="an archive or unpacked folder of a verified copy")
    p.add_argument("--output", default=None, help="CSV path (default: data_manifests/DATASET_files.csv)")
    p.set_defaults(handler=_cmd_manifest)
