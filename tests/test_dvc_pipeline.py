"""End to end: `dvc repro` of the whole pipeline (smoke profile) in a temporary copy of the repo,
against the fixture datasets served on 127.0.0.1; then MLflow and `dvc metrics`/`dvc plots`, and a
forced re-run of one training beside a CPU burner that must give the same weights and metrics."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from fixtures import REPO_ROOT, FixtureProject, Mirror, ctc_members, sha256, write_zip

DATASETS = {"drive": 8, "hela": 8, "u373": 5}  # hela: 4 GT + 4 silver-truth frames (its card's silver_truth)
NETWORKS = ("unet", "unetpp", "u2net")


def _dvc(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, text=True, capture_output=True, timeout=900
    )


@pytest.mark.slow
def test_dvc_repro_whole_pipeline(project: FixtureProject, mirror: Mirror, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(REPO_ROOT / "dvc.yaml", repo)
    shutil.copytree(REPO_ROOT / "pipeline", repo / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(project.root / "configs", repo / "configs")
    shutil.copytree(project.root / "data_manifests", repo / "data_manifests")
    train_cfg = yaml.safe_load((repo / "configs" / "train.yaml").read_text())
    train_cfg["profile"] = "smoke"
    (repo / "configs" / "train.yaml").write_text(yaml.safe_dump(train_cfg, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k not in ("SEGPIPE_CONFIG_DIR", "MLFLOW_TRACKING_URI")}
    env.update(
        SEGPIPE_MIRROR=mirror.url,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
        DVC_NO_ANALYTICS="1",
        OMP_NUM_THREADS="1",
    )
    assert _dvc(["init", "--no-scm", "-q"], repo, env).returncode == 0
    # HeLa imported by hand first (an archive the sources do not know): `dvc repro` keeps it, no edit
    imported = write_zip(tmp_path / "DIC-C2DH-HeLa.zip", ctc_members("DIC-C2DH-HeLa", seed=5))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "download",
            "hela",
            "--from",
            str(imported),
            "--accept-sha256",
            sha256(imported),
        ],
        cwd=repo,
        env=env,
        text=True,
        capture_output=True,
    )
    assert done.returncode == 0, done.stderr

    first = _dvc(["repro"], repo, env)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    for dataset, n_cases in DATASETS.items():
        table = pd.read_csv(repo / "data" / "prepared" / dataset / "manifest.csv")
        assert len(table) == n_cases
        for network in NETWORKS:
            assert (repo / "models" / dataset / network / "best.pt").is_file()
            metrics = json.loads((repo / "results" / dataset / network / "metrics.json").read_text())
            assert 0.0 <= metrics["dice"] <= 1.0 and 0.0 <= metrics["iou"] <= 1.0
    assert (repo / "results" / "report.md").is_file()
    assert (repo / "mlflow.db").is_file()  # the default embedded store at the repo root
    record = json.loads((repo / "data" / "raw" / "hela" / "download.json").read_text())
    assert [a["source"] for a in record["archives"]] == [str(imported)]

    # MLflow: one experiment per dataset, one run per stage execution, Dice and IoU logged.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    for dataset in DATASETS:
        experiment = client.get_experiment_by_name(dataset)
        assert experiment is not None
        runs = client.search_runs([experiment.experiment_id])
        by_stage: dict[str, list] = {}
        for run in runs:
            assert run.info.status == "FINISHED"
            by_stage.setdefault(run.data.tags["stage"], []).append(run)
        assert len(by_stage["prepare"]) == 1
        assert sorted(r.data.tags["network"] for r in by_stage["train"]) == sorted(NETWORKS)
        assert sorted(r.data.tags["network"] for r in by_stage["evaluate"]) == sorted(NETWORKS)
        for run in by_stage["train"]:
            assert {"train_loss", "val_dice", "val_iou"} <= set(run.data.metrics)
            assert run.data.tags["git_commit"] and run.data.tags["data_manifest_sha256"] != "missing"
        for run in by_stage["evaluate"]:
            assert {"test_dice", "test_iou"} <= set(run.data.metrics)
        _check_grouping_and_datasets(experiment, by_stage, dataset, repo)

    shown = _dvc(["metrics", "show", "--json"], repo, env)
    assert shown.returncode == 0, shown.stderr
    listed = json.dumps(json.loads(shown.stdout))
    for dataset in DATASETS:
        for network in NETWORKS:
            assert f"results/{dataset}/{network}/metrics.json" in listed
    assert '"dice"' in listed and "pooled_auc" in listed
    plots = _dvc(["plots", "show", "--json"], repo, env)
    assert plots.returncode == 0, plots.stderr
    assert "models/drive/unet/log.csv" in plots.stdout and "results/drive/unet/roc.csv" in plots.stdout

    second = _dvc(["repro"], repo, env)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "Running stage" not in second.stdout
    dag = _dvc(["dag", "--dot"], repo, env)
    assert '"download_drive" -> "prepare@drive"' in dag.stdout
    assert '"download_cells@hela" -> "prepare@hela"' in dag.stdout
    assert '"prepare@drive" -> "train@drive-unet"' in dag.stdout
    assert '"train@hela-u2net" -> "evaluate@hela-u2net"' in dag.stdout
    assert '"evaluate@u373-unetpp" -> "report"' in dag.stdout

    # The same numbers twice: a forced re-run of one training and its evaluation, this time with a
    # process burning a CPU beside it, gives bit-identical weights and identical metrics.
    before = _weights_and_metrics(repo, "drive", "unet")
    burner = subprocess.Popen([sys.executable, "-c", BURNER])
    try:
        again = _dvc(["repro", "-f", "train@drive-unet", "evaluate@drive-unet"], repo, env)
    finally:
        burner.kill()
        burner.wait()
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert "Running stage 'train@drive-unet'" in again.stdout
    after = _weights_and_metrics(repo, "drive", "unet")
    assert after[1] == before[1]  # metrics.json holds no timing: every value is equal
    assert before[0].keys() == after[0].keys()
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0]), "weights differ"

    # A branch of the matrix without metrics: `dvc metrics show` warns, the report names it and how
    # to produce it, and still lists the MLflow run of every evaluated pair.
    (repo / "results" / "hela" / "unetpp" / "metrics.json").unlink()
    shown = _dvc(["metrics", "show"], repo, env)
    assert shown.returncode == 0 and "failed to load some metrics" in shown.stdout + shown.stderr
    rep = subprocess.run(
        [sys.executable, "-m", "pipeline", "report"], cwd=repo, env=env, text=True, capture_output=True, timeout=300
    )
    assert rep.returncode == 0, rep.stdout[-3000:] + rep.stderr[-3000:]
    text = (repo / "results" / "report.md").read_text()
    assert "## Not evaluated yet" in text and "hela × unetpp: `dvc repro evaluate@hela-unetpp`" in text
    summary = pd.read_csv(repo / "results" / "summary.csv")
    assert summary["mlflow_run_id"].notna().all() and len(summary) == len(DATASETS) * len(NETWORKS) - 1
    assert all(f"| {run_id} |" in text for run_id in summary["mlflow_run_id"])


def _check_grouping_and_datasets(experiment, by_stage: dict[str, list], dataset: str, repo: Path) -> None:
    """One `dvc repro`: a model-training experiment, one parent run that every stage run is nested
    under (same run group), the prepared splits as dataset inputs (prepare: outputs, same digests),
    and the evaluate run ids in results/<dataset>/<network>/mlflow.json."""
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    parents = by_stage["pipeline-run"]
    assert len(parents) == 1, [p.info.run_name for p in parents]
    parent = parents[0]
    group = parent.data.tags["segpipe.run_group"]
    stage_runs = [run for stage, runs in by_stage.items() if stage != "pipeline-run" for run in runs]
    for run in stage_runs:
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["segpipe.run_group"] == group
        assert run.data.tags["segpipe.dvc_stage"].startswith(run.data.tags["stage"] + "@")
    assert parent.info.end_time >= max(run.info.end_time for run in stage_runs)

    def inputs(run) -> dict[str, tuple[str, str]]:
        return {
            i.dataset.name: (i.dataset.digest, {t.key: t.value for t in i.tags}["mlflow.data.context"])
            for i in run.inputs.dataset_inputs
        }

    written = inputs(by_stage["prepare"][0])
    assert {name: context for name, (_, context) in written.items()} == {
        f"{dataset}-{split}": "output" for split in ("train", "val", "test")
    }
    for stage, contexts in (
        ("train", {"train": "training", "val": "validation"}),
        ("evaluate", {"test": "testing", "val": "validation"}),
    ):
        for run in by_stage[stage]:
            assert inputs(run) == {
                f"{dataset}-{split}": (written[f"{dataset}-{split}"][0], context) for split, context in contexts.items()
            }
    evaluate_ids = {run.data.tags["network"]: run.info.run_id for run in by_stage["evaluate"]}
    for network, run_id in evaluate_ids.items():
        record = json.loads((repo / "results" / dataset / network / "mlflow.json").read_text())
        assert record["run_id"] == run_id and record["experiment_id"] == experiment.experiment_id
        assert record["tracking_uri"] == "sqlite:///mlflow.db"  # the repo root's store, no machine path
        assert run_id not in (repo / "results" / dataset / network / "metrics.json").read_text()
    report = (repo / "results" / "report.md").read_text()
    assert all(f"| {run_id} |" in report for run_id in evaluate_ids.values())


BURNER = "import time\nend = time.monotonic() + 600\nwhile time.monotonic() < end:\n    pass\n"
"""Busy-loops one CPU for at most 10 minutes (the test kills it sooner)."""


def _weights_and_metrics(repo: Path, dataset: str, network: str) -> tuple[dict, dict]:
    from pipeline.networks import read_checkpoint

    state = read_checkpoint(repo / "models" / dataset / network / "best.pt")["state_dict"]
    return state, json.loads((repo / "results" / dataset / network / "metrics.json").read_text())
