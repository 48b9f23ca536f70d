"""`segpipe bench infer` runs end to end on a tiny image (a smoke test: no timing is asserted)."""
from __future__ import annotations

from pipeline.bench.inference import run_benchmark, synthetic_image


def test_bench_infer_smoke(tmp_path, capsys):
    rows = run_benchmark([64], tile=32, overlap=0.25, blend="gaussian", batch_size=2, threads=1, workdir=tmp_path)
    assert [r["method"] for r in rows] == [
        "segpipe predict_file, same", "MONAI SlidingWindowInferer", "segpipe predict_file, valid (overlap-tile)"]
    for row in rows:
        assert "error" not in row, row
        assert row["mpx_s"] > 0 and row["peak_rss_mb"] >= row["baseline_mb"] > 0
    out = capsys.readouterr().out
    assert "ratio segpipe / MONAI: throughput" in out and "peak RSS" in out


def test_synthetic_image_is_a_tiled_bigtiff(tmp_path):
    import tifffile

    path = synthetic_image(tmp_path / "s.tif", 80, tile=32)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_bigtiff and tif.pages[0].is_tiled and tif.pages[0].shape == (80, 80, 3)
        image = tif.asarray()
    assert image.dtype.name == "uint8" and image.std() > 10
