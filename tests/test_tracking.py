"""MLflow as users inspect it (pipeline/tracking.py): the experiment kind, dataset inputs with
digests and contexts, system metrics, one parent run per run group, mlflow.json for the report."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline.config import ConfigError, load_config
from pipeline.evaluation import evaluate as ev
from pipeline.stages.evaluate import evaluate as run_evaluate
from pipeline.stages.report import report
from pipeline.stages.train import train
from pipeline.tracking import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    PARENT_STAGE,
    RUN_GROUP_TAG,
    TrackingSettings,
    parent_run,
    run_group,
    stage_run,
    tracking_settings,
    tracking_uri,
)
from pipeline.tracking_datasets import data_digest

from fixtures import FixtureProject
from test_evaluate import UNET, drive_case, fake_predict, make_checkpoint, make_prepared, work  # noqa: F401 (fixture)
from test_train import drive_project  # noqa: F401 (fixture)

SYSTEM = ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes")
PARENT_TAG = "mlflow.parentRunId"


def set_tracking(root: Path, *, interval: float = 0.1, enabled: bool = True, run_groups: bool = True) -> None:
    """configs/tracking.yaml of the test project (no MLflow model: tests/test_mlflow_model.py)."""
    cfg = {
        "system_metrics": {"enabled": enabled, "sampling_interval_seconds": interval},
        "run_groups": run_groups,
        "log_model": False,
        "register_model": False,
    }
    (root / "configs" / "tracking.yaml").write_text(yaml.safe_dump(cfg))


def latest(experiment: str, stage: str, network: str | None = None) -> Any:
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    query = f"tags.stage = '{stage}'" + (f" and tags.network = '{network}'" if network else "")
    return client.search_runs([exp.experiment_id], query, order_by=["start_time DESC"], max_results=1)[0]


def inputs_of(run: Any) -> dict[str, tuple[str, dict[str, str]]]:
    """Dataset name -> (digest, input tags) of a run's dataset inputs."""
    return {i.dataset.name: (i.dataset.digest, {t.key: t.value for t in i.tags}) for i in run.inputs.dataset_inputs}


def expected(manifest: Path, split: str, context: str) -> tuple[str, dict[str, str]]:
    return data_digest(manifest, split), {"mlflow.data.context": context, "split": split, "dataset": "drive"}


def test_experiments_are_model_training_new_and_existing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    client = MlflowClient()
    assert (EXPERIMENT_KIND_TAG, EXPERIMENT_KIND) == ("mlflow.experimentKind", "custom_model_development")
    client.create_experiment("kind-old")  # a store written before: no kind, the UI's GenAI overview
    client.create_experiment("kind-inferred", tags={EXPERIMENT_KIND_TAG: "genai_development_inferred"})
    client.create_experiment("kind-chosen", tags={EXPERIMENT_KIND_TAG: "genai_development"})  # chosen by hand
    for name in ("kind-new", "kind-old", "kind-inferred", "kind-chosen"):
        with stage_run("prepare", name, params={}, manifest=tmp_path / "manifest.csv"):
            pass
    kinds = {
        name: client.get_experiment_by_name(name).tags.get(EXPERIMENT_KIND_TAG)
        for name in ("kind-new", "kind-old", "kind-inferred", "kind-chosen")
    }
    assert kinds == {
        "kind-new": EXPERIMENT_KIND,
        "kind-old": EXPERIMENT_KIND,
        "kind-inferred": EXPERIMENT_KIND,
        "kind-chosen": "genai_development",
    }


def test_train_run_has_datasets_system_metrics_and_a_parent(drive_project: FixtureProject) -> None:  # noqa: F811
    set_tracking(drive_project.root, interval=0.1)
    train("drive", "unet", profile="smoke")
    run = latest("drive", "train", "unet")
    manifest = drive_project.root / "data" / "prepared" / "drive" / "manifest.csv"
    assert inputs_of(run) == {
        "drive-train": expected(manifest, "train", "training"),
        "drive-val": expected(manifest, "val", "validation"),
    }
    dataset = next(i.dataset for i in run.inputs.dataset_inputs if i.dataset.name == "drive-train")
    assert json.loads(dataset.source)["uri"] == "data/prepared/drive/manifest.csv" and dataset.source_type == "local"
    assert json.loads(dataset.profile)["num_rows"] == 4
    # prepare (the fixture) logged what it wrote: the same names and digests, context "output"
    assert inputs_of(latest("drive", "prepare")) == {
        split_name: (digest, {**tags, "mlflow.data.context": "output"})
        for split_name, (digest, tags) in {**inputs_of(run), "drive-test": expected(manifest, "test", "")}.items()
    }

    assert set(SYSTEM) <= set(run.data.metrics)
    assert len(MlflowClient().get_metric_history(run.info.run_id, SYSTEM[0])) >= 1
    assert run.info.status == "FINISHED"
    parent = MlflowClient().get_run(run.data.tags[PARENT_TAG])
    assert parent.data.tags["stage"] == PARENT_STAGE and parent.info.status == "FINISHED"
    assert parent.data.tags[RUN_GROUP_TAG] == run.data.tags[RUN_GROUP_TAG]


def test_evaluate_run_has_test_and_val_inputs_system_metrics_and_mlflow_json(
    work: Path,  # noqa: F811 (fixture)
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    make_prepared(work, "drive", drive_case)
    make_checkpoint(work, "drive", "unet", "unet", 3, **UNET)
    set_tracking(work, interval=0.1)

    def slow_oracle(x: np.ndarray) -> np.ndarray:
        time.sleep(0.1)  # a few system-metrics samples during the run
        return (x[0] > 0).astype(np.float32)

    monkeypatch.setattr(ev, "predict", fake_predict(slow_oracle))
    run_evaluate("drive", "unet", models_dir=work / "models", results_dir=work / "results")
    run = latest("drive", "evaluate", "unet")
    manifest = work / "data" / "prepared" / "drive" / "manifest.csv"
    assert inputs_of(run) == {
        "drive-test": expected(manifest, "test", "testing"),
        "drive-val": expected(manifest, "val", "validation"),
    }
    assert set(SYSTEM) <= set(run.data.metrics)

    out = work / "results" / "drive" / "unet"
    record = json.loads((out / "mlflow.json").read_text())
    assert record == {
        "run_id": run.info.run_id,
        "experiment_id": run.info.experiment_id,
        "tracking_uri": tracking_uri(),
    }
    metrics_text = (out / "metrics.json").read_text()
    assert run.info.run_id not in metrics_text and "run_id" not in metrics_text

    report(work / "results", models_dir=work / "models", matrix=[("drive", "unet"), ("drive", "unetpp")])
    summary = pd.read_csv(work / "results" / "summary.csv")
    assert summary.loc[0, "mlflow_run_id"] == run.info.run_id
    assert str(summary.loc[0, "mlflow_experiment_id"]) == run.info.experiment_id
    text = (work / "results" / "report.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| dataset"))
    assert header.endswith("| MLflow run |")
    assert f"| {run.info.run_id} |" in text
    assert "drive × unetpp: `dvc repro evaluate@drive-unetpp`" in text and "drive × unet:" not in text


def test_evaluate_without_val_threshold_logs_only_the_test_split(work: Path) -> None:  # noqa: F811 (fixture)
    make_prepared(work, "drive", drive_case)
    make_checkpoint(work, "drive", "unet", "unet", 3, **UNET)
    set_tracking(work, enabled=False)
    config = yaml.safe_load((work / "configs" / "evaluate.yaml").read_text())
    config.update(val_threshold=False, overlays=0)
    (work / "configs" / "evaluate.yaml").write_text(yaml.safe_dump(config))
    run_evaluate("drive", "unet", models_dir=work / "models", results_dir=work / "results")
    run = latest("drive", "evaluate", "unet")
    assert set(inputs_of(run)) == {"drive-test"}
    assert not any(key.startswith("system/") for key in run.data.metrics)  # system_metrics.enabled: false


def test_stage_runs_of_one_group_share_one_parent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    client = MlflowClient()
    manifest, group = tmp_path / "manifest.csv", TrackingSettings(group="share-1")
    ids = []
    for stage in ("train", "evaluate"):
        with stage_run(stage, "groups", params={}, manifest=manifest, network="unet", tracking=group) as tracker:
            ids.append(tracker.active_run().info.run_id)
    with pytest.raises(RuntimeError, match="boom"):
        with stage_run("evaluate", "groups", params={}, manifest=manifest, tracking=group) as tracker:
            ids.append(tracker.active_run().info.run_id)
            raise RuntimeError("boom")
    with pytest.raises(KeyboardInterrupt):
        with stage_run("train", "groups", params={}, manifest=manifest, tracking=group) as tracker:
            ids.append(tracker.active_run().info.run_id)
            raise KeyboardInterrupt
    with stage_run("train", "groups", params={}, manifest=manifest, tracking=TrackingSettings(group="share-2")) as t:
        other = t.active_run().info.run_id

    runs = [client.get_run(run_id) for run_id in ids]
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED", "FAILED", "KILLED"]
    assert {r.data.tags[RUN_GROUP_TAG] for r in runs} == {"share-1"}
    parents = {r.data.tags[PARENT_TAG] for r in runs}
    assert len(parents) == 1
    parent = client.get_run(parents.pop())
    assert parent.info.status == "FINISHED" and parent.info.run_name == "pipeline share-1"
    assert parent.data.tags["stage"] == PARENT_STAGE and parent.data.tags[RUN_GROUP_TAG] == "share-1"
    assert parent.info.end_time >= max(r.info.end_time for r in runs)  # spans its stage runs
    assert client.get_run(other).data.tags[PARENT_TAG] != parent.info.run_id

    experiment = client.get_experiment_by_name("groups").experiment_id
    assert len(client.search_runs([experiment], f"tags.stage = '{PARENT_STAGE}'")) == 2
    # the README's searches: a dotted tag key without backquotes, LIKE on the DVC experiment name
    assert len(client.search_runs([experiment], "tags.segpipe.run_group = 'share-1'")) == 5  # parent + 4
    monkeypatch.setenv("DVC_EXP_NAME", "lr-small")
    exp_group = TrackingSettings(group=run_group(tmp_path))
    with stage_run("train", "groups", params={}, manifest=manifest, network="unet", tracking=exp_group) as tracker:
        exp_run = tracker.active_run().info.run_id
    found = client.search_runs([experiment], "tags.stage = 'train' and tags.segpipe.dvc_exp LIKE 'lr-%'")
    assert [r.info.run_id for r in found] == [exp_run]
    assert client.get_run(found[0].data.tags[PARENT_TAG]).info.run_name == "pipeline exp:lr-small"


def test_parent_run_is_found_and_the_oldest_wins(tmp_path: Path) -> None:
    client = MlflowClient()
    experiment = client.create_experiment("parents")
    first = client.create_run(experiment, tags={"stage": PARENT_STAGE, RUN_GROUP_TAG: "g"}, start_time=1000)
    client.create_run(experiment, tags={"stage": PARENT_STAGE, RUN_GROUP_TAG: "g"}, start_time=2000)  # a racer's
    assert parent_run(client, experiment, "g", {}) == first.info.run_id
    created = parent_run(client, experiment, "h", {"dataset": "parents"})
    assert created == parent_run(client, experiment, "h", {})
    assert client.get_run(created).info.status == "FINISHED"


def test_run_group_comes_from_dvc_or_commit_and_params(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SEGPIPE_RUN_GROUP", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    params = tmp_path / "configs"
    params.mkdir()
    (params / "train.yaml").write_text("lr: 0.001\n")
    first = run_group(params)
    assert re.fullmatch(r"([0-9a-f]{8}|nogit)\+[0-9a-f]{8}", first) and run_group(params) == first
    (params / "train.yaml").write_text("lr: 0.01\n")
    assert run_group(params) != first and run_group(params).split("+")[0] == first.split("+")[0]
    monkeypatch.setenv("DVC_EXP_NAME", "lr-large")
    assert run_group(params) == "exp:lr-large"
    monkeypatch.setenv("SEGPIPE_RUN_GROUP", "my sweep/1")
    assert run_group(params) == "my-sweep-1"


def test_tracking_config_is_checked(work: Path) -> None:  # noqa: F811 (fixture)
    settings = tracking_settings(load_config("tracking"), "configs/tracking.yaml")  # the repo's file
    assert settings.system_metrics and settings.sampling_interval == 10.0 and settings.group
    assert settings.log_model and settings.register_model
    good = {
        "system_metrics": {"enabled": True, "sampling_interval_seconds": 2},
        "run_groups": False,
        "log_model": False,
        "register_model": False,
    }
    assert tracking_settings(good, "t.yaml") == TrackingSettings(True, 2.0, None)
    bad = {**good, "system_metrics": {"enabled": True, "sampling_interval_seconds": 0}}
    with pytest.raises(
        ConfigError,
        match=r"t\.yaml: system_metrics\.sampling_interval_seconds must be a finite "
        r"number > 0, got 0",
    ):
        tracking_settings(bad, "t.yaml")
    with pytest.raises(ConfigError, match=r"unknown keys \['colour'\]"):
        tracking_settings({**good, "colour": "red"}, "t.yaml")
    with pytest.raises(ConfigError, match="run_groups must be true or false"):
        tracking_settings({**good, "run_groups": "yes please"}, "t.yaml")


def test_default_store_is_in_the_dvc_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert tracking_uri() == "sqlite:///mlflow.db"
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))  # DVC sets it for every stage, also in `dvc exp run --temp`
    temp_copy = tmp_path / "executor"
    temp_copy.mkdir()
    monkeypatch.chdir(temp_copy)
    assert tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)  # a stage in the workspace: the portable relative URI
    assert tracking_uri() == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example.org")
    assert tracking_uri() == "http://mlflow.example.org"


RACE_SCRIPT = """
import sys, time
from pathlib import Path
from pipeline.tracking import stage_run

me, other = Path(sys.argv[1]), Path(sys.argv[2])
me.touch()
deadline = time.monotonic() + 120
while not other.exists() and time.monotonic() < deadline:  # both imported: start at the same moment
    time.sleep(0.001)
with stage_run("prepare", "race", params={"who": me.name}, manifest=Path("manifest.csv")) as tracker:
    print(tracker.active_run().info.run_id)
"""


def test_two_stages_starting_at_once_on_a_fresh_store_both_finish(tmp_path: Path) -> None:
    """The first stage on a fresh SQLite store creates it (schema migrations) under a file lock:
    a second stage starting at the same moment waits instead of failing in alembic."""
    import os
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    (tmp_path / "fresh").mkdir()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
    }
    ready = [tmp_path / "ready-a", tmp_path / "ready-b"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACE_SCRIPT, str(me), str(other)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for me, other in (ready, ready[::-1])
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    run_ids = [o.strip().splitlines()[-1] for o in outputs]
    client = MlflowClient(uri)
    assert [client.get_run(r).info.status for r in run_ids] == ["FINISHED", "FINISHED"]
    assert (tmp_path / "fresh" / "mlflow.db.lock").exists()


def test_stale_running_runs_of_the_stage_are_marked_killed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A RUNNING run whose process is gone on this host (a SIGKILLed stage) is marked KILLED when the
    same stage starts again; runs of a live process, of another stage, network or host, or without
    the pid tags are left alone."""
    import os
    import socket
    import subprocess
    import sys

    from pipeline.tracking_store import HOST_TAG, MARKED_KILLED_TAG, PID_TAG

    monkeypatch.chdir(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    client = MlflowClient()
    experiment = client.create_experiment("stale")
    base = {"stage": "train", "network": "unet", HOST_TAG: host}

    def running(**tags: str) -> str:
        return client.create_run(experiment, tags={**base, **tags}).info.run_id

    stale = running(**{PID_TAG: str(dead.pid)})
    alive = running(**{PID_TAG: str(os.getpid())})
    others = [
        running(**{PID_TAG: str(dead.pid), "network": "unetpp"}),
        running(**{PID_TAG: str(dead.pid), "stage": "evaluate"}),
        running(**{PID_TAG: str(dead.pid), HOST_TAG: "another-host"}),
        running(**{PID_TAG: str(dead.pid), RUN_GROUP_TAG: "other-group"}),
        client.create_run(experiment, tags={"stage": "train", "network": "unet"}).info.run_id,
    ]
    with stage_run("train", "stale", params={}, manifest=tmp_path / "manifest.csv", network="unet") as tracker:
        new = tracker.active_run()
        assert new.data.tags[PID_TAG] == str(os.getpid()) and new.data.tags[HOST_TAG] == host
    killed = client.get_run(stale)
    assert killed.info.status == "KILLED" and killed.info.end_time is not None
    assert killed.data.tags[MARKED_KILLED_TAG].startswith("stale RUNNING run found when the stage started again at ")
    for run_id in (alive, *others):
        run = client.get_run(run_id)
        assert run.info.status == "RUNNING" and MARKED_KILLED_TAG not in run.data.tags
    assert client.get_run(new.info.run_id).info.status == "FINISHED"


def test_pid_alive_asks_without_signalling() -> None:
    import os
    import subprocess
    import sys

    from pipeline.tracking_store import pid_alive

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert pid_alive(os.getpid()) and not pid_alive(child.pid) and not pid_alive(0) and not pid_alive(-1)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert pid_alive(sleeper.pid) and pid_alive(sleeper.pid)  # asking twice leaves it running
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()
