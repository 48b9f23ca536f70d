"""Objects from probabilities (pipeline/postprocessing): the extraction methods on touching discs,
the border target, the choice on validation images, streamed blocks stitched into whole-image ids,
and the instance metrics against hand-computed values."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from pipeline.errors import SegpipeError
from pipeline.metrics.instances import average_precision, matched_iou, rand_and_vi, seg_measure
from pipeline.postprocessing.instances import InstanceSettings, border_target, extract_instances
from pipeline.postprocessing.planning import candidates, plan_instances
from pipeline.postprocessing.stitching import InstanceStream


def discs(shape: tuple[int, int], centres: list[tuple[int, int]], radius: int) -> np.ndarray:
    """Instance ids 1..n of discs; a pixel in two discs goes to the first."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    out = np.zeros(shape, np.int64)
    for k, (cy, cx) in enumerate(centres, start=1):
        out[((yy - cy) ** 2 + (xx - cx) ** 2 < radius**2) & (out == 0)] = k
    return out


TOUCHING = discs((80, 120), [(40, 40), (40, 76)], 20)  # overlapping by 4 px: one blob with a neck


def probabilities(instances: np.ndarray, gap: bool = False) -> np.ndarray:
    """(1, H, W) foreground probability: 0.95 inside objects, 0.05 outside; `gap`: 0.4 on object borders
    between two objects (a network that learnt the weight map's gaps, but not enough to cut them)."""
    p = np.where(instances > 0, 0.95, 0.05).astype(np.float32)
    if gap:
        p[border_target(instances) == 2] = 0.6
        p[(border_target(instances) == 2) & _between(instances)] = 0.55
    return p[None]


def _between(instances: np.ndarray) -> np.ndarray:
    """Pixels of an object with a 4-neighbour in another object."""
    a = instances
    out = np.zeros(a.shape, bool)
    for axis in (0, 1):
        for shift in (1, -1):
            b = np.roll(a, shift, axis)
            out |= (a > 0) & (b > 0) & (a != b)
    return out


def test_components_merge_touching_discs_and_watershed_splits_them() -> None:
    p = probabilities(TOUCHING)
    merged = extract_instances(p, InstanceSettings("components"))
    assert merged.max() == 1 and seg_measure(merged, TOUCHING) == pytest.approx(0.5, abs=0.01)
    split = extract_instances(p, InstanceSettings("watershed", min_distance=10))
    assert split.max() == 2 and split.dtype == np.uint32
    assert seg_measure(split, TOUCHING) > 0.97


def test_cores_split_where_the_probability_dips() -> None:
    p = probabilities(TOUCHING, gap=True)
    assert extract_instances(p, InstanceSettings("components")).max() == 1
    split = extract_instances(p, InstanceSettings("cores", core_threshold=0.9))
    assert split.max() == 2 and seg_measure(split, TOUCHING) > 0.95


def test_border_target_and_its_extraction() -> None:
    target = border_target(TOUCHING, width=2)
    assert set(np.unique(target)) == {0, 1, 2}
    assert (target[TOUCHING == 0] == 0).all() and (target[_between(TOUCHING)] == 2).all()
    assert (target[40, 40] == 1) and (target[40, 76] == 1)  # the centres are interior
    onehot = np.stack([target == k for k in range(3)]).astype(np.float32) * 0.9 + 0.1 / 3
    objects = extract_instances(onehot, InstanceSettings("border"))
    assert objects.max() == 2 and seg_measure(objects, TOUCHING) > 0.97
    with pytest.raises(SegpipeError, match="needs the 3 channels"):
        extract_instances(probabilities(TOUCHING), InstanceSettings("border"))


def test_orphans_small_objects_and_raster_order() -> None:
    inst = discs((60, 60), [(45, 45), (10, 10)], 8)
    inst[2, 55] = 3  # a one-pixel speck
    p = probabilities(inst)
    objects = extract_instances(p, InstanceSettings("cores", core_threshold=0.99, min_size=5))  # no core at all
    assert objects.max() == 2 and objects[10, 10] == 1 and objects[45, 45] == 2 and objects[2, 55] == 0


@pytest.mark.parametrize("bad", [{"method": "blob"}, {"threshold": 1.0}, {"min_distance": -1}, {"halo": 2.5}])
def test_settings_refuse_bad_values(bad: dict) -> None:
    with pytest.raises(SegpipeError, match="instances"):
        InstanceSettings(**bad)
    with pytest.raises(SegpipeError, match="best.pt"):
        InstanceSettings.from_dict({"method": "components", **bad}, "best.pt")
    assert InstanceSettings.from_dict(InstanceSettings("cores").to_dict(), "x") == InstanceSettings("cores")


def test_plan_picks_watershed_for_touching_discs_on_validation() -> None:
    cases = [
        (probabilities(TOUCHING), TOUCHING),
        (probabilities(discs((64, 64), [(32, 32)], 12)), discs((64, 64), [(32, 32)], 12)),
    ]
    plan = plan_instances(cases, median_area=float(np.pi * 20**2))
    assert plan.settings.method == "watershed" and plan.val_seg > 0.97
    assert plan.record()["candidates"] == len(candidates(float(np.pi * 20**2), 1))
    components = max(seg for s, seg in plan.tried if s.method == "components")
    assert components < 0.8
    assert plan.settings.halo == 16 * int(np.ceil(2 * 40 / 16)) and plan.settings.min_size == round(0.05 * np.pi * 400)


def test_plan_refuses_validation_without_objects() -> None:
    with pytest.raises(SegpipeError, match="no validation images"):
        plan_instances([], 100.0)
    empty = np.zeros((16, 16), np.int64)
    with pytest.raises(SegpipeError, match="no reference objects"):
        plan_instances([(probabilities(empty), empty)], 100.0)


def _streamed(p: np.ndarray, settings: InstanceSettings, band: int, block: int) -> np.ndarray:
    stream = InstanceStream(settings, p.shape[1], block=block)
    out = np.zeros(p.shape[1:], np.uint32)
    for y0 in range(0, p.shape[1], band):
        for first, rows in stream.push(y0, p[:, y0 : y0 + band]):
            out[first : first + rows.shape[1]] = rows[0]
    stream.finish()
    return out


def _scattered(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = [(int(rng.integers(10, 290)), int(rng.integers(10, 190))) for _ in range(40)]
    return discs((300, 200), centres, 9)


@pytest.mark.parametrize("band,block", [(17, 40), (64, 32), (300, 64)])
def test_streamed_components_equal_the_whole_image_ids_and_all(band: int, block: int) -> None:
    p = probabilities(_scattered(0))
    settings = InstanceSettings("components", halo=24)
    whole = extract_instances(p, settings)
    assert np.array_equal(_streamed(p, settings, band, block), whole)  # raster-order ids: equal arrays


def test_streamed_watershed_keeps_objects_that_straddle_block_seams_whole() -> None:
    # touching pairs centred on the seams of 40-row blocks (rows 40, 80, 120, ...)
    centres = [(y, x) for y in (40, 120, 200) for x in (30, 66)] + [(80, 150), (160, 150)]
    inst = discs((240, 200), centres, 19)
    p = probabilities(inst)
    settings = InstanceSettings("watershed", min_distance=10, halo=48)
    whole, streamed = extract_instances(p, settings), _streamed(p, settings, band=13, block=40)
    assert whole.max() == streamed.max() == len(centres)
    for k in range(1, len(centres) + 1):  # one id per object, the same pixels as the whole-image result
        ids = Counter(streamed[whole == k].tolist())
        assert len(ids) == 1 and ids.most_common(1)[0][1] == (whole == k).sum()
    assert seg_measure(streamed, inst) > 0.95


def test_stream_refuses_rows_out_of_order_and_an_early_end() -> None:
    stream = InstanceStream(InstanceSettings("components"), 100, halo=8, block=16)
    list(stream.push(0, np.zeros((1, 10, 5), np.float32)))
    with pytest.raises(SegpipeError, match="in order"):
        list(stream.push(20, np.zeros((1, 10, 5), np.float32)))
    with pytest.raises(SegpipeError, match="ended early"):
        stream.finish()


def test_instance_metrics_against_hand_computed_values() -> None:
    ref = np.array([[1, 1, 1, 1, 0, 2, 2, 0, 3, 3]])
    pred = np.array([[5, 5, 5, 0, 0, 6, 0, 0, 0, 7]])
    # object 1: IoU 3/4 (TP); object 2: IoU 1/2, not > 0.5; object 3: IoU 1/2, not > 0.5
    tp, n_pred, n_ref = matched_iou(pred, ref)
    assert (tp, n_pred, n_ref) == (1, 3, 3)
    assert average_precision(tp, n_pred, n_ref) == pytest.approx(1 / 5)
    assert np.isnan(average_precision(0, 0, 0))
    error, vi = rand_and_vi(ref, ref)
    assert error == pytest.approx(0.0) and vi == pytest.approx(0.0)
    # two equal halves merged into one object: H(ref | pred) = 1 bit, H(pred | ref) = 0
    halves = np.array([[1, 1, 2, 2]])
    error, vi = rand_and_vi(np.array([[1, 1, 1, 1]]), halves)
    assert vi == pytest.approx(1.0)
    # adapted Rand over pixel pairs (n = 4 pixels): precision = (sum n_ij^2 - n) / (sum b_j^2 - n) = 4 / 12,
    # recall = (sum n_ij^2 - n) / (sum a_i^2 - n) = 4 / 4, error = 1 - 2PR / (P + R) = 1/2
    assert error == pytest.approx(0.5)
