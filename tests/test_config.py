"""The one set of validation helpers, and the stage configs checked with them up front."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest

from pipeline.config import (
    ConfigError,
    check_bool,
    check_choice,
    check_int,
    check_keys,
    check_list,
    check_number,
    load_config,
    setting_argument,
)
from pipeline.data.settings import check_data_config
from pipeline.training.settings import TrainConfigs, resolve_settings


def test_helpers_name_where_and_key_and_refuse_non_finite() -> None:
    where = "configs/x.yaml: s"
    assert check_int(3, "n", where, minimum=1) == 3 and check_int(None, "n", where, optional=True) is None
    for bad in (True, 2.0, "2", 0):
        with pytest.raises(ConfigError, match=r"configs/x\.yaml: s: n must be an integer >= 1, got"):
            check_int(bad, "n", where, minimum=1)
    assert check_number(0.5, "p", where, low=0, high=1, high_open=True) == 0.5
    for bad in (math.nan, math.inf, -math.inf, 1.0, "0.5", False):
        with pytest.raises(ConfigError, match="p must be a finite number >= 0 and < 1"):
            check_number(bad, "p", where, low=0, high=1, high_open=True)
    with pytest.raises(ConfigError, match="b must be true or false, got 'yes'"):
        check_bool("yes", "b", where)
    with pytest.raises(ConfigError, match="c must be one of x, y"):
        check_choice("z", "c", ("x", "y"), where)
    with pytest.raises(ConfigError, match=r"missing keys \['a'\], unknown keys \['q'\]"):
        check_keys({"b": 1, "q": 2}, ("a", "b"), where)
    assert check_keys({"b": 1}, ("a", "b"), where, optional=("a",)) == {"b": 1}
    with pytest.raises(ConfigError, match="l must be null or a non-empty list"):
        check_list([], "l", where, optional=True, nonempty=True)


def test_data_config_is_checked_before_any_work() -> None:
    good = load_config("data")
    checked = check_data_config(good, "configs/data.yaml")  # frozen typed settings with the file's values
    assert list(checked.datasets) == good["datasets"] and checked.prepared_dir == good["prepared_dir"]
    assert checked.prepare.seed == good["prepare"]["seed"] and dict(checked.prepare.limits) == good["prepare"]["limits"]
    assert checked.download.retries == good["download"]["retries"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        checked.prepared_dir = "elsewhere"  # type: ignore[misc]
    cases = [
        (("prepare", "val_fraction"), math.nan, "prepare.val_fraction must be a finite number"),
        (("prepare", "seed"), -1, "prepare.seed must be an integer >= 0"),
        (("download", "retries"), 0, "download.retries must be an integer >= 1"),
        (("prepare", "weight_map", "sigma"), 0, "prepare.weight_map.sigma must be a finite number > 0"),
    ]
    for keys, value, message in cases:
        cfg = copy.deepcopy(good)
        section = cfg
        for key in keys[:-1]:
            section = section[key]
        section[keys[-1]] = value
        with pytest.raises(ConfigError, match=message):
            check_data_config(cfg, "configs/data.yaml")
    cfg = copy.deepcopy(good)
    del cfg["prepare"]["seed"]  # no silent default: the file is the one place it lives
    with pytest.raises(ConfigError, match=r"configs/data.yaml: prepare: missing keys \['seed'\]"):
        check_data_config(cfg, "configs/data.yaml")


@pytest.mark.parametrize(
    "override, message",
    [
        ({"optimizer": {"lr": math.nan}}, "optimizer.lr must be a finite number > 0"),
        ({"optimizer": {"lr": -1}}, "optimizer.lr must be a finite number > 0"),
        ({"optimizer": {"lr": "abc"}}, "optimizer.lr must be a finite number > 0"),
        ({"schedule": {"warmup_steps": -5}}, "schedule.warmup_steps must be an integer >= 0"),
        ({"max_minutes": 0}, "max_minutes must be null or a finite number > 0"),
        (
            {"loss": {"dice_wieght": 1}},
            r"loss: unknown keys \['dice_wieght'\] \('dice_wieght': did you mean 'dice_weight'\?\); expected",
        ),
        ({"substitute": {"segnet": "unet"}}, r"substitute: unknown keys \['segnet'\]; expected"),
    ],
)
def test_training_settings_are_checked_up_front(override: dict, message: str) -> None:
    configs = TrainConfigs(load_config("train"), load_config("networks"), load_config("augment")["drive"])
    with pytest.raises(ConfigError, match=message):
        resolve_settings(configs, "drive", "unet", "smoke", override)


def test_set_values_are_read_as_people_type_them() -> None:
    """`--set optimizer.lr=1e-3`: YAML 1.1 reads 1e-3 as text; numbers are numbers, the rest is YAML."""
    assert setting_argument("optimizer.lr=1e-3") == {"optimizer": {"lr": 0.001}}
    assert setting_argument("epochs=3") == {"epochs": 3} and setting_argument("x=5E4") == {"x": 50000.0}
    assert setting_argument("compile=true") == {"compile": True} and setting_argument("grad_clip=null") == {
        "grad_clip": None
    }
    assert setting_argument("x=nan") == {"x": "nan"}  # not a number: the settings' checks refuse it
    configs = TrainConfigs(load_config("train"), load_config("networks"), load_config("augment")["drive"])
    assert resolve_settings(configs, "drive", "unet", "smoke", setting_argument("optimizer.lr=1e-3")).optimizer[
        "lr"
    ] == pytest.approx(0.001)
