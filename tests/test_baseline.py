"""MONAI-standard baseline (issue 6 quality bar) and the DRIVE-protocol scoring of any predictor."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest
import torch
from monai.data import CacheDataset, DataLoader

from benchmarks.baseline import (
    baseline_transforms,
    evaluate_probabilities,
    predict_baseline,
    train_baseline,
)
from pipeline.config import load_config
from pipeline.data.io import write_volume
from pipeline.data.prepared import PreparedDataset, open_prepared
from pipeline.errors import SegpipeError
from pipeline.transforms.presets import preprocess

SHAPE = (72, 68)  # not a multiple of 16, smaller than the 128² inference window


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def _case(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A bright-"vessel" RGB image (3, H, W) uint8 with its label, weight and elliptic FOV."""
    h, w = SHAPE
    label = np.zeros(SHAPE, np.uint8)
    for _ in range(3):
        r, c = rng.integers(6, h - 8), rng.integers(6, w - 8)
        label[r : r + rng.integers(1, 4), 4:-4] = 1
        label[4:-4, c : c + rng.integers(1, 4)] = 1
    yy, xx = np.mgrid[:h, :w]
    fov = (((yy - h / 2) / (h / 2)) ** 2 + ((xx - w / 2) / (w / 2)) ** 2 <= 1.0).astype(np.uint8)
    label *= fov
    image = rng.integers(0, 60, (3, h, w)).astype(np.uint8)
    image[1] += (150 * label).astype(np.uint8)
    return {"image": image, "label": label[None], "weight": np.ones((1, h, w), np.float32), "fov": fov[None]}


def make_prepared(root: Path, splits: dict[str, int], seed: int = 0) -> PreparedDataset:
    """A prepared "drive" dataset in the layout of `segpipe prepare` (manifest.csv, stats.json, NIfTI)."""
    rng = np.random.default_rng(seed)
    rows = []
    folders = {"image": "images", "label": "labels", "weight": "weights", "fov": "fov"}
    for split, n in splits.items():
        for i in range(n):
            case = f"{split}_{i:02d}"
            row = {"case": case, "split": split, "instances": "", "label2": ""}
            for role, array in _case(rng).items():
                rel = f"{folders[role]}/{case}.nii.gz"
                write_volume(root / rel, array)
                row[role] = rel
            rows.append(row)
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    (root / "stats.json").write_text(json.dumps({"splits": splits}))
    return open_prepared("drive", root=root)


def _augment() -> dict:
    """The DRIVE preprocessing of configs/augment.yaml."""
    return dict(load_config("augment")["drive"])


@pytest.fixture
def prepared(tmp_path: Path) -> PreparedDataset:
    return make_prepared(tmp_path / "drive", {"train": 3, "val": 2, "test": 2})


def lookup_predictor(dataset: PreparedDataset, maps: dict[str, np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """A predictor returning `maps[case]` for the normalised image of that case (and failing otherwise)."""
    by_image = {}
    for case, probs in maps.items():
        image = preprocess(dataset.name, dataset.load(case)["image"], _augment())
        by_image[hashlib.sha256(image.tobytes()).hexdigest()] = probs
    return lambda image: by_image[hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()]


def _labels(dataset: PreparedDataset, split: str) -> dict[str, np.ndarray]:
    return {case: dataset.load(case)["label"][0] for case in dataset.cases(split)}


def _fovs(dataset: PreparedDataset, split: str) -> dict[str, np.ndarray]:
    return {case: dataset.load(case)["fov"][0] > 0 for case in dataset.cases(split)}


# --- training and inference --------------------------------------------------------------------


def _train(prepared: PreparedDataset, seed: int = 0, steps: int = 3):
    return train_baseline(
        prepared, 3600.0, seed=seed, batch_size=8, patch=32, max_steps=steps, progress=False, augment=_augment()
    )


def test_baseline_trains_steps_and_is_deterministic(prepared: PreparedDataset) -> None:
    a, b, c = _train(prepared), _train(prepared), _train(prepared, seed=1)
    assert (a.steps, a.patches) == (3, 24)
    assert 0 < a.cache_seconds <= a.wall_seconds and np.isfinite(a.final_loss)
    assert not a.model.training and a.augment["normalize"] in ("zscore", "percentile")
    wa, wb, wc = (torch.cat([p.detach().ravel() for p in r.model.parameters()]) for r in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.allclose(wa, wc)


def test_baseline_learns_bright_vessels(prepared: PreparedDataset) -> None:
    scores = {}
    for steps in (1, 40):
        result = _train(prepared, steps=steps)
        out = evaluate_probabilities(prepared, lambda image: predict_baseline(result.model, image), augment=_augment())
        scores[steps] = (result.final_loss, out["auc"], out["at_val"]["f1"])
    assert scores[40][0] < scores[1][0] - 0.3
    assert scores[40][1] > 0.99 and scores[40][2] > 0.95 and scores[1][2] < 0.8


def test_predict_baseline_gives_probabilities_of_the_image_size(prepared: PreparedDataset) -> None:
    model = _train(prepared, steps=1).model
    image = preprocess("drive", prepared.load("test_00")["image"], _augment())
    probs = predict_baseline(model, image)
    assert probs.shape == SHAPE and probs.dtype == np.float32
    assert probs.min() >= 0 and probs.max() <= 1
    with pytest.raises(SegpipeError, match="expected an image"):
        predict_baseline(model, image[0])


def test_random_part_leaves_the_cache_untouched(prepared: PreparedDataset) -> None:
    items = [
        {"image": preprocess("drive", c["image"], _augment()), "label": c["label"].astype(np.float32)}
        for c in prepared.load_split("train")
    ]
    dataset = CacheDataset(items, baseline_transforms(32, 4), progress=False, copy_cache=False)
    before = [(d["image"].clone(), d["label"].clone()) for d in dataset._cache]
    channels = items[0]["image"].shape[0]
    for batch in DataLoader(dataset, batch_size=3, num_workers=0):
        assert batch["image"].shape == (12, channels, 32, 32) and batch["label"].shape == (12, 1, 32, 32)
        assert set(batch) == {"image", "label"}
    for (image, label), d in zip(before, dataset._cache):
        assert torch.equal(image, d["image"]) and torch.equal(label, d["label"])


def test_baseline_rejects_bad_settings(prepared: PreparedDataset) -> None:
    with pytest.raises(SegpipeError, match="multiple of 16"):
        train_baseline(prepared, 10.0, patch=40, progress=False, augment=_augment())
    with pytest.raises(SegpipeError, match="seconds > 0"):
        train_baseline(prepared, 0.0, progress=False, augment=_augment())


def test_fewer_training_images_than_a_batch_draws_are_drawn_with_replacement(prepared: PreparedDataset) -> None:
    # batch 32 / 4 patches per image = 8 images per batch from the 3 training images (the 7 HeLa frames)
    a = train_baseline(prepared, 3600.0, batch_size=32, patch=32, max_steps=2, progress=False, augment=_augment())
    b = train_baseline(prepared, 3600.0, batch_size=32, patch=32, max_steps=2, progress=False, augment=_augment())
    assert (a.steps, a.patches) == (2, 64) and np.isfinite(a.final_loss)
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))


def test_cells_get_seg_of_components_and_of_the_chosen_instance_maps(tmp_path: Path) -> None:
    """Two touching discs per image: components merge them (SEG about 0.5), the watershed chosen on
    the validation split splits them."""
    from pipeline.postprocessing.instances import InstanceSettings

    yy, xx = np.mgrid[:64, :96]
    inst = np.zeros((64, 96), np.uint16)
    inst[(yy - 32) ** 2 + (xx - 30) ** 2 < 16**2] = 1
    inst[((yy - 32) ** 2 + (xx - 58) ** 2 < 16**2) & (inst == 0)] = 2
    rows = []
    for split in ("train", "val", "test"):
        for role, array in {
            "image": (200 * (inst > 0)).astype(np.uint8)[None],
            "label": (inst > 0).astype(np.uint8)[None],
            "weight": np.ones((1, 64, 96), np.float32),
            "instances": inst[None],
        }.items():
            write_volume(tmp_path / role / f"{split}.nii.gz", array)
        rows.append(
            {
                "case": split,
                "split": split,
                **{r: f"{r}/{split}.nii.gz" for r in ("image", "label", "weight", "instances")},
            }
        )
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    (tmp_path / "stats.json").write_text(json.dumps({"splits": {"train": 1, "val": 1, "test": 1}}))
    cells = open_prepared("hela", root=tmp_path)
    oracle = lambda image: (inst > 0).astype(np.float32)  # noqa: E731
    augment = dict(load_config("augment")["hela"])
    out = evaluate_probabilities(cells, oracle, augment=augment, median_area=float(np.pi * 16**2))
    assert out["seg_components"] == pytest.approx(0.5, abs=0.02)
    assert out["seg"] > 0.95 and out["instances"].startswith("watershed")
    given = evaluate_probabilities(cells, oracle, augment=augment, objects=InstanceSettings("components"))
    assert given["seg"] == pytest.approx(given["seg_components"]) and given["instances"].startswith("components")


# --- scoring -----------------------------------------------------------------------------------


def test_oracle_scores_one_and_ignores_pixels_outside_the_fov(prepared: PreparedDataset) -> None:
    maps = {}
    for split in ("val", "test"):
        fovs = _fovs(prepared, split)
        for case, label in _labels(prepared, split).items():
            maps[case] = np.where(fovs[case], label, 1.0).astype(np.float32)  # wrong outside the FOV
    out = evaluate_probabilities(prepared, lookup_predictor(prepared, maps), augment=_augment())
    assert out["images"] == 2 and out["pixels"] == sum(f.sum() for f in _fovs(prepared, "test").values())
    assert out["auc"] == 1.0
    for key in ("at_0.5", "at_val"):
        assert out[key]["f1"] == out[key]["accuracy"] == out[key]["mean_dice"] == 1.0
        assert out[key]["sensitivity"] == out[key]["specificity"] == 1.0
    assert [row["dice"] for row in out["per_image"]] == [1.0, 1.0]


def test_constant_predictor_has_auc_one_half(prepared: PreparedDataset) -> None:
    out = evaluate_probabilities(
        prepared, lambda image: np.full(image.shape[1:], 0.3, np.float32), val_threshold=False, augment=_augment()
    )
    assert out["auc"] == 0.5
    assert out["at_0.5"]["f1"] == 0.0 and out["at_0.5"]["sensitivity"] == 0.0 and out["at_0.5"]["specificity"] == 1.0
    assert "at_val" not in out


def test_threshold_is_picked_on_validation_not_test(prepared: PreparedDataset) -> None:
    # val: vessels 0.3, background 0.1 -> best val threshold 0.2 (midpoint), val F1 1.
    # test: vessels 0.8, background 0.1 but 0.25 on every 7th pixel: F1 1 at 0.5, < 1 at 0.2.
    maps = {case: np.where(label > 0, 0.3, 0.1).astype(np.float32) for case, label in _labels(prepared, "val").items()}
    for case, label in _labels(prepared, "test").items():
        distract = (np.arange(label.size).reshape(label.shape) % 7 == 0) & (label == 0)
        maps[case] = np.where(label > 0, 0.8, np.where(distract, 0.25, 0.1)).astype(np.float32)
    out = evaluate_probabilities(prepared, lookup_predictor(prepared, maps), augment=_augment())
    assert out["at_val"]["threshold"] == pytest.approx(0.2) and out["at_val"]["val_f1"] == 1.0
    assert out["at_0.5"]["f1"] == 1.0
    assert 0 < out["at_val"]["f1"] < 0.9 and out["at_val"]["sensitivity"] == 1.0
    assert out["auc"] == 1.0
    assert all(0 < row["dice_val"] < row["dice"] == 1.0 for row in out["per_image"])


def test_pooled_f1_differs_from_mean_per_image_dice(prepared: PreparedDataset) -> None:
    labels = _labels(prepared, "test")
    first, second = sorted(labels)
    maps = {first: labels[first].astype(np.float32), second: np.zeros(SHAPE, np.float32)}
    out = evaluate_probabilities(prepared, lookup_predictor(prepared, maps), val_threshold=False, augment=_augment())
    fovs = _fovs(prepared, "test")
    tp = int((labels[first] > 0)[fovs[first]].sum())
    fn = int((labels[second] > 0)[fovs[second]].sum())
    assert out["at_0.5"]["f1"] == pytest.approx(2 * tp / (2 * tp + fn))
    assert out["at_0.5"]["mean_dice"] == 0.5
    assert out["at_0.5"]["sensitivity"] == pytest.approx(tp / (tp + fn))


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda image: np.zeros((1, 3, *image.shape[1:]), np.float32), "expected probabilities"),
        (lambda image: np.zeros((10, 10), np.float32), "expected probabilities"),
        (lambda image: np.full(image.shape[1:], 1.5, np.float32), r"in \[0, 1\]"),
        (lambda image: np.full(image.shape[1:], np.nan, np.float32), r"in \[0, 1\]"),
    ],
)
def test_bad_predictions_are_rejected(prepared: PreparedDataset, bad: Callable, message: str) -> None:
    with pytest.raises(SegpipeError, match=message):
        evaluate_probabilities(prepared, bad, augment=_augment())


def test_softmax_and_channel_outputs_are_read_as_foreground(prepared: PreparedDataset) -> None:
    labels = _labels(prepared, "test")
    two = {case: np.stack([1.0 - label, label]).astype(np.float32) for case, label in labels.items()}
    one = {case: label[None].astype(np.float32) for case, label in labels.items()}
    border = {
        case: np.stack([1.0 - label, 0.7 * label, 0.3 * label]).astype(np.float32)  # 1 - P(background)
        for case, label in labels.items()
    }
    for maps in (two, one, border):
        out = evaluate_probabilities(
            prepared, lookup_predictor(prepared, maps), val_threshold=False, augment=_augment()
        )
        assert out["at_0.5"]["f1"] == 1.0 and out["auc"] == 1.0


def test_scoring_normalises_with_the_recorded_augment_section(prepared: PreparedDataset) -> None:
    current = _augment()
    custom = {**current, "normalize": "percentile" if current["normalize"] == "zscore" else "zscore"}
    result = train_baseline(prepared, 3600.0, batch_size=8, patch=32, max_steps=1, augment=custom, progress=False)
    assert result.augment == custom
    seen: list[np.ndarray] = []

    def record(image: np.ndarray) -> np.ndarray:
        seen.append(image)
        return np.zeros(image.shape[1:], np.float32)

    evaluate_probabilities(prepared, record, val_threshold=False, augment=result.augment)
    raw = prepared.load("test_00")["image"]
    assert np.array_equal(seen[0], preprocess("drive", raw, custom))
    assert not np.allclose(seen[0], preprocess("drive", raw, _augment()))  # the config's normalisation differs
