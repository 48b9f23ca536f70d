"""`segpipe bench infer` runs end to end on a tiny image (a smoke test: no timing is asserted)."""
from __future__ import annotations

from pipeline.bench.inference import run_benchmark, synthetic_image


def test_bench_infer_smoke(tmp_path, capsys):
    rows = run_benchmark([64], tile=32, overlap=0.25, blend="gaussian", batch_size=2, threads=1, workdir=tmp_path,
                         precisions=("fp32", "bf16"))
    assert [r["method"] for r in rows] == [
        "segpipe predict_file, same, fp32", "segpipe predict_file, same, bf16", "segpipe predict_file, same, onnxruntime",
        "MONAI SlidingWindowInferer", "segpipe predict_file, valid (overlap-tile), fp32",
        "segpipe predict_file, valid (overlap-tile), bf16", "segpipe predict_file, valid (overlap-tile), onnxruntime"]
    for row in rows:
        assert "error" not in row, row
        assert row["mpx_s"] > 0 and row["peak_rss_mb"] >= row["baseline_mb"] > 0
    for row in (r for r in rows if r["method"].startswith("segpipe")):
        assert row["gflop"] > 0 and 0 < row["net_seconds"] <= row["seconds"] and row["of_peak"] > 0
        assert row["gflop_s"] == row["gflop"] / row["seconds"] and row["net_gflop_s"] >= row["gflop_s"]
    same = rows[0]
    assert same["redundancy"] == 9 * 32**2 / 64**2  # windows at 0, 24, 32 (scan interval 24) per axis
    out = capsys.readouterr().out
    assert "conv peak" in out and "% of the bf16 peak" in out
    assert "ratio segpipe, fp32 / MONAI: throughput" in out and "ratio segpipe, bf16 / MONAI" in out
    assert "ratio onnxruntime / torch fp32, same: throughput" in out
    assert "ratio onnxruntime / torch fp32, valid (overlap-tile): throughput" in out
    assert rows[2]["gflop"] == rows[0]["gflop"] and "onnxruntime" in rows[2]["notes"]


def test_synthetic_image_is_a_tiled_bigtiff(tmp_path):
    import tifffile

    path = synthetic_image(tmp_path / "s.tif", 80, tile=32)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_bigtiff and tif.pages[0].is_tiled and tif.pages[0].shape == (80, 80, 3)
        image = tif.asarray()
    assert image.dtype.name == "uint8" and image.std() > 10
