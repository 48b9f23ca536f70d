"""U-Net eq. 2 weight maps: fast windowed version vs the brute-force reference, touching disks."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import SegpipeError
from pipeline.transforms import (
    compute_class_weights,
    instances_from_binary,
    unet_weight_map,
    unet_weight_map_reference,
)


def _disk(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


@st.composite
def instance_images(draw: st.DrawFn) -> np.ndarray:
    """Random (H, W) instance images: overlapping disks and boxes, some cells split in pieces."""
    h = draw(st.integers(4, 56))
    w = draw(st.integers(4, 56))
    inst = np.zeros((h, w), dtype=np.int32)
    n = draw(st.integers(0, 12))
    for cell in range(1, n + 1):
        cy = draw(st.integers(0, h - 1))
        cx = draw(st.integers(0, w - 1))
        r = draw(st.integers(0, 9))
        if draw(st.booleans()):
            inst[_disk((h, w), cy, cx, r)] = cell
        else:
            inst[max(cy - r, 0) : cy + r + 1, max(cx - r // 2, 0) : cx + 1] = cell
    return inst


@settings(max_examples=120, deadline=None)
@given(
    inst=instance_images(),
    w0=st.floats(0.5, 30.0),
    sigma=st.floats(0.5, 12.0),
    bg_weight=st.floats(0.1, 3.0),
)
def test_fast_equals_bruteforce(inst: np.ndarray, w0: float, sigma: float, bg_weight: float) -> None:
    cw = [bg_weight, 1.0]
    fast = unet_weight_map(inst, w0=w0, sigma=sigma, class_weights=cw)
    ref = unet_weight_map_reference(inst, w0=w0, sigma=sigma, class_weights=cw)
    assert fast.dtype == np.float32 and fast.shape == inst.shape
    np.testing.assert_allclose(fast, ref, rtol=0, atol=1e-4)


def test_error_bound_is_the_tolerance() -> None:
    """With a coarse tol the window radius shrinks; the error stays below tol (module proof)."""
    rng = np.random.default_rng(0)
    inst = np.zeros((96, 96), dtype=np.int32)
    for cell in range(1, 16):
        cy, cx = rng.integers(0, 96, size=2)
        inst[_disk(inst.shape, cy, cx, rng.integers(2, 7))] = cell
    ref = unet_weight_map_reference(inst, w0=10.0, sigma=5.0)
    for tol in (0.5, 0.05):
        fast = unet_weight_map(inst, w0=10.0, sigma=5.0, tol=tol)
        assert np.abs(fast - ref).max() < tol


@pytest.mark.parametrize("gap_pixels", [1, 2, 5])
def test_two_touching_disks_maximum_in_gap(gap_pixels: int) -> None:
    """Two disks on one row, `gap_pixels` background pixels apart: the closest cell pixels are
    g = gap_pixels + 1 apart, and the maximum, in the gap, is w_c(bg) + w0 exp(-g^2 / (2 sigma^2))."""
    w0, sigma, cw = 10.0, 5.0, [0.7, 1.3]
    shape, r, cy = (48, 64), 10, 24
    left_cx = 20
    right_cx = left_cx + 2 * r + gap_pixels + 1
    inst = np.zeros(shape, dtype=np.int32)
    inst[_disk(shape, cy, left_cx, r)] = 1
    inst[_disk(shape, cy, right_cx, r)] = 2
    wmap = unet_weight_map(inst, w0=w0, sigma=sigma, class_weights=cw)
    g = gap_pixels + 1
    expected = cw[0] + w0 * math.exp(-(g**2) / (2 * sigma**2))
    assert wmap.max() == pytest.approx(expected, rel=1e-6)
    rows, cols = np.nonzero(wmap >= wmap.max() - 1e-6)
    assert np.all(inst[rows, cols] == 0)
    assert np.all((cols > left_cx + r) & (cols < right_cx - r))
    assert np.all(rows == cy)
    # inside the cells only the class term
    assert np.all(wmap[inst > 0] == np.float32(cw[1]))


def test_single_cell_has_no_border_term() -> None:
    inst = np.zeros((32, 32), dtype=np.uint16)
    inst[10:20, 10:20] = 7
    wmap = unet_weight_map(inst, class_weights=[0.5, 2.0])
    np.testing.assert_array_equal(wmap, np.where(inst > 0, 2.0, 0.5).astype(np.float32))


def test_explicit_labels_select_class_weights() -> None:
    inst = np.zeros((16, 16), dtype=np.int32)
    inst[2:6, 2:6] = 1
    inst[2:6, 9:13] = 2
    labels = (inst > 0).astype(np.int64) + (inst == 2)  # cell 2 is class 2
    wmap = unet_weight_map(inst, w0=0.0, class_weights=[1.0, 2.0, 3.0], labels=labels)
    assert wmap[3, 3] == 2.0 and wmap[3, 10] == 3.0 and wmap[0, 0] == 1.0


def test_bad_input_raises() -> None:
    with pytest.raises(SegpipeError, match="integer"):
        unet_weight_map(np.zeros((8, 8), dtype=np.float32))
    with pytest.raises(SegpipeError, match="2-D"):
        unet_weight_map(np.zeros((1, 8, 8), dtype=np.int32))
    inst = np.zeros((8, 8), dtype=np.int32)
    inst[2, 2] = 1
    with pytest.raises(SegpipeError, match="class_weights"):
        unet_weight_map(inst, class_weights=[1.0])


def test_compute_class_weights_formula() -> None:
    a = np.zeros((1, 10, 10), dtype=np.uint8)
    a[0, :2] = 1  # 20 foreground, 80 background
    b = np.zeros((10, 10), dtype=np.uint8)
    b[:3] = 1  # 30 foreground, 70 background
    w = compute_class_weights([a, b], num_classes=2)
    np.testing.assert_allclose(w, [200 / (2 * 150), 200 / (2 * 50)])
    # pixel-average of w_c over the split is 1
    assert (150 * w[0] + 50 * w[1]) / 200 == pytest.approx(1.0)
    with pytest.raises(SegpipeError, match="never occur"):
        compute_class_weights([np.zeros((4, 4), dtype=np.uint8)])
    with pytest.raises(SegpipeError, match="expected classes"):
        compute_class_weights([np.full((4, 4), 2, dtype=np.uint8)])


def test_instances_from_binary_connectivity() -> None:
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[1, 1] = mask[2, 2] = 255  # diagonal neighbours
    mask[5:7, 5:7] = 255
    eight = instances_from_binary(mask)
    four = instances_from_binary(mask, connectivity=1)
    assert eight.max() == 2 and four.max() == 3
    assert eight[1, 1] == eight[2, 2] != eight[5, 5]
    assert eight.dtype == np.int32 and np.all((eight > 0) == (mask > 0))


def test_weightmap_command_writes_map_and_preview(tmp_path: Path) -> None:
    import tifffile

    from pipeline.cli import main
    from pipeline.data.io import read_volume

    mask = np.zeros((40, 50), dtype=np.uint8)
    mask[5:15, 5:20] = 255
    mask[5:15, 22:40] = 255  # two blobs, 2 px apart
    tifffile.imwrite(tmp_path / "mask.tif", mask)
    out = tmp_path / "w" / "mask_weight.nii.gz"
    assert main(["weightmap", str(tmp_path / "mask.tif"), "--output", str(out), "--sigma", "4"]) == 0
    written = read_volume(out)
    assert written.shape == (1, 40, 50) and written.dtype == np.float32
    inst = instances_from_binary(mask)
    expected = unet_weight_map(inst, sigma=4.0, class_weights=compute_class_weights([inst > 0]))
    np.testing.assert_array_equal(written[0], expected)
    assert (tmp_path / "w" / "mask_weight.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["mask_weight.nii.gz", "mask_weight.png"]
    # TIFF output beside the label by default, fixed class weights
    assert main(["weightmap", str(tmp_path / "mask.tif"), "--class-weights", "none"]) == 0
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "mask_weight.tif"), unet_weight_map(inst))


def test_weightmap_command_errors_name_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import tifffile

    from pipeline.cli import main

    tifffile.imwrite(tmp_path / "empty.tif", np.zeros((8, 8), np.uint8))
    assert main(["weightmap", str(tmp_path / "empty.tif")]) == 2
    assert "empty.tif" in capsys.readouterr().err
    assert main(["weightmap", str(tmp_path / "empty.tif"), "--output", str(tmp_path / "w.png")]) == 2
    assert "w.png" in capsys.readouterr().err
    assert not (tmp_path / "empty_weight.tif").exists()
