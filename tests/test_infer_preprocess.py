"""`segpipe infer` applies the preprocessing the checkpoint records: `PreprocessedReader` equals
`pipeline.transforms.presets.preprocess` band by band, and `predict_file` on a file equals `predict` on the
preprocessed image (infer == evaluate); `preprocess: intensity` keeps the old behaviour."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import torch
from torch import nn

from pipeline.errors import SegpipeError
from pipeline.inference import load_settings, predict, predict_file
from pipeline.inference.backends.torch_graph import optimize_network
from pipeline.inference.readers.images import ArrayReader, ImageReader
from pipeline.inference.readers.preprocessed import PreprocessedReader, histogram_percentile
from pipeline.transforms.presets import SCHEMA, preprocess

torch.set_num_threads(1)


def _augment(
    channels: list[int] | None = None, clahe: float | None = None, normalize: str = "zscore"
) -> dict[str, Any]:
    """A recorded `augment` section: every schema key, the three preprocessing keys set."""

    def fill(schema: dict[str, Any]) -> dict[str, Any]:
        return {k: fill(v) if isinstance(v, dict) else None for k, v in schema.items()}

    return {**fill(SCHEMA), "channels": channels, "clahe": clahe, "normalize": normalize}


def _image(shape: tuple[int, int, int], dtype: type, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.floating):
        return (rng.standard_normal(shape) * 30 + 200).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, shape, endpoint=True).astype(dtype)


class _SpyReader(ArrayReader):
    """An ArrayReader that records the largest number of rows asked at once."""

    def __init__(self, array: np.ndarray) -> None:
        super().__init__(array, "spy.tif")
        self.largest = 0

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        self.largest = max(self.largest, stop - start)
        return super().read_rows(start, stop)


def _read_in_pieces(reader: ImageReader, cuts: list[int]) -> np.ndarray:
    h = reader.shape[1]
    edges = [0, *cuts, h]
    return np.concatenate([reader.read_rows(a, b) for a, b in zip(edges, edges[1:])], axis=1)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_zscore_streams_in_bands_and_equals_preprocess(dtype):
    image = _image((3, 41, 23), dtype, seed=1)
    augment = _augment(channels=[2, 0])
    spy = _SpyReader(image)
    reader = PreprocessedReader(spy, augment, max_megapixels=1e-9, band_rows=6)  # the limit never applies
    assert reader.mode == "streamed" and reader.shape == (2, 41, 23) and reader.dtype == np.float32
    got = _read_in_pieces(reader, [5, 17, 18])
    assert spy.largest == 23  # the statistics pass read bands of 6 rows; the largest read is the caller's 18..41
    expected = preprocess("test", image, augment)
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=2e-5)
    assert abs(float(got[0].mean())) < 1e-4 and abs(float(got[0].std()) - 1) < 1e-4


def test_zscore_constant_channel_divides_by_one_like_monai():
    image = _image((2, 19, 7), np.uint8, seed=2)
    image[1] = 77
    augment = _augment()
    got = PreprocessedReader(ArrayReader(image), augment, max_megapixels=1, band_rows=4).read_rows(0, 19)
    np.testing.assert_allclose(got, preprocess("test", image, augment), rtol=1e-5, atol=2e-5)
    np.testing.assert_array_equal(got[1], 0)


def test_zscore_is_stable_for_a_large_offset():
    """Values near 1e4 with unit spread: a naive sum-of-squares variance would lose the spread."""
    rng = np.random.default_rng(3)
    image = (10000 + rng.standard_normal((1, 64, 32))).astype(np.float32)
    got = PreprocessedReader(ArrayReader(image), _augment(), max_megapixels=1, band_rows=3).read_rows(0, 64)
    expected = preprocess("test", image, _augment())
    np.testing.assert_allclose(got, expected, atol=2e-3)  # float32 data at 1e4 carries ~1e-3 resolution


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.bool_])
def test_percentile_streams_an_exact_histogram_for_small_integers(dtype):
    image = (_image((2, 37, 29), np.uint8, seed=4) > 128) if dtype == np.bool_ else _image((2, 37, 29), dtype, seed=4)
    augment = _augment(normalize="percentile")
    spy = _SpyReader(image)
    reader = PreprocessedReader(spy, augment, max_megapixels=1e-9, band_rows=5)
    assert reader.mode == "streamed, exact histogram"
    got = _read_in_pieces(reader, [1, 20])
    assert spy.largest == 19
    np.testing.assert_allclose(got, preprocess("test", image, augment), rtol=1e-5, atol=1e-6)
    assert got.min() == 0 and got.max() == 1


@pytest.mark.parametrize("n", [1, 2, 3, 200, 1001])
@pytest.mark.parametrize("q", [0.0, 0.5, 37.3, 99.5, 100.0])
def test_histogram_percentile_is_exactly_numpys(n, q):
    rng = np.random.default_rng(n)
    values = rng.integers(-300, 300, n).astype(np.int16)
    counts = np.bincount(values.astype(np.int64) + 300, minlength=600)
    expected = np.percentile(values.astype(np.float32), np.asarray(q))  # how MONAI calls it
    assert histogram_percentile(counts, -300, q) == float(expected)


@pytest.mark.parametrize(
    ("dtype", "channels", "clahe", "normalize"),
    [
        (np.uint8, [1], 0.01, "zscore"),  # DRIVE: green channel, CLAHE, zscore
        (np.uint16, None, 0.02, "percentile"),
        (np.float32, [0, 2], None, "percentile"),  # float percentiles need the whole image
    ],
)
def test_whole_image_steps_equal_preprocess(dtype, channels, clahe, normalize):
    image = _image((3, 45, 38), dtype, seed=5)
    augment = _augment(channels=channels, clahe=clahe, normalize=normalize)
    reader = PreprocessedReader(ArrayReader(image), augment, max_megapixels=1, band_rows=7)
    assert reader.mode == "whole image"
    got = _read_in_pieces(reader, [10, 11, 30])
    np.testing.assert_allclose(got, preprocess("test", image, augment), rtol=1e-5, atol=1e-6)


def test_whole_image_limit_names_the_file_the_size_and_the_key():
    image = _image((3, 40, 50), np.uint8)
    with pytest.raises(SegpipeError) as err:
        PreprocessedReader(
            ArrayReader(image, "big_slide.tif"),
            _augment(channels=[1], clahe=0.01),
            max_megapixels=0.001,
            where="models/drive/unet/best.pt",
        )
    message = str(err.value)
    for part in (
        "big_slide.tif",
        "1 channel(s) x 40 x 50 = 0.002 megapixels",
        "preprocess_max_megapixels = 0.001",
        "configs/inference.yaml",
        "models/drive/unet/best.pt",
        "CLAHE 0.01",
    ):
        assert part in message
    # just inside the limit (1 x 40 x 50 = 2000 values) it runs
    PreprocessedReader(ArrayReader(image), _augment(channels=[1], clahe=0.01), max_megapixels=0.002)


def test_recorded_channels_beyond_the_image_name_the_file():
    image = _image((2, 10, 10), np.uint8)
    with pytest.raises(SegpipeError, match=r"gray\.tif: the image has 2 channel\(s\).*selects channels \[1, 2\]"):
        PreprocessedReader(ArrayReader(image, "gray.tif"), _augment(channels=[1, 2]), max_megapixels=1)


def test_a_malformed_record_is_rejected():
    with pytest.raises(SegpipeError, match="ckpt.pt"):
        PreprocessedReader(
            ArrayReader(_image((1, 8, 8), np.uint8)), _augment(normalize="minmax"), max_megapixels=1, where="ckpt.pt"
        )


# --- predict_file with a checkpoint that records its preprocessing ---------------------------------


def _unet(cin: int, seed: int = 0) -> nn.Module:
    from pipeline.networks import build_network

    torch.manual_seed(seed)
    return build_network("unet", cin, 2, padding="same", base_width=4, depth=2, batch_norm=True, dropout=0.0).eval()


def _checkpoint(tmp_path: Path, net: nn.Module, augment: dict[str, Any] | None) -> Path:
    from pipeline.networks import save_checkpoint

    extra = {} if augment is None else {"augment": augment}
    return save_checkpoint(net, tmp_path / "best.pt", dataset="drive", network_key="unet", **extra)


def _settings() -> Any:
    return load_settings(
        None,
        tile=32,
        overlap=0.25,
        tta=(),
        batch_size=2,
        probabilities_dtype="float32",
        device="cpu",
        preprocess="checkpoint",
    )


def _probabilities(net_or_path: Any, tif: Path, tmp_path: Path, **overrides: Any) -> tuple[np.ndarray, Any]:
    seg, prob = tmp_path / "out_seg.tif", tmp_path / "out_prob.tif"
    report = predict_file(net_or_path, tif, seg, probabilities_path=prob, settings=_settings(), **overrides)
    return np.moveaxis(tifffile.imread(prob), -1, 0), report  # stored (H, W, K)


def test_predict_file_applies_the_recording_like_evaluate(tmp_path):
    image = _image((3, 50, 61), np.uint8, seed=6)
    tif = tmp_path / "fundus.tif"
    tifffile.imwrite(tif, np.moveaxis(image, 0, -1), photometric="rgb", tile=(16, 16))
    augment = _augment(channels=[1], clahe=0.01, normalize="zscore")
    net = _unet(1, seed=6)
    path = _checkpoint(tmp_path, net, augment)

    probs, report = _probabilities(path, tif, tmp_path)
    expected = predict(net, preprocess("drive", image, augment), settings=load_settings(_settings(), intensity="none"))
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    assert "preprocessing from checkpoint: channels [1], CLAHE 0.01, zscore (whole image)" in report.notes
    assert report.shape == (3, 50, 61) and report.dtype == "uint8"  # the input as stored
    assert "preprocessing from checkpoint" in report.summary()


def test_predict_file_streams_zscore_and_keeps_infer_equal_to_evaluate(tmp_path):
    image = _image((2, 47, 40), np.uint16, seed=7)
    tif = tmp_path / "cells.tif"
    tifffile.imwrite(tif, image, metadata={"axes": "CYX"})
    augment = _augment(normalize="zscore")
    net = _unet(2, seed=7)
    path = _checkpoint(tmp_path, net, augment)
    graph = optimize_network(path)
    assert graph.augment == augment and graph.source == path
    probs, report = _probabilities(graph, tif, tmp_path)
    expected = predict(net, preprocess("hela", image, augment), settings=load_settings(_settings(), intensity="none"))
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    assert "preprocessing from checkpoint: zscore (streamed)" in report.notes


def test_preprocess_intensity_restores_the_old_behaviour(tmp_path):
    image = _image((3, 36, 44), np.uint8, seed=8)
    tif = tmp_path / "rgb.tif"
    tifffile.imwrite(tif, np.moveaxis(image, 0, -1), photometric="rgb")
    net = _unet(3, seed=8)
    path = _checkpoint(tmp_path, net, _augment(normalize="zscore"))
    probs, report = _probabilities(path, tif, tmp_path, preprocess="intensity")
    old = predict(net, image, settings=load_settings(_settings(), intensity="scale"))
    np.testing.assert_allclose(probs, old, atol=1e-6)
    assert "checkpoint preprocessing off, intensity scale" in report.notes
    applied, _ = _probabilities(path, tif, tmp_path)
    assert np.abs(applied - old).max() > 1e-3  # the recording does change the input


def test_checkpoint_without_a_recording_and_plain_modules_use_intensity(tmp_path):
    image = _image((3, 30, 33), np.uint8, seed=9)
    tif = tmp_path / "rgb.tif"
    tifffile.imwrite(tif, np.moveaxis(image, 0, -1), photometric="rgb")
    net = _unet(3, seed=9)
    path = _checkpoint(tmp_path, net, None)
    assert optimize_network(path).augment is None and optimize_network(net).augment is None
    old = predict(net, image, settings=load_settings(_settings(), intensity="scale"))
    for model in (path, net):
        probs, report = _probabilities(model, tif, tmp_path)
        np.testing.assert_allclose(probs, old, atol=1e-6)
        assert not any("preprocessing" in note for note in report.notes)


def test_drive_checkpoint_on_rgb_needs_the_recording(tmp_path):
    """The reported bug: a 1-channel (green) model and an RGB TIFF."""
    image = _image((3, 24, 24), np.uint8, seed=10)
    tif = tmp_path / "rgb.tif"
    tifffile.imwrite(tif, np.moveaxis(image, 0, -1), photometric="rgb")
    path = _checkpoint(tmp_path, _unet(1), _augment(channels=[1], normalize="zscore"))
    with pytest.raises(SegpipeError, match="the image has 3 channel"):
        _probabilities(path, tif, tmp_path, preprocess="intensity")
    probs, _ = _probabilities(path, tif, tmp_path)
    assert probs.shape == (2, 24, 24) and np.isfinite(probs).all()


def test_settings_validate_the_new_keys():
    settings = load_settings()
    assert settings.preprocess in ("checkpoint", "intensity") and settings.preprocess_max_megapixels > 0
    with pytest.raises(SegpipeError, match="preprocess must be one of checkpoint, intensity"):
        load_settings(None, preprocess="auto")
    for bad in (0, -1, True, float("nan"), float("inf")):
        with pytest.raises(SegpipeError, match="preprocess_max_megapixels must be a finite number > 0"):
            load_settings(None, preprocess_max_megapixels=bad)


def test_cli_passes_preprocess(monkeypatch):
    import pipeline.stages.infer as stage
    from pipeline.cli import main

    seen: dict[str, Any] = {}
    monkeypatch.setattr(stage, "infer_files", lambda *a, **kw: seen.update(kw) or [])
    assert main(["infer", "--model", "m.pt", "--input", "x.tif", "--output", "out", "--preprocess", "intensity"]) == 0
    assert seen["settings"] == load_settings(stage.config_settings(), preprocess="intensity")  # the file, then the flag
