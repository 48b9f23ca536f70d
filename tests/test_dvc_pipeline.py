"""End to end: `dvc repro` of the data stages in a temporary copy of the repo, against the mirror."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from fixtures import REPO_ROOT, FixtureProject, Mirror


def _dvc(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=600)


@pytest.mark.slow
def test_dvc_repro_data_stages(project: FixtureProject, mirror: Mirror, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(REPO_ROOT / "dvc.yaml", repo)
    shutil.copytree(REPO_ROOT / "pipeline", repo / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(project.root / "configs", repo / "configs")
    shutil.copytree(project.root / "data_manifests", repo / "data_manifests")
    env = {k: v for k, v in os.environ.items() if k not in ("SEGPIPE_CONFIG_DIR", "MLFLOW_TRACKING_URI")}
    env.update(SEGPIPE_MIRROR=mirror.url, PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
               DVC_NO_ANALYTICS="1")
    assert _dvc(["init", "--no-scm", "-q"], repo, env).returncode == 0

    first = _dvc(["repro"], repo, env)
    assert first.returncode == 0, first.stdout + first.stderr
    for dataset, n_cases in {"drive": 8, "hela": 5, "u373": 5}.items():
        table = pd.read_csv(repo / "data" / "prepared" / dataset / "manifest.csv")
        assert len(table) == n_cases
    assert (repo / "dvc.lock").is_file()
    assert (repo / "mlflow.db").is_file()  # the default embedded store at the repo root

    second = _dvc(["repro"], repo, env)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "Running stage" not in second.stdout
    dag = _dvc(["dag", "--dot"], repo, env)
    assert '"download_drive" -> "prepare@drive"' in dag.stdout
    assert '"download_cells@hela" -> "prepare@hela"' in dag.stdout
