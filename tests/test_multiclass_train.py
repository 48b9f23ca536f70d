"""Multi-class training (issue 13): a 3-class PNG folder dataset added, prepared and trained end to end
(K-channel network, class names in the checkpoints, the ignore value out of the loss, deterministic
weights), the masked multi-class loss, multi-class eq. 2 weight maps and the validation score against
hand-computed values, and the MLflow pyfunc model of a K-channel checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import imageio.v3 as iio
import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.cli import main
from pipeline.data.io import read_volume
from pipeline.data.prepared import open_prepared
from pipeline.errors import SegpipeError
from pipeline.networks import read_checkpoint
from pipeline.training.loader import check_ignore_value
from pipeline.training.losses import SegmentationLoss
from pipeline.training.settings import TrainSettings
from pipeline.training.supervision import DeepSupervisionLoss
from pipeline.training.validation import validation_cases, validation_scores
from pipeline.transforms.weightmap import (
    instances_from_binary,
    instances_from_labels,
    unet_weight_map,
    unet_weight_map_reference,
)

from fixtures import FixtureProject
from test_datasets import add, disk_label, write_folders

CLASSES = ["background", "disk", "bar"]
IGNORE = 9


def _no_model_logging(project: FixtureProject) -> None:
    """The MLflow model is tested in test_mlflow_model.py (and below, without MLflow's logging)."""
    tracking = project.root / "configs" / "tracking.yaml"
    tracking.write_text(
        tracking.read_text()
        .replace("log_model: true", "log_model: false")
        .replace("register_model: true", "register_model: false")
    )


def _three_class_dataset(project: FixtureProject) -> Path:
    """`segpipe dataset add` + `segpipe prepare` of 6 PNG cases of 3 classes whose top 3 rows are
    unlabelled (the ignore value); returns the prepared folder."""
    _no_model_logging(project)
    folders = write_folders(project.root / "mine", values=(0, 100, 200))
    for path in sorted(folders["labels"].iterdir()):
        label = iio.imread(path)
        label[:3] = IGNORE  # the images keep their background there
        iio.imwrite(path, label)
    assert add("three", folders, "--classes", ",".join(CLASSES), "--ignore-value", str(IGNORE)) == 0
    assert main(["prepare", "three"]) == 0
    return project.root / "data" / "prepared" / "three"


@pytest.fixture
def three(project: FixtureProject) -> Path:
    return _three_class_dataset(project)


# --- end to end -------------------------------------------------------------------------------------


def test_three_classes_train_end_to_end(project: FixtureProject, three: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    masks: list[torch.Tensor | None] = []
    head_losses = DeepSupervisionLoss.head_losses

    def spy(self, output, target, weight=None, mask=None):
        masks.append(mask)
        return head_losses(self, output, target, weight, mask)

    monkeypatch.setattr(DeepSupervisionLoss, "head_losses", spy)
    assert main(["train", "three", "unet", "--profile", "smoke"]) == 0
    out = project.root / "models" / "three" / "unet"
    best, last = read_checkpoint(out / "best.pt"), read_checkpoint(out / "last.pt")
    assert best["out_channels"] == 3 and best["class_names"] == CLASSES and last["class_names"] == CLASSES
    log = pd.read_csv(out / "log.csv")
    assert list(log["epoch"]) == [1, 2] and log["val_dice"].between(0, 1).all() and log["val_iou"].between(0, 1).all()
    assert best["val_dice"] == pytest.approx(log["val_dice"].max())

    # the ignore value's pixels reach the loss as the mask (0 there), every step
    assert len(masks) == 4 and all(m is not None for m in masks)
    assert all(bool((m == 0).any()) for m in masks)

    # validation scores inside the FOV, which leaves the ignore value out
    settings = TrainSettings.from_dict(json.loads((out / "config.json").read_text()))
    case = validation_cases(open_prepared("three", three), settings)[0]
    assert not case["fov"][:3].any() and case["fov"][3:].all()
    assert set(np.unique(case["label"])) == {0, 1, 2}

    # the same weights twice
    first = best["state_dict"]
    assert main(["train", "three", "unet", "--profile", "smoke"]) == 0
    again = read_checkpoint(out / "best.pt")["state_dict"]
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)


def test_binary_checkpoints_keep_one_channel_and_record_their_names(project: FixtureProject) -> None:
    _no_model_logging(project)
    assert add("two", write_folders(project.root / "mine"), "--classes", "background,vessel") == 0
    assert main(["prepare", "two"]) == 0
    assert main(["train", "two", "unet", "--profile", "smoke", "--set", "epochs=1", "--set", "steps_per_epoch=1"]) == 0
    best = read_checkpoint(project.root / "models" / "two" / "unet" / "best.pt")
    assert best["out_channels"] == 1 and best["class_names"] == ["background", "vessel"]


def test_an_ignore_value_needs_the_fov_in_the_loss(three: Path) -> None:
    prepared = open_prepared("three", three)
    check_ignore_value(prepared, {"patches": {"fov_key": "fov"}})
    with pytest.raises(
        SegpipeError,
        match=r"configs/augment\.yaml: three\.patches\.fov_key is null, but the "
        r"card's ignore_value 9 .*stats\.json.* set fov_key: fov",
    ):
        check_ignore_value(prepared, {"patches": {"fov_key": None}})


def test_the_pyfunc_model_gives_argmax_label_maps(project: FixtureProject, three: Path) -> None:
    from pipeline.config import load_config
    from pipeline.inference import load_settings, predict
    from pipeline.inference.settings import settings_from_config
    from pipeline.training.mlflow_model import write_settings
    from pipeline.training.pyfunc_model import SegmentationModel
    from pipeline.transforms.presets import preprocess

    assert (
        main(["train", "three", "unet", "--profile", "smoke", "--set", "epochs=1", "--set", "steps_per_epoch=1"]) == 0
    )
    checkpoint = project.root / "models" / "three" / "unet" / "best.pt"
    settings_file = project.root / "inference_settings.json"
    inference = settings_from_config(load_config("inference"), "configs/inference.yaml")
    write_settings(load_settings(inference, preprocess="checkpoint", intensity="none"), settings_file)
    model = SegmentationModel()
    model.load_context(SimpleNamespace(artifacts={"checkpoint": str(checkpoint), "settings": str(settings_file)}))
    prepared = open_prepared("three", three)
    image = prepared.load(prepared.cases("val")[0])["image"].astype(np.float32)
    labels = model.predict(None, image)
    probs = model.predict(None, image, params={"output": "probabilities"})
    assert probs.shape == (3, *image.shape[1:]) and labels.shape == image.shape[1:] and labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, probs.argmax(0))
    augment = read_checkpoint(checkpoint)["augment"]
    np.testing.assert_array_equal(
        probs, predict(checkpoint, preprocess("three", image, augment), settings=model.settings)
    )


# --- the loss ignores masked pixels -----------------------------------------------------------------


def test_the_multiclass_loss_ignores_masked_pixels() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8)
    target = torch.randint(0, 3, (2, 1, 8, 8))
    weight = 1 + torch.rand(2, 1, 8, 8)
    mask = torch.ones(2, 1, 8, 8)
    mask[..., :3] = 0  # the first three columns: the ignore value
    loss = DeepSupervisionLoss(SegmentationLoss(), "mean")
    masked = loss(logits, target, weight, mask)
    # whatever the masked pixels hold, the loss is that of the valid pixels alone
    changed_logits, changed_target = logits.clone(), target.clone()
    changed_logits[..., :3] = 50 * torch.randn(2, 3, 8, 3)
    changed_target[..., :3] = 2 - changed_target[..., :3]
    assert loss(changed_logits, changed_target, weight, mask) == pytest.approx(float(masked), abs=1e-6)
    alone = loss(logits[..., 3:], target[..., 3:], weight[..., 3:])
    assert float(masked) == pytest.approx(float(alone), abs=1e-5)
    assert float(loss(logits, target, weight)) != pytest.approx(float(masked), abs=1e-3)


# --- multi-class weight maps (U-Net eq. 2) ------------------------------------------------------------


def test_multiclass_weight_map_by_hand() -> None:
    labels = np.array([[1, 0, 2, 0, 0]], np.uint8)  # a class-1 component at x=0, a class-2 one at x=2
    inst = instances_from_labels(labels)
    np.testing.assert_array_equal(inst, [[1, 0, 2, 0, 0]])
    weight = unet_weight_map(inst, w0=10.0, sigma=1.0, class_weights=[1.0, 2.0, 3.0], labels=labels)
    # background x=1: d1 = d2 = 1; x=3: d1 = 1, d2 = 3; x=4: d1 = 2, d2 = 4
    expected = [2.0, 1 + 10 * math.exp(-4 / 2), 3.0, 1 + 10 * math.exp(-16 / 2), 1 + 10 * math.exp(-36 / 2)]
    np.testing.assert_allclose(weight[0], expected, rtol=1e-6)


def test_instances_from_labels_number_every_class_component() -> None:
    labels = np.zeros((12, 12), np.uint8)
    labels[1:4, 1:4] = 1
    labels[1:4, 8:11] = 1
    labels[4:7, 1:4] = 2  # touches the first class-1 square: still its own component
    labels[9:11, 5:7] = 2
    inst = instances_from_labels(labels)
    assert inst.max() == 4 and len(np.unique(inst[labels == 1])) == 2 and len(np.unique(inst[labels == 2])) == 2
    assert set(np.unique(inst[labels == 1])).isdisjoint(np.unique(inst[labels == 2]))
    assert not inst[labels == 0].any()
    np.testing.assert_allclose(
        unet_weight_map(inst, class_weights=[0.5, 1.0, 2.0], labels=labels),
        unet_weight_map_reference(inst, class_weights=[0.5, 1.0, 2.0], labels=labels),
        atol=1e-5,
    )
    binary = (labels > 0).astype(np.uint8)
    np.testing.assert_array_equal(instances_from_labels(binary), instances_from_binary(binary))


def test_prepare_writes_multiclass_weight_maps(project: FixtureProject, three: Path) -> None:
    stats = json.loads((three / "stats.json").read_text())
    assert stats["classes"] == CLASSES and len(stats["class_weights"]) == 3
    row = pd.read_csv(three / "manifest.csv").iloc[0]
    label = read_volume(three / row.label)[0]
    np.testing.assert_array_equal(label[3:], disk_label(int(row.case[-2:]), (0, 1, 2))[3:])
    w = stats["weight_map"]
    expected = unet_weight_map(
        instances_from_labels(label), w0=w["w0"], sigma=w["sigma"], class_weights=stats["class_weights"], labels=label
    )
    np.testing.assert_array_equal(read_volume(three / row.weight)[0], expected)


# --- the validation score ---------------------------------------------------------------------------


def test_validation_score_by_hand() -> None:
    label = np.array([[0, 1, 1], [2, 2, 0]], np.uint8)
    pred = np.array([[0, 1, 2], [2, 0, 0]])
    probs = np.stack([(pred == k).astype(np.float32) * 0.8 + 0.1 for k in range(3)])
    # class 1: TP 1, FP 0, FN 1 -> Dice 2/3, IoU 1/2; class 2: TP 1, FP 1, FN 1 -> Dice 1/2, IoU 1/3
    assert validation_scores(probs, label, None) == pytest.approx((7 / 12, 5 / 12))
    fov = np.ones(label.shape, bool)
    fov[1, 1] = False  # class 2 then: TP 1, FP 1, FN 0 -> Dice 2/3, IoU 1/2
    assert validation_scores(probs, label, fov) == pytest.approx((2 / 3, 1 / 2))
    # one channel: foreground probability >= 0.5 against label > 0 (TP 2, FP 1, FN 2)
    foreground = np.array([[[0.6, 0.5, 0.2], [0.7, 0.1, 0.0]]], np.float32)
    assert validation_scores(foreground, label, None) == pytest.approx((4 / 7, 2 / 5))
