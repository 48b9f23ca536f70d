"""The console entry points."""

from __future__ import annotations

import subprocess
import sys

from pipeline.cli import build_parser


def test_python_dash_m_pipeline_help_lists_stage_groups() -> None:
    out = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for word in ("download", "prepare", "bench", "data", "inference"):
        assert word in out.stdout


def test_bad_arguments_exit_nonzero() -> None:
    out = subprocess.run([sys.executable, "-m", "pipeline", "download"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "dataset" in out.stderr


def test_download_flags_parse() -> None:
    args = build_parser().parse_args(
        ["download", "drive", "--from", "a.zip", "--from", "b.zip", "--accept-sha256", "ab"]
    )
    assert args.from_paths == ["a.zip", "b.zip"] and args.accept_sha256 == ["ab"] and args.mirror is None


def test_no_torchvision_in_the_installed_tree() -> None:
    """torchvision has no CPU build here: nothing the project installs may pull it in."""
    from importlib.metadata import distributions

    names = {(d.metadata["Name"] or "").lower() for d in distributions()}
    assert "torch" in names and "torchvision" not in names and not any(n.startswith("nvidia-") for n in names)


def test_a_training_stopped_by_its_time_limit_exits_3(monkeypatch, capsys, tmp_path) -> None:
    """`max_minutes` is a safety net, not a budget: when it fires the stage fails loudly."""
    import pipeline.stages.train as stage
    from pipeline.cli import main
    from pipeline.training.loop import TrainResult

    def stopped(*args, **kwargs) -> TrainResult:
        return TrainResult(tmp_path, tmp_path / "best.pt", 3, 120, 0.5, 61.0, stopped_early=True)

    monkeypatch.setattr(stage, "train", stopped)
    assert main(["train", "drive", "unet", "--set", "max_minutes=1"]) == 3
    assert "stopped by max_minutes after 120 steps" in capsys.readouterr().err
    monkeypatch.setattr(stage, "train", lambda *a, **k: TrainResult(tmp_path, tmp_path, 3, 120, 0.5, 1.0, False))
    assert main(["train", "drive", "unet"]) == 0
