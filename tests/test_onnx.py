"""`segpipe export` and the ONNX Runtime backend: parity with torch on every architecture, the
metadata round trip, `segpipe infer --model x.onnx` end to end, and bad files named."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import tifffile
import torch
from torch import nn

from pipeline.errors import SegpipeError
from pipeline.inference import export_onnx, load_settings, predict
from pipeline.inference.backends.onnx_meta import PREFIX, read_meta
from pipeline.inference.backends.onnx_runtime import onnx_network
from pipeline.inference.backends.torch_graph import optimize_network, recorded_preprocessing
from pipeline.networks import build_network, load_model, save_checkpoint
from pipeline.transforms.presets import SCHEMA

torch.set_num_threads(1)
TOLERANCE = 1e-4
"""Largest difference in probabilities between the two backends."""


def _random_stats(net: nn.Module, seed: int = 0) -> nn.Module:
    """`net` in eval mode with random batch-norm statistics and affines (folding then changes the weights)."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return net.eval()


def _checkpoint(tmp_path: Path, name: str, cin: int, cout: int, **config: Any) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(_random_stats(build_network(name, cin, cout, **config)), tmp_path / f"{name}.pt")


def _augment(channels: list[int] | None = None, normalize: str = "zscore") -> dict[str, Any]:
    """A recorded `augment` section: every schema key, the preprocessing keys set."""

    def fill(schema: dict[str, Any]) -> dict[str, Any]:
        return {k: fill(v) if isinstance(v, dict) else None for k, v in schema.items()}

    return {**fill(SCHEMA), "channels": channels, "clahe": None, "normalize": normalize}


UNET = dict(base_width=4, depth=2, batch_norm=True, dropout=0.0)
UNETPP = dict(base_width=4, depth=3, batch_norm=True, dropout=0.0)
# (network, in, out, config, tile): every architecture, UNet++ at every prune level and in both eval modes
ARCHITECTURES = [
    ("unet", 3, 2, {**UNET, "padding": "same"}, 16),
    ("unet", 1, 1, {**UNET, "padding": "valid"}, 12),
    ("unet", 2, 3, {**UNET, "padding": "same", "upsampling": "bilinear"}, 16),
    ("unetpp", 1, 1, {**UNETPP, "prune_level": 1, "mode": "accurate"}, 16),
    ("unetpp", 1, 2, {**UNETPP, "prune_level": 2, "mode": "fast"}, 16),
    ("unetpp", 3, 1, {**UNETPP, "mode": "accurate"}, 16),
    ("unetpp", 1, 3, {**UNETPP, "mode": "accurate"}, 16),
    ("unetpp", 1, 2, {**UNETPP, "deep_supervision": False}, 16),
    ("u2netp", 3, 1, {}, 24),
    ("u2netp", 1, 2, {}, 20),
]


@pytest.mark.parametrize(
    "name, cin, cout, config, tile",
    ARCHITECTURES,
    ids=[
        f"{a[0]}-{a[3].get('padding', '')}{a[3].get('prune_level', '')}{a[3].get('mode', '')}-{a[2]}ch"
        for a in ARCHITECTURES
    ],
)
def test_onnxruntime_equals_torch_on_every_architecture(tmp_path, name, cin, cout, config, tile):
    ckpt = _checkpoint(tmp_path, name, cin, cout, **config)
    model = export_onnx(ckpt)
    rng = np.random.default_rng(1)
    # sizes that are not multiples of the tile, and one smaller than a tile (zero-padded window)
    for h, w, tta in ((2 * tile + 5, 3 * tile - 3, ()), (tile - 3, tile + 7, ()), (tile + 9, tile + 1, ("h", "t"))):
        image = rng.standard_normal((cin, h, w)).astype(np.float32)
        want = predict(ckpt, image, tile=tile, tta=tta)
        got = predict(model, image, tile=tile, tta=tta)
        assert got.shape == want.shape == (cout, h, w)
        assert np.abs(got - want).max() <= TOLERANCE, (h, w, tta)


@pytest.mark.parametrize("name, config", [("unetpp", UNETPP), ("u2netp", {})])
def test_a_network_trained_a_few_steps(tmp_path, name, config):
    """Weights and batch-norm statistics moved by training (Adam, the deep-supervision heads), not at init."""
    torch.manual_seed(0)
    net = build_network(name, 1, 1, **config).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    x = torch.randn(4, 1, 32, 32)
    target = (x > 0.5).float()
    for _ in range(5):
        main, aux = net(x)
        loss = sum(nn.functional.binary_cross_entropy_with_logits(out, target) for out in (main, *aux))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    ckpt = save_checkpoint(net.eval(), tmp_path / "trained.pt", precision="fp32", epoch=1)
    image = np.random.default_rng(5).standard_normal((1, 45, 38)).astype(np.float32)
    want = predict(ckpt, image, tile=32, tta=("hv",))
    assert np.abs(predict(export_onnx(ckpt), image, tile=32, tta=("hv",)) - want).max() <= TOLERANCE


def test_full_u2net_and_unetpp_pruned_at_load_time(tmp_path):
    """The full U2-Net (44 M parameters) and a UNet++ cut down by `load_model(prune_level=, mode=)`."""
    ckpt = _checkpoint(tmp_path, "u2net", 3, 1)
    image = np.random.default_rng(2).standard_normal((3, 40, 29)).astype(np.float32)
    assert np.abs(predict(export_onnx(ckpt), image, tile=32) - predict(ckpt, image, tile=32)).max() <= TOLERANCE
    pruned = load_model(_checkpoint(tmp_path, "unetpp", 1, 1, **UNETPP), prune_level=2, mode="fast")
    image = image[:1]
    want = predict(pruned, image, tile=16)
    assert np.abs(predict(export_onnx(pruned, tmp_path / "l2.onnx"), image, tile=16) - want).max() <= TOLERANCE
    in_memory = predict(pruned, image, tile=16, settings=load_settings(backend="onnxruntime"))
    assert np.abs(in_memory - want).max() <= TOLERANCE


@pytest.mark.parametrize("biases", [[-150.0], [150.0, -150.0, 0.0]])
def test_large_logits_stay_finite(tmp_path, biases):
    """UNet++ "accurate" averages its heads through log_sigmoid (one channel) or log_softmax: exported as
    log(sigmoid(x)), ONNX Runtime gives -14.84 for -15 and -inf from about -18 on (NaN where windows blend)."""
    torch.manual_seed(0)
    net = _random_stats(build_network("unetpp", 1, len(biases), **UNETPP))
    for head in net.heads.values():
        head.bias.data.copy_(torch.tensor(biases))  # confident heads: logits of about +-150
    image = np.random.default_rng(3).standard_normal((1, 37, 29)).astype(np.float32)
    logits = optimize_network(net)(torch.from_numpy(image[None, :, :32, :16]))
    assert logits.abs().max() > 100  # the case is exercised
    onnx_net = onnx_network(export_onnx(net, tmp_path / "big.onnx"), load_settings())
    assert torch.isfinite(onnx_net(torch.from_numpy(image[None, :, :32, :16]))).all()
    assert np.abs(predict(onnx_net, image, tile=16) - predict(net, image, tile=16)).max() <= TOLERANCE


def test_metadata_round_trip(tmp_path):
    augment = _augment(channels=[1])
    net = _random_stats(build_network("unet", 1, 2, **{**UNET, "padding": "valid"}))
    ckpt = save_checkpoint(
        net,
        tmp_path / "best.pt",
        augment=augment,
        precision="bf16",
        dataset="drive",
        epoch=3,
        val_dice=0.5,
        class_names=["background", "vessel"],
    )
    model = export_onnx(ckpt, tmp_path / "out" / "vessels.onnx", opset=17)
    proto = onnx.load(str(model))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version == 17
    dims = [
        [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in (*proto.graph.input, *proto.graph.output)
    ]
    assert dims == [["batch", 1, "height", "width"], ["batch", 2, "out_height", "out_width"]]
    props = {p.key: p.value for p in proto.metadata_props}
    assert sorted(props) == sorted(
        PREFIX + k
        for k in ("format", "network", "contract", "augment", "class_names", "precision", "checkpoint", "export")
    )
    meta = read_meta(props, str(model))
    assert (meta.network, meta.config, meta.padding) == ("unet", net.config, "valid")
    assert (meta.in_channels, meta.out_channels, meta.rule.halo) == (1, 2, net.halo)
    assert meta.augment == augment == recorded_preprocessing(ckpt)
    assert meta.class_names == ["background", "vessel"] and meta.precision == "bf16"
    assert meta.checkpoint is not None and meta.checkpoint["file"] == "best.pt"
    assert (meta.checkpoint["dataset"], meta.checkpoint["epoch"], meta.checkpoint["val_dice"]) == ("drive", 3, 0.5)
    assert meta.export is not None and meta.export["opset"] == 17
    for n in range(1, 120):  # the size helpers equal the network's, errors included
        for ours, theirs in ((meta.rule.output_size, net.output_size), (meta.rule.input_size, net.input_size)):
            try:
                expected: int | None = theirs(n)
            except SegpipeError:
                expected = None
            if expected is None:
                with pytest.raises(SegpipeError):
                    ours(n)
            else:
                assert ours(n) == expected
        assert meta.rule.valid_output_size(n) == net.valid_output_size(n)
    runner = onnx_network(model, load_settings())
    assert (runner.padding, runner.halo, runner.augment, runner.source) == ("valid", net.halo, augment, model)


def test_cli_export_then_infer_onnx_writes_the_label_map_of_the_checkpoint(tmp_path, capsys):
    from pipeline.cli import main

    torch.manual_seed(0)
    net = _random_stats(build_network("unet", 1, 2, **{**UNET, "padding": "same"}))
    ckpt = save_checkpoint(net, tmp_path / "best.pt", augment=_augment(channels=[1]))
    image = np.random.default_rng(4).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "slide.tif", image, photometric="rgb")
    assert main(["export", "--model", str(ckpt), "--format", "onnx"]) == 0
    model = tmp_path / "best.onnx"
    assert f"-> {model}" in capsys.readouterr().out and not list(tmp_path.glob(".*.tmp"))
    common = [
        "--input",
        str(tmp_path / "slide.tif"),
        "--tile",
        "32",
        "--save-probabilities",
        "--probabilities-dtype",
        "float32",
        "--no-progress",
    ]
    assert main(["infer", "--model", str(ckpt), "--output", str(tmp_path / "pt"), *common]) == 0
    assert main(["infer", "--model", str(model), "--output", str(tmp_path / "onnx"), *common]) == 0
    assert (
        main(["infer", "--model", str(ckpt), "--backend", "onnxruntime", "--output", str(tmp_path / "mem"), *common])
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert all("preprocessing from checkpoint: channels [1], zscore" in line for line in lines)
    assert "onnxruntime" not in lines[0] and "onnxruntime" in lines[1] and "exported in memory" in lines[2]
    want = tifffile.imread(tmp_path / "pt" / "slide_seg.tif")
    prob = tifffile.imread(tmp_path / "pt" / "slide_prob.tif")
    for run in ("onnx", "mem"):
        np.testing.assert_array_equal(tifffile.imread(tmp_path / run / "slide_seg.tif"), want)
        assert np.abs(tifffile.imread(tmp_path / run / "slide_prob.tif") - prob).max() <= TOLERANCE


def test_bad_onnx_files_are_named(tmp_path, capsys):
    from pipeline.cli import main

    settings = load_settings()
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model at all")
    with pytest.raises(SegpipeError, match=f"{garbage}: not a loadable ONNX model"):
        onnx_network(garbage, settings)
    foreign = tmp_path / "foreign.onnx"
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 1, "h", "w"])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 1, "h", "w"])],
    )
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), str(foreign))
    with pytest.raises(SegpipeError, match=f"{foreign}: an ONNX model without segpipe metadata"):
        onnx_network(foreign, settings)
    with pytest.raises(SegpipeError, match="missing.onnx: ONNX model file not found"):
        onnx_network(tmp_path / "missing.onnx", settings)
    model = export_onnx(build_network("unet", 1, 1, **{**UNET, "padding": "same"}), tmp_path / "ok.onnx")
    with pytest.raises(SegpipeError, match="precision 'bf16'"):
        onnx_network(model, load_settings(precision="bf16"))
    proto = onnx.load(str(model))
    proto.metadata_props[[p.key for p in proto.metadata_props].index(f"{PREFIX}contract")].value = '{"padding": 3}'
    onnx.save(proto, str(tmp_path / "broken.onnx"))
    with pytest.raises(SegpipeError, match="broken.onnx: malformed segpipe metadata"):
        onnx_network(tmp_path / "broken.onnx", settings)
    tifffile.imwrite(tmp_path / "in.tif", np.zeros((20, 20), np.uint8))
    assert (
        main(
            [
                "infer",
                "--model",
                str(garbage),
                "--input",
                str(tmp_path / "in.tif"),
                "--output",
                str(tmp_path / "out"),
                "--no-progress",
            ]
        )
        == 2
    )
    assert str(garbage) in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:Exporting to ONNX opset version 99")
def test_export_failures_name_the_file_and_leave_nothing(tmp_path, monkeypatch):
    import os

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(SegpipeError, match=f"{bad}"):
        export_onnx(bad)
    ckpt = save_checkpoint(build_network("unet", 1, 1, **{**UNET, "padding": "same"}), tmp_path / "m.pt")
    (tmp_path / "dir.onnx").mkdir()
    with pytest.raises(SegpipeError, match="dir.onnx: is a directory"):
        export_onnx(ckpt, tmp_path / "dir.onnx")
    with pytest.raises(SegpipeError, match="would overwrite the checkpoint"):
        export_onnx(ckpt, ckpt)
    with pytest.raises(SegpipeError, match=r"the ONNX file name is 300 bytes long, longer than file systems allow"):
        export_onnx(ckpt, tmp_path / ("m" * 295 + ".onnx"))  # refused before any work, named
    long_ok = tmp_path / ("m" * 245 + ".onnx")  # 250 bytes: fits, and so does its temp file's name
    assert export_onnx(ckpt, long_ok) == long_ok and long_ok.stat().st_size > 0
    long_ok.unlink()

    def refuse(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(SegpipeError, match="m.onnx: cannot write the ONNX model .No space left on device"):
        export_onnx(ckpt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt", "dir.onnx", "m.pt"]
    monkeypatch.undo()
    with pytest.raises(
        SegpipeError, match="m.pt: ONNX export failed .RuntimeError: Unsupported onnx_opset_version: 99"
    ):
        export_onnx(ckpt, opset=99)


def test_backend_setting_is_validated():
    with pytest.raises(SegpipeError, match="backend"):
        load_settings(backend="tensorrt")
    assert load_settings(backend="onnxruntime").backend == "onnxruntime"
