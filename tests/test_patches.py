"""Overlap-tile (U-Net figure 2): mirror padding, training patch sampler, grid tiler/stitcher."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import SegpipeError
from pipeline.transforms import RandOverlapTilePatchd, TileGrid, crop_reflect, reflect_indices

torch.set_num_threads(1)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 12), before=st.integers(0, 40), after=st.integers(0, 40))
def test_reflect_indices_match_numpy_pad(n: int, before: int, after: int) -> None:
    axis = np.arange(n)
    expected = np.pad(axis, (before, after), mode="reflect") if n > 1 else np.zeros(n + before + after, int)
    np.testing.assert_array_equal(reflect_indices(-before, n + after, n), expected)


def test_crop_reflect_numpy_and_torch() -> None:
    img = np.random.default_rng(0).random((2, 7, 9)).astype(np.float32)
    padded = np.pad(img, ((0, 0), (20, 20), (20, 20)), mode="reflect")
    for top, left, h, w in [(-5, -3, 12, 14), (2, 3, 4, 4), (-20, -20, 47, 49), (5, 8, 15, 3)]:
        expected = padded[:, top + 20 : top + 20 + h, left + 20 : left + 20 + w]
        np.testing.assert_array_equal(crop_reflect(img, top, left, h, w), expected)
        np.testing.assert_array_equal(crop_reflect(torch.from_numpy(img), top, left, h, w).numpy(), expected)


class _IdentityNet:
    """Stands in for a registry network: output = centre crop of the input (valid padding)."""

    def __init__(self, halo: int, step: int = 1) -> None:
        self.halo, self.step = halo, step

    def valid_output_size(self, at_least: int) -> int:
        return -(-at_least // self.step) * self.step

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        h = self.halo
        return tiles[..., h : tiles.shape[-2] - h, h : tiles.shape[-1] - h]


@settings(max_examples=80, deadline=None)
@given(
    height=st.integers(1, 70),
    width=st.integers(1, 70),
    tile=st.integers(1, 32),
    halo=st.integers(0, 20),
    channels=st.integers(1, 3),
)
def test_tile_stitch_identity_is_exact(height: int, width: int, tile: int, halo: int, channels: int) -> None:
    image = np.random.default_rng(height * 71 + width).random((channels, height, width)).astype(np.float32)
    grid = TileGrid((height, width), tile, halo)
    tiles = grid.split(image)
    assert tiles.shape == (len(grid), channels, tile + 2 * halo, tile + 2 * halo)
    out = grid.stitch(_IdentityNet(halo)(tiles))
    assert out.dtype == image.dtype
    np.testing.assert_array_equal(out, image)  # bit for bit


@pytest.mark.parametrize("size", [(5, 9), (100, 37), (388, 388), (584, 565)])
def test_tile_stitch_torch_same_and_valid(size: tuple[int, int]) -> None:
    image = torch.rand(3, *size)
    for halo in (0, 92):  # "same" padding, the paper's valid U-Net
        grid = TileGrid.for_network(_IdentityNet(halo, step=16), size, 100)
        assert grid.tile_size == (112, 112) and grid.halo == halo
        tiles = grid.split(image)
        assert isinstance(tiles, torch.Tensor)
        assert torch.equal(grid.stitch(_IdentityNet(halo)(tiles)), image)


def test_tiles_are_mirror_padded_not_zero() -> None:
    image = np.arange(1, 1 + 30 * 40, dtype=np.float32).reshape(1, 30, 40)  # no zeros
    grid = TileGrid((30, 40), 16, halo=10)
    tiles = grid.split(image)
    assert np.all(tiles != 0)
    padded = np.pad(image, ((0, 0), (10, 10 + 2), (10, 10 + 8)), mode="reflect")
    np.testing.assert_array_equal(tiles[0], padded[:, :36, :36])  # first tile: mirrored top/left
    # every output pixel is written by exactly one tile, overlapping tiles split in the middle
    cover = np.zeros((30, 40), int)
    for (_, y0, y1), (_, x0, x1) in grid.tiles:
        cover[y0:y1, x0:x1] += 1
    assert np.all(cover == 1)


def test_stitch_rejects_wrong_tiles() -> None:
    grid = TileGrid((20, 20), 8, halo=2)
    with pytest.raises(SegpipeError, match="output tiles"):
        grid.stitch(np.zeros((len(grid), 1, 12, 12)))


def _drive_like(size: tuple[int, int] = (80, 90)) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    label = np.zeros((1, *size), np.uint8)
    label[0, 30:50, 40:60] = 1
    image = rng.random((3, *size)).astype(np.float32)
    weight = rng.random((1, *size)).astype(np.float32)
    fov = np.zeros((1, *size), np.uint8)
    fov[0, 10:70, 10:80] = 1
    return {"image": image, "label": label, "weight": weight, "fov": fov, "case": "21"}


KEYS = ["image", "label", "weight", "fov"]


def test_patch_shapes_halo_and_concentric_crops() -> None:
    data = _drive_like()
    t = RandOverlapTilePatchd(KEYS, "label", patch_size=16, halo=12, fov_key="fov", num_samples=5)
    t.set_random_state(0)
    out = t(data)
    assert len(out) == 5
    padded_image = np.pad(data["image"], ((0, 0), (60, 60), (60, 60)), mode="reflect")
    for s in out:
        assert s["image"].shape == (3, 40, 40) and s["label"].shape == (1, 16, 16)
        assert s["weight"].shape == (1, 16, 16) and s["case"] == "21"
        # locate the label patch in the image, check the image crop is its mirrored surrounding
        matches = [
            (y, x)
            for y in range(80 - 15)
            for x in range(90 - 15)
            if np.array_equal(data["weight"][:, y : y + 16, x : x + 16], s["weight"])
        ]
        assert len(matches) == 1
        y, x = matches[0]
        np.testing.assert_array_equal(s["label"], data["label"][:, y : y + 16, x : x + 16])
        np.testing.assert_array_equal(s["image"], padded_image[:, y + 60 - 12 : y + 60 + 28, x + 60 - 12 : x + 60 + 28])


def test_halo_leaving_small_image_is_mirrored() -> None:
    image = np.arange(1, 1 + 2 * 6 * 7, dtype=np.float32).reshape(2, 6, 7)
    label = np.ones((1, 6, 7), np.uint8)
    t = RandOverlapTilePatchd(["image", "label"], "label", patch_size=4, halo=9, label_halo=0)
    t.set_random_state(1)
    (s,) = t({"image": image, "label": label})
    assert s["image"].shape == (2, 22, 22) and np.all(s["image"] != 0)
    assert np.isin(s["image"], image).all()


def test_pos_neg_balance_and_fov() -> None:
    data = _drive_like((120, 120))
    data["label"][:] = 0
    data["label"][0, 50:70, 50:70] = 1
    t = RandOverlapTilePatchd(["label", "fov"], "label", patch_size=8, fov_key="fov", pos=1, neg=3, num_samples=400)
    t.set_random_state(4)
    out = t(data)
    centres = np.array([s["label"][0, 4, 4] for s in out])  # no shift: centres are far from the border
    assert 0.18 < centres.mean() < 0.32
    assert all(s["fov"][0, 4, 4] == 1 for s in out)  # negatives are drawn inside the FOV only
    only_pos = RandOverlapTilePatchd(["label"], "label", patch_size=8, pos=1, neg=0, num_samples=50)
    assert all(s["label"].any() for s in only_pos.set_random_state(0)(data))


def test_same_seed_same_patches_torch_input() -> None:
    data = {k: torch.from_numpy(v) for k, v in _drive_like().items() if k != "case"}

    def run(seed: int) -> list[dict]:
        t = RandOverlapTilePatchd(KEYS, "label", patch_size=16, halo=4, fov_key="fov", num_samples=4)
        return t.set_random_state(seed)(data)

    a, b, c = run(7), run(7), run(8)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in KEYS)
    assert isinstance(a[0]["image"], torch.Tensor)
    assert not all(torch.equal(x["image"], y["image"]) for x, y in zip(a, c))


def test_empty_fov_raises() -> None:
    data = _drive_like()
    data["fov"][:] = 0
    with pytest.raises(SegpipeError, match="empty"):
        RandOverlapTilePatchd(KEYS, "label", patch_size=8, fov_key="fov")(data)
