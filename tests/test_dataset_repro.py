"""Smoke `dvc repro` of a user's 3-class dataset (issue 13): background / cell interior / cell border
plus an ignore label, written here as PNG folders (`segpipe dataset add`) and as an nnU-Net v2 raw
folder (`segpipe dataset import`), then `dvc repro` of its scan -> prepare -> train -> evaluate stages
in a temporary copy of the repo; a second `dvc repro` reruns nothing but the always-run scan and gives
the same metrics."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import pandas as pd
import pytest
import yaml

from fixtures import REPO_ROOT
from test_dataset_import import IGNORE, cell_label, channels_of, write_nnunet

TARGET = "evaluate@cells-unet"


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, text=True, capture_output=True, timeout=600)
    assert done.returncode == 0, f"{args}: {done.stdout[-3000:]}{done.stderr[-3000:]}"
    return done


def _edit(path: Path, **changes: object) -> None:
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), **changes}, sort_keys=False))


def _png_folders(root: Path, n: int = 8) -> list[str]:
    """images/ (one channel) and labels/ (0 background, 1 interior, 2 border, 3 unlabelled) PNGs."""
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True)
    for case in range(n):
        label = cell_label(case)
        iio.imwrite(root / "images" / f"cell_{case:03d}.png", channels_of(label, case)[0])
        iio.imwrite(root / "labels" / f"cell_{case:03d}.png", label)
    return [
        "add",
        "cells",
        "--images",
        str(root / "images"),
        "--labels",
        str(root / "labels"),
        "--classes",
        "background,interior,border",
        "--ignore-value",
        str(IGNORE),
    ]


def _nnunet_folder(root: Path) -> list[str]:
    return ["import", str(write_nnunet(root / "Dataset001_cells", n_train=8)), "--name", "cells"]


@pytest.mark.slow
@pytest.mark.parametrize("source", [_png_folders, _nnunet_folder], ids=["add", "import"])
def test_a_three_class_dataset_of_yours_runs_in_dvc(tmp_path: Path, source) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(REPO_ROOT / "dvc.yaml", repo)
    for folder in ("pipeline", "configs", "data_manifests"):
        shutil.copytree(REPO_ROOT / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k not in ("SEGPIPE_CONFIG_DIR", "MLFLOW_TRACKING_URI")}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", DVC_NO_ANALYTICS="1", OMP_NUM_THREADS="1"
    )
    _run(["pipeline", "dataset", *source(tmp_path / "raw"), "--test-fraction", "0.25"], repo, env)
    data = yaml.safe_load((repo / "configs" / "data.yaml").read_text())
    assert "cells" in data["datasets"] and "cells" in data["folder_datasets"]
    _edit(repo / "configs" / "train.yaml", profile="smoke", networks=["unet"])
    tracking = repo / "configs" / "tracking.yaml"  # the MLflow model has its own tests
    tracking.write_text(
        tracking.read_text()
        .replace("log_model: true", "log_model: false")
        .replace("register_model: true", "register_model: false")
    )
    _run(["dvc", "init", "--no-scm", "-q"], repo, env)

    first = _run(["dvc", "repro", TARGET], repo, env)
    for stage in ("scan_folder@cells", "prepare@cells", "train@cells-unet", TARGET):
        assert f"Running stage '{stage}'" in first.stdout
    table = pd.read_csv(repo / "data" / "prepared" / "cells" / "manifest.csv")
    assert sorted(table["split"].value_counts().items()) == [("test", 2), ("train", 5), ("val", 1)]
    metrics_path = repo / "results" / "cells" / "unet" / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    for name in ("background", "interior", "border", "mean_fg"):
        assert 0.0 <= metrics[f"dice_{name}"] <= 1.0 and 0.0 <= metrics[f"iou_{name}"] <= 1.0
    assert "dice_ignore" not in metrics  # the ignore label is no class
    per_image = pd.read_csv(repo / "results" / "cells" / "unet" / "per_image.csv")
    assert sorted(per_image["case"]) == sorted(table.loc[table["split"] == "test", "case"])

    second = _run(["dvc", "repro", TARGET], repo, env)
    assert "Running stage 'scan_folder@cells'" in second.stdout  # always run: re-hashes the folder
    for stage in ("prepare@cells", "train@cells-unet", TARGET):
        assert f"Running stage '{stage}'" not in second.stdout, second.stdout
    assert json.loads(metrics_path.read_text()) == metrics
