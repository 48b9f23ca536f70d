"""`segpipe bench train` runs both loaders and reports finite ratios (a benchmark, not a timing test)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main


def test_bench_train_runs_both_loaders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)  # no prepared data here: synthetic images
    code = main(["bench", "train", "--network", "unet", "--steps", "2", "--batch-size", "4",
                 "--patch-size", "32", "--workers", "0", "--threads", "1"])
    out = capsys.readouterr().out
    assert code == 0 and "synthetic" in out
    line = [l for l in out.splitlines() if l.strip().startswith("unet")][0].split()
    assert line[4] == "True"  # ours runs channels-last, as the smoke profile trains
    ours, monai, ratio = float(line[5]), float(line[7]), float(line[9])
    assert ours > 0 and monai > 0 and np.isclose(ratio, ours / monai, rtol=1e-2)
