"""Dataset fingerprint and training plan (issue 13, "Splits and planning"): the fingerprint of a small
3-class dataset against hand-computed values, the plan's rules (size contract, memory budget,
normalisation, explicit settings win), plan.json of a smoke training holding the values it used, and
the DRIVE / HeLa / U373 trainings unchanged by the default profile's planned keys."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline.cli import main
from pipeline.config import ConfigError, load_config
from pipeline.data.cards import parse_card
from pipeline.errors import SegpipeError
from pipeline.networks import read_checkpoint
from pipeline.preprocessing.fingerprint import (
    FINGERPRINT_NAME,
    dataset_fingerprint,
    read_fingerprint,
    write_fingerprint,
)
from pipeline.training.planning import CLAHE_CLIP, estimate_memory, meta_network, plan_training
from pipeline.training.settings import TrainConfigs, resolve_settings
from pipeline.transforms.presets import build_preprocess_transforms

from fixtures import FixtureProject
from test_multiclass_train import CLASSES, _three_class_dataset

FACTS = {"classes": ["background", "disk", "bar"], "channels": ["gray"], "spacing": [0.5, 0.5], "modality": None}


def _case(
    shape: tuple[int, int],
    disks: list[tuple[int, int, int, int]],
    bar: tuple[int, int, int, int] | None,
    value: int = 10,
) -> dict[str, np.ndarray]:
    """A case with rectangles of class 1 (`disks`: y0, y1, x0, x1) and one of class 2 (`bar`)."""
    label = np.zeros((1, *shape), np.uint8)
    for y0, y1, x0, x1 in disks:
        label[0, y0:y1, x0:x1] = 1
    if bar is not None:
        y0, y1, x0, x1 = bar
        label[0, y0:y1, x0:x1] = 2
    image = (value + 100 * label).astype(np.uint8)
    return {"image": image, "label": label}


def _cases() -> tuple[dict[str, dict[str, np.ndarray]], dict[str, str]]:
    """Three train/val cases (one with a FOV) and a test case the fingerprint must leave out."""
    a = _case((20, 30), [(0, 2, 0, 3), (10, 14, 10, 14)], (18, 20, 0, 30))  # disks 6 + 16 px, bar 60 px
    b = _case((24, 30), [(5, 10, 5, 10)], None)  # disk 25 px
    c = _case((30, 40), [(0, 3, 0, 3), (0, 3, 5, 8), (20, 21, 20, 21)], (4, 5, 0, 10))  # disks 9, 9, 1; bar 10
    c["fov"] = np.ones((1, 30, 40), np.uint8)
    c["fov"][0, 25:] = 0  # 5 rows x 40 outside the FOV: all background
    test = _case((99, 99), [(0, 50, 0, 50)], None)
    return {"a": a, "b": b, "c": c, "t": test}, {"a": "train", "b": "train", "c": "val", "t": "test"}


# --- fingerprint ------------------------------------------------------------------------------------


def test_fingerprint_against_hand_computed_values(tmp_path: Path) -> None:
    loaded, splits = _cases()
    fp = dataset_fingerprint(loaded, splits, FACTS, seed=3)
    assert fp["cases"] == {"a": [20, 30], "b": [24, 30], "c": [30, 40]}
    assert fp["shape"] == {"median": [24.0, 30.0], "min": [20, 30], "max": [30, 40]}
    assert fp["channels"] == {"count": 1, "names": ["gray"]} and fp["spacing"] == [0.5, 0.5]
    # pixels inside the FOV: a 600, b 720, c 1000 of 1200
    disk, bar = 6 + 16 + 25 + 9 + 9 + 1, 60 + 10
    total = 600 + 720 + 1000
    assert fp["classes"] == {
        "background": {"pixels": total - disk - bar, "frequency": (total - disk - bar) / total},
        "disk": {"pixels": disk, "frequency": disk / total},
        "bar": {"pixels": bar, "frequency": bar / total},
    }
    areas = np.array([6, 16, 25, 9, 9, 1])
    assert fp["objects"]["disk"] == {
        "count": 6,
        "min": 1,
        "median": float(np.median(areas)),
        "p95": float(np.percentile(areas, 95)),
    }
    assert fp["objects"]["bar"] == {"count": 2, "min": 10, "median": 35.0, "p95": float(np.percentile([60, 10], 95))}
    assert fp["intensity"]["region"] == "fov"
    write_fingerprint(tmp_path, fp)
    assert read_fingerprint(tmp_path, "three") == fp


def test_objects_are_8_connected_and_absent_classes_have_none() -> None:
    label = np.zeros((1, 10, 10), np.uint8)
    label[0, 1, 1] = label[0, 2, 2] = 1  # diagonal neighbours: one object
    label[0, 7, 7] = 1
    fp = dataset_fingerprint(
        {"x": {"image": label.copy(), "label": label}}, {"x": "train"}, {**FACTS, "spacing": None}, seed=0
    )
    assert fp["objects"]["disk"] == {"count": 2, "min": 1, "median": 1.5, "p95": pytest.approx(1.95)}
    assert fp["objects"]["bar"] == {"count": 0, "min": None, "median": None, "p95": None}


def test_intensity_statistics_are_numpys_on_the_sample() -> None:
    rng = np.random.default_rng(0)
    loaded = {
        f"c{i}": {
            "image": rng.gamma(2.0, 50.0, (2, 60, 70)).astype(np.float32),
            "label": np.zeros((1, 60, 70), np.uint8),
        }
        for i in range(4)
    }
    facts = {**FACTS, "channels": ["one", "two"]}
    splits = {c: "train" for c in loaded}
    pooled = np.concatenate([v["image"].reshape(2, -1) for v in loaded.values()], axis=1).astype(np.float64)
    full = dataset_fingerprint(loaded, splits, facts, seed=1)["intensity"]["channels"]
    for k, name in enumerate(("one", "two")):  # every pixel fits the sample: exactly numpy's
        low, mid, high = np.percentile(pooled[k], (0.5, 50, 99.5))
        overall = {key: v for key, v in full[name].items() if key != "classes"}
        assert overall == pytest.approx(
            {
                "p0.5": low,
                "p50": mid,
                "p99.5": high,
                "mean": pooled[k].mean(),
                "std": pooled[k].std(),
                "pixels": pooled.shape[1],
            },
            rel=1e-6,
        )
        assert full[name]["classes"]["background"] == pytest.approx(
            {"mean": pooled[k].mean(), "std": pooled[k].std(), "pixels": pooled.shape[1]}, rel=1e-6
        )
        assert full[name]["classes"]["disk"] == {"mean": None, "std": None, "pixels": 0}
    sampled = dataset_fingerprint(loaded, splits, facts, seed=1, max_pixels_per_case=1000)
    again = dataset_fingerprint(loaded, splits, facts, seed=1, max_pixels_per_case=1000)
    assert sampled == again and sampled["intensity"]["channels"]["one"]["pixels"] == 4000
    for k, name in enumerate(("one", "two")):  # a seeded sample of 4,000 of 16,800 pixels: close
        stats = sampled["intensity"]["channels"][name]
        assert stats["p50"] == pytest.approx(np.median(pooled[k]), rel=0.05)
        assert stats["mean"] == pytest.approx(pooled[k].mean(), rel=0.03)
        assert stats["std"] == pytest.approx(pooled[k].std(), rel=0.05)
    total = dataset_fingerprint(loaded, splits, facts, seed=1, max_pixels_total=2000)
    assert total["intensity"]["sample"]["max_pixels_per_case"] == 500


def test_a_missing_fingerprint_names_the_command(tmp_path: Path) -> None:
    with pytest.raises(SegpipeError, match=r"fingerprint\.json: not found .*run segpipe prepare mine again"):
        read_fingerprint(tmp_path, "mine")
    (tmp_path / FINGERPRINT_NAME).write_text('{"format": "other"}')
    with pytest.raises(SegpipeError, match="not a segpipe-fingerprint/1 fingerprint; run segpipe prepare mine"):
        read_fingerprint(tmp_path, "mine")


# --- the plan ---------------------------------------------------------------------------------------


def _configs(**profile_changes: Any) -> TrainConfigs:
    """The repository's configs with a dataset `mine` on the generic preset."""
    train = copy.deepcopy(load_config("train"))
    for profile in train["profiles"].values():
        profile.update(profile_changes)
    return TrainConfigs(train, load_config("networks"), load_config("augment")["generic"])


def _fingerprint(
    median: tuple[float, float] = (300.0, 200.0),
    channels: dict[str, dict[str, Any]] | None = None,
    modality: str | None = None,
    asked: dict[str, str] | None = None,
    dtype: str = "uint8",
) -> dict[str, Any]:
    normal = {"p0.5": -2.58, "p50": 0.0, "p99.5": 2.58, "mean": 0.0, "std": 1.0}
    return {
        "format": "segpipe-fingerprint/1",
        "shape": {"median": list(median)},
        "modality": modality,
        "plan": asked or {},
        "channels": {"count": len(channels or [0]), "names": list(channels or {"gray": None})},
        "intensity": {"dtype": dtype, "channels": channels or {"gray": normal}},
        "classes": {"background": {"pixels": 900}, "cell": {"pixels": 100}},
    }


def _plan(
    network: str = "unet",
    profile: str = "default",
    fingerprint: dict | None = None,
    configs: TrainConfigs | None = None,
    **overrides: Any,
):
    settings = resolve_settings(configs or _configs(), "mine", network, profile, overrides)
    return plan_training(fingerprint or _fingerprint(), settings)


@pytest.mark.parametrize(
    "network, overrides",
    [
        ("unet", {}),  # same padding: multiples of 16
        ("unet", {"network_preset": "paper"}),  # valid padding: 4, 20, ..., 116, 132
        ("u2net", {}),
        ("unetpp", {}),
    ],
)
@pytest.mark.parametrize("median", [(300.0, 200.0), (70.5, 90.0), (40.0, 41.0)])
def test_patch_size_obeys_the_size_contract(network: str, overrides: dict, median: tuple[float, float]) -> None:
    plan = _plan(network, fingerprint=_fingerprint(median), **overrides)
    entry, net = plan.entries["patch_size"], meta_network(plan.settings, _fingerprint(median))
    size, limit = entry["value"], min(int(min(median)), 128)
    assert entry["source"] == "planned" and plan.settings.patch_size == size
    assert net.valid_output_size(size) == size and size <= limit
    assert all(net.valid_output_size(n) != n for n in range(size + 1, limit + 1))  # the largest
    if net.padding == "valid":
        assert net.input_size(size) == size + 2 * net.halo


def test_patch_size_too_small_an_image_gets_the_smallest_output() -> None:
    plan = _plan("unet", fingerprint=_fingerprint((10.0, 12.0)))
    assert plan.entries["patch_size"]["value"] == 16 and "no output size <= 10" in plan.entries["patch_size"]["why"]


def test_batch_size_follows_the_memory_budget_and_is_clamped() -> None:
    def batch(budget: int, max_batch: int = 1024) -> int:
        configs = _configs(plan={"memory_budget_mb": budget, "max_patch_size": 128, "max_batch_size": max_batch})
        return _plan("unet", configs=configs).settings.batch_size

    sizes = [batch(b) for b in (16, 64, 256, 1024, 4096)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    assert sizes[0] == 4  # clamped to 2, then one multiple of patches.num_samples (4)
    assert all(s % 4 == 0 for s in sizes)
    assert batch(10**6, max_batch=32) == 32
    net = meta_network(_plan("unet").settings, _fingerprint())
    per_patch, fixed = estimate_memory(net, 128, "bf16")
    assert batch(1024) == min(1024, (1024 * 2**20 - fixed) // per_patch) // 4 * 4
    assert estimate_memory(net, 128, "fp32")[0] == 2 * per_patch
    assert estimate_memory(net, 64, "bf16")[0] < per_patch


def test_explicit_settings_win_and_the_plan_records_its_alternative() -> None:
    plan = _plan("unet", "smoke")
    patch, batch = plan.entries["patch_size"], plan.entries["batch_size"]
    assert (patch["value"], patch["source"], patch["planned"]) == (32, "profile", 128)
    assert (batch["value"], batch["source"]) == (4, "profile") and batch["planned"] % 4 == 0
    assert (plan.settings.patch_size, plan.settings.batch_size) == (32, 4)
    plan = _plan("unet", patch_size=64)  # --set patch_size=64 over the default profile's null
    assert plan.entries["patch_size"]["source"] == "profile" and plan.settings.patch_size == 64
    assert plan.entries["batch_size"]["source"] == "planned"
    fingerprint = {**_fingerprint(), "shape": {"median": [300.0, 200.0], "min": [200, 150], "max": [320, 240]}}
    assert _plan("unet", patch_size=320, fingerprint=fingerprint).settings.patch_size == 320
    with pytest.raises(
        SegpipeError,
        match=r"patch_size 100000 \(mine, .*\) is larger than the largest image side "
        r"of the dataset \(320 px",
    ):
        _plan("unet", patch_size=100000, fingerprint=fingerprint)  # --set patch_size=100000: refused, not a traceback


def test_normalize_auto_is_resolved_per_channel() -> None:
    normal = {"p0.5": -2.58, "p50": 0.0, "p99.5": 2.58, "mean": 0.0, "std": 1.0}
    spiky = {"p0.5": 10.0, "p50": 11.0, "p99.5": 12.0, "mean": 12.0, "std": 5.0}  # a few very bright pixels
    plan = _plan(fingerprint=_fingerprint(channels={"gray": normal}))
    assert plan.entries["normalize"]["value"] == "zscore" and plan.settings.augment["normalize"] == "zscore"
    plan = _plan(fingerprint=_fingerprint(channels={"dapi": normal, "gfp": spiky}))
    channels = plan.entries["normalize"]["channels"]
    assert (channels["dapi"]["value"], channels["gfp"]["value"]) == ("zscore", "percentile")
    assert plan.settings.augment["normalize"] == "percentile"  # one scheme for every channel
    plan = _plan(fingerprint=_fingerprint(channels={"gray": normal}, modality="CT"))
    assert plan.entries["normalize"]["source"] == "card" and plan.settings.augment["normalize"] == "percentile"
    configs = _configs()
    configs = dataclasses.replace(configs, augment={**configs.augment, "normalize": "zscore"})
    plan = _plan(fingerprint=_fingerprint(channels={"gray": spiky}), configs=configs)
    assert plan.entries["normalize"] | {"channels": None} == {
        "value": "zscore",
        "source": "preset",
        "why": "set in configs/augment.yaml",
        "planned": "percentile",
        "channels": None,
    }
    assert plan.entries["clahe"]["source"] == "preset" and plan.entries["class_weights"]["value"] == pytest.approx(
        [1000 / (2 * 900), 1000 / (2 * 100)]
    )


def test_card_plan_key_takes_only_auto(tmp_path: Path) -> None:
    card = {"source": {"archives": "drive"}, "classes": {"background": 0, "vessel": 255}, "channels": ["gray"]}
    path = tmp_path / "mine.yaml"
    assert parse_card(card, "mine", path).plan == {}
    parsed = parse_card({**card, "plan": {"channels": "auto"}}, "mine", path)
    assert parsed.plan == {"channels": "auto"} and parsed.facts["plan"] == {"channels": "auto"}
    with pytest.raises(ConfigError, match=r"mine\.yaml: plan\.clahe must be auto .*got 0\.02"):
        parse_card({**card, "plan": {"clahe": 0.02}}, "mine", path)
    with pytest.raises(ConfigError, match=r"mine\.yaml: plan: unknown keys \['normalize'\]"):
        parse_card({**card, "plan": {"normalize": "auto"}}, "mine", path)


def test_fingerprint_records_the_card_request_dtype_and_class_statistics() -> None:
    loaded, splits = _cases()
    fp = dataset_fingerprint(loaded, splits, {**FACTS, "plan": {"clahe": "auto"}}, seed=3)
    assert fp["plan"] == {"clahe": "auto"} and fp["intensity"]["dtype"] == "uint8"
    classes = fp["intensity"]["channels"]["gray"]["classes"]  # image = 10 + 100 x class: constant per class
    assert classes["disk"] == {"mean": 110.0, "std": 0.0, "pixels": 66}
    assert classes["bar"] == {"mean": 210.0, "std": 0.0, "pixels": 70}
    assert dataset_fingerprint(loaded, splits, FACTS, seed=3)["plan"] == {}


def _stats(p05: float, p995: float, per_class: list[tuple[float, float]]) -> dict[str, Any]:
    """One channel's fingerprint statistics with per-class (mean, std) of background and cell."""
    return {
        "p0.5": p05,
        "p50": (p05 + p995) / 2,
        "p99.5": p995,
        "mean": 1.0,
        "std": (p995 - p05) / 5,
        "classes": {
            name: {"mean": m, "std": sd, "pixels": 100} for name, (m, sd) in zip(("background", "cell"), per_class)
        },
    }


THREE = {
    "red": _stats(0, 100, [(50, 20), (80, 20)]),  # Fisher 900 / 800 = 1.1
    "green": _stats(0, 100, [(40, 10), (120, 10)]),  # 6400 / 200 = 32: the best
    "blue": _stats(0, 100, [(60, 5), (60, 30)]),
}  # 0; all narrow: p99.5 - p0.5 = 100 < 127.5


def test_channels_auto_keeps_the_channel_separating_the_classes_best() -> None:
    configs = _configs()
    configs = dataclasses.replace(configs, augment={**configs.augment, "normalize": "auto"})
    plan = _plan(fingerprint=_fingerprint(channels=THREE, asked={"channels": "auto"}), configs=configs)
    entry = plan.entries["channels"]
    assert (entry["value"], entry["source"]) == ([1], "planned") and plan.settings.augment["channels"] == [1]
    assert entry["fisher"] == pytest.approx({"red": 900 / 800, "green": 32.0, "blue": 0.0})
    assert set(plan.entries["normalize"]["channels"]) == {"green"}  # normalisation of the kept channel
    assert meta_network(plan.settings, _fingerprint(channels=THREE)).in_channels == 1
    one = _plan(fingerprint=_fingerprint(asked={"channels": "auto"})).entries["channels"]
    assert one["value"] is None and "nothing to choose" in one["why"]


def test_an_explicit_preset_wins_over_the_card_and_records_the_planned_alternative() -> None:
    configs = _configs()
    configs = dataclasses.replace(configs, augment={**configs.augment, "channels": [0], "clahe": 0.03})
    fingerprint = _fingerprint(channels=THREE, asked={"channels": "auto", "clahe": "auto"})
    plan = _plan(fingerprint=fingerprint, configs=configs)
    channels, clahe = plan.entries["channels"], plan.entries["clahe"]
    assert (channels["value"], channels["source"], channels["planned"]) == ([0], "preset", [1])
    assert (clahe["value"], clahe["source"], clahe["planned"]) == (0.03, "preset", CLAHE_CLIP)
    assert plan.settings.augment["channels"] == [0] and plan.settings.augment["clahe"] == 0.03
    assert set(plan.entries["normalize"]["channels"]) == {"red"}


@pytest.mark.parametrize(
    "dtype, spread, clahe",
    [
        ("uint8", 100.0, CLAHE_CLIP),  # 100 < 0.5 x 255
        ("uint8", 200.0, None),
        ("uint16", 30000.0, CLAHE_CLIP),  # < 0.5 x 65535
        ("uint16", 40000.0, None),
        ("float32", 0.1, None),  # no dtype range: never
    ],
)
def test_clahe_auto_on_narrow_integer_data_only(dtype: str, spread: float, clahe: float | None) -> None:
    channels = {"gray": _stats(10.0, 10.0 + spread, [(20, 5), (60, 5)])}
    plan = _plan(fingerprint=_fingerprint(channels=channels, asked={"clahe": "auto"}, dtype=dtype))
    entry = plan.entries["clahe"]
    assert (entry["value"], entry["source"]) == (clahe, "planned") and plan.settings.augment["clahe"] == clahe
    assert (f"{spread:.4g}" in entry["why"]) if dtype != "float32" else ("float32" in entry["why"])


def test_without_the_card_asking_channels_and_clahe_stay_the_presets() -> None:
    configs = _configs()
    configs = dataclasses.replace(configs, augment={**configs.augment, "channels": None, "clahe": None})
    plan = _plan(fingerprint=_fingerprint(channels=THREE), configs=configs)  # narrow uint8 channels
    for key in ("channels", "clahe"):
        assert plan.entries[key]["value"] is None and plan.entries[key]["source"] == "preset"
        assert "planned" not in plan.entries[key] and plan.settings.augment[key] is None
    assert set(plan.entries["normalize"]["channels"]) == {"red", "green", "blue"}


def test_transforms_never_see_auto() -> None:
    generic = load_config("augment")["generic"]
    assert generic["normalize"] == "auto"
    with pytest.raises(SegpipeError, match="mine.normalize is auto, which the training plan resolves"):
        build_preprocess_transforms("mine", generic)


def test_plan_keys_are_validated() -> None:
    configs = _configs(plan={"memory_budget_mb": 0, "max_patch_size": 128, "max_batch_size": 32})
    with pytest.raises(ConfigError, match="plan.memory_budget_mb must be an integer >= 1"):
        resolve_settings(configs, "mine", "unet")
    with pytest.raises(ConfigError, match=r"plan: missing keys \['max_batch_size'\]"):
        resolve_settings(_configs(plan={"memory_budget_mb": 1, "max_patch_size": 1}), "mine", "unet")


@pytest.mark.parametrize("dataset", ["drive", "hela", "u373"])
@pytest.mark.parametrize("network", ["unet", "unetpp", "u2net"])
def test_paper_datasets_keep_their_calibrated_settings(dataset: str, network: str) -> None:
    configs = TrainConfigs(load_config("train"), load_config("networks"), load_config("augment")[dataset])
    settings = resolve_settings(configs, dataset, network)
    assert (settings.patch_size, settings.batch_size) == (96, 16)
    assert settings.weight_map is (dataset != "drive")
    channels = {"red": {}, "green": {}, "blue": {}} if dataset == "drive" else {"gray": {}}
    fingerprint = _fingerprint(
        (584.0, 565.0), channels={k: {"p0.5": 0.0, "p50": 1.0, "p99.5": 9.0, "mean": 1.0, "std": 1.0} for k in channels}
    )
    plan = plan_training(fingerprint, settings)
    assert (plan.settings.patch_size, plan.settings.batch_size) == (96, 16)
    assert plan.settings.augment == settings.augment  # their presets set normalize
    assert {plan.entries[k]["source"] for k in ("patch_size", "batch_size", "normalize")} == {"profile", "preset"}


# --- end to end -------------------------------------------------------------------------------------


def test_prepare_writes_the_fingerprint_and_training_uses_the_plan(project: FixtureProject) -> None:
    prepared = _three_class_dataset(project)
    fp = json.loads((prepared / FINGERPRINT_NAME).read_text())
    stats = json.loads((prepared / "stats.json").read_text())
    assert sorted(fp["cases"]) == sorted(stats["cases"]["train"] + stats["cases"]["val"])
    assert list(fp["classes"]) == CLASSES and fp["shape"]["median"] == [32.0, 40.0]
    assert fp["intensity"]["region"] == "fov" and set(fp["objects"]) == {"disk", "bar"}

    args = [
        "train",
        "three",
        "unet",
        "--profile",
        "smoke",
        "--set",
        "patch_size=null",
        "--set",
        "batch_size=null",
        "--set",
        "plan.max_batch_size=8",
        "--set",
        "epochs=1",
    ]
    assert main(args) == 0
    out = project.root / "models" / "three" / "unet"
    plan = json.loads((out / "plan.json").read_text())
    config = json.loads((out / "config.json").read_text())
    entries = plan["entries"]
    assert (entries["patch_size"]["value"], entries["batch_size"]["value"]) == (32, 8)
    assert (config["patch_size"], config["batch_size"]) == (32, 8)
    assert entries["normalize"]["source"] == "planned"
    assert config["augment"]["normalize"] == entries["normalize"]["value"] != "auto"
    assert read_checkpoint(out / "best.pt")["augment"]["normalize"] == entries["normalize"]["value"]
    client = MlflowClient()
    run = client.search_runs(
        [client.get_experiment_by_name("three").experiment_id],
        "tags.stage = 'train'",
        order_by=["start_time DESC"],
        max_results=1,
    )[0]
    assert run.data.params["plan.patch_size"] == "32" and run.data.params["plan.batch_size"] == "8"
    assert run.data.params["plan.memory_budget_mb"] == "2048"
    assert "plan.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert yaml.safe_load((project.root / "configs" / "augment.yaml").read_text())["three"]["normalize"] == "auto"
