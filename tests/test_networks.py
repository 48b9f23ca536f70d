"""Tests of pipeline.networks (issue 3): papers' sizes, shapes, contract, pruning, export, checkpoints.

Small widths and inputs everywhere except the parameter counts, which build on the meta device
(no memory, no compute) and only count.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from benchmarks.networks import count_conv_calls
from pipeline.config import load_config
from pipeline.errors import SegpipeError
from pipeline.networks import (
    CHECKPOINT_FORMAT,
    SegmentationNetwork,
    average_heads,
    build_network,
    config_keys,
    load_model,
    network_config,
    network_names,
    register_network,
    save_checkpoint,
    unet_halo,
    unet_input_size,
    unet_output_size,
    unet_valid_output_size,
)
from pipeline.networks.unetpp import UNetPlusPlus

torch.set_num_threads(1)

# Small configs of every network, with the side of a valid input and its output side.
SMALL = {
    "unet-valid": ("unet", dict(base_width=4, padding="valid", batch_norm=True), 188, 4),
    "unet-same": ("unet", dict(base_width=4, padding="same", upsampling="bilinear"), 32, 32),
    "unetpp": ("unetpp", dict(base_width=4, batch_norm=True, dropout=0.2), 32, 32),
    "unetpp-fast-L2": ("unetpp", dict(base_width=4, mode="fast", prune_level=2), 32, 32),
    "u2netp": ("u2netp", {}, 32, 32),
}


def count_params(name: str, in_channels: int, out_channels: int, **config: object) -> int:
    with torch.device("meta"):
        model = build_network(name, in_channels, out_channels, **config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "channels", "config", "paper"),
    [
        ("unet", (1, 2), {}, 31.0e6),  # Ronneberger 2015 (64 -> 1024)
        ("unetpp", (1, 1), {}, 9.04e6),  # Zhou 2018, Table 2 (32 -> 512, deep supervision)
        ("u2net", (3, 1), {}, 44.0e6),  # Qin 2020, Table 1 / Sec. 3.2
        ("u2netp", (3, 1), {}, 1.13e6),
    ],
)
def test_parameter_counts_match_papers(name, channels, config, paper):
    params = count_params(name, *channels, **config)
    assert abs(params - paper) / paper < 0.01, params


def test_unet_valid_572_gives_388_and_halo_92():
    assert unet_output_size(572, 4, "valid") == 388
    assert unet_input_size(388, 4, "valid") == 572
    assert unet_halo(4) == 92
    model = build_network("unet", 1, 2, base_width=2).eval()
    assert (model.padding, model.halo) == ("valid", 92)
    assert model.output_size(572) == 388
    with torch.no_grad():
        out = model(torch.zeros(1, 1, 572, 572))
    assert out.shape == (1, 2, 388, 388)


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5])
def test_unet_valid_size_helpers_are_consistent(depth):
    halo = unet_halo(depth)
    reachable = []
    for out in range(1, 6 * 2**depth):
        try:
            inp = unet_input_size(out, depth)
        except SegpipeError:
            continue
        reachable.append(out)
        assert inp == out + 2 * halo
        assert unet_output_size(inp, depth) == out
    assert len(reachable) >= 3 and all(b - a == 2**depth for a, b in zip(reachable, reachable[1:]))
    valid_inputs = set()
    for inp in range(1, reachable[-1] + 2 * halo + 1):
        try:
            out = unet_output_size(inp, depth)
        except SegpipeError:
            continue
        valid_inputs.add(inp)
        assert out == inp - 2 * halo and out in reachable
    assert valid_inputs == {o + 2 * halo for o in reachable}
    for at_least in range(0, reachable[-1] + 1):
        got = unet_valid_output_size(at_least, depth)
        assert got in reachable and got >= at_least
        assert not any(at_least <= o < got for o in reachable)


@pytest.mark.parametrize("side", range(50, 70))
def test_unet_valid_forward_agrees_with_helper(side):
    """Depth 2 (halo 20): every size the helper accepts runs to its size, the others are refused."""
    model = build_network("unet", 1, 1, base_width=2, depth=2).eval()
    try:
        expected = model.output_size(side)
    except SegpipeError as exc:
        assert str(side) in str(exc)
        return
    with torch.no_grad():
        assert model(torch.zeros(1, 1, side, 40 + 16)).shape[-2:] == (expected, 16)


def test_same_padding_sizes_and_errors():
    unet = build_network("unet", 1, 1, padding="same", depth=3, base_width=2)
    assert unet.halo == 0 and unet.output_size(48) == 48 and unet.input_size(48) == 48
    assert unet.valid_output_size(49) == 56
    with pytest.raises(SegpipeError, match="divisible by 8"):
        unet.output_size(50)
    unetpp = build_network("unetpp", 1, 1, base_width=2, prune_level=2)
    assert unetpp.output_size(36) == 36 and unetpp.valid_output_size(37) == 40
    with pytest.raises(SegpipeError):
        unetpp.input_size(38)
    u2 = build_network("u2netp", 1, 1)
    assert u2.output_size(37) == 37 and u2.valid_output_size(37) == 37
    with pytest.raises(SegpipeError):
        u2.output_size(0)


@pytest.mark.parametrize("key", sorted(SMALL))
def test_contract_shapes_multichannel_multiclass(key):
    torch.manual_seed(0)
    name, config, side, out_side = SMALL[key]
    model = build_network(name, 3, 4, **config)
    assert model.network_name == name and model.in_channels == 3 and model.out_channels == 4
    assert model.padding in ("valid", "same")
    assert model.halo == (side - out_side) // 2 and model.output_size(side) == out_side
    assert model.input_size(out_side) == side
    rebuilt = build_network(name, 3, 4, **model.config)
    assert rebuilt.config == model.config
    x = torch.randn(2, 3, side, side)
    main, aux = model.train()(x)
    expected_aux = {"unet": 0, "unetpp": config.get("prune_level", 4) - 1, "u2netp": 6}[name]
    assert main.shape == (2, 4, out_side, out_side) and len(aux) == expected_aux
    assert all(a.shape == main.shape for a in aux)
    with torch.no_grad():
        out = model.eval()(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 4, out_side, out_side)


def test_u2net_full_keeps_odd_sizes():
    with torch.no_grad():
        out = build_network("u2net", 1, 2).eval()(torch.randn(1, 1, 21, 34))
    assert out.shape == (1, 2, 21, 34)


@pytest.mark.parametrize("key", ["unet-same", "unetpp", "u2netp"])
def test_gradients_reach_every_parameter(key):
    torch.manual_seed(0)
    name, config, side, _ = SMALL[key]
    model = build_network(name, 2, 3, **(dict(config, dropout=0.0) if name != "u2netp" else config))
    main, aux = model.train()(torch.randn(2, 2, side, side))
    loss = sum((out * torch.randn_like(out)).sum() for out in [main, *aux])
    loss.backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", ["unetpp", "u2netp"])
def test_aux_heads_alone_train_the_shared_layers(name):
    """The auxiliary outputs are attached to the graph: they alone give gradients to the stem."""
    torch.manual_seed(0)
    model = build_network(name, 1, 2, **({"base_width": 4} if name == "unetpp" else {}))
    main, aux = model.train()(torch.randn(2, 1, 32, 32))
    assert aux
    for k, out in enumerate(aux):
        model.zero_grad()
        (out * torch.randn_like(out)).sum().backward(retain_graph=True)
        first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        assert first_conv.weight.grad.abs().sum() > 0, k


def test_unetpp_prune_levels_give_their_heads_and_run_fewer_convs():
    torch.manual_seed(0)
    full = build_network("unetpp", 1, 2, base_width=4, batch_norm=True).eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        features = full.top_features(x)
    calls = []
    for level in range(1, 5):
        pruned = full.pruned(level, mode="fast").eval()
        nodes = (level + 1) * (level + 2) // 2
        assert len(pruned.nodes) == nodes and len(pruned.ups) == level * (level + 1) // 2
        with torch.no_grad():
            expected = full.heads[f"x0_{level}"](features[level - 1])
            assert torch.allclose(pruned(x), expected, atol=1e-6)
        calls.append(count_conv_calls(pruned, x))
        # two convs per node, one transposed conv per up-sampling, one head
        assert calls[-1] == 2 * nodes + level * (level + 1) // 2 + 1
        built = build_network("unetpp", 1, 2, base_width=4, batch_norm=True, prune_level=level)
        assert sum(p.numel() for p in built.parameters()) == sum(p.numel() for p in pruned.parameters())
    assert calls == sorted(set(calls))


def test_unetpp_modes_and_supervision():
    torch.manual_seed(0)
    model = build_network("unetpp", 1, 3, base_width=4).eval()
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        feats = model.top_features(x)
        heads = [model.heads[f"x0_{j}"](feats[j - 1]) for j in range(1, 5)]
        accurate = model(x)
    probs = torch.stack([h.softmax(1) for h in heads]).mean(0)
    assert torch.allclose(accurate.softmax(1), probs, atol=1e-6)
    model.mode = "fast"
    with torch.no_grad():
        assert torch.equal(model(x), heads[-1])
    plain = build_network("unetpp", 1, 1, base_width=4, deep_supervision=False)
    main, aux = plain.train()(x)
    assert aux == [] and len(plain.heads) == 1
    with pytest.raises(SegpipeError, match="deep_supervision"):
        plain.pruned(2)


def test_average_heads_sigmoid_is_mean_probability():
    heads = [torch.tensor([[[[30.0]]]]), torch.tensor([[[[-2.0]]]]), torch.tensor([[[[0.5]]]])]
    avg = average_heads(heads)
    expected = torch.stack([h.sigmoid() for h in heads]).mean(0)
    assert torch.allclose(avg.sigmoid(), expected, atol=1e-6) and torch.isfinite(avg).all()


@pytest.mark.parametrize("key", sorted(SMALL) + ["u2net"])
def test_torch_export_of_eval_graph(key, tmp_path):
    torch.manual_seed(0)
    name, config, side, _ = SMALL.get(key, ("u2net", {}, 32, 32))
    model = build_network(name, 1, 2, **config).eval()
    x = torch.randn(1, 1, side, side)
    program = torch.export.export(model, (x,))
    if key == "unet-valid":  # deployment path: the exported file alone, reloaded
        torch.export.save(program, tmp_path / "net.pt2")
        program = torch.export.load(tmp_path / "net.pt2")
    with torch.no_grad():
        assert torch.allclose(program.module()(x), model(x), atol=1e-5)


@pytest.mark.parametrize("key", sorted(SMALL))
def test_checkpoint_round_trip(key, tmp_path):
    torch.manual_seed(0)
    name, config, side, _ = SMALL[key]
    model = build_network(name, 2, 3, **config)
    model.train()(torch.randn(2, 2, side, side))  # move batch-norm running stats off their init
    model.eval()
    path = save_checkpoint(model, tmp_path / "sub" / "model.pt", epoch=7, note="x")
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pt"]
    data = torch.load(path, weights_only=True)
    assert data["format"] == CHECKPOINT_FORMAT and data["network"] == name
    assert data["config"] == model.config and data["halo"] == model.halo
    assert (data["padding"], data["in_channels"], data["out_channels"], data["epoch"]) == (
        model.padding,
        2,
        3,
        7,
    )
    loaded = load_model(path)
    assert not loaded.training and loaded.config == model.config
    x = torch.randn(1, 2, side, side)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_load_model_prunes_unetpp(tmp_path):
    torch.manual_seed(0)
    model = build_network("unetpp", 1, 1, base_width=4).eval()
    path = save_checkpoint(model, tmp_path / "m.pt")
    loaded = load_model(path, prune_level=2, mode="fast")
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.pruned(2, "fast").eval()(x))
    assert loaded.config["prune_level"] == 2 and len(loaded.nodes) == 6
    with pytest.raises(SegpipeError, match="prune_level"):
        load_model(path, prune_level=5)
    unet_path = save_checkpoint(build_network("unet", 1, 1, base_width=2), tmp_path / "u.pt")
    with pytest.raises(SegpipeError, match="u.pt"):
        load_model(unet_path, mode="fast")


def test_load_model_rejects_foreign_files(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(SegpipeError, match="notes.txt"):
        load_model(text)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(SegpipeError, match="other.pt.*not a segpipe checkpoint"):
        load_model(other)
    with pytest.raises(SegpipeError, match="missing.pt"):
        load_model(tmp_path / "missing.pt")
    model = build_network("unet", 1, 1, base_width=2)
    broken = tmp_path / "broken.pt"
    save_checkpoint(model, broken)
    data = torch.load(broken, weights_only=True)
    data["config"]["base_width"] = 4
    torch.save(data, broken)
    with pytest.raises(SegpipeError, match="broken.pt.*does not rebuild"):
        load_model(broken)
    with pytest.raises(SegpipeError, match="reserved"):
        save_checkpoint(model, tmp_path / "clash.pt", state_dict={})


def test_registry_errors_list_valid_choices():
    with pytest.raises(SegpipeError, match="unet, unetpp, u2net, u2netp"):
        build_network("resnet", 1, 1)
    with pytest.raises(SegpipeError, match="valid keys: padding, base_width"):
        build_network("unet", 1, 1, widht=3)
    with pytest.raises(SegpipeError, match="valid keys: none"):
        build_network("u2net", 1, 1, base_width=3)
    for bad in [dict(padding="full"), dict(depth=0), dict(dropout=1.0), dict(batch_norm="yes")]:
        with pytest.raises(SegpipeError):
            build_network("unet", 1, 1, **bad)
    with pytest.raises(SegpipeError, match="prune_level"):
        build_network("unetpp", 1, 1, prune_level=5)
    with pytest.raises(SegpipeError, match="out_channels"):
        build_network("u2netp", 1, 0)
    assert {"unet", "unetpp", "u2net", "u2netp"} <= set(network_names())


@pytest.mark.parametrize("preset", ["default", "paper"])
def test_config_presets_build(preset):
    presets = load_config("networks")
    for name in ("unet", "unetpp", "u2net", "u2netp"):
        config = network_config(presets, name, preset, "configs/networks.yaml")
        assert set(config) <= set(config_keys(name))
        with torch.device("meta"):
            model = build_network(name, 1, 2, **config)
        assert set(model.config) == set(config_keys(name))
        assert all(model.config[key] == value for key, value in config.items())
    paper_unet = network_config(presets, "unet", "paper", "configs/networks.yaml")
    assert (paper_unet["padding"], paper_unet["base_width"]) == ("valid", 64)


class _Tiny(SegmentationNetwork):
    """A network registered at run time: a 3x3 conv of `width` channels and a 1x1 head."""

    def __init__(self, in_channels: int, out_channels: int, *, width: int = 2) -> None:
        super().__init__("tiny", {"width": width}, in_channels, out_channels)
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, out_channels, 1)
        )

    def forward(self, x: torch.Tensor):
        return (self.body(x), []) if self.training else self.body(x)


def test_a_network_missing_from_a_preset_builds_with_its_registered_defaults(monkeypatch, tmp_path):
    from pipeline.networks import registry

    monkeypatch.setattr(registry, "_BUILDERS", dict(registry._BUILDERS))  # the registration ends with the test
    register_network("tiny", _Tiny, {"width": 3})
    presets = load_config("networks")
    assert all("tiny" not in presets[preset] for preset in ("default", "paper"))
    config = network_config(presets, "tiny", "default", "configs/networks.yaml")
    assert config == {"width": 3}
    model = build_network("tiny", 1, 2, **config)
    assert model.config == {"width": 3} and model.body[0].out_channels == 3
    assert network_config({"default": {"tiny": {"width": 5}}}, "tiny", "default", "w") == {"width": 5}
    with pytest.raises(SegpipeError, match="unknown network 'nonet'"):
        network_config(presets, "nonet", "default", "configs/networks.yaml")
    with pytest.raises(SegpipeError, match="w: no preset 'nope'"):
        network_config(presets, "tiny", "nope", "w")
    path = save_checkpoint(model, tmp_path / "tiny.pt")
    assert load_model(path).config == {"width": 3}
    with pytest.raises(
        SegpipeError,
        match=r"cannot override \['mode'\] for network 'tiny' "
        r"\(only unetpp takes mode / prune_level at load time\)",
    ):
        load_model(path, mode="fast")


def test_load_time_overrides_follow_the_network_class(tmp_path):
    assert (SegmentationNetwork.load_overrides, UNetPlusPlus.load_overrides) == ((), ("mode", "prune_level"))
    unet_path = save_checkpoint(build_network("unet", 1, 1, base_width=2), tmp_path / "u.pt")
    with pytest.raises(SegpipeError) as refused:
        load_model(unet_path, prune_level=1)
    assert str(refused.value) == (
        f"{unet_path}: cannot override ['prune_level'] for network 'unet' "
        "(only unetpp takes mode / prune_level at load time)"
    )
    unetpp_path = save_checkpoint(build_network("unetpp", 1, 1, base_width=2, depth=2), tmp_path / "pp.pt")
    with pytest.raises(SegpipeError, match=r"cannot override \['mode', 'width'\] for network 'unetpp'"):
        load_model(unetpp_path, mode="fast", width=3)
    loaded = load_model(unetpp_path, mode="fast")
    assert (loaded.mode, loaded.prune_level, loaded.training) == ("fast", 2, False)


def test_bench_cli_is_registered():
    from pipeline.cli import build_parser

    args = build_parser().parse_args(["bench", "networks", "--size", "32", "--repeats", "1"])
    assert args.handler.__name__ == "_cmd_bench_networks" and args.size == 32


def test_bench_measures_in_process():
    from benchmarks.networks import Case, measure

    case = Case("tiny", "segpipe", "unet", dict(base_width=2, depth=2))
    result = measure(case, "backward", 16, 1, 1, (1, 2))
    assert result["output"] >= 16 and result["input"] == result["output"] + 2 * unet_halo(2)
    assert result["params"] > 0 and result["seconds"] > 0 and math.isfinite(result["peak_mib"])


def test_unet_widths_per_level() -> None:
    from pipeline.networks import build_network

    net = build_network("unet", 1, 1, padding="same", depth=2, batch_norm=True, widths=[8, 8, 16])
    convs = [m for m in net.encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 8, 8, 8, 16, 16]
    assert net.config["widths"] == [8, 8, 16]
    with pytest.raises(SegpipeError, match=r"widths must be null or a list of depth \+ 1 = 3"):
        build_network("unet", 1, 1, padding="same", depth=2, widths=[8, 16])


def test_unetpp_widths_per_level_survive_pruning() -> None:
    from pipeline.networks import build_network

    torch.manual_seed(0)
    net = build_network("unetpp", 1, 1, depth=3, batch_norm=True, widths=[4, 4, 8, 16]).eval()
    outs = {
        name: [m.out_channels for m in node.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        for name, node in net.nodes.items()
    }
    assert outs == {
        "x0_0": 4,
        "x1_0": 4,
        "x2_0": 8,
        "x3_0": 16,
        "x0_1": 4,
        "x1_1": 4,
        "x2_1": 8,
        "x0_2": 4,
        "x1_2": 4,
        "x0_3": 4,
    }
    assert net.config["widths"] == [4, 4, 8, 16]
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        features = net.top_features(x)
        pruned = net.pruned(2, mode="fast").eval()
        assert pruned.config["widths"] == [4, 4, 8, 16]
        assert torch.allclose(pruned(x), net.heads["x0_2"](features[1]), atol=1e-6)
    with pytest.raises(SegpipeError, match=r"unetpp: widths must be null or a list of depth \+ 1 = 4"):
        build_network("unetpp", 1, 1, depth=3, widths=[4, 8, 16])
