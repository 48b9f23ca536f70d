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
    args = build_parser().parse_args(["download", "drive", "--from", "a.zip", "--from", "b.zip", "--accept-sha256", "ab"])
    assert args.from_paths == ["a.zip", "b.zip"] and args.accept_sha256 == ["ab"] and args.mirror is None


def test_no_torchvision_in_the_installed_tree() -> None:
    """torchvision has no CPU build here: nothing the project installs may pull it in."""
    from importlib.metadata import distributions

    names = {(d.metadata["Name"] or "").lower() for d in distributions()}
    assert "torch" in names and "torchvision" not in names and not any(n.startswith("nvidia-") for n in names)
