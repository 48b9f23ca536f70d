"""`segpipe bench infer` runs end to end on a tiny image (a smoke test: no timing is asserted)."""

from __future__ import annotations

import numpy as np
import tifffile
import torch

from benchmarks.inference import STREAMING, run_benchmark, synthetic_image
from benchmarks.monai_streaming import run_patch_inferer, window_starts


def test_bench_infer_smoke(tmp_path, capsys):
    rows = run_benchmark(
        [64],
        tile=32,
        overlap=0.25,
        blend="gaussian",
        batch_size=2,
        threads=1,
        workdir=tmp_path,
        precisions=("fp32", "bf16"),
    )
    assert [r["method"] for r in rows] == [
        "segpipe predict_file, same, fp32",
        "segpipe predict_file, same, bf16",
        "segpipe predict_file, same, onnxruntime",
        "MONAI SlidingWindowInferer",
        STREAMING,
        "segpipe predict_file, valid (overlap-tile), fp32",
        "segpipe predict_file, valid (overlap-tile), bf16",
        "segpipe predict_file, valid (overlap-tile), onnxruntime",
    ]
    for row in rows:
        assert "error" not in row, row
        assert row["mpx_s"] > 0 and row["peak_rss_mb"] >= row["baseline_mb"] > 0
    for row in (r for r in rows if r["method"].startswith("segpipe")):
        assert row["gflop"] > 0 and 0 < row["net_seconds"] <= row["seconds"] and row["of_peak"] > 0
        assert row["gflop_s"] == row["gflop"] / row["seconds"] and row["net_gflop_s"] >= row["gflop_s"]
        assert row["peak"] > 0 and row["of_peak"] == row["gflop_s"] / row["peak"]
    # each row is measured against its own probe (the run's first probe would give the fp32 rows one value)
    assert len({r["peak"] for r in rows if r["method"].startswith("segpipe") and r["precision"] == "fp32"}) == 4
    same = rows[0]
    assert same["redundancy"] == 9 * 32**2 / 64**2  # windows at 0, 24, 32 (scan interval 24) per axis
    out = capsys.readouterr().out
    assert "conv peak" in out and "% of the bf16 peak (" in out and "GFLOP/s, probed after the row)" in out
    assert "ratio segpipe, fp32 / MONAI: throughput" in out and "ratio segpipe, bf16 / MONAI" in out
    assert "ratio onnxruntime / torch fp32, same: throughput" in out
    for backend in ("fp32", "bf16", "onnxruntime"):
        assert f"ratio segpipe, {backend} / MONAI streaming: throughput" in out
    assert "blending constant (merger average; ours gaussian)" in rows[4]["notes"]
    assert "ratio onnxruntime / torch fp32, valid (overlap-tile): throughput" in out
    assert rows[2]["gflop"] == rows[0]["gflop"] and "onnxruntime" in rows[2]["notes"]


def test_synthetic_image_is_a_tiled_bigtiff(tmp_path):
    import tifffile

    path = synthetic_image(tmp_path / "s.tif", 80, tile=32)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_bigtiff and tif.pages[0].is_tiled and tif.pages[0].shape == (80, 80, 3)
        image = tif.asarray()
    assert image.dtype.name == "uint8" and image.std() > 10


def test_monai_streaming_labels_match_predict_file(tmp_path):
    """MONAI's streaming path (the bench row's code) and our predict_file give the same label map for
    the same network when blending (constant: the merger averages) and windows coincide (512 - 128 is
    a multiple of the step 96); batch-norm statistics come from the image, so the labels are not constant."""
    from pipeline.config import config_path, load_config
    from pipeline.inference import predict_file
    from pipeline.networks import build_network, network_config, save_checkpoint

    image = synthetic_image(tmp_path / "s.tif", 512)
    torch.manual_seed(0)
    config = network_config(load_config("networks"), "unet", "default", str(config_path("networks")))
    net = build_network("unet", 3, 2, **{**config, "padding": "same"})
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None
            m.reset_running_stats()
    with torch.no_grad():
        net.train()(torch.from_numpy(tifffile.imread(image)[:256, :256]).permute(2, 0, 1)[None].float() / 255)
    ckpt = save_checkpoint(net.eval(), tmp_path / "u.pt")
    assert window_starts(512, 128, 0.25) == [0, 96, 192, 288, 384]
    assert window_starts(512, 256, 0.25) == [0, 192, 384]  # padded to 640: ours would end at 256
    run_patch_inferer(net, image, tmp_path / "monai.tif", tmp_path, tile=128, overlap=0.25, batch_size=2)
    predict_file(
        ckpt,
        image,
        tmp_path / "ours.tif",
        tile=128,
        overlap=0.25,
        blend="constant",
        batch_size=2,
        intensity="scale",
        device="cpu",
    )
    monai, ours = tifffile.imread(tmp_path / "monai.tif"), tifffile.imread(tmp_path / "ours.tif")
    assert monai.shape == ours.shape == (512, 512) and monai.dtype == np.uint8
    assert 0.2 < ours.mean() < 0.8  # both classes present
    assert (monai == ours).mean() >= 0.999
    assert sorted(p.name for p in tmp_path.iterdir()) == ["monai.tif", "ours.tif", "s.tif", "u.pt"]  # stores removed
