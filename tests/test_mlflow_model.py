"""The best model of `segpipe train` as an MLflow model (pipeline/training/mlflow_model.py): logged
with the train run, registered as segpipe-DATASET-NETWORK, loaded by MLflow (also in a fresh
process, from the model's own copy of the package) and predicting like `pipeline.inference.predict`
after the checkpoint's preprocessing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import mlflow
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline.config import ConfigError
from pipeline.data.prepared import open_prepared
from pipeline.errors import SegpipeError
from pipeline.inference import predict
from pipeline.networks import read_checkpoint
from pipeline.stages.train import train
from pipeline.tracking import tracking_settings
from pipeline.training.mlflow_model import model_signature, read_settings
from pipeline.transforms.presets import preprocess

from fixtures import FixtureProject
from test_train import drive_project  # noqa: F401 (fixture)

NAME = "segpipe-drive-unet"


@pytest.fixture
def store(
    drive_project: FixtureProject,  # noqa: F811 (fixture)
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[MlflowClient]:
    """A store of its own (the registry's versions count from 1), the session's one back afterwards."""
    session_uri = os.environ["MLFLOW_TRACKING_URI"]
    uri = f"sqlite:///{tmp_path / 'registry.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    yield MlflowClient(uri)
    mlflow.set_tracking_uri(session_uri)  # stage_run set the global URI to this store


def set_model_logging(root: Path, log_model: bool, register_model: bool) -> None:
    path = root / "configs" / "tracking.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg.update(log_model=log_model, register_model=register_model)
    path.write_text(yaml.safe_dump(cfg))


def small_image(root: Path) -> np.ndarray:
    """A 64 x 64 RGB image (a prepared DRIVE validation image, mirrored out) as float32 (3, 64, 64)."""
    prepared = open_prepared("drive", root / "data" / "prepared" / "drive")
    image = prepared.load(prepared.cases("val")[0])["image"]
    _, h, w = image.shape
    return np.pad(image, ((0, 0), (0, 64 - h), (0, 64 - w)), mode="reflect").astype(np.float32)


def expected_probabilities(checkpoint: Path, image: np.ndarray, settings_file: Path) -> np.ndarray:
    """`pipeline.inference.predict` on the image preprocessed as the checkpoint records."""
    augment = read_checkpoint(checkpoint)["augment"]
    return predict(checkpoint, preprocess("drive", image, augment), settings=read_settings(settings_file))


def test_training_logs_registers_and_serves_its_best_model(
    store: MlflowClient,
    drive_project: FixtureProject,  # noqa: F811
    tmp_path: Path,
) -> None:
    train("drive", "unet", profile="smoke")
    run = store.search_runs([store.get_experiment_by_name("drive").experiment_id], "tags.stage = 'train'")[0]
    model = store.get_logged_model(run.outputs.model_outputs[0].model_id)
    assert model.name == "model" and model.source_run_id == run.info.run_id
    version = store.get_model_version(NAME, "1")
    assert version.run_id == run.info.run_id
    best = read_checkpoint(drive_project.root / "models/drive/unet/best.pt")
    assert version.tags == {
        "dataset": "drive",
        "network": "unet",
        "architecture": "unet",
        "precision": "fp32",
        "val_dice": f"{best['val_dice']:.6f}",
        "best_epoch": str(best["epoch"]),
    }

    loaded = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    signature = loaded.metadata.signature
    assert signature == model_signature()
    assert [(s.type, s.shape) for s in (*signature.inputs.inputs, *signature.outputs.inputs)] == [
        (np.dtype(np.float32), (-1, -1, -1)),
        (np.dtype(np.uint8), (-1, -1)),
    ]
    assert [(p.name, p.default) for p in signature.params.params] == [("output", "labels"), ("threshold", "0.5")]
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/1", dst_path=str(tmp_path / "model")))
    requirements = (local / "requirements.txt").read_text().split()
    assert "torch==2.13.0" in requirements and not any(r.startswith("dvc") for r in requirements)
    assert (local / "code" / "pipeline" / "training" / "pyfunc_model.py").is_file()
    assert not (local / "python_model.pkl").exists()  # models from code: nothing to unpickle
    checkpoint, settings_file = local / "artifacts" / "best.pt", local / "artifacts" / "inference_settings.json"
    assert checkpoint.read_bytes() == (drive_project.root / "models/drive/unet/best.pt").read_bytes()

    image = small_image(drive_project.root)
    probs = expected_probabilities(checkpoint, image, settings_file)
    labels = loaded.predict(image)
    assert labels.dtype == np.uint8 and labels.shape == (64, 64)
    np.testing.assert_array_equal(labels, (probs[0] >= 0.5).astype(np.uint8))
    np.testing.assert_array_equal(loaded.predict(image, params={"output": "probabilities"}), probs)
    with pytest.raises(mlflow.exceptions.MlflowException, match="output must be one of labels, probabilities"):
        loaded.predict(image, params={"output": "logits"})
    with pytest.raises(mlflow.exceptions.MlflowException, match="does not match expected shape"):
        loaded.predict(image[0])  # (H, W): the signature wants (C, H, W)

    train("drive", "unet", profile="smoke", overrides={"seed": 7})
    assert [v.version for v in store.search_model_versions(f"name = '{NAME}'", order_by=["version_number"])] == [1, 2]
    second = store.get_model_version(NAME, "2")
    assert second.run_id != run.info.run_id and second.tags["val_dice"] == (
        f"{read_checkpoint(drive_project.root / 'models/drive/unet/best.pt')['val_dice']:.6f}"
    )


def test_the_registered_model_loads_in_a_fresh_process(
    store: MlflowClient,
    drive_project: FixtureProject,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Only MLflow and the model's artifacts: the `pipeline` package comes from the model's code/."""
    train("drive", "unet", profile="smoke")
    image = small_image(drive_project.root)
    np.save(tmp_path / "image.npy", image)
    script = (
        "import sys, numpy as np, mlflow\n"
        "sys.path[:] = [p for p in sys.path if p not in ('', {repo!r}, {tests!r})]\n"
        "model = mlflow.pyfunc.load_model('models:/{name}/1')\n"
        "np.save('labels.npy', model.predict(np.load('image.npy')))\n"
        "import pipeline\n"
        "print(pipeline.__file__)\n"
    ).format(repo=str(Path(__file__).resolve().parents[1]), tests=str(Path(__file__).resolve().parent), name=NAME)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SEGPIPE_CONFIG_DIR")}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip().splitlines()[-1]).parts[-3:] == ("code", "pipeline", "__init__.py")
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/1", dst_path=str(tmp_path / "model")))
    probs = expected_probabilities(
        local / "artifacts" / "best.pt", image, local / "artifacts" / "inference_settings.json"
    )
    np.testing.assert_array_equal(np.load(tmp_path / "labels.npy"), (probs[0] >= 0.5).astype(np.uint8))


def test_model_logging_is_switchable_and_fails_the_training_loudly(
    store: MlflowClient,
    drive_project: FixtureProject,  # noqa: F811 (fixture)
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    set_model_logging(drive_project.root, log_model=True, register_model=False)
    train("drive", "unet", profile="smoke", overrides={"epochs": 1})
    run = store.search_runs([store.get_experiment_by_name("drive").experiment_id], "tags.stage = 'train'")[0]
    assert len(run.outputs.model_outputs) == 1 and store.search_registered_models() == []

    set_model_logging(drive_project.root, log_model=False, register_model=False)
    train("drive", "unet", profile="smoke", overrides={"epochs": 1})
    run = store.search_runs(
        [store.get_experiment_by_name("drive").experiment_id], "tags.stage = 'train'", order_by=["start_time DESC"]
    )[0]
    assert run.info.status == "FINISHED" and not run.outputs.model_outputs

    def broken(*args, **kwargs):
        raise mlflow.exceptions.MlflowException("artifact store on fire")

    set_model_logging(drive_project.root, log_model=True, register_model=True)
    with (
        monkeypatch.context() as patch,
        pytest.raises(
            SegpipeError,
            match=r"best\.pt: logging it as an MLflow model \(registry name 'segpipe-drive-unet'\) "
            r"failed \(MlflowException: artifact store on fire\); .* --resume",
        ),
    ):
        patch.setattr(mlflow.pyfunc, "log_model", broken)
        train("drive", "unet", profile="smoke", overrides={"epochs": 1})
    failed = store.search_runs(
        [store.get_experiment_by_name("drive").experiment_id], "tags.stage = 'train'", order_by=["start_time DESC"]
    )[0]
    assert failed.info.status == "FAILED"

    # the training's files were kept: --resume logs and registers the model without training again
    train("drive", "unet", profile="smoke", overrides={"epochs": 1}, resume=True)
    assert store.get_run(failed.info.run_id).info.status == "FINISHED"
    assert store.get_model_version(NAME, "1").run_id == failed.info.run_id


def test_model_settings_are_checked() -> None:
    good = {
        "system_metrics": {"enabled": False, "sampling_interval_seconds": 2},
        "run_groups": False,
        "log_model": True,
        "register_model": True,
    }
    settings = tracking_settings(good, "t.yaml")
    assert settings.log_model and settings.register_model
    with pytest.raises(ConfigError, match="register_model: true needs log_model: true"):
        tracking_settings({**good, "log_model": False}, "t.yaml")
    with pytest.raises(ConfigError, match="log_model must be true or false"):
        tracking_settings({**good, "log_model": "on"}, "t.yaml")
    with pytest.raises(ConfigError, match=r"missing keys \['register_model'\]"):
        tracking_settings({k: v for k, v in good.items() if k != "register_model"}, "t.yaml")
