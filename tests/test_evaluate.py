"""`segpipe evaluate`: files, metrics against pipeline.metrics, thresholds, heads, MLflow, errors.

Tiny synthetic prepared datasets (64 x 64) and tiny networks; `predict` is replaced by an oracle
or a fixed function of the image where the metrics themselves are under test.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from pipeline.config import REPO_ROOT, load_config
from pipeline.data.io import write_volume
from pipeline.data.prepared import open_prepared
from pipeline.errors import SegpipeError
from pipeline.evaluation import evaluate as ev
from pipeline.evaluation.heads import multi_head_scores
from pipeline.evaluation.overlays import overlay
from pipeline.evaluation.settings import evaluate_config
from pipeline.inference import inference_network, load_settings, predict
from pipeline.metrics import (
    best_f1_threshold,
    confusion,
    foreground,
    label_instances,
    mae,
    max_f_beta,
    roc_auc,
    roc_curve,
    seg_jaccards,
)
from pipeline.networks import build_network, load_model, save_checkpoint
from pipeline.networks.u2net import U2NetSides
from pipeline.preprocessing.prepare import separate_touching
from pipeline.stages.evaluate import evaluate as run_evaluate
from pipeline.transforms.presets import preprocess

from fixtures import FlipAveraged

SIZE = 64
SPLITS = {"train": 2, "val": 2, "test": 3}


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tmp_path as the working directory with a copy of configs/ (tile 64, 2 overlays) in force."""
    shutil.copytree(REPO_ROOT / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SEGPIPE_CONFIG_DIR", str(tmp_path / "configs"))
    set_eval_config(tmp_path, overlays=2, curve_points=50, inference={"tile": SIZE})
    return tmp_path


def set_eval_config(root: Path, **changes: Any) -> None:
    path = root / "configs" / "evaluate.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg.update(changes)
    path.write_text(yaml.safe_dump(cfg))


def drive_case(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """RGB uint8 image whose red channel is 255 on the vessels (an oracle can read the label off
    the normalised image), a disk FOV, and a second observer that disagrees on a few pixels."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    fov = ((yy - 31.5) ** 2 + (xx - 31.5) ** 2 <= 30**2).astype(np.uint8)
    label = np.zeros((SIZE, SIZE), np.uint8)
    for _ in range(3):
        r, w = rng.integers(8, SIZE - 12), rng.integers(1, 4)
        if rng.random() < 0.5:
            label[r : r + w, :] = 1
        else:
            label[:, r : r + w] = 1
    label *= fov
    image = rng.integers(0, 256, (3, SIZE, SIZE), dtype=np.uint8)
    image[0] = label * 255
    label2 = label.copy()
    flip = rng.random((SIZE, SIZE)) < 0.05
    label2[flip] = 1 - label2[flip]
    return {"image": image, "label": label[None], "fov": fov[None], "label2": label2[None]}


def cell_case(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """16-bit image of disks (two touching), instance ids, label = foreground without touching borders."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    inst = np.zeros((SIZE, SIZE), np.uint16)
    centres = [(16, 16), (16, 30), (44, 40 + int(rng.integers(-4, 4)))]
    for i, (cy, cx) in enumerate(centres, start=1):
        inst[(yy - cy) ** 2 + (xx - cx) ** 2 <= 8**2] = i
    label = separate_touching(inst)
    image = (rng.normal(1000, 30, (SIZE, SIZE)) + 2000.0 * label).clip(0, 65535).astype(np.uint16)
    return {"image": image[None], "label": label[None], "instances": inst[None]}


def make_prepared(
    root: Path,
    dataset: str,
    maker: Callable[[np.random.Generator], dict[str, np.ndarray]],
    splits: dict[str, int] = SPLITS,
) -> Path:
    """data/prepared/<dataset> as `segpipe prepare` writes it (manifest.csv, stats.json, NIfTI)."""
    out = root / "data" / "prepared" / dataset
    rng = np.random.default_rng(7)
    rows = []
    for split, n in splits.items():
        for i in range(n):
            case = f"{split}_{i:02d}"
            vols = maker(rng)
            vols["weight"] = np.ones((1, SIZE, SIZE), np.float32)
            entry = {"case": case, "split": split}
            for role, array in vols.items():
                rel = f"{role}/{case}.nii.gz"
                write_volume(out / rel, array)
                entry[role] = rel
            rows.append(entry)
    columns = ["case", "split", "image", "label", "weight", "fov", "instances", "label2"]
    pd.DataFrame(rows, columns=columns).to_csv(out / "manifest.csv", index=False)
    (out / "stats.json").write_text(json.dumps({"dataset": dataset, "splits": splits}))
    return out


def augment(dataset: str) -> dict[str, Any]:
    """The checkpoints' preprocessing: configs/augment.yaml's section with every channel kept and no
    CLAHE, so the test images reach the network (and the oracles) with all their channels."""
    section = dict(load_config("augment")[dataset])
    section.update({key: None for key in ("channels", "clahe") if key in section})
    return section


def make_checkpoint(root: Path, dataset: str, key: str, name: str, in_channels: int, **config: Any) -> Path:
    """models/<dataset>/<key>/best.pt with the extra keys `segpipe train` writes."""
    torch.manual_seed(0)
    net = build_network(name, in_channels, 1, **config)
    path = root / "models" / dataset / key / "best.pt"
    save_checkpoint(
        net, path, dataset=dataset, network_key=key, profile="smoke", epoch=3, val_dice=0.5, augment=augment(dataset)
    )
    return path


UNET = {"base_width": 4, "depth": 2, "padding": "same", "batch_norm": True}


@pytest.fixture
def drive(work: Path) -> Path:
    make_prepared(work, "drive", drive_case)
    make_checkpoint(work, "drive", "unet", "unet", 3, **UNET)
    return work


def fake_predict(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[..., np.ndarray]:
    """A stand-in for `predict` returning fn(preprocessed image (C, H, W)) as probabilities (1, H, W)."""

    def run(model: Any, image: np.ndarray, **kwargs: Any) -> np.ndarray:
        assert kwargs["settings"].intensity == "none"
        return fn(np.asarray(image)).astype(np.float32)[None]

    return run


def cases(dataset: str, split: str) -> list[dict[str, Any]]:
    return open_prepared(dataset, Path("data/prepared") / dataset).load_split(split)


def scores_of(dataset: str, case: dict[str, Any], fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    return fn(preprocess(dataset, case["image"], augment(dataset))).astype(np.float32)


def last_run(dataset: str, network: str) -> Any:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    experiment = client.get_experiment_by_name(dataset)
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.stage = 'evaluate' and tags.network = '{network}'",
        order_by=["start_time DESC"],
        max_results=1,
    )
    return runs[0]


def test_oracle_gives_perfect_scores_and_all_files(drive: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    oracle = lambda x: (x[0] > 0).astype(np.float32)  # noqa: E731 - red channel > its mean = vessel
    monkeypatch.setattr(ev, "predict", fake_predict(oracle))
    seen: list[Any] = []
    monkeypatch.setattr(ev, "preprocess", lambda d, image, aug: seen.append(aug) or preprocess(d, image, aug))
    m = run_evaluate("drive", "unet", models_dir=drive / "models", results_dir=drive / "results")
    assert len(seen) == 5 and all(a == augment("drive") for a in seen)  # the checkpoint's preprocessing
    out = drive / "results" / "drive" / "unet"
    timings = json.loads((out / "timings.json").read_text())
    assert set(timings) == {"inference_seconds", "seconds"} and all(v > 0 for v in timings.values())
    assert {**json.loads((out / "metrics.json").read_text()), **timings} == m  # no timing in metrics.json
    for key in (
        "dice",
        "iou",
        "pooled_f1",
        "mean_f1",
        "pooled_auc",
        "mean_auc",
        "pooled_accuracy",
        "pooled_sensitivity",
        "pooled_specificity",
        "dice_best",
        "pooled_f1_best",
        "maxf",
    ):
        assert m[key] == pytest.approx(1.0), key
    assert m["mae"] == pytest.approx(0.0)
    assert m["network"] == "unet" and m["network_used"] == "unet" and m["test_images"] == 3
    assert m["checkpoint_epoch"] == 3 and m["threshold"] == 0.5 and 0 < m["threshold_best"] <= 1

    table = pd.read_csv(out / "per_image.csv")
    assert list(table["case"]) == ["test_00", "test_01", "test_02"]
    for column in (
        "dice",
        "iou",
        "f1",
        "accuracy",
        "sensitivity",
        "specificity",
        "precision",
        "auc",
        "mae",
        "dice_best",
        "observer2_f1",
        "observer2_accuracy",
        "seconds",
    ):
        assert column in table.columns, column
    assert "seg" not in table.columns
    assert (out / "heads.csv").read_text().strip() == "head,dice,iou"  # U-Net: no heads

    # second observer vs the reference, inside the FOV, by hand
    tests = cases("drive", "test")
    by_hand = [confusion(c["label2"][0], c["label"][0], c["fov"][0]) for c in tests]
    assert table["observer2_f1"].tolist() == pytest.approx([c.f1 for c in by_hand])
    tp, fp, fn = (sum(getattr(c, k) for c in by_hand) for k in ("tp", "fp", "fn"))
    assert m["observer2_pooled_f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert 0 < m["observer2_pooled_f1"] < 1

    assert list(pd.read_csv(out / "roc.csv").columns) == ["fpr", "tpr"]
    assert list(pd.read_csv(out / "pr.csv").columns) == ["recall", "precision"]
    pngs = sorted(p.name for p in (out / "overlays").iterdir())
    assert pngs == ["test_00.png", "test_01.png"]
    import imageio.v3 as iio

    rgb = iio.imread(out / "overlays" / "test_00.png")
    assert rgb.shape == (SIZE, SIZE, 3) and rgb.dtype == np.uint8
    vessel = tests[0]["label"][0].astype(bool)
    assert (rgb[vessel][:, 1] > rgb[vessel][:, 0]).all()  # true positives are green
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left

    run = last_run("drive", "unet")
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test_dice"] == pytest.approx(1.0)
    assert run.data.metrics["test_pooled_auc"] == pytest.approx(1.0)
    assert run.data.params["evaluate.threshold"] == "0.5"
    assert run.data.params["checkpoint.network"] == "unet"
    from mlflow.tracking import MlflowClient

    artifacts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}
    assert {"metrics.json", "per_image.csv", "roc.csv", "pr.csv", "overlays"} <= artifacts
    assert "heads.csv" not in artifacts


def test_all_zero_prediction(drive: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ev, "predict", fake_predict(lambda x: np.zeros(x.shape[1:])))
    set_eval_config(drive, val_threshold=False, overlays=0)
    m = run_evaluate("drive", "unet", models_dir=drive / "models", results_dir=drive / "results")
    assert m["dice"] == 0 and m["iou"] == 0 and m["pooled_f1"] == 0 and m["pooled_sensitivity"] == 0
    assert m["pooled_specificity"] == 1 and m["pooled_precision"] is None  # nothing predicted: undefined
    assert m["pooled_auc"] == pytest.approx(0.5) and m["mean_auc"] == pytest.approx(0.5)
    assert "threshold_best" not in m and "dice_best" not in m
    assert not list((drive / "results" / "drive" / "unet" / "overlays").iterdir())


def test_a_killed_evaluations_folders_go_and_overlays_look_like_any_folder(
    drive: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A killed evaluate leaves its temp overlay folder: the next one removes it (this host, dead pid);
    overlays/ gets the mode of a new folder, not mkdtemp's 0700."""
    import subprocess

    from pipeline.files import file_mode, temp_prefix

    out = drive / "results" / "drive" / "unet"
    out.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = out / (temp_prefix().replace(f"-{os.getpid()}-", f"-{dead.pid}-") + "x.overlays")
    stale.mkdir()
    (stale / "test_00.png").write_bytes(b"half")
    alive = out / (temp_prefix() + "y.overlays")  # a live process's (ours): kept
    alive.mkdir()
    monkeypatch.setattr(ev, "predict", fake_predict(lambda x: np.zeros(x.shape[1:])))
    run_evaluate("drive", "unet", models_dir=drive / "models", results_dir=drive / "results")
    assert not stale.exists() and alive.exists()
    assert (out / "overlays").stat().st_mode & 0o777 == file_mode(directory=True)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [alive.name]


def test_metrics_match_pipeline_metrics(drive: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Continuous scores: every number recomputed with pipeline.metrics on the same predictions."""
    fn = lambda x: 1 / (1 + np.exp(-(x[0] + 0.8 * x[1])))  # noqa: E731 - informative but imperfect
    monkeypatch.setattr(ev, "predict", fake_predict(fn))
    m = run_evaluate("drive", "unet", models_dir=drive / "models", results_dir=drive / "results")
    out = drive / "results" / "drive" / "unet"
    table = pd.read_csv(out / "per_image.csv")

    val = cases("drive", "val")
    t_best, f1_val = best_f1_threshold(
        np.concatenate([scores_of("drive", c, fn)[c["fov"][0] > 0] for c in val]),
        np.concatenate([c["label"][0][c["fov"][0] > 0] for c in val]),
    )
    assert m["threshold_best"] == pytest.approx(t_best) and m["val_best_f1"] == pytest.approx(f1_val)
    assert t_best != pytest.approx(0.5)

    tests = cases("drive", "test")
    scores = [scores_of("drive", c, fn) for c in tests]
    for i, (c, s) in enumerate(zip(tests, scores)):
        gt, fov = c["label"][0], c["fov"][0]
        at = confusion(s >= 0.5, gt, fov)
        best = confusion(s >= t_best, gt, fov)
        assert table.at[i, "dice"] == pytest.approx(at.dice)
        assert table.at[i, "iou"] == pytest.approx(at.iou)
        assert table.at[i, "sensitivity"] == pytest.approx(at.sensitivity)
        assert table.at[i, "dice_best"] == pytest.approx(best.dice)
        assert table.at[i, "auc"] == pytest.approx(roc_auc(s, gt, fov))
        assert table.at[i, "mae"] == pytest.approx(mae(s, gt, fov), rel=1e-5)
    assert m["dice"] == pytest.approx(table["dice"].mean())
    assert m["mean_f1_best"] == pytest.approx(table["f1_best"].mean())
    pooled_s = np.concatenate([s[c["fov"][0] > 0] for c, s in zip(tests, scores)])
    pooled_g = np.concatenate([c["label"][0][c["fov"][0] > 0] for c in tests])
    assert m["pooled_auc"] == pytest.approx(roc_auc(pooled_s, pooled_g))
    assert m["pooled_f1_best"] == pytest.approx(confusion(pooled_s >= t_best, pooled_g).f1)
    assert m["pooled_accuracy"] == pytest.approx(confusion(pooled_s >= 0.5, pooled_g).accuracy)
    assert m["maxf"] == pytest.approx(
        max_f_beta([s for s in scores], [c["label"][0] for c in tests], [c["fov"][0] for c in tests])[0]
    )
    fpr, tpr, _ = roc_curve(pooled_s, pooled_g, max_points=50)
    roc = pd.read_csv(out / "roc.csv")
    assert len(roc) == len(fpr) <= 50
    assert roc["fpr"].to_numpy() == pytest.approx(fpr) and roc["tpr"].to_numpy() == pytest.approx(tpr)


def test_val_threshold_is_applied_to_test(drive: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Scores 0.3 on vessels: nothing at 0.5, everything at the threshold picked on validation."""
    monkeypatch.setattr(ev, "predict", fake_predict(lambda x: 0.3 * (x[0] > 0)))
    m = run_evaluate("drive", "unet", models_dir=drive / "models", results_dir=drive / "results")
    assert m["dice"] == 0 and m["dice_best"] == pytest.approx(1.0)
    assert 0 < m["threshold_best"] <= 0.3 and m["val_best_f1"] == pytest.approx(1.0)


def test_real_network_end_to_end_and_report(drive: Path) -> None:
    m = run_evaluate("drive", "unet", models_dir=drive / "models", results_dir=drive / "results")
    table = pd.read_csv(drive / "results" / "drive" / "unet" / "per_image.csv")
    model = load_model(drive / "models" / "drive" / "unet" / "best.pt")
    settings = load_settings(tile=SIZE, intensity="none")
    for i, c in enumerate(cases("drive", "test")):
        x = preprocess("drive", c["image"], augment("drive"))
        s = predict(model, x, settings=settings)[0]
        assert table.at[i, "dice"] == pytest.approx(confusion(s >= 0.5, c["label"][0], c["fov"][0]).dice)
    assert (table["seconds"] > 0).all() and m["inference_seconds"] > 0
    run = last_run("drive", "unet")
    assert run.info.status == "FINISHED" and run.data.metrics["test_dice"] == pytest.approx(m["dice"])
    assert run.data.metrics["test_iou"] == pytest.approx(m["iou"])

    from pipeline.stages.report import report

    md = report(drive / "results", models_dir=drive / "models").read_text()
    assert f"| drive | unet | unet | {m['dice']:.4f} | {m['iou']:.4f} |" in md
    assert "| drive | 2nd observer |" in md


def test_unetpp_heads_per_level(work: Path) -> None:
    make_prepared(work, "drive", drive_case, {"train": 1, "val": 1, "test": 2})
    path = make_checkpoint(work, "drive", "unetpp", "unetpp", 3, base_width=2, depth=4, batch_norm=True)
    m = run_evaluate("drive", "unetpp", models_dir=work / "models", results_dir=work / "results")
    heads = pd.read_csv(work / "results" / "drive" / "unetpp" / "heads.csv")
    assert list(heads["head"]) == ["L1", "L2", "L3", "L4"]
    assert list(heads.columns) == ["head", "dice", "iou", "seconds", "parameters"]
    assert heads["parameters"].is_monotonic_increasing and heads["parameters"].nunique() == 4
    assert (heads["seconds"] > 0).all()
    # L2 by hand: the pruned network in fast mode through predict
    pruned = load_model(path, prune_level=2, mode="fast")
    settings = load_settings(tile=SIZE, intensity="none")
    dices = []
    for c in cases("drive", "test"):
        x = preprocess("drive", c["image"], augment("drive"))
        dices.append(confusion(predict(pruned, x, settings=settings)[0] >= 0.5, c["label"][0], c["fov"][0]).dice)
    assert heads.loc[1, "dice"] == pytest.approx(np.mean(dices))
    assert m["head_L2_dice"] == pytest.approx(np.mean(dices)) and m["head_L4_seconds"] > 0
    run = last_run("drive", "unetpp")
    assert run.data.metrics["head_L1_dice"] == pytest.approx(heads.loc[0, "dice"])
    assert "head_L4_iou" in run.data.metrics


def test_u2net_side_outputs_and_fused(work: Path) -> None:
    make_prepared(work, "drive", drive_case, {"train": 1, "val": 1, "test": 2})
    path = make_checkpoint(work, "drive", "u2net", "u2netp", 3)
    m = run_evaluate("drive", "u2net", models_dir=work / "models", results_dir=work / "results")
    assert m["network"] == "u2net" and m["network_used"] == "u2netp"
    heads = pd.read_csv(work / "results" / "drive" / "u2net" / "heads.csv")
    assert list(heads["head"]) == ["S1", "S2", "S3", "S4", "S5", "S6", "fused"]
    assert list(heads.columns) == ["head", "dice", "iou"]
    assert {"side_1_dice", "side_6_iou", "fused_dice"} <= set(m)
    assert "maxf" in m and "mae" in m

    model = load_model(path)
    settings = load_settings(tile=SIZE, intensity="none")
    c = cases("drive", "test")[0]
    x = preprocess("drive", c["image"], augment("drive"))
    heads_net = U2NetSides(model)
    per_head = multi_head_scores(inference_network(heads_net, settings), x, settings, 7)
    assert per_head.shape == (7, SIZE, SIZE)
    # the fused channel is the network's eval output through the project's predict, also with
    # several blended windows (48 on 64: overlapping, the last one shifted back) and flip TTA
    np.testing.assert_allclose(per_head[6], predict(model, x, settings=settings)[0], atol=1e-4)
    blended = load_settings(tile=48, overlap=0.5, intensity="none")
    flipped = load_settings(blended, tta=["h", "hv"])
    np.testing.assert_allclose(
        multi_head_scores(inference_network(heads_net, flipped), x, flipped, 7)[6],
        predict(FlipAveraged(model, [(-1,), (-2, -1)]), x, settings=blended)[0],
        atol=1e-4,
    )
    # the six side channels are exactly what the fuse conv combines (order S1..S6), eval-mode BN
    with torch.inference_mode():
        logits = heads_net(torch.from_numpy(x)[None])
        np.testing.assert_allclose(model.fuse(logits[:, :6]).numpy(), logits[:, 6:].numpy(), atol=1e-5)
    assert not model.training
    run = last_run("drive", "u2net")
    assert run.data.metrics["fused_dice"] == pytest.approx(heads.loc[6, "dice"])
    assert run.data.metrics["side_3_dice"] == pytest.approx(heads.loc[2, "dice"])


def test_cells_seg_measure(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_prepared(work, "u373", cell_case)
    make_checkpoint(work, "u373", "unet", "unet", 1, **UNET)
    oracle = lambda x: (x[0] > 0.5).astype(np.float32)  # noqa: E731 - percentile-normalised: cells ~1
    monkeypatch.setattr(ev, "predict", fake_predict(oracle))
    m = run_evaluate("u373", "unet", models_dir=work / "models", results_dir=work / "results")
    table = pd.read_csv(work / "results" / "u373" / "unet" / "per_image.csv")
    tests = cases("u373", "test")
    jaccards = [seg_jaccards(label_instances(scores_of("u373", c, oracle) >= 0.5), c["instances"][0])[1] for c in tests]
    assert m["seg"] == pytest.approx(np.concatenate(jaccards).mean())
    assert table["seg"].tolist() == pytest.approx([j.mean() for j in jaccards])
    assert 0.5 < m["seg"] < 1  # the touching borders removed from the label cost a little Jaccard
    assert m["dice"] == pytest.approx(1.0) and "seg_best" in m
    assert not any(k.startswith("observer2") for k in m)
    pngs = list((work / "results" / "u373" / "unet" / "overlays").iterdir())
    assert len(pngs) == 2


def test_missing_checkpoint_names_file_and_command(work: Path) -> None:
    make_prepared(work, "drive", drive_case)
    with pytest.raises(SegpipeError, match=r"models/drive/unetpp/best\.pt.*segpipe train drive unetpp"):
        run_evaluate("drive", "unetpp", models_dir=work / "models", results_dir=work / "results")


def test_failure_marks_run_failed_and_writes_nothing(work: Path) -> None:
    make_prepared(work, "drive", drive_case)
    make_checkpoint(work, "drive", "unet", "unet", 1, **UNET)  # 1 input channel for RGB images
    with pytest.raises(SegpipeError, match="channel"):
        run_evaluate("drive", "unet", models_dir=work / "models", results_dir=work / "results")
    assert last_run("drive", "unet").info.status == "FAILED"
    out = work / "results" / "drive" / "unet"
    assert not out.exists() or not list(out.iterdir())


def test_config_is_checked(work: Path) -> None:
    set_eval_config(work, threshold=1.5)
    with pytest.raises(SegpipeError, match=r"evaluate\.yaml: threshold must be a finite number > 0 and < 1"):
        evaluate_config(load_config("evaluate"), "configs/evaluate.yaml")
    set_eval_config(work, threshold=0.5, overlays=-1)
    with pytest.raises(SegpipeError, match="overlays"):
        evaluate_config(load_config("evaluate"), "configs/evaluate.yaml")
    with pytest.raises(SegpipeError, match="overlays"):  # the stage reads the file and stops before any work
        run_evaluate("drive", "unet", models_dir=work / "models", results_dir=work / "results")
    set_eval_config(work, overlays=2, inference={"tile": 64})
    cfg = evaluate_config(load_config("evaluate"), "configs/evaluate.yaml")  # typed, frozen settings
    assert (cfg.threshold, cfg.overlays, dict(cfg.inference)) == (0.5, 2, {"tile": 64})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.threshold = 0.3  # type: ignore[misc]


def test_foreground_of_softmax_outputs() -> None:
    probs = np.array([[[0.7, 0.1]], [[0.2, 0.3]], [[0.1, 0.6]]], np.float32)  # K = 3, background first
    np.testing.assert_allclose(foreground(probs), [[0.3, 0.9]], atol=1e-6)
    np.testing.assert_allclose(foreground(probs[1:2]), [[0.2, 0.3]])


def test_overlay_colours() -> None:
    image = np.zeros((1, 2, 2), np.uint16)
    pred = np.array([[1, 1], [0, 0]], bool)
    label = np.array([[1, 0], [1, 0]], bool)
    rgb = overlay(image, pred, label)
    assert rgb[0, 0].argmax() == 1 and rgb[0, 1].argmax() == 0 and rgb[1, 0].argmax() == 2
    assert (rgb[1, 1] == 0).all()
    masked = overlay(image, pred, label, mask=np.array([[0, 1], [1, 1]], bool))
    assert (masked[0, 0] == 0).all()


@pytest.mark.parametrize(
    "recorded",
    [
        {"method": "watershed", "threshold": 0.5, "min_distance": 4, "halo": 16},
        {"method": "components", "threshold": 0.5, "min_size": 10**6},
    ],
)
def test_cells_are_scored_as_the_instance_maps_infer_writes(
    work: Path, monkeypatch: pytest.MonkeyPatch, recorded: dict[str, Any]
) -> None:
    from pipeline.metrics.instances import average_precision, matched_iou
    from pipeline.postprocessing.instances import InstanceSettings
    from pipeline.postprocessing.stitching import instances_of

    make_prepared(work, "u373", cell_case)
    path = make_checkpoint(work, "u373", "unet", "unet", 1, **UNET)
    ckpt = torch.load(path, weights_only=True)
    ckpt["instances"] = {"settings": recorded, "val_seg": 0.9, "candidates": 1}
    torch.save(ckpt, path)
    oracle = lambda x: (x[0] > 0.5).astype(np.float32)  # noqa: E731
    monkeypatch.setattr(ev, "predict", fake_predict(oracle))
    m = run_evaluate("u373", "unet", models_dir=work / "models", results_dir=work / "results")
    settings = InstanceSettings(**recorded)
    objects = [instances_of(scores_of("u373", c, oracle)[None], settings) for c in cases("u373", "test")]
    refs = [c["instances"][0].astype(np.int64) for c in cases("u373", "test")]
    jaccards = np.concatenate([seg_jaccards(o, r)[1] for o, r in zip(objects, refs)])
    assert m["seg"] == pytest.approx(jaccards.mean())
    components = [
        seg_jaccards(label_instances(scores_of("u373", c, oracle) >= 0.5), r)[1]
        for c, r in zip(cases("u373", "test"), refs)
    ]
    assert m["seg_components"] == pytest.approx(np.concatenate(components).mean())  # pooled, as seg
    counts = np.sum([matched_iou(o, r) for o, r in zip(objects, refs)], axis=0)
    assert m["ap50"] == pytest.approx(average_precision(*counts))
    assert m["instances"] == settings.describe() and m["val_seg"] == 0.9
    if settings.min_size == 10**6:  # every object dropped: the instance scores say so, the components do not
        assert m["seg"] == 0 and m["ap50"] == 0 and m["seg_components"] > 0.5
    else:
        assert m["seg"] > 0.5 and 0 <= m["rand_error"] < 1 and m["vi"] >= 0
