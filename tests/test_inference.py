"""`pipeline.inference.predict`: MONAI equivalence (same padding), overlap-tile (valid padding),
TTA, the inference graph, settings and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.inferers import SlidingWindowInferer
from torch import nn

from pipeline.errors import SegpipeError
from pipeline.inference import InferenceSettings, load_settings, predict
from pipeline.inference.backends.torch_graph import (
    count_batch_norm,
    fold_batch_norm,
    inplace_activations,
    optimize_network,
)
from pipeline.inference.engine.tiling import output_period, plan_tiles, source_index
from pipeline.inference.settings import settings_from_config

from fixtures import FlipAveraged

torch.set_num_threads(1)


class SameNet(nn.Module):
    """A same-padding contract network of any input size: conv-BN-ReLU-conv."""

    padding = "same"
    halo = 0

    def __init__(self, cin: int, cout: int, width: int = 6) -> None:
        super().__init__()
        self.in_channels, self.out_channels = cin, cout
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, cout, 3, padding=1),
        )
        bn = self.body[1]
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 2.0)
        bn.bias.data.uniform_(-1, 1)

    def output_size(self, n: int) -> int:
        return n

    def input_size(self, n: int) -> int:
        return n

    def valid_output_size(self, n: int) -> int:
        return max(n, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class ValidNet(nn.Module):
    """A valid-padding contract network: two unpadded 3x3 convs, halo 2, any output size."""

    padding = "valid"
    halo = 2

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.in_channels, self.out_channels = cin, cout
        self.body = nn.Sequential(nn.Conv2d(cin, 5, 3), nn.ReLU(), nn.Conv2d(5, cout, 3))

    def output_size(self, n: int) -> int:
        if n < 5:
            raise SegpipeError(f"input {n} too small")
        return n - 4

    def input_size(self, n: int) -> int:
        return n + 4

    def valid_output_size(self, n: int) -> int:
        return max(n, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _net(cls: type[nn.Module], cin: int, cout: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return cls(cin, cout).eval()


def _unet(padding: str, cout: int = 2, seed: int = 0, depth: int = 2) -> nn.Module:
    from pipeline.networks import build_network

    torch.manual_seed(seed)
    net = build_network(
        "unet", 3, cout, padding=padding, base_width=4 if depth == 2 else 2, depth=depth, batch_norm=True, dropout=0.0
    )
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def _monai(
    net: nn.Module, image: np.ndarray, tile: int, overlap: float, mode: str, bs: int, sigma: float = 0.125
) -> np.ndarray:
    inferer = SlidingWindowInferer(roi_size=tile, sw_batch_size=bs, overlap=overlap, mode=mode, sigma_scale=sigma)
    with torch.inference_mode():
        logits = inferer(torch.from_numpy(image)[None], net)[0]
    probs = torch.sigmoid(logits) if logits.shape[0] == 1 else torch.softmax(logits, 0)
    return probs.numpy()


def _rand(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


MONAI_CASES = [
    # (H, W, tile, overlap, mode, out channels, batch size)
    (50, 70, 32, 0.25, "gaussian", 2, 3),
    (20, 13, 32, 0.5, "constant", 1, 2),  # smaller than one tile in both axes
    (31, 100, 32, 0.25, "gaussian", 3, 4),  # smaller in one axis only
    (100, 37, 16, 0.3, "gaussian", 3, 5),  # not divisible by the tile or the stride
    (32, 32, 32, 0.25, "gaussian", 2, 1),  # exactly one tile
    (67, 45, 24, 0.0, "constant", 2, 7),  # no overlap
    (45, 61, 20, 0.8, "gaussian", 1, 16),  # heavy overlap, a batch spanning window rows
] + [
    # seeded random sizes, tiles and overlaps
    (int(h), int(w), int(t), float(o), m, int(k), int(b))
    for h, w, t, o, m, k, b in zip(
        *(np.random.default_rng(7).integers(lo, hi, 6) for lo, hi in ((5, 90), (5, 90), (8, 40))),
        np.round(np.random.default_rng(8).uniform(0, 0.75, 6), 2),
        ["gaussian", "constant"] * 3,
        np.random.default_rng(9).integers(1, 4, 6),
        np.random.default_rng(10).integers(1, 9, 6),
    )
]


@pytest.mark.parametrize("h,w,tile,overlap,mode,k,bs", MONAI_CASES)
def test_same_padding_equals_monai_sliding_window_inferer(h, w, tile, overlap, mode, k, bs):
    net = _net(SameNet, 3, k, seed=h * w)
    image = _rand((3, h, w), seed=h + w)
    ours = predict(net, image, tile=tile, overlap=overlap, blend=mode, batch_size=bs)
    assert ours.dtype == np.float32 and ours.shape == (k, h, w)
    np.testing.assert_allclose(ours, _monai(net, image, tile, overlap, mode, bs), rtol=0, atol=1e-5)


def test_sigma_scale_is_monais():
    net = _net(SameNet, 3, 2, seed=1)
    image = _rand((3, 60, 44), seed=2)
    ours = predict(net, image, tile=24, overlap=0.5, blend="gaussian", sigma_scale=0.3, batch_size=2)
    np.testing.assert_allclose(ours, _monai(net, image, 24, 0.5, "gaussian", 2, sigma=0.3), atol=1e-5)
    default = predict(net, image, tile=24, overlap=0.5, blend="gaussian", sigma_scale=0.125, batch_size=2)
    assert np.abs(default - ours).max() > 1e-4  # sigma really reaches the weights


@pytest.mark.parametrize("h,w", [(45, 77), (20, 12), (64, 64)])
def test_real_same_unet_equals_monai(h, w):
    net = _unet("same")
    image = _rand((3, h, w), seed=h)
    ours = predict(net, image, tile=32, overlap=0.25, blend="gaussian", batch_size=3)
    np.testing.assert_allclose(ours, _monai(net, image, 32, 0.25, "gaussian", 3), atol=1e-5)


def _whole_mirror_padded(net: nn.Module, image: np.ndarray) -> np.ndarray:
    """The network on the whole image, mirror-padded by the halo (and up to a reachable size)."""
    _, h, w = image.shape
    halo = net.halo
    hh, ww = net.valid_output_size(h), net.valid_output_size(w)
    padded = np.pad(image, ((0, 0), (halo, halo + hh - h), (halo, halo + ww - w)), mode="reflect")
    with torch.inference_mode():
        logits = net(torch.from_numpy(padded)[None])[0, :, :h, :w]
    return (torch.sigmoid(logits) if logits.shape[0] == 1 else torch.softmax(logits, 0)).numpy()


@pytest.mark.parametrize(
    "h,w,tile,depth",
    [
        (45, 77, 20, 2),
        (10, 7, 20, 2),
        (64, 64, 36, 2),
        (5, 130, 12, 2),
        (83, 29, 60, 2),
        # depth 3: reachable outputs 4 + 8k are not multiples of the pooling period 8, so tiles must
        # step by a multiple of 8 (not by the output tile) for the pooling grids to line up
        (70, 53, 20, 3),
        (9, 40, 30, 3),
    ],
)
def test_valid_unet_overlap_tile_equals_whole_mirror_padded_image(h, w, tile, depth):
    net = _unet("valid", seed=h, depth=depth)
    image = _rand((3, h, w), seed=w)
    ours = predict(net, image, tile=tile, batch_size=3)
    assert ours.shape == (2, h, w)
    np.testing.assert_allclose(ours, _whole_mirror_padded(net, image), atol=1e-5)


@pytest.mark.parametrize("h,w,tile", [(30, 41, 8), (3, 4, 16)])
def test_valid_toy_net_overlap_tile(h, w, tile):
    net = _net(ValidNet, 2, 1, seed=3)
    image = _rand((2, h, w), seed=4)
    np.testing.assert_allclose(
        predict(net, image, tile=tile, batch_size=4), _whole_mirror_padded(net, image), atol=1e-6
    )


def test_overlap_tile_plan_covers_each_output_pixel_once():
    net = optimize_network(_unet("valid", depth=3))
    period = output_period(net)
    assert period == 8  # 2**depth
    plan = plan_tiles(net, 103, 57, tile=30, overlap=0.9)
    assert plan.out_tile % period != 0  # the stride had to be rounded down to the period
    assert plan.strategy == "overlap-tile" and plan.pad_mode == "reflect"
    assert plan.in_tile == plan.out_tile + 2 * net.halo and net.output_size(plan.in_tile) == plan.out_tile
    for axis, size in ((plan.rows, 103), (plan.cols, 57)):
        covered = np.concatenate([np.arange(lo, hi) for lo, hi in axis.keep])
        np.testing.assert_array_equal(covered, np.arange(size))  # exactly once, in order
        assert all(o % period == 0 for o in axis.out_starts)  # max-pool grid aligned with the image's
        assert all(lo == o for (lo, _), o in zip(axis.keep, axis.out_starts))


def test_same_plan_is_monais_placement():
    from monai.data.utils import dense_patch_slices

    net = optimize_network(_net(SameNet, 3, 2, seed=0))
    plan = plan_tiles(net, 100, 37, tile=16, overlap=0.3)
    slices = dense_patch_slices((100, 37), (16, 16), (int(16 * 0.7), int(16 * 0.7)))
    ours = [(y, x) for y in plan.rows.starts for x in plan.cols.starts]
    assert ours == [(s[0].start, s[1].start) for s in slices]


def test_reflect_index_matches_numpy_pad():
    for size in (1, 2, 3, 7):
        for before, after in ((0, 0), (5, 9), (20, 31)):
            data = np.arange(size)
            expected = np.pad(data, (before, after), mode="reflect")
            np.testing.assert_array_equal(data[source_index(size, before, after, "reflect")], expected)
    idx = source_index(4, 2, 3, "constant")
    np.testing.assert_array_equal(idx, [-1, -1, 0, 1, 2, 3, -1, -1, -1])


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_flip_tta_averages_unflipped_predictions(padding):
    net = _unet(padding, seed=5)
    image = _rand((3, 40, 50), seed=6)
    tile = 32 if padding == "same" else 20
    with_tta = predict(net, image, tile=tile, tta=("h", "v", "hv"), batch_size=2, blend="constant")
    reference = predict(FlipAveraged(net, [(-1,), (-2,), (-2, -1)]), image, tile=tile, batch_size=2, blend="constant")
    np.testing.assert_allclose(with_tta, reference, atol=1e-5)
    assert np.abs(with_tta - predict(net, image, tile=tile, batch_size=2, blend="constant")).max() > 1e-4


DIHEDRAL = ("h", "v", "hv", "t", "th", "tv", "thv")


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_dihedral_tta_is_equivariant_to_transposing_the_image(padding):
    """With all 8 symmetries of the window averaged, predicting the transposed image gives the
    transposed prediction (a wrong inverse transform of any of the 7 breaks this)."""
    net = _unet(padding, seed=7)
    image = _rand((3, 40, 52), seed=8)
    tile = 32 if padding == "same" else 20
    straight = predict(net, image, tile=tile, tta=DIHEDRAL, batch_size=2)
    transposed = predict(net, np.ascontiguousarray(image.transpose(0, 2, 1)), tile=tile, tta=DIHEDRAL, batch_size=2)
    np.testing.assert_allclose(transposed, straight.transpose(0, 2, 1), atol=1e-5)
    without = predict(net, np.ascontiguousarray(image.transpose(0, 2, 1)), tile=tile, batch_size=2)
    assert np.abs(without - straight.transpose(0, 2, 1)).max() > 1e-4


def test_rotation_tta_on_one_window_by_hand():
    """ "th" and "tv" are the two 90-degree rotations: one window, averaged by hand with torch.rot90."""
    net = _unet("same", seed=9).eval()
    image = _rand((3, 32, 32), seed=10)
    x = torch.from_numpy(image)[None]
    with torch.no_grad():
        logits = (
            net(x)
            + torch.rot90(net(torch.rot90(x, 1, (-2, -1))), -1, (-2, -1))
            + torch.rot90(net(torch.rot90(x, -1, (-2, -1))), 1, (-2, -1))
        ) / 3
    expected = torch.softmax(logits, 1)[0].numpy()
    got = predict(net, image, tile=32, tta=("th", "tv"), blend="constant")
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_probabilities_sigmoid_and_softmax():
    image = _rand((3, 30, 30), seed=1)
    two = predict(_net(SameNet, 3, 2, seed=1), image, tile=16)
    np.testing.assert_allclose(two.sum(0), 1.0, atol=1e-6)
    one = predict(_net(SameNet, 3, 1, seed=1), image, tile=16)
    assert one.shape == (1, 30, 30) and 0 < one.min() and one.max() < 1


def test_integer_images_scaled_by_dtype_max():
    net = _net(SameNet, 3, 2, seed=2)
    image = np.random.default_rng(3).integers(0, 65536, (3, 33, 20)).astype(np.uint16)
    scaled = predict(net, image, tile=16, intensity="scale")
    np.testing.assert_array_equal(scaled, predict(net, image.astype(np.float32) / np.float32(65535), tile=16))
    raw = predict(net, image, tile=16, intensity="none")
    np.testing.assert_array_equal(raw, predict(net, image.astype(np.float32), tile=16))


def test_model_from_checkpoint_path(tmp_path):
    from pipeline.networks import save_checkpoint

    net = _unet("same", seed=9)
    path = save_checkpoint(net, tmp_path / "model.pt")
    image = _rand((3, 40, 36), seed=9)
    np.testing.assert_array_equal(predict(path, image, tile=32), predict(net, image, tile=32))


def test_fold_batch_norm_keeps_outputs_and_leaves_the_callers_module_alone():
    net = _unet("same", seed=2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    n_bn = count_batch_norm(net)
    assert n_bn > 0
    graph = optimize_network(net)
    assert count_batch_norm(graph.module) == 0
    assert any(note == f"bn folded {n_bn}/{n_bn}" for note in graph.notes)
    assert count_batch_norm(net) == n_bn and all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    x = torch.rand(2, 3, 32, 48)
    with torch.inference_mode():
        np.testing.assert_allclose(graph(x).numpy(), net(x).numpy(), atol=1e-5)
    toy = _net(SameNet, 3, 2, seed=0)
    assert fold_batch_norm(toy) == 1 and count_batch_norm(toy) == 0


def test_inplace_activations_only_where_safe():
    chain = nn.Sequential(nn.Conv2d(2, 2, 3), nn.Dropout(0.1), nn.Sequential(nn.Identity(), nn.ReLU()))
    first = nn.Sequential(nn.ReLU(), nn.Conv2d(2, 2, 3))  # its input is the chain's input
    passthrough = nn.Sequential(nn.Identity(), nn.ReLU())  # ditto, through an Identity
    after_other = nn.Sequential(nn.Conv2d(2, 2, 1), nn.Flatten(0, 0), nn.ReLU())  # unknown producer
    assert inplace_activations(nn.ModuleList([chain, first, passthrough, after_other])) == 1
    assert chain[2][1].inplace and not first[0].inplace and not passthrough[1].inplace
    assert not after_other[2].inplace

    net = _unet("same", seed=3)
    graph = optimize_network(net)
    n_relu = sum(isinstance(m, nn.ReLU) for m in net.modules())
    assert any(note == f"{n_relu} in-place activations" for note in graph.notes)
    assert not any(m.inplace for m in net.modules() if isinstance(m, nn.ReLU))  # the caller's net untouched
    x = torch.rand(1, 3, 36, 44)
    with torch.inference_mode():
        np.testing.assert_allclose(graph(x).numpy(), net(x).numpy(), atol=1e-5)


def test_settings_default_overridden_and_validated():
    settings = load_settings()
    assert settings == InferenceSettings() and settings.blend in ("gaussian", "constant") and settings.tile >= 1
    assert load_settings(None, tile=64, tta=["h"]) == InferenceSettings(tile=64, tta=("h",))
    base = InferenceSettings(tile=128, blend="constant")
    assert load_settings(base, overlap=0.5, tile=None) == InferenceSettings(tile=128, blend="constant", overlap=0.5)
    with pytest.raises(SegpipeError, match="blend"):
        load_settings(None, blend="linear")
    with pytest.raises(SegpipeError, match="overlap"):
        load_settings(None, overlap=1.0)
    with pytest.raises(SegpipeError, match="tta"):
        load_settings(None, tta=["diagonal"])
    with pytest.raises(SegpipeError, match="inference arguments: overlap must be a finite number"):
        load_settings(None, overlap=float("nan"))
    with pytest.raises(SegpipeError, match="unknown inference setting.*tile_size"):
        load_settings(None, tile_size=64)


def test_bad_input_for_predict():
    net = _net(SameNet, 3, 2, seed=0)
    with pytest.raises(SegpipeError, match="1 channel.*expects 3"):
        predict(net, _rand((1, 20, 20), seed=0), tile=16)
    with pytest.raises(SegpipeError, match="zero-size"):
        predict(net, np.zeros((3, 0, 20), np.float32), tile=16)
    with pytest.raises(SegpipeError, match=r"\(C, H, W\)"):
        predict(net, _rand((20, 20), seed=0), tile=16)
    with pytest.raises(SegpipeError, match="tile 30 does not suit"):
        predict(_unet("same"), _rand((3, 40, 40), seed=0), tile=30)  # not divisible by 2**depth
    with pytest.raises(SegpipeError, match="lacks"):
        predict(nn.Conv2d(3, 2, 3, padding=1), _rand((3, 20, 20), seed=0), tile=16)


def _shipped_config() -> dict:
    import yaml

    from pipeline.config import REPO_ROOT

    return yaml.safe_load((REPO_ROOT / "configs" / "inference.yaml").read_text())


def test_config_file_errors_name_the_file_and_key(tmp_path, monkeypatch):
    """The stage entry reads configs/inference.yaml from SEGPIPE_CONFIG_DIR; errors name the file."""
    import yaml

    from pipeline.stages.infer import config_settings

    data = _shipped_config()
    monkeypatch.setenv("SEGPIPE_CONFIG_DIR", str(tmp_path))
    (tmp_path / "inference.yaml").write_text(yaml.safe_dump({**data, "tile": 64}))
    assert config_settings() == InferenceSettings(tile=64)
    (tmp_path / "inference.yaml").write_text(yaml.safe_dump({**data, "tile_size": 3}))
    with pytest.raises(SegpipeError, match=r"inference.yaml: unknown keys \['tile_size'\]"):
        config_settings()
    del data["blend"]
    (tmp_path / "inference.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(SegpipeError, match=r"inference.yaml: missing keys \['blend'\]; expected"):
        config_settings()
    (tmp_path / "inference.yaml").write_text(yaml.safe_dump({**data, "blend": "median"}))
    with pytest.raises(SegpipeError, match="inference.yaml: blend must be one of gaussian, constant"):
        config_settings()


def test_settings_from_config_names_the_file_and_the_key():
    where = "configs/inference.yaml"
    data = _shipped_config()
    assert settings_from_config(data, where) == InferenceSettings()
    missing = {k: v for k, v in data.items() if k != "overlap"}
    with pytest.raises(SegpipeError, match=r"configs/inference.yaml: missing keys \['overlap'\]"):
        settings_from_config(missing, where)
    with pytest.raises(SegpipeError, match=r"configs/inference.yaml: .*unknown keys \['overlapp'\]"):
        settings_from_config({**data, "overlapp": 0.5}, where)
    with pytest.raises(SegpipeError, match=r"configs/inference.yaml: overlap must be a finite number.*got nan"):
        settings_from_config({**data, "overlap": float("nan")}, where)
    with pytest.raises(SegpipeError, match=r"configs/inference.yaml: sigma_scale must be a finite number.*got inf"):
        settings_from_config({**data, "sigma_scale": float("inf")}, where)
    # a section's keys stay in their section: the error names the section and the key
    graph = {k: v for k, v in data["graph"].items() if k != "compile"}
    with pytest.raises(SegpipeError, match=r"configs/inference.yaml: graph: missing keys \['compile'\]"):
        settings_from_config({**data, "graph": graph}, where)
    with pytest.raises(SegpipeError, match=r"configs/inference.yaml: .*unknown keys \['threshold'\]"):
        settings_from_config({**data, "threshold": 0.5}, where)
    with pytest.raises(SegpipeError, match=r"configs/inference.yaml: output: .*unknown keys \['tile'\]"):
        settings_from_config({**data, "output": {**data["output"], "tile": 64}}, where)
    with pytest.raises(SegpipeError, match="configs/inference.yaml: threshold must be a finite number"):
        settings_from_config({**data, "output": {**data["output"], "threshold": float("nan")}}, where)
    assert settings_from_config({**data, "tta": None}, where).tta == ()
    assert settings_from_config({**data, "tta": ["h", "tv"]}, where).tta == ("h", "tv")


def test_library_defaults_equal_the_shipped_params():
    """configs/inference.yaml (DVC params) and `InferenceSettings()` must not drift apart."""
    from dataclasses import asdict

    shipped = asdict(settings_from_config(_shipped_config(), "configs/inference.yaml"))
    assert shipped == asdict(InferenceSettings())


def test_flip_tta_with_one_output_channel():
    """One-channel networks return a tensor made in inference mode; TTA must not update it in place."""
    from pipeline.networks import build_network

    torch.manual_seed(0)
    net = build_network("unet", 1, 1, base_width=4, depth=2, padding="same").eval()
    image = _rand((1, 64, 64), seed=3)
    with_tta = predict(net, image, tile=32, tta=["h"], intensity="none")
    reference = predict(FlipAveraged(net, [(-1,)]), image, tile=32, intensity="none")
    np.testing.assert_allclose(with_tta, reference, atol=1e-5)
