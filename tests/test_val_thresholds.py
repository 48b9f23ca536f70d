"""Validation thresholds in the checkpoint (issue 13): the histogram best-F1 / best mean Dice thresholds
against the exact ones and a hand-computed case, training storing them (best.pt, last.pt,
thresholds.json, MLflow), `segpipe infer --threshold val / val-dice` on checkpoints and ONNX exports,
its errors, the resume key, and the MLflow pyfunc model's `threshold` param."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import tifffile
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import pipeline.inference.run.predict as streaming
from pipeline.cli import main
from pipeline.config import ConfigError, load_config
from pipeline.data.prepared import open_prepared
from pipeline.inference import export_onnx, inference_network, load_settings
from pipeline.inference.backends.onnx_meta import PREFIX, read_meta
from pipeline.inference.backends.onnx_runtime import onnx_network
from pipeline.inference.run.resume import open_log, run_key
from pipeline.inference.settings import settings_from_config
from pipeline.metrics import best_f1_threshold, confusion, histogram_best_f1, histogram_best_mean_dice, score_histogram
from pipeline.networks import build_network, load_model, read_checkpoint, save_checkpoint
from pipeline.stages.infer import config_settings
from pipeline.training.settings import TrainSettings
from pipeline.training.validation import validate, validation_cases, validation_settings, validation_thresholds

from fixtures import FixtureProject
from test_datasets import add, write_folders

KEYS = {"best_f1", "best_dice", "val_f1", "val_dice", "cases"}


# --- the thresholds from histograms -------------------------------------------------------------


def test_histogram_best_f1_is_the_exact_best_f1_within_the_bin_width() -> None:
    rng = np.random.default_rng(13)
    gt = rng.random(200_000) < 0.3
    scores = np.where(gt, rng.beta(4, 2, gt.size), rng.beta(2, 4, gt.size))
    exact_t, exact_f1 = best_f1_threshold(scores, gt)
    t, f1 = histogram_best_f1(score_histogram(scores, gt))
    assert abs(t - exact_t) <= 1 / 1000 and f1 <= exact_f1 and exact_f1 - f1 < 1e-3
    assert f1 == pytest.approx(confusion(scores >= t, gt).f1, abs=1e-12)  # the counts at the grid are exact
    # scores on the bins' centres: the best threshold is a bin edge, found exactly
    centres = (np.floor(scores * 1000) + 0.5) / 1000
    assert histogram_best_f1(score_histogram(centres, gt)) == pytest.approx(best_f1_threshold(centres, gt), abs=1e-12)
    mask = rng.random(gt.size) < 0.5
    np.testing.assert_array_equal(score_histogram(scores, gt, mask), score_histogram(scores[mask], gt[mask]))


def test_best_mean_dice_on_a_hand_computed_example() -> None:
    """Bins of 0.1 (thresholds 0.1 .. 0.9). Image 1 (scores 0.25, 0.45, 0.75; the last two foreground):
    Dice 4/5 at 0.1-0.2, 1 at 0.3-0.4, 2/3 at 0.5-0.7, 0 at 0.8-0.9. Image 2 (0.35, 0.55; no foreground):
    1 once nothing is predicted (0.6 on), else 0. Mean: .4 .4 .5 .5 1/3 5/6 5/6 .5 .5: best 0.7 (the
    tie with 0.6 goes to the highest). Pooled F1 (2 positives): best 0.8 at 0.4 (TP 2, FP 1)."""
    one = score_histogram(np.array([0.25, 0.45, 0.75]), np.array([False, True, True]), bins=10)
    two = score_histogram(np.array([0.35, 0.55]), np.array([False, False]), bins=10)
    assert histogram_best_mean_dice(np.stack([one, two])) == pytest.approx((0.7, 5 / 6))
    assert histogram_best_f1(one + two) == pytest.approx((0.4, 0.8))
    assert validation_thresholds(np.stack([one, two])) == pytest.approx(
        {"best_f1": 0.4, "best_dice": 0.7, "val_f1": 0.8, "val_dice": 5 / 6, "cases": 2}
    )
    assert validation_thresholds(np.stack([two])) is None and validation_thresholds(None) is None


# --- training stores them -----------------------------------------------------------------------


def _no_model_logging(project: FixtureProject) -> None:
    """The MLflow model is tested in test_mlflow_model.py; here the pyfunc class is used directly."""
    tracking = project.root / "configs" / "tracking.yaml"
    tracking.write_text(
        tracking.read_text()
        .replace("log_model: true", "log_model: false")
        .replace("register_model: true", "register_model: false")
    )


def test_training_stores_thresholds_that_infer_and_the_pyfunc_model_use(
    project: FixtureProject, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _no_model_logging(project)
    assert add("two", write_folders(project.root / "mine"), "--classes", "background,vessel") == 0
    assert main(["prepare", "two"]) == 0
    assert main(["train", "two", "unet", "--profile", "smoke"]) == 0
    out = project.root / "models" / "two" / "unet"
    best, last = read_checkpoint(out / "best.pt"), read_checkpoint(out / "last.pt")
    thresholds = best["thresholds"]
    assert set(thresholds) == KEYS and all(0 < thresholds[k] < 1 for k in ("best_f1", "best_dice"))
    assert json.loads((out / "thresholds.json").read_text()) == thresholds
    assert last["best"]["thresholds"] == thresholds
    assert set(last["thresholds"]) == KEYS  # those of its own epoch, validated as the last one
    if best["epoch"] == last["epoch"]:
        assert last["thresholds"] == thresholds

    # the thresholds of best.pt's own validation: the same probabilities, histograms and picks again
    prepared = open_prepared("two", project.root / "data" / "prepared" / "two")
    cases = validation_cases(prepared, TrainSettings.from_dict(json.loads((out / "config.json").read_text())))
    result = validate(load_model(out / "best.pt"), cases, validation_settings(config_settings(), torch.device("cpu")))
    assert validation_thresholds(result.histograms) == thresholds and thresholds["cases"] == len(cases)

    client = MlflowClient()
    run = client.search_runs([client.get_experiment_by_name("two").experiment_id], "tags.stage = 'train'")[0]
    assert run.data.metrics["val_threshold_best_f1"] == pytest.approx(thresholds["best_f1"])
    assert run.data.metrics["val_dice_at_best_dice"] == pytest.approx(thresholds["val_dice"])

    # segpipe infer --threshold val / val-dice: the label map is probability >= the stored threshold
    image = project.root / "mine" / "images" / "slice_00.png"
    for name, key in (("val", "best_f1"), ("val-dice", "best_dice")):
        target = tmp_path / name
        assert (
            main(
                [
                    "infer",
                    "--model",
                    str(out / "best.pt"),
                    "--input",
                    str(image),
                    "--output",
                    str(target),
                    "--threshold",
                    name,
                    "--save-probabilities",
                    "--probabilities-dtype",
                    "float32",
                    "--no-progress",
                ]
            )
            == 0
        )
        assert f"threshold {name} = {thresholds[key]:g} ({key} on {len(cases)} validation" in capsys.readouterr().out
        probs = tifffile.imread(target / "slice_00_prob.tif")
        np.testing.assert_array_equal(tifffile.imread(target / "slice_00_seg.tif"), probs >= thresholds[key])

    # the pyfunc model: params={"threshold": ...}, by default the settings' threshold
    from pipeline.training.mlflow_model import write_settings
    from pipeline.training.pyfunc_model import SegmentationModel

    settings_file = tmp_path / "inference_settings.json"
    write_settings(load_settings(config_settings(), preprocess="checkpoint", intensity="none"), settings_file)
    model = SegmentationModel()
    model.load_context(SimpleNamespace(artifacts={"checkpoint": str(out / "best.pt"), "settings": str(settings_file)}))
    array = prepared.load(prepared.cases("val")[0])["image"].astype(np.float32)
    probs = model.predict(None, array, params={"output": "probabilities"})[0]
    np.testing.assert_array_equal(
        model.predict(None, array, params={"threshold": "val"}), probs >= thresholds["best_f1"]
    )
    np.testing.assert_array_equal(model.predict(None, array, params={"threshold": "0.3"}), probs >= 0.3)
    np.testing.assert_array_equal(model.predict(None, array), probs >= 0.5)
    with pytest.raises(MlflowException, match="param threshold: threshold must be a number in"):
        model.predict(None, array, params={"threshold": "best"})


# --- segpipe infer on crafted checkpoints -------------------------------------------------------


def _checkpoint(path: Path, out_channels: int = 1, thresholds: dict[str, Any] | None = None) -> Path:
    """A tiny same-padding U-Net (the same weights for every call), with `thresholds` if given."""
    torch.manual_seed(0)
    net = build_network("unet", 1, out_channels, padding="same", base_width=2, depth=1, batch_norm=False, dropout=0.0)
    return save_checkpoint(net, path, **({} if thresholds is None else {"thresholds": thresholds}))


def _image(path: Path) -> Path:
    tifffile.imwrite(path, np.random.default_rng(0).integers(0, 200, (40, 48)).astype(np.uint8))
    return path


def _infer(capsys: pytest.CaptureFixture[str], model: Path, image: Path, out: Path, *extra: str) -> tuple[int, str]:
    """`segpipe infer` with float32 probabilities: (exit code, stdout + stderr)."""
    code = main(
        [
            "infer",
            "--model",
            str(model),
            "--input",
            str(image),
            "--output",
            str(out),
            "--tile",
            "16",
            "--save-probabilities",
            "--probabilities-dtype",
            "float32",
            "--no-progress",
            *extra,
        ]
    )
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _outputs(out: Path, stem: str = "image") -> tuple[np.ndarray, np.ndarray]:
    return tifffile.imread(out / f"{stem}_seg.tif"), tifffile.imread(out / f"{stem}_prob.tif")


def test_threshold_val_uses_the_checkpoint_threshold_and_keys_the_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    image = _image(tmp_path / "image.tif")
    assert _infer(capsys, _checkpoint(tmp_path / "plain.pt"), image, tmp_path / "plain")[0] == 0
    _, probs = _outputs(tmp_path / "plain")
    t, t_dice = float(np.quantile(probs, 0.5)), float(np.quantile(probs, 0.25))
    assert ((probs >= t) != (probs >= 0.5)).any()  # a threshold that changes the label map
    recorded = {"best_f1": t, "best_dice": t_dice, "val_f1": 0.9, "val_dice": 0.8, "cases": 4}
    ckpt = _checkpoint(tmp_path / "val.pt", thresholds=recorded)

    keys: list[dict[str, Any]] = []
    monkeypatch.setattr(streaming, "run_key", lambda *a: keys.append(run_key(*a)) or keys[-1])
    code, said = _infer(capsys, ckpt, image, tmp_path / "val", "--threshold", "val")
    assert code == 0 and f"threshold val = {t:g} (best_f1 on 4 validation image(s), recorded in {ckpt})" in said
    labels, probs = _outputs(tmp_path / "val")
    np.testing.assert_array_equal(labels, probs >= t)
    assert keys[-1]["settings"]["threshold"] == t  # the resolved number keys the resume
    assert _infer(capsys, ckpt, image, tmp_path / "dice", "--threshold", "val-dice")[0] == 0
    labels, probs = _outputs(tmp_path / "dice")
    np.testing.assert_array_equal(labels, probs >= t_dice)
    assert keys[-1]["settings"]["threshold"] == t_dice

    # a killed run's progress at another threshold does not apply: the key differs, the run starts over
    settings = load_settings(None, tile=16)
    net = inference_network(ckpt, settings)
    target = [(tmp_path / "resume" / "image_seg.tif", "tiff")]
    at = {
        x: run_key(image, (1, 40, 48), "uint8", net, load_settings(settings, threshold=x), target, ["a", "b"], None)
        for x in (0.3, 0.6)
    }
    assert at[0.3] != at[0.6]
    target[0][0].parent.mkdir()
    open_log(target[0][0], at[0.3], [(1, 48, np.dtype(np.uint8))], 40)
    _, note = open_log(target[0][0], at[0.6], [(1, 48, np.dtype(np.uint8))], 40)
    assert note is not None and "started over" in note and "threshold 0.3 -> 0.6" in note


def test_threshold_val_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = _image(tmp_path / "image.tif")
    plain = _checkpoint(tmp_path / "plain.pt")
    code, said = _infer(capsys, plain, image, tmp_path / "a", "--threshold", "val")
    assert code == 2 and f"{plain}: records no validation thresholds" in said and "--threshold 0.5" in said
    three = _checkpoint(tmp_path / "three.pt", out_channels=3, thresholds={"best_f1": 0.3, "best_dice": 0.3})
    code, said = _infer(capsys, three, image, tmp_path / "b", "--threshold", "val-dice")
    assert code == 2 and f"{three}: threshold 'val-dice' applies to two-class" in said and "3 classes" in said
    assert _infer(capsys, three, image, tmp_path / "c", "--threshold", "0.3")[0] == 0  # argmax: a number is unused
    code, said = _infer(capsys, plain, image, tmp_path / "d", "--threshold", "best")
    assert code == 2 and "--threshold: threshold must be a number in (0, 1), 'val' or 'val-dice', got 'best'" in said
    assert _infer(capsys, plain, image, tmp_path / "e", "--threshold", "1")[0] == 2

    config = load_config("inference")
    config["output"]["threshold"] = "val-dice"
    assert settings_from_config(config, "configs/inference.yaml").threshold == "val-dice"
    config["output"]["threshold"] = "best"
    with pytest.raises(ConfigError, match=r"configs/inference.yaml: threshold must be a number in \(0, 1\), 'val'"):
        settings_from_config(config, "configs/inference.yaml")


def test_onnx_export_carries_the_thresholds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import onnx

    recorded = {"best_f1": 0.4, "best_dice": 0.45, "val_f1": 0.9, "val_dice": 0.8, "cases": 4}
    model = export_onnx(_checkpoint(tmp_path / "val.pt", thresholds=recorded), tmp_path / "val.onnx")
    props = {p.key: p.value for p in onnx.load(str(model)).metadata_props}
    assert json.loads(props[PREFIX + "thresholds"]) == recorded
    assert read_meta(props, str(model)).thresholds == recorded
    assert onnx_network(model, load_settings(None)).thresholds == recorded
    del props[PREFIX + "thresholds"]  # an export of an older segpipe
    assert read_meta(props, str(model)).thresholds is None

    image = _image(tmp_path / "image.tif")
    code, said = _infer(capsys, model, image, tmp_path / "out", "--threshold", "val")
    assert code == 0 and f"threshold val = 0.4 (best_f1 on 4 validation image(s), recorded in {model})" in said
    labels, probs = _outputs(tmp_path / "out")
    np.testing.assert_array_equal(labels, probs >= 0.4)
    code, said = _infer(
        capsys,
        export_onnx(_checkpoint(tmp_path / "plain.pt"), tmp_path / "plain.onnx"),
        image,
        tmp_path / "plain",
        "--threshold",
        "val",
    )
    assert code == 2 and "plain.onnx: records no validation thresholds" in said
