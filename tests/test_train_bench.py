"""`segpipe bench train` runs both loaders in both precisions and reports consistent figures
(a benchmark, not a timing test)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main


def test_bench_train_runs_both_loaders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)  # no prepared data here: synthetic images
    code = main(
        [
            "bench",
            "train",
            "--network",
            "unet",
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--patch-size",
            "32",
            "--workers",
            "0",
            "--threads",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "synthetic" in out
    assert "channels-last True" in out  # ours runs channels-last, as the smoke profile trains
    assert "conv peak" in out and "fp32" in out and "bf16" in out
    lines = out.splitlines()
    table = lines[next(i for i, line in enumerate(lines) if line.startswith("conv peak")) + 1 :]
    rows = dict(line.split(None, 1) for line in table if line.strip())
    assert rows["network"].strip() == "unet"
    value = {k: float(v) for k, v in rows.items() if k != "network"}
    assert value["GFLOP_per_patch"] > 0
    for p in ("fp32", "bf16"):
        assert value[f"{p}_patches_s"] > 0 and value[f"{p}_of_peak"] > 0
        assert np.isclose(value[f"{p}_GFLOP_s"], value[f"{p}_patches_s"] * value["GFLOP_per_patch"], rtol=1e-2)
        assert np.isclose(value[f"{p}/monai"], value[f"{p}_patches_s"] / value["monai_fp32_patches_s"], rtol=1e-2)


def test_bench_quality_on_cells_at_equal_steps_reports_seg(project, capsys: pytest.CaptureFixture) -> None:
    """The CTC fixture (few training frames, touching discs), smoke profile: the baseline trains for our
    steps at our batch and patch, both get SEG of the components and of the instance maps."""
    import yaml

    from benchmarks.training import run_quality

    from fixtures import prepare_fixture_datasets

    prepare_fixture_datasets(project, ("hela",))
    cfg_path = project.root / "configs" / "train.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["profile"] = "smoke"
    cfg_path.write_text(yaml.safe_dump(cfg))
    table = run_quality(
        "hela", "unet", equal_steps=True, overrides={"weight_map": False}, threads=1, workdir=project.root / "bench"
    )
    assert list(table["patches"])[1] == 4 * 4  # smoke: 4 steps of batch 4, as ours
    for column in ("seg_components", "seg", "instances"):
        assert table[column].notna().all()
    assert ((table["seg"] >= 0) & (table["seg"] <= 1)).all()
    assert '"weight_map": false' in (project.root / "bench/models/hela/unet/config.json").read_text()
    assert "SEG" in capsys.readouterr().out
