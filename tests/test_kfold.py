"""k-fold cross-validation (issue 13 "Splits and planning"): `segpipe prepare` deals the train and val
cases into seeded, balanced folds (manifest.csv `fold`, stats.json `folds`) without touching the
split; `PreparedDataset.with_fold(k)` validates on fold k; `segpipe train --fold k` records the fold
in the checkpoints, config.json and MLflow, refuses to resume another fold, and `segpipe evaluate`
picks its threshold on the same fold's validation cases."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.cli import main
from pipeline.config import ConfigError, load_config
from pipeline.data.prepared import PreparedDataset, open_prepared
from pipeline.data.settings import check_data_config
from pipeline.data.sources import get_source
from pipeline.errors import SegpipeError
from pipeline.networks import read_checkpoint
from pipeline.preprocessing.splits import assign_folds, assign_splits
from pipeline.stages.evaluate import evaluate as run_evaluate
from pipeline.training.settings import TrainConfigs, resolve_settings

from fixtures import FixtureProject, prepare_fixture_datasets

REPO_ROOT = Path(__file__).resolve().parents[1]


def _pool(n: int, n_test: int = 0) -> tuple[pd.Series, pd.Series]:
    """(case names, splits): `n` train/val cases (every fifth val) and `n_test` test cases."""
    cases = [f"c{i:02d}" for i in range(n)] + [f"t{i:02d}" for i in range(n_test)]
    split = ["val" if i % 5 == 0 else "train" for i in range(n)] + ["test"] * n_test
    return pd.Series(cases), pd.Series(split)


def _dataset(n: int = 12, n_test: int = 3, folds: int = 5, seed: int = 2015) -> PreparedDataset:
    """A PreparedDataset in memory (with_fold reads only the manifest and stats.json)."""
    cases, split = _pool(n, n_test)
    fold = assign_folds(cases, split, seed, folds)
    manifest = pd.DataFrame({"case": cases, "split": split, "fold": fold, "image": "", "label": "", "weight": ""})
    return PreparedDataset("toy", Path("data/prepared/toy"), manifest, {"folds": {"n": folds}})


# --- the folds ---------------------------------------------------------------------------------------


def test_folds_are_seeded_balanced_and_leave_test_cases_out() -> None:
    cases, split = _pool(13, 4)
    first = assign_folds(cases, split, 2015, 5)
    assert first.equals(assign_folds(cases, split, 2015, 5))
    assert not first.equals(assign_folds(cases, split, 7, 5))
    assert list(first[split == "test"]) == [""] * 4
    sizes = first[split != "test"].value_counts()
    assert sorted(sizes.index) == ["0", "1", "2", "3", "4"] and sorted(sizes) == [2, 2, 3, 3, 3]
    # the fold of a case depends on the set of cases, not on the table's row order
    shuffled = np.random.default_rng(0).permutation(len(cases))
    again = assign_folds(
        cases.iloc[shuffled].reset_index(drop=True), split.iloc[shuffled].reset_index(drop=True), 2015, 5
    )
    assert dict(zip(cases.iloc[shuffled], again)) == dict(zip(cases, first))


@pytest.mark.parametrize("k", range(5))
def test_with_fold_validates_on_fold_k_and_trains_on_the_rest(k: int) -> None:
    data = _dataset()
    folded = data.with_fold(k)
    fold_k = set(data.manifest.loc[data.manifest["fold"] == str(k), "case"])
    train, val = set(folded.cases("train")), set(folded.cases("val"))
    assert val == fold_k and not train & val
    assert train | val == set(data.cases("train")) | set(data.cases("val"))
    assert folded.cases("test") == data.cases("test")
    assert data.with_fold(None) is data
    assert list(data.manifest["split"]) == list(_pool(12, 3)[1])  # the original is not changed


def test_with_fold_errors_name_the_file_and_the_fix() -> None:
    data = _dataset()
    old = PreparedDataset("toy", data.root, data.manifest.drop(columns="fold"), {})
    with pytest.raises(
        SegpipeError, match=r"manifest\.csv: no cross-validation folds .*run `segpipe prepare toy` again"
    ):
        old.with_fold(0)
    for k in (5, -1):
        with pytest.raises(SegpipeError, match=rf"stats\.json: 5 folds .*must be 0\.\.4, got {k}"):
            data.with_fold(k)
    with pytest.raises(SegpipeError, match=r"fold 3 holds 0 of the 3 train and val cases"):
        _dataset(n=3, folds=5).with_fold(3)
    with pytest.raises(SegpipeError, match=r"fold 0 holds 1 of the 1 train and val cases"):
        _dataset(n=1, folds=2).with_fold(0)


def test_fold_settings_are_checked() -> None:
    cfg = copy.deepcopy(load_config("data"))
    assert cfg["prepare"]["folds"] == 5
    cfg["prepare"]["folds"] = 1
    with pytest.raises(ConfigError, match=r"configs/data\.yaml: prepare\.folds must be an integer >= 2, got 1"):
        check_data_config(cfg, "configs/data.yaml")
    train = dict(load_config("train"))
    assert train["fold"] is None
    configs = TrainConfigs(train, load_config("networks"), load_config("augment")["drive"])
    assert resolve_settings(configs, "drive", "unet", "smoke").fold is None
    assert resolve_settings(configs, "drive", "unet", "smoke", fold=3).fold == 3
    assert (
        resolve_settings(
            TrainConfigs({**train, "fold": 2}, configs.networks, configs.augment), "drive", "unet", "smoke"
        ).fold
        == 2
    )
    with pytest.raises(ConfigError, match=r"configs/train\.yaml: fold must be null or an integer >= 0, got 'a'"):
        resolve_settings(TrainConfigs({**train, "fold": "a"}, configs.networks, configs.augment), "drive", "unet")
    with pytest.raises(ConfigError, match=r"segpipe train --fold: fold must be an integer >= 0, got -1"):
        resolve_settings(configs, "drive", "unet", "smoke", fold=-1)


def test_the_dvc_train_stage_reads_fold() -> None:
    """`dvc exp run -S configs/train.yaml:fold=K` reruns the trainings only if their params list fold."""
    params = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]["train"]["params"]
    train_keys = next(entry["configs/train.yaml"] for entry in params if "configs/train.yaml" in entry)
    assert "fold" in train_keys


# --- prepare, train and evaluate -------------------------------------------------------------------


@pytest.fixture
def drive(project: FixtureProject) -> Path:
    """The fixture DRIVE prepared (5 training cases: 4 train + 1 val; 3 test), without MLflow models."""
    tracking = project.root / "configs" / "tracking.yaml"
    tracking.write_text(
        tracking.read_text()
        .replace("log_model: true", "log_model: false")
        .replace("register_model: true", "register_model: false")
    )
    prepare_fixture_datasets(project, ("drive",))
    return project.root / "data" / "prepared" / "drive"


def test_prepare_writes_folds_beside_the_unchanged_split(drive: Path) -> None:
    manifest = pd.read_csv(drive / "manifest.csv", dtype=str, keep_default_na=False)
    assert list(manifest.columns[:3]) == ["case", "split", "fold"]
    # the split column is what assign_splits gives, as before folds existed
    layout = get_source(Path("data_manifests"), "drive").layout
    table = pd.DataFrame({"case": manifest["case"], "part": manifest["case"].str.split("_").str[0]})
    expected = assign_splits(table, layout.train_parts, layout.test_parts, 2015, 0.2)
    assert list(manifest["split"]) == list(expected)
    assert list(manifest["fold"]) == list(assign_folds(manifest["case"], manifest["split"], 2015, 5))
    assert (manifest["fold"] == "").equals(manifest["split"] == "test")
    stats = json.loads((drive / "stats.json").read_text())
    assert stats["folds"]["n"] == 5
    assert stats["folds"]["cases"] == {
        str(k): sorted(manifest.loc[manifest["fold"] == str(k), "case"]) for k in range(5)
    }
    assert sorted(c for cases in stats["folds"]["cases"].values() for c in cases) == sorted(
        manifest.loc[manifest["split"] != "test", "case"]
    )


def test_a_fold_trains_with_eq2_class_weights_of_its_own_training_cases(drive: Path) -> None:
    from pipeline.training.loader import training_cases
    from pipeline.transforms import compute_class_weights

    prepared = open_prepared("drive", drive)
    keys = ["image", "label", "weight"]
    stored = {c: prepared.load(c) for c in prepared.manifest.loc[prepared.manifest["split"] != "test", "case"]}
    old = np.asarray(prepared.stats["class_weights"])
    as_prepared = training_cases(prepared, keys)  # prepare's own train split: the maps as written
    assert all(np.array_equal(c["weight"], stored[n]["weight"]) for c, n in zip(as_prepared, prepared.cases("train")))
    fold = prepared.with_fold(1)
    new = compute_class_weights([stored[c]["label"] for c in fold.cases("train")], num_classes=old.size)
    assert not np.allclose(new, old)  # the held-out fold's labels changed the class frequencies
    for case, name in zip(training_cases(fold, keys), fold.cases("train")):
        label, weight = stored[name]["label"], stored[name]["weight"]
        assert case["weight"].dtype == np.float32
        # eq. 2: w = w_c(x) + border term; the border term stays, w_c is the fold's
        np.testing.assert_allclose(case["weight"] - new[label], weight - old[label], atol=1e-5)


def test_train_and_evaluate_fold_1(
    project: FixtureProject, drive: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow.tracking import MlflowClient

    import pipeline.evaluation.evaluate as ev
    import pipeline.training.loop as loop
    import pipeline.training.trainer as trainer

    seen: dict[str, list[str]] = {}
    build_loader, validation_cases, pick_threshold = trainer.build_loader, loop.validation_cases, ev.pick_threshold

    def loader_spy(prepared, *args):
        seen["train"] = prepared.cases("train")
        return build_loader(prepared, *args)

    def validation_spy(prepared, settings):
        seen["val"] = prepared.cases("val")
        return validation_cases(prepared, settings)

    def threshold_spy(predictor, data, desc):
        seen["threshold"] = data.cases("val")
        return pick_threshold(predictor, data, desc)

    monkeypatch.setattr(trainer, "build_loader", loader_spy)
    monkeypatch.setattr(loop, "validation_cases", validation_spy)
    monkeypatch.setattr(ev, "pick_threshold", threshold_spy)
    prepared = open_prepared("drive", drive)
    fold_1 = prepared.manifest.loc[prepared.manifest["fold"] == "1", "case"].tolist()
    assert len(fold_1) == 1 and fold_1 != prepared.cases("val")  # not the prepare split's val case

    smoke = ["--profile", "smoke", "--set", "epochs=1", "--set", "steps_per_epoch=1"]
    assert main(["train", "drive", "unet", *smoke, "--fold", "1"]) == 0
    assert seen["val"] == fold_1
    assert sorted(seen["train"]) == sorted(
        set(prepared.manifest.loc[prepared.manifest["split"] != "test", "case"]) - set(fold_1)
    )
    out = project.root / "models" / "drive" / "unet"
    assert read_checkpoint(out / "best.pt")["fold"] == 1 and read_checkpoint(out / "last.pt")["fold"] == 1
    assert json.loads((out / "config.json").read_text())["fold"] == 1
    client = MlflowClient()
    run = client.search_runs(
        [client.get_experiment_by_name("drive").experiment_id],
        "tags.stage = 'train'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )[0]
    assert run.data.params["fold"] == "1" and run.data.tags["fold"] == "1"
    logged = {i.dataset.name: json.loads(i.dataset.profile)["num_rows"] for i in run.inputs.dataset_inputs}
    assert logged == {"drive-train-fold1": len(seen["train"]), "drive-val-fold1": 1}  # the fold's rows

    capsys.readouterr()
    assert main(["train", "drive", "unet", *smoke, "--fold", "2", "--resume"]) == 2
    assert "cannot resume with fold 2: this checkpoint trained fold 1;" in capsys.readouterr().err
    assert main(["train", "drive", "unet", *smoke, "--resume"]) == 2  # configs/train.yaml fold: null
    assert (
        "cannot resume with fold null (the prepare split): this checkpoint trained fold 1;" in capsys.readouterr().err
    )

    metrics = run_evaluate("drive", "unet")
    assert seen["threshold"] == fold_1
    assert metrics["fold"] == 1
    assert json.loads((project.root / "results" / "drive" / "unet" / "metrics.json").read_text())["fold"] == 1


def test_a_manifest_without_folds_asks_for_prepare(drive: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = pd.read_csv(drive / "manifest.csv", dtype=str, keep_default_na=False)
    manifest.drop(columns="fold").to_csv(drive / "manifest.csv", index=False)
    assert main(["train", "drive", "unet", "--profile", "smoke", "--fold", "0"]) == 2
    assert (
        "no cross-validation folds (prepared before folds existed); run `segpipe prepare drive` again"
        in capsys.readouterr().err
    )
