"""Elastic deformation (U-Net section 3.1): identity, label values, image/label/weight move together."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.errors import SegpipeError
from pipeline.transforms import RandElasticd
from pipeline.transforms.elastic import dense_displacement, sampling_grid, warp

torch.set_num_threads(1)
KEYS = ["image", "label", "weight"]
MODES = ["bilinear", "nearest", "bilinear"]


def _blobs(size: int, seed: int, values: tuple[int, ...] = (1, 3, 7)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    label = np.zeros((1, size, size), dtype=np.uint8)
    for i in range(12):
        cy, cx = rng.integers(0, size, 2)
        r = rng.integers(3, size // 6)
        label[0][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = values[i % len(values)]
    return label


def _sample(size: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    label = _blobs(size, seed)
    return {
        "image": label.astype(np.float32) * 100.0,
        "label": label,
        "weight": label.astype(np.float32) + 1.0,
    }


def test_sigma_zero_is_identity() -> None:
    data = _sample()
    out = RandElasticd(KEYS, sigma=0.0, mode=MODES)(data)
    for k in KEYS:
        assert isinstance(out[k], torch.Tensor)
        np.testing.assert_array_equal(out[k].numpy(), data[k])
    assert out["label"].dtype == torch.uint8 and out["image"].dtype == torch.float32


@pytest.mark.parametrize("mode", ["bilinear", "bicubic", "nearest"])
def test_zero_displacement_samples_pixel_centres(mode: str) -> None:
    """The coordinate convention of the warp: no half-pixel shift, offsets crop exactly."""
    img = torch.rand(2, 20, 24)
    grid = sampling_grid(torch.zeros(2, 20, 24), (0.0, 0.0), (20, 24))
    torch.testing.assert_close(warp(img, grid, mode), img, atol=1e-5, rtol=0)
    grid = sampling_grid(torch.zeros(2, 10, 8), (5.0, 8.0), (20, 24))
    torch.testing.assert_close(warp(img, grid, mode), img[:, 5:15, 8:16], atol=1e-5, rtol=0)


def test_borders_are_mirrored_not_zero() -> None:
    ramp = torch.arange(10, dtype=torch.float32).repeat(1, 10, 1) + 1.0  # value = column + 1
    disp = torch.zeros(2, 10, 10)
    disp[1] = -3.0  # every pixel reads 3 columns to its left
    out = warp(ramp, sampling_grid(disp, (0.0, 0.0), (10, 10)), "bilinear")
    # column 0 reads column -3 -> mirrored to column 3 (value 4); column 1 reads column 2 -> value 3
    torch.testing.assert_close(out[0, :, 0], torch.full((10,), 4.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(out[0, :, 1], torch.full((10,), 3.0), atol=1e-4, rtol=0)


def test_strong_deformation_of_constant_stays_constant() -> None:
    data = {"image": np.full((1, 32, 32), 5.0, np.float32)}
    t = RandElasticd(["image"], sigma=40.0)
    t.set_random_state(3)
    np.testing.assert_allclose(t(data)["image"].numpy(), 5.0, atol=1e-4)


def test_labels_keep_their_values_and_move_with_image() -> None:
    data = _sample(96, seed=1)
    t = RandElasticd(KEYS, sigma=10.0, mode=["nearest", "nearest", "bilinear"])
    t.set_random_state(0)
    out = t(data)
    label = out["label"].numpy()
    assert set(np.unique(label)) <= set(np.unique(data["label"]))
    assert not np.array_equal(label, data["label"]), "sigma=10 must move pixels"
    # image (nearest) and label read the same source pixels
    np.testing.assert_array_equal(out["image"].numpy(), label.astype(np.float32) * 100.0)
    # bilinear weight equals label + 1 wherever the label is locally constant
    weight = out["weight"].numpy()
    interior = np.abs(weight - np.round(weight)) < 1e-4
    assert interior.mean() > 0.8
    np.testing.assert_array_equal(np.round(weight[interior]) - 1, label[interior])


def test_bilinear_image_follows_nearest_label() -> None:
    data = _sample(96, seed=2)
    t = RandElasticd(KEYS, sigma=10.0, mode=MODES)
    t.set_random_state(5)
    out = t(data)
    img, label = out["image"].numpy(), out["label"].numpy()
    flat = np.abs(img / 100.0 - np.round(img / 100.0)) < 1e-5  # all 4 neighbours of one value
    assert flat.mean() > 0.8
    np.testing.assert_array_equal(np.round(img[flat] / 100.0), label[flat])


def test_trimmed_outputs_are_concentric() -> None:
    """Image with a halo, label at the output size: the label is the centre of the image."""
    data = _sample(96, seed=3)
    t = RandElasticd(KEYS, sigma=10.0, mode="nearest", output_size={"image": 64, "label": 32, "weight": 32})
    t.set_random_state(1)
    out = t(data)
    assert out["image"].shape == (1, 64, 64) and out["label"].shape == (1, 32, 32)
    np.testing.assert_array_equal(out["image"].numpy()[:, 16:48, 16:48], out["label"].numpy() * 100.0)
    # the same field as with every key at 64: the label is the centre of that result
    full = RandElasticd(KEYS, sigma=10.0, mode="nearest", output_size=64)
    full.set_random_state(1)
    np.testing.assert_array_equal(full(data)["label"].numpy()[:, 16:48, 16:48], out["label"].numpy())


def test_same_seed_same_result() -> None:
    data = _sample()
    a = RandElasticd(KEYS, mode=MODES).set_random_state(11)
    b = RandElasticd(KEYS, mode=MODES).set_random_state(11)
    c = RandElasticd(KEYS, mode=MODES).set_random_state(12)
    ra, rb, rc = a(data), b(data), c(data)
    for k in KEYS:
        assert torch.equal(ra[k], rb[k])
    assert not torch.equal(ra["image"], rc["image"])


def test_prob_zero_only_trims() -> None:
    data = _sample(40)
    out = RandElasticd(KEYS, prob=0.0, mode=MODES, output_size={"label": 20, "weight": 20})(data)
    np.testing.assert_array_equal(out["label"].numpy(), data["label"][:, 10:30, 10:30])
    np.testing.assert_array_equal(out["image"].numpy(), data["image"])


def test_bad_arguments_raise() -> None:
    with pytest.raises(SegpipeError, match="mode"):
        RandElasticd(KEYS, mode="cubic")
    with pytest.raises(SegpipeError, match="spatial shape"):
        RandElasticd(KEYS)({"image": np.zeros((1, 8, 8)), "label": np.zeros((1, 6, 6)), "weight": np.zeros((1, 8, 8))})
    with pytest.raises(SegpipeError, match="fit centred"):
        RandElasticd(["image"], output_size=7)({"image": np.zeros((1, 8, 8))})


def test_dense_field_is_bicubic_through_the_nodes() -> None:
    coarse = torch.randn(2, 3, 3, generator=torch.Generator().manual_seed(0)) * 10
    dense = dense_displacement(coarse, (65, 41))
    ref = torch.nn.functional.interpolate(coarse[None], size=(65, 41), mode="bicubic", align_corners=True)[0]
    torch.testing.assert_close(dense, ref, atol=1e-4, rtol=0)
    for (i, j), (y, x) in {(0, 0): (0, 0), (1, 1): (32, 20), (2, 2): (64, 40), (0, 2): (0, 40)}.items():
        torch.testing.assert_close(dense[:, y, x], coarse[:, i, j], atol=1e-4, rtol=0)
