"""`segpipe train`: schedules, deterministic patches, a smoke run, resume after a kill, crash -> FAILED, DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.errors import SegpipeError
from pipeline.networks import load_model, read_checkpoint
from pipeline.stages.train import load_train_configs, train
from pipeline.training.loader import PatchDataset, StepSampler
from pipeline.training.optim import learning_rate
from pipeline.training.settings import resolve_settings

from fixtures import FixtureProject, prepare_fixture_datasets


@pytest.fixture
def drive_project(project: FixtureProject) -> FixtureProject:
    prepare_fixture_datasets(project, ("drive",))
    return project


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _cli(args: list[str], cwd: Path, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def test_learning_rate_schedules() -> None:
    cfg = {"name": "cosine", "warmup_steps": 2, "min_lr": 0.0, "poly_power": 0.9, "step_epochs": 2, "gamma": 0.5}
    assert learning_rate(0, 12, 4, 1.0, cfg) == pytest.approx(0.5)  # warm-up 1/2
    assert learning_rate(2, 12, 4, 1.0, cfg) == pytest.approx(1.0)  # t = 0
    assert learning_rate(7, 12, 4, 1.0, cfg) == pytest.approx(0.5)  # t = 1/2
    assert learning_rate(12, 12, 4, 1.0, cfg) == pytest.approx(0.0)  # t = 1
    cfg.update(name="poly", warmup_steps=0)
    assert learning_rate(6, 12, 4, 1.0, cfg) == pytest.approx(0.5**0.9)
    cfg.update(name="step")
    assert [learning_rate(s, 24, 4, 1.0, cfg) for s in (0, 7, 8, 16)] == pytest.approx([1, 1, 0.5, 0.25])
    cfg.update(name="constant")
    assert learning_rate(11, 12, 4, 0.3, cfg) == 0.3


def test_sampler_splits_each_step_across_ranks() -> None:
    single = list(StepSampler(steps=3, items_per_step=4, rank=0, world=1))
    ranks = [list(StepSampler(steps=3, items_per_step=4, rank=r, world=2)) for r in range(2)]
    for step in range(3):
        together = ranks[0][2 * step : 2 * step + 2] + ranks[1][2 * step : 2 * step + 2]
        assert together == single[4 * step : 4 * step + 4]


def test_patches_depend_only_on_seed_epoch_and_index() -> None:
    from monai.transforms import Compose, RandSpatialCropd

    rng = np.random.default_rng(0)
    cases = [{"image": rng.random((1, 32, 32)).astype(np.float32)} for _ in range(3)]
    data = PatchDataset(cases, Compose([RandSpatialCropd("image", (8, 8), random_size=False)]), seed=7)
    first = data[(1, 5)][0]["image"]
    data[(0, 0)]  # another item in between changes nothing
    assert np.array_equal(data[(1, 5)][0]["image"], first)
    assert not np.array_equal(data[(2, 5)][0]["image"], first)
    # every pass over the data visits each case once
    assert sorted(data.case_index(0, i) for i in range(3)) == [0, 1, 2]


def test_smoke_training_writes_checkpoints_log_and_mlflow(drive_project: FixtureProject) -> None:
    from mlflow.tracking import MlflowClient

    result = train("drive", "unet", profile="smoke")
    out = drive_project.root / "models" / "drive" / "unet"
    assert result.checkpoint.resolve() == out / "best.pt" and result.epochs == 2 and result.steps == 4
    log = pd.read_csv(out / "log.csv")
    assert list(log["epoch"]) == [1, 2] and log["val_dice"].notna().all()
    assert (log["data_wait_share"] >= 0).all() and (log["data_wait_share"] <= 1).all()
    best = read_checkpoint(out / "best.pt")
    assert best["dataset"] == "drive" and best["augment"]["channels"] == [1] and best["in_channels"] == 1
    assert best["val_dice"] == pytest.approx(log["val_dice"].max())
    assert "instances" not in best and not (out / "instances.json").exists()  # DRIVE has no reference instances
    assert load_model(out / "best.pt").network_name == "unet"
    assert read_checkpoint(out / "last.pt")["epoch"] == 2
    client = MlflowClient()
    runs = client.search_runs(
        [client.get_experiment_by_name("drive").experiment_id], filter_string="tags.stage = 'train'", max_results=1
    )
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["network"] == "unet"
    assert {"train_loss", "val_dice", "val_iou", "data_wait_share", "patches_per_s"} <= set(run.data.metrics)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]


def test_deep_supervision_logs_every_head(drive_project: FixtureProject) -> None:
    from mlflow.tracking import MlflowClient

    train("drive", "u2net", profile="smoke", overrides={"epochs": 1})
    assert read_checkpoint(drive_project.root / "models/drive/u2net/best.pt")["network"] == "u2netp"
    client = MlflowClient()
    run = client.search_runs(
        [client.get_experiment_by_name("drive").experiment_id],
        filter_string="tags.stage = 'train' and tags.network = 'u2net'",
        max_results=1,
    )[0]
    assert {f"train_loss_head{i}" for i in range(7)} <= set(run.data.metrics)  # fused + S1..S6


def test_a_crash_marks_the_run_failed(drive_project: FixtureProject, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    import pipeline.training.loop as train_module

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(train_module, "validate", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        train("drive", "unet", profile="smoke")
    client = MlflowClient()
    run = client.search_runs(
        [client.get_experiment_by_name("drive").experiment_id], filter_string="tags.stage = 'train'", max_results=1
    )[0]
    assert run.info.status == "FAILED"


def test_channels_last_trains_like_the_default_layout(drive_project: FixtureProject, tmp_path: Path) -> None:
    """NHWC is a memory layout only: the same losses and validation scores (up to float rounding),
    and the weights are stored in the layout that was asked for."""
    out = drive_project.root / "models" / "drive" / "unet"
    logs, layouts = {}, {}
    for channels_last in (False, True):
        train("drive", "unet", profile="smoke", overrides={"channels_last": channels_last})
        logs[channels_last] = pd.read_csv(out / "log.csv")
        weights = [v for v in read_checkpoint(out / "last.pt")["state_dict"].values() if v.dim() == 4]
        layouts[channels_last] = {
            w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
            for w in weights
            if w.shape[2:] != (1, 1) and w.shape[1] > 1
        }
        os.rename(drive_project.root / "models", tmp_path / f"models-{channels_last}")
    assert layouts == {False: {False}, True: {True}}
    for key in ("train_loss", "val_dice"):
        np.testing.assert_allclose(logs[True][key], logs[False][key], rtol=1e-3)
    with pytest.raises(SegpipeError, match="channels_last must be true or false"):
        resolve_settings(load_train_configs("drive"), "drive", "unet", "smoke", {"channels_last": "yes"})


def _killed_after_epoch_one(
    project: FixtureProject, monkeypatch: pytest.MonkeyPatch, settings: dict
) -> tuple[Path, dict]:
    """A smoke training that dies in its second validation: (last.pt, its state after epoch 1)."""
    import pipeline.training.loop as train_module

    calls = []
    real_validate = train_module.validate

    def dies_at_the_second_validation(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real_validate(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(train_module, "validate", dies_at_the_second_validation)
        with pytest.raises(RuntimeError, match="killed"):
            train("drive", "unet", profile="smoke", overrides=settings)
    last = project.root / "models/drive/unet/last.pt"
    state = read_checkpoint(last)
    assert state["epoch"] == 1
    return last, state


def test_a_resumed_run_continues_the_wall_clock_budget(
    drive_project: FixtureProject, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The killed run's checkpointed wall time counts against `max_minutes`: a run that had
    already used more than its budget stops after one step when resumed (a fresh budget of an hour
    would train the remaining epochs)."""
    settings = {"epochs": 3, "val_every": 1}
    last, state = _killed_after_epoch_one(drive_project, monkeypatch, settings)
    state["log"][-1]["elapsed_seconds"] = 7200.0  # the killed run had used two hours
    torch.save(state, last)
    result = train("drive", "unet", profile="smoke", resume=True, overrides={**settings, "max_minutes": 60})
    assert result.stopped_early and result.epochs == 2
    from mlflow.tracking import MlflowClient

    run = MlflowClient().get_run(read_checkpoint(last)["mlflow_run_id"])
    assert run.data.tags["stopped_by_time_limit"] == "true"
    log = pd.read_csv(drive_project.root / "models/drive/unet/log.csv")
    assert list(log["epoch"]) == [1, 2] and list(log["step"]) == [2, 3]  # one step of epoch 2
    assert log["elapsed_seconds"].iloc[-1] > 7200.0


def test_a_resumed_training_continues_its_mlflow_run(
    drive_project: FixtureProject, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A training interrupted after epoch 1 and resumed is ONE MLflow run holding every epoch's
    metrics at its epoch step; resuming a finished training adds no run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    started = int(time.time() * 1000) - 1

    def train_runs() -> list:
        experiment = client.get_experiment_by_name("drive").experiment_id
        found = client.search_runs([experiment], "tags.stage = 'train' and tags.network = 'unet'", max_results=100)
        return [r for r in found if r.info.start_time >= started]

    settings = {"epochs": 3, "val_every": 1}
    last, state = _killed_after_epoch_one(drive_project, monkeypatch, settings)
    [interrupted] = train_runs()
    assert state["mlflow_run_id"] == interrupted.info.run_id and interrupted.info.status == "FAILED"

    train("drive", "unet", profile="smoke", resume=True, overrides=settings)
    [run] = train_runs()
    assert run.info.run_id == interrupted.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags["resumed_from_epoch"] == "1" and "stopped_by_time_limit" not in run.data.tags
    for metric in ("train_loss", "val_dice", "lr"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, metric)] == [1, 2, 3]
    assert read_checkpoint(last)["mlflow_run_id"] == run.info.run_id

    train("drive", "unet", profile="smoke", resume=True, overrides=settings)  # all epochs done already
    [again] = train_runs()
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2, 3]


def test_bad_settings_are_named(drive_project: FixtureProject) -> None:
    with pytest.raises(SegpipeError, match="optimizer.name must be one of"):
        resolve_settings(load_train_configs("drive"), "drive", "unet", "smoke", {"optimizer": {"name": "lion"}})
    with pytest.raises(SegpipeError, match="no profile 'turbo'"):
        resolve_settings(load_train_configs("drive"), "drive", "unet", "turbo")
    with pytest.raises(SegpipeError, match="batch_size 6 must be a multiple"):
        train("drive", "unet", profile="smoke", overrides={"batch_size": 6})
    with pytest.raises(SegpipeError, match="nothing to resume"):
        train("drive", "unetpp", profile="smoke", resume=True)


@pytest.mark.slow
def test_resume_after_kill_ends_like_an_uninterrupted_run(drive_project: FixtureProject, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    root = drive_project.root
    args = ["train", "drive", "unet", "--profile", "smoke", "--set", "epochs=4", "--set", "steps_per_epoch=3"]
    full = _cli(args, root)
    assert full.wait(timeout=600) == 0, full.stdout.read()
    reference = pd.read_csv(root / "models/drive/unet/log.csv")
    reference_state = read_checkpoint(root / "models/drive/unet/best.pt")["state_dict"]
    os.rename(root / "models", tmp_path / "reference-models")

    killed_at = int(time.time() * 1000) - 1
    killed = _cli(args, root)
    last = root / "models/drive/unet/last.pt"
    deadline = time.monotonic() + 600
    while not last.is_file() and time.monotonic() < deadline and killed.poll() is None:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    done = read_checkpoint(last)["epoch"]
    assert 1 <= done < 4, f"the run was killed after epoch {done}; the test needs an interrupted run"

    resumed = _cli([*args, "--resume"], root)
    assert resumed.wait(timeout=600) == 0, resumed.stdout.read()
    # one MLflow run for the killed and resumed training: reopened (not marked KILLED), every epoch
    client = MlflowClient()
    run = client.get_run(read_checkpoint(last)["mlflow_run_id"])
    assert run.info.status == "FINISHED" and "segpipe.marked_killed" not in run.data.tags
    assert run.info.start_time >= killed_at
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2, 3, 4]
    experiment = client.get_experiment_by_name("drive").experiment_id
    later = [
        r
        for r in client.search_runs([experiment], "tags.stage = 'train'", max_results=100)
        if r.info.start_time >= killed_at
    ]
    assert [r.info.run_id for r in later] == [run.info.run_id]
    log = pd.read_csv(root / "models/drive/unet/log.csv")
    pd.testing.assert_frame_equal(
        log[["epoch", "step", "lr", "train_loss", "val_dice", "val_iou"]],
        reference[["epoch", "step", "lr", "train_loss", "val_dice", "val_iou"]],
        rtol=1e-5,
    )
    state = read_checkpoint(root / "models/drive/unet/best.pt")["state_dict"]
    for key, value in reference_state.items():
        torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_two_gloo_processes_follow_one_process(drive_project: FixtureProject, tmp_path: Path) -> None:
    """Same global batch split over 2 ranks: the same patches, gradients averaged by DDP. Only the
    batch-norm statistics differ (per rank), hence the tolerance."""
    root = drive_project.root
    args = [
        "train",
        "drive",
        "unet",
        "--profile",
        "smoke",
        "--set",
        "epochs=3",
        "--set",
        "steps_per_epoch=3",
        "--set",
        "val_every=10",
        "--set",
        "batch_size=8",
        "--set",
        "max_minutes=100",
    ]  # budget path: ranks share one clock
    single = _cli(args, root)
    assert single.wait(timeout=600) == 0, single.stdout.read()
    one = pd.read_csv(root / "models/drive/unet/log.csv")
    os.rename(root / "models", tmp_path / "single-models")
    ddp = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "pipeline",
            *args,
        ],
        cwd=root,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ddp.returncode == 0, ddp.stdout[-3000:] + ddp.stderr[-3000:]
    two = pd.read_csv(root / "models/drive/unet/log.csv")
    assert list(two["step"]) == list(one["step"])
    np.testing.assert_allclose(two["train_loss"], one["train_loss"], rtol=0.05)
    assert two["train_loss"].iloc[-1] < two["train_loss"].iloc[0]


def test_a_failed_run_never_mixes_its_files_with_the_previous_run(
    drive_project: FixtureProject, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that fails before its first checkpoint gives the previous run's files back; one that
    fails later keeps its own consistent, resumable set and the previous run aside until a run
    succeeds."""
    import pipeline.training.loop as train_module
    from pipeline.training.outputs import PREVIOUS, RUN_FILES

    out = drive_project.root / "models/drive/unet"
    train("drive", "unet", profile="smoke")

    def files(folder: Path) -> dict[str, bytes]:  # instances.json: only on datasets with reference instances
        return {name: (folder / name).read_bytes() for name in RUN_FILES if (folder / name).exists()}

    good = files(out)

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    with monkeypatch.context() as patch:  # fails in the first validation, before last.pt
        patch.setattr(train_module, "validate", broken)
        with pytest.raises(RuntimeError, match="disk on fire"):
            train("drive", "unet", profile="smoke", overrides={"seed": 7})
    assert files(out) == good and not (out / PREVIOUS).exists()

    _killed_after_epoch_one(drive_project, monkeypatch, {"seed": 7})  # fails after epoch 1's last.pt
    assert json.loads((out / "config.json").read_text())["seed"] == 7
    assert read_checkpoint(out / "best.pt")["epoch"] == 1  # this run's (its first validation)
    assert files(out / PREVIOUS) == good
    with monkeypatch.context() as patch:  # the next fresh start drops the failed run, keeps the good one aside
        patch.setattr(train_module, "validate", broken)
        with pytest.raises(RuntimeError, match="disk on fire"):
            train("drive", "unet", profile="smoke", overrides={"seed": 8})
    assert files(out) == good and not (out / PREVIOUS).exists()


def test_a_cell_training_chooses_and_records_its_instance_settings(project: FixtureProject) -> None:
    """The CTC fixture (touching discs, reference instances): best.pt, instances.json and the MLflow run
    carry the instance settings chosen on the validation images by SEG; DRIVE (no instances) has none."""
    from mlflow.tracking import MlflowClient

    from pipeline.postprocessing.instances import InstanceSettings

    prepare_fixture_datasets(project, ("hela",))
    train("hela", "unet", profile="smoke")
    out = project.root / "models" / "hela" / "unet"
    record = read_checkpoint(out / "best.pt")["instances"]
    assert json.loads((out / "instances.json").read_text()) == record
    settings = InstanceSettings.from_dict(record["settings"], "best.pt")
    assert 0 <= record["val_seg"] <= 1 and record["candidates"] > 10
    assert settings.min_size > 0 and settings.halo >= 16  # sized from the fingerprint's median object
    client = MlflowClient()
    run = client.search_runs(
        [client.get_experiment_by_name("hela").experiment_id], filter_string="tags.stage = 'train'", max_results=1
    )[0]
    assert run.data.params["instances.method"] == settings.method and run.data.metrics["val_seg"] == record["val_seg"]


def test_the_border_target_trains_three_classes_and_is_scored_as_cells(project: FixtureProject) -> None:
    """target: border on the CTC fixture: background / interior / border from the instances, a 3-channel
    network whose instance settings may use the border method, evaluated as 1 - P(background) with
    instance maps from its three channels; DRIVE (no instances) refuses the target."""
    from pipeline.postprocessing.instances import BORDER_CLASSES
    from pipeline.postprocessing.planning import candidates
    from pipeline.stages.evaluate import evaluate

    prepare_fixture_datasets(project, ("hela", "drive"))
    train("hela", "unet", profile="smoke", overrides={"target": "border"})
    best = read_checkpoint(project.root / "models" / "hela" / "unet" / "best.pt")
    assert best["out_channels"] == 3 and best["class_names"] == list(BORDER_CLASSES) and best["target"] == "border"
    assert best["instances"]["candidates"] == len(candidates(100.0, 3))  # the border method among them
    metrics = evaluate("hela", "unet")
    assert 0 <= metrics["seg"] <= 1 and 0 <= metrics["dice"] <= 1 and "ap50" in metrics
    with pytest.raises(SegpipeError, match="target 'border' needs reference instances"):
        train("drive", "unet", profile="smoke", overrides={"target": "border"})
