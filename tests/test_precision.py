"""The `precision` parameter: bf16 parity with fp32 on every architecture, refusals, warnings,
and a deterministic bf16 training."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy import ndimage
from torch import nn

from pipeline.config import ConfigError
from pipeline.inference import load_settings, predict
from pipeline.networks import build_network, read_checkpoint
from pipeline.networks import precision as precision_module
from pipeline.networks.precision import PrecisionWarning, check_precision
from pipeline.stages.train import train

from fixtures import FixtureProject, prepare_fixture_datasets

PRESETS = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "networks.yaml").read_text())
ARCHITECTURES = {
    "unet": PRESETS["default"]["unet"],
    "unet-valid": {**PRESETS["paper"]["unet"], "base_width": 8},  # the paper's, narrower
    "unetpp": PRESETS["default"]["unetpp"],
    "u2netp": {},
    "u2net": {},
}
PROBABILITY_TOLERANCE = {"unet": 0.01, "unet-valid": 0.01, "unetpp": 0.01, "u2netp": 0.08, "u2net": 0.08}
"""Stated tolerance: the 99th percentile of |p_bf16 - p_fp32| over the pixels. U2-Net's ~100
convolutions in a row accumulate more bf16 rounding than the U-Nets' ~20 (measured on these random
networks: 0.004-0.007 for the U-Nets, 0.032-0.051 for U2-Net and the lite version, on a CPU with
AVX512-BF16 and with oneDNN held to AVX-512 without it, `ONEDNN_MAX_CPU_ISA=AVX512_CORE`, as on
CPUs that emulate bf16).

Labels must agree on 99.5 % of the pixels that fp32 decides by more than twice the tolerance
(|2p - 1| for one channel, the gap between the two largest class probabilities otherwise): a
tolerance-sized change of the probabilities cannot flip those. Over all pixels the
figure says little for random networks: at init their outputs are near-constant, so their label
maps are near-ties (1.6 % flipped for the 3-class paper U-Net, whose probabilities differ by 3e-4)."""


def _image() -> np.ndarray:
    """A smooth random RGB image, z-scored: structure at several scales, like a real input."""
    rng = np.random.default_rng(0)
    img = ndimage.gaussian_filter(rng.random((3, 160, 192)), (0, 6, 6))
    return ((img - img.mean()) / img.std()).astype(np.float32)


def _random_network(name: str, out_channels: int, image: np.ndarray, calibrated: bool) -> nn.Module:
    """A random network of `name`; `calibrated`: batch-norm statistics set from `image`, so that the
    activations have the scale of a trained network's (at init they shrink to a near-constant output)."""
    torch.manual_seed(0)
    net = build_network(name.split("-")[0], 3, out_channels, **ARCHITECTURES[name])
    if calibrated:
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = None
                m.reset_running_stats()
        net.train()
        with torch.no_grad():
            net(torch.from_numpy(image)[None])
    return net.eval()


def _labels(probs: np.ndarray) -> np.ndarray:
    return probs[0] >= 0.5 if probs.shape[0] == 1 else probs.argmax(0)


def _margin(probs: np.ndarray) -> np.ndarray:
    if probs.shape[0] == 1:
        return np.abs(2 * probs[0] - 1)
    top = np.sort(probs, axis=0)
    return top[-1] - top[-2]


@pytest.mark.parametrize("out_channels", [1, 3])
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_bf16_inference_matches_fp32(name: str, out_channels: int) -> None:
    image = _image()
    tile = 100 if name == "unet-valid" else 128
    for calibrated in (False,) if name == "unet-valid" else (False, True):  # (no batch norm to calibrate)
        net = _random_network(name, out_channels, image, calibrated)
        fp32 = predict(net, image, settings=load_settings(tile=tile))
        bf16 = predict(net, image, settings=load_settings(tile=tile, precision="bf16"))
        assert bf16.dtype == np.float32 and np.isfinite(bf16).all()
        diff = np.abs(bf16 - fp32).max(axis=0)
        assert diff.max() > 0, "bf16 ran in fp32"
        assert np.quantile(diff, 0.99) <= PROBABILITY_TOLERANCE[name]
        agree = _labels(bf16) == _labels(fp32)
        decided = _margin(fp32) > 2 * PROBABILITY_TOLERANCE[name]
        if calibrated:
            assert decided.mean() > 0.2  # the outputs vary: the agreement below means something
        assert agree[decided].sum() >= 0.995 * decided.sum()


def test_fp16_needs_cuda_and_unknown_precisions_are_named() -> None:
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        check_precision("fp16", "cpu", "here")
    with pytest.raises(ConfigError, match="precision"):
        load_settings(precision="fp8")
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        predict(
            build_network("unet", 1, 1, widths=[4, 4, 4, 4, 4]),
            np.zeros((1, 32, 32), np.float32),
            settings=load_settings(precision="fp16"),
        )


def test_bf16_without_native_instructions_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision_module, "native_cpu_bf16", lambda: False)
    with pytest.warns(PrecisionWarning, match="slower than fp32"):
        check_precision("bf16", "cpu", "configs/inference.yaml")
    monkeypatch.setattr(precision_module, "native_cpu_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_precision("bf16", "cpu", "configs/inference.yaml")


@pytest.fixture
def drive_project(project: FixtureProject) -> FixtureProject:
    prepare_fixture_datasets(project, ("drive",))
    return project


def test_bf16_training_is_deterministic_and_recorded(drive_project: FixtureProject, tmp_path: Path) -> None:
    out = drive_project.root / "models" / "drive" / "unet"
    weights = []
    for run in range(2):
        train("drive", "unet", profile="smoke", overrides={"precision": "bf16"})
        weights.append(read_checkpoint(out / "best.pt"))
        os.rename(drive_project.root / "models", tmp_path / f"models-{run}")
    train("drive", "unet", profile="smoke", overrides={"precision": "fp32"})
    fp32 = read_checkpoint(out / "best.pt")
    assert weights[0]["precision"] == "bf16" and fp32["precision"] == "fp32"
    for key, value in weights[0]["state_dict"].items():
        assert torch.equal(value, weights[1]["state_dict"][key]), key
    assert any(
        not torch.equal(v, fp32["state_dict"][k]) for k, v in weights[0]["state_dict"].items() if v.is_floating_point()
    ), "bf16 trained like fp32"
    assert read_checkpoint(out / "last.pt")["settings"]["precision"] == "fp32"


def test_compiled_inference_freezes_only_its_own_graph() -> None:
    """`compile: true` runs inductor with `freezing` per call: same probabilities as eager, and the
    process-wide inductor setting is left alone (a training graph compiled later must not freeze)."""
    import torch._inductor.config as inductor_config

    torch.manual_seed(0)
    net = build_network("unet", 1, 2, widths=[4, 4, 8, 8, 8], padding="same", batch_norm=True).eval()
    image = np.random.default_rng(1).random((1, 64, 64), dtype=np.float32)
    eager = predict(net, image, settings=load_settings(tile=32))
    compiled = predict(net, image, settings=load_settings(tile=32, compile=True))
    np.testing.assert_allclose(compiled, eager, atol=1e-5)
    assert inductor_config.freezing is False
