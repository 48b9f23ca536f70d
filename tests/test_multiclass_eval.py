"""Multi-class evaluation (issue 13): per-class metrics against hand-computed values, `segpipe evaluate`
of a 3-class folder dataset with a 3-channel checkpoint (per_image.csv, metrics.json, MLflow, heads,
overlays, the ignore value outside the FOV), and `segpipe report`'s per-class table.

Tiny images (32 x 40, `tests/test_datasets.py`'s folders), tiny networks; `predict` is replaced by a
fixed rule where the numbers are under test."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import imageio.v3 as iio
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from pipeline.config import load_config
from pipeline.data.prepared import open_prepared
from pipeline.errors import SegpipeError
from pipeline.evaluation import evaluate as ev
from pipeline.evaluation.overlays import CLASS_PALETTE, OVERLAY_ALPHA, class_colour, class_overlay
from pipeline.inference import load_settings, predict
from pipeline.inference.settings import settings_from_config
from pipeline.metrics import ClassTally, class_keys, class_scores, per_class, pixel_accuracy, pooled_per_class
from pipeline.networks import build_network, load_model, read_checkpoint, save_checkpoint
from pipeline.stages.evaluate import evaluate as run_evaluate
from pipeline.stages.prepare import prepare
from pipeline.stages.report import report
from pipeline.transforms.presets import preprocess

from fixtures import FixtureProject
from test_datasets import add, write_folders

CLASSES = ["background", "disk", "bar"]
IGNORE = 9
IGNORED_COLUMNS = 4


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


# --- per-class metrics by hand ---------------------------------------------------------------------

PRED_A = np.array([[0, 1, 1, 2], [0, 0, 2, 2], [1, 1, 0, 0]])
GT_A = np.array([[0, 1, 2, 2], [0, 1, 2, 0], [1, 0, 0, 0]])
PRED_B = np.array([[2, 2], [0, 1]])
GT_B = np.array([[2, 0], [0, 1]])


def test_class_scores_by_hand() -> None:
    confusions = per_class(PRED_A, GT_A, 3)
    assert [(c.tp, c.fp, c.fn, c.tn) for c in confusions] == [(4, 1, 2, 5), (2, 2, 1, 7), (2, 1, 1, 8)]
    scores = class_scores(confusions, ["bg", "a", "b"])
    expected = {
        "dice_bg": 8 / 11,
        "dice_a": 4 / 7,
        "dice_b": 2 / 3,
        "dice_mean_fg": (4 / 7 + 2 / 3) / 2,
        "iou_bg": 4 / 7,
        "iou_a": 2 / 5,
        "iou_b": 1 / 2,
        "iou_mean_fg": 0.45,
    }
    assert scores == pytest.approx(expected)
    assert pixel_accuracy(confusions) == pytest.approx(8 / 12)
    # the last column left out of the mask
    mask = np.ones(GT_A.shape, bool)
    mask[:, 3] = False
    masked = class_scores(per_class(PRED_A, GT_A, 3, mask), ["bg", "a", "b"])
    assert [masked[k] for k in ("dice_bg", "dice_a", "dice_b", "iou_b")] == pytest.approx([6 / 8, 4 / 7, 2 / 3, 1 / 2])
    assert pixel_accuracy(per_class(PRED_A, GT_A, 3, mask)) == pytest.approx(6 / 9)
    # a class in neither map scores 1 (as Dice of two empty masks), and counts in the foreground mean
    absent = class_scores(per_class(np.array([[0, 1]]), np.array([[0, 1]]), 3), ["bg", "a", "b"])
    assert absent["dice_b"] == 1.0 and absent["dice_mean_fg"] == 1.0


def test_pooled_per_class_by_hand() -> None:
    pooled = pooled_per_class([per_class(PRED_A, GT_A, 3), per_class(PRED_B, GT_B, 3)])
    assert [(c.tp, c.fp, c.fn, c.tn) for c in pooled] == [(5, 1, 3, 7), (3, 2, 1, 10), (3, 2, 1, 10)]
    assert [c.dice for c in pooled] == pytest.approx([5 / 7, 2 / 3, 2 / 3])
    assert pixel_accuracy(pooled) == pytest.approx(11 / 16)
    with pytest.raises(SegpipeError, match="same classes"):
        pooled_per_class([per_class(PRED_A, GT_A, 3), per_class(PRED_B, GT_B, 4)])


def test_class_tally_means_and_pooled() -> None:
    tally = ClassTally(["background", "cell body", "membrane"])
    assert tally.keys == ["background", "cell_body", "membrane"]
    row = tally.add("a", PRED_A, GT_A, None, seconds=0.5)
    assert row["dice_cell_body"] == pytest.approx(4 / 7) and row["accuracy"] == pytest.approx(2 / 3)
    tally.add("b", PRED_B, GT_B, None)
    table = tally.table()
    assert list(table.columns) == [
        "case",
        "dice_background",
        "dice_cell_body",
        "dice_membrane",
        "dice_mean_fg",
        "iou_background",
        "iou_cell_body",
        "iou_membrane",
        "iou_mean_fg",
        "accuracy",
        "seconds",
    ]
    m = tally.metrics()
    fg_a, fg_b = (4 / 7 + 2 / 3) / 2, (1 + 2 / 3) / 2
    assert m["dice_mean_fg"] == pytest.approx((fg_a + fg_b) / 2) and m["dice"] == m["dice_mean_fg"]
    assert m["iou"] == m["iou_mean_fg"] == pytest.approx((0.45 + (1 + 1 / 2) / 2) / 2)
    assert m["dice_membrane"] == pytest.approx(2 / 3) and m["dice_background"] == pytest.approx((8 / 11 + 2 / 3) / 2)
    assert m["mean_accuracy"] == pytest.approx((2 / 3 + 3 / 4) / 2) and m["pooled_accuracy"] == pytest.approx(11 / 16)
    assert m["pooled_dice_background"] == pytest.approx(5 / 7) and m["pooled_iou_membrane"] == pytest.approx(1 / 2)
    assert m["pooled_dice_mean_fg"] == pytest.approx(2 / 3)


def test_class_keys_must_be_distinct() -> None:
    assert class_keys(["bg", "a/b", "é"]) == ["bg", "a_b", "é"]
    for names in (["bg", "a b", "a_b"], ["bg", "mean_fg"]):
        with pytest.raises(SegpipeError, match="rename the classes"):
            class_keys(names)


# --- overlays ----------------------------------------------------------------------------------------


def test_class_overlay_colours_each_class() -> None:
    image = np.zeros((1, 2, 3), np.uint8)
    label = np.array([[0, 1, 2], [2, 1, 0]])
    pred = np.array([[1, 1, 0], [2, 2, 0]])
    mask = np.array([[1, 1, 1], [0, 1, 1]], bool)
    rgb = class_overlay(image, pred, label, mask)
    assert rgb.shape == (2, 6, 3) and rgb.dtype == np.uint8

    def blended(index: int) -> list[int]:
        return np.round(OVERLAY_ALPHA * np.array(class_colour(index), np.float32)).astype(int).tolist()

    reference, prediction = rgb[:, :3], rgb[:, 3:]
    assert reference[0, 0].tolist() == [0, 0, 0]  # background: the image
    assert reference[0, 1].tolist() == blended(1) and reference[0, 2].tolist() == blended(2)
    assert reference[1, 0].tolist() == [0, 0, 0]  # outside the mask: nothing
    assert prediction[0, 0].tolist() == blended(1) and prediction[0, 2].tolist() == [0, 0, 0]
    assert prediction[1, 1].tolist() == blended(2) and prediction[1, 0].tolist() == [0, 0, 0]
    assert blended(1) != blended(2) and class_colour(1 + len(CLASS_PALETTE)) == class_colour(1)


# --- segpipe evaluate on a 3-class folder dataset ----------------------------------------------------


def three_class_dataset(project: FixtureProject) -> Path:
    """`segpipe dataset add` + prepare of 6 PNG cases (disk = 1, bar = 2), the first columns of
    every label at the ignore value (outside the FOV)."""
    folders = write_folders(project.root / "mine", values=(0, 1, 2))
    for path in sorted(folders["labels"].iterdir()):
        label = iio.imread(path)
        label[:, :IGNORED_COLUMNS] = IGNORE
        iio.imwrite(path, label)
    assert add("three", folders, "--classes", ",".join(CLASSES), "--ignore-value", str(IGNORE)) == 0
    out = prepare("three")
    assert json.loads((out / "stats.json").read_text())["classes"] == CLASSES
    return out


def eval_config(project: FixtureProject, **changes: Any) -> None:
    path = project.root / "configs" / "evaluate.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg.update({"overlays": None, "inference": {"tile": 32, "tta": []}, **changes})
    path.write_text(yaml.safe_dump(cfg))


def make_checkpoint(
    project: FixtureProject, key: str, name: str, out_channels: int = 3, class_names: list[str] = CLASSES, **config: Any
) -> Path:
    """models/three/<key>/best.pt as `segpipe train` writes it (class_names included)."""
    torch.manual_seed(0)
    net = build_network(name, 1, out_channels, **config)
    path = project.root / "models" / "three" / key / "best.pt"
    augment = {**load_config("augment")["three"], "normalize": "zscore"}  # as the training plan resolves `auto`
    save_checkpoint(
        net,
        path,
        dataset="three",
        network_key=key,
        profile="smoke",
        epoch=2,
        val_dice=0.4,
        augment=augment,
        class_names=class_names,
    )
    return path


def rule(x: np.ndarray) -> np.ndarray:
    """A fixed, imperfect label map of a preprocessed image (1, H, W): bright pixels are the disk above
    row 14 and the bar below it (the disk's lower part is wrong); the ignored columns are called bar
    (outside the FOV: they must not count)."""
    rows = np.arange(x.shape[1])[:, None]
    classes = np.where(x[0] > 0.5, np.where(rows < 14, 1, 2), 0)
    classes[:, :IGNORED_COLUMNS] = 2
    return classes


def fake_predict(model: Any, image: np.ndarray, **kwargs: Any) -> np.ndarray:
    """Stand-in for `predict`: the one-hot probabilities (3, H, W) of `rule`."""
    assert kwargs["settings"].intensity == "none"
    return np.eye(3, dtype=np.float32)[rule(np.asarray(image))].transpose(2, 0, 1)


def last_run(network: str) -> Any:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    experiment = client.get_experiment_by_name("three")
    return client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.stage = 'evaluate' and tags.network = '{network}'",
        order_by=["start_time DESC"],
        max_results=1,
    )[0]


def test_evaluate_three_classes_per_class_metrics_mlflow_overlays_report(
    project: FixtureProject, monkeypatch: pytest.MonkeyPatch
) -> None:
    three_class_dataset(project)
    eval_config(project)
    make_checkpoint(project, "unet", "unet", base_width=4, depth=2, padding="same", batch_norm=True)
    monkeypatch.setattr(ev, "predict", fake_predict)
    m = run_evaluate("three", "unet")
    out = project.root / "results" / "three" / "unet"

    # by hand: the rule's label maps against the references, inside the FOV
    data = open_prepared("three", project.root / "data" / "prepared" / "three")
    tests = data.load_split("test")
    augment = {**load_config("augment")["three"], "normalize": "zscore"}  # the checkpoint's
    preds = [rule(preprocess("three", c["image"], augment)) for c in tests]
    confusions = [per_class(p, c["label"][0], 3, c["fov"][0]) for p, c in zip(preds, tests)]
    by_image = [class_scores(c, CLASSES) for c in confusions]
    unmasked = class_scores(per_class(preds[0], tests[0]["label"][0], 3), CLASSES)
    assert unmasked["dice_bar"] != pytest.approx(by_image[0]["dice_bar"])  # the FOV matters here

    table = pd.read_csv(out / "per_image.csv")
    assert list(table["case"]) == [c["case"] for c in tests]
    for name in ("dice_background", "dice_disk", "dice_bar", "dice_mean_fg", "iou_disk", "iou_bar", "iou_mean_fg"):
        assert table[name].tolist() == pytest.approx([s[name] for s in by_image]), name
        assert m[name] == pytest.approx(np.mean([s[name] for s in by_image])), name
    assert 0 < m["dice_mean_fg"] < 1 and m["dice"] == m["dice_mean_fg"] and m["iou"] == m["iou_mean_fg"]
    pooled = class_scores(pooled_per_class(confusions), CLASSES)
    assert m["pooled_dice_bar"] == pytest.approx(pooled["dice_bar"])
    assert m["pooled_iou_mean_fg"] == pytest.approx(pooled["iou_mean_fg"])
    assert table["accuracy"].tolist() == pytest.approx([pixel_accuracy(c) for c in confusions])

    written = json.loads((out / "metrics.json").read_text())
    assert written["classes"] == CLASSES and written["dice_disk"] == pytest.approx(m["dice_disk"])
    for binary_only in ("threshold", "threshold_best", "pooled_auc", "mean_auc", "maxf", "mae", "pooled_f1", "seg"):
        assert binary_only not in written, binary_only
    assert pd.read_csv(out / "roc.csv").empty and list(pd.read_csv(out / "pr.csv").columns) == ["recall", "precision"]

    run = last_run("unet")
    assert run.info.status == "FINISHED"
    for name in ("dice_disk", "iou_bar", "dice_mean_fg", "pooled_dice_background", "pooled_accuracy"):
        assert run.data.metrics[f"test_{name}"] == pytest.approx(m[name]), name
    assert not any("auc" in key for key in run.data.metrics)

    # the overlay: reference | prediction, each class in its colour, the ignored columns uncoloured
    rgb = iio.imread(out / "overlays" / f"{tests[0]['case']}.png")
    label = tests[0]["label"][0]
    assert rgb.shape == (*label.shape[:1], 2 * label.shape[1], 3)
    reference = rgb[:, : label.shape[1]].astype(int)
    disk, bar = reference[label == 1], reference[label == 2]
    assert ((disk[:, 0] > disk[:, 1]) & (disk[:, 1] > disk[:, 2])).all()  # orange
    assert ((bar[:, 2] > bar[:, 1]) & (bar[:, 1] > bar[:, 0])).all()  # sky blue
    ignored = reference[:, :IGNORED_COLUMNS]
    assert (ignored[..., 0] == ignored[..., 1]).all() and (ignored[..., 1] == ignored[..., 2]).all()  # grey

    md = report(project.root / "results", models_dir=project.root / "models", matrix=[]).read_text()
    assert f"| three | unet | unet | {m['dice']:.4f} | {m['iou']:.4f} |" in md
    assert "## Per class" in md
    for key in CLASSES:
        assert (
            f"| three | unet | {key} | {m[f'dice_{key}']:.4f} | {m[f'iou_{key}']:.4f} | "
            f"{m[f'pooled_dice_{key}']:.4f} | {m[f'pooled_iou_{key}']:.4f} |"
        ) in md
    assert f"| three | unet | mean fg | {m['dice_mean_fg']:.4f} |" in md
    summary = pd.read_csv(project.root / "results" / "summary.csv")
    assert json.loads(summary.loc[0, "classes"]) == CLASSES


def test_evaluate_three_classes_real_unetpp_with_heads(project: FixtureProject) -> None:
    three_class_dataset(project)
    eval_config(project, overlays=0)  # tile 32, no TTA
    path = make_checkpoint(project, "unetpp", "unetpp", base_width=2, depth=2, batch_norm=True)
    m = run_evaluate("three", "unetpp")
    table = pd.read_csv(project.root / "results" / "three" / "unetpp" / "per_image.csv")
    model, pruned = load_model(path), load_model(path, prune_level=1, mode="fast")
    base = settings_from_config(load_config("inference"), "configs/inference.yaml")
    settings = load_settings(base, tile=32, tta=[], intensity="none")  # as eval_config sets them
    data = open_prepared("three", project.root / "data" / "prepared" / "three")
    augment = read_checkpoint(path)["augment"]
    l1_dices = []
    for i, c in enumerate(data.load_split("test")):
        x = preprocess("three", c["image"], augment)
        probs = predict(model, x, settings=settings)
        assert probs.shape[0] == 3
        scores = class_scores(per_class(probs.argmax(0), c["label"][0], 3, c["fov"][0]), CLASSES)
        assert table.at[i, "dice_mean_fg"] == pytest.approx(scores["dice_mean_fg"])
        l1 = predict(pruned, x, settings=settings).argmax(0)
        l1_dices.append(class_scores(per_class(l1, c["label"][0], 3, c["fov"][0]), CLASSES)["dice_mean_fg"])
    heads = pd.read_csv(project.root / "results" / "three" / "unetpp" / "heads.csv")
    assert list(heads["head"]) == ["L1", "L2"] and heads["dice"].between(0, 1).all()
    assert heads.loc[0, "dice"] == pytest.approx(np.mean(l1_dices))
    assert m["head_L1_dice"] == pytest.approx(heads.loc[0, "dice"])
    assert last_run("unetpp").data.metrics["head_L1_dice"] == pytest.approx(heads.loc[0, "dice"])


def test_checkpoint_must_fit_the_classes(project: FixtureProject) -> None:
    three_class_dataset(project)
    eval_config(project)
    unet = {"base_width": 4, "depth": 2, "padding": "same", "batch_norm": True}
    make_checkpoint(project, "unet", "unet", out_channels=1, **unet)
    with pytest.raises(SegpipeError, match=r"best\.pt: the network has 1 output channel.*3 classes.*need 3"):
        run_evaluate("three", "unet")
    make_checkpoint(project, "unet", "unet", class_names=["background", "cell", "edge"], **unet)
    with pytest.raises(SegpipeError, match=r"best\.pt: trained on the classes .*'cell'.*stats\.json"):
        run_evaluate("three", "unet")
