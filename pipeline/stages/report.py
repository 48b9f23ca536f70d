"""`segpipe report`: the entry of the report stage, one table of every evaluated dataset x network.

Reads configs/evaluate.yaml (`results_dir`), configs/train.yaml (`models_dir`, `networks`) and
configs/data.yaml (`datasets`: with `networks`, the DVC matrix) and calls
`pipeline.evaluation.report.write_report`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterable

from pipeline.config import check_list, check_str, config_path, load_config, read_config
from pipeline.data.settings import check_data_config
from pipeline.evaluation.report import write_report


def configured_matrix() -> list[tuple[str, str]]:
    """The (dataset, network) pairs of the DVC train/evaluate matrix: configs/data.yaml `datasets` x
    configs/train.yaml `networks`."""
    where = str(config_path("train"))
    networks = check_list(load_config("train").get("networks"), "networks", where, nonempty=True)
    return [
        (dataset, check_str(network, "networks[]", where))
        for dataset in read_config("data", check_data_config).datasets
        for network in networks
    ]


def report(
    results_dir: Path | None = None,
    datasets: Iterable[str] | None = None,
    networks: Iterable[str] | None = None,
    *,
    models_dir: Path | None = None,
    matrix: Iterable[tuple[str, str]] | None = None,
) -> Path:
    """results/summary.csv and results/report.md; None arguments: configs/evaluate.yaml `results_dir`,
    configs/train.yaml `models_dir`, `configured_matrix()`. Returns the path of report.md."""
    results = Path(results_dir if results_dir is not None else load_config("evaluate")["results_dir"])
    models = Path(models_dir if models_dir is not None else load_config("train")["models_dir"])
    return write_report(
        results, models, configured_matrix() if matrix is None else matrix, datasets=datasets, networks=networks
    )


def _cmd_report(args: argparse.Namespace) -> int:
    report()
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Collect results/*/*/metrics.json (and the training facts of models/*/*/log.csv) into "
        "results/summary.csv and results/report.md; pairs of the DVC matrix not evaluated yet "
        "are listed as such."
    )
    p.set_defaults(handler=_cmd_report)
