"""`segpipe infer` under torchrun: the shares of the inputs, and a real 2-process run."""

from __future__ import annotations

import io
import itertools
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
import torch
from torch import nn

from pipeline.errors import SegpipeError
from pipeline.inference.run.inputs import check_output_clashes
from pipeline.inference.run.shards import (
    PrefixedStream,
    assign_shards,
    image_pixels,
    threads_per_process,
)
from pipeline.torchrun import RankEnv, rank_env

from fixtures import REPO_ROOT

TORCHRUN_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_USE_AGENT_STORE",
    "TORCHELASTIC_RESTART_COUNT",
)


def _check_shares(weights: list[int], world: int) -> list[list[int]]:
    shares = assign_shards(weights, world)
    assert len(shares) == world
    assert sorted(itertools.chain(*shares)) == list(range(len(weights)))  # every file exactly once
    assert all(share == sorted(share) for share in shares)  # input order kept within a share
    assert assign_shards(list(weights), world) == shares  # deterministic
    loads = [sum(weights[i] for i in share) for share in shares]
    if weights:
        assert max(loads) - min(loads) <= max(weights)  # greedy bound: balanced by pixels
    return shares


def test_shares_balance_pixels_not_file_counts() -> None:
    sides = [128, 64, 96, 80]
    assert _check_shares([s * s for s in sides], 2) == [[0], [1, 2, 3]]  # 16384 vs 19712 px, the best split
    # one huge image and many small ones: the huge one alone, the rest on the other rank
    assert _check_shares([4096**2] + [512**2] * 6, 2) == [[0], [1, 2, 3, 4, 5, 6]]
    rng = np.random.default_rng(0)
    for world in (1, 2, 3, 5):
        _check_shares([int(w) for w in rng.integers(1, 10**6, 23)], world)


def test_shares_ties_and_more_ranks_than_files() -> None:
    assert _check_shares([10, 10, 10, 10], 2) == [[0, 2], [1, 3]]  # ties: the earlier file, the lower rank
    assert _check_shares([0, 0, 0], 2) == [[0, 2], [1]]  # unreadable (0 px) files spread by count
    assert _check_shares([5, 3], 4) == [[0], [1], [], []]
    assert _check_shares([], 3) == [[], [], []]
    with pytest.raises(ValueError):
        assign_shards([1], 0)


def test_image_pixels_from_headers(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((30, 50, 3), np.uint8), photometric="rgb")
    nib.save(nib.Nifti1Image(np.zeros((2, 40, 60), np.float32), np.eye(4)), str(tmp_path / "b.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((40, 70), np.float32), np.eye(4)), str(tmp_path / "c.nii"))
    (tmp_path / "bad.tif").write_bytes(b"garbage")
    assert image_pixels(tmp_path / "a.tif") == 1500
    assert image_pixels(tmp_path / "b.nii.gz") == 2400
    assert image_pixels(tmp_path / "c.nii") == 2800
    assert image_pixels(tmp_path / "bad.tif") == 0  # its rank reports the error
    assert image_pixels(tmp_path / "missing.tif") == 0


def test_output_clashes_are_checked_over_all_inputs(tmp_path: Path) -> None:
    paths = [tmp_path / "x" / "a.tif", tmp_path / "y" / "b.tif", tmp_path / "z" / "a.tif"]
    with pytest.raises(SegpipeError, match="would both write .*a_seg.tif"):
        check_output_clashes(paths, tmp_path / "out", "auto")
    check_output_clashes(paths[:2], tmp_path / "out", "auto")


def test_rank_env_and_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    assert rank_env({}) == RankEnv(0, 1, 0, 1) and not rank_env({}).distributed
    env = rank_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert env == RankEnv(3, 4, 1, 2) and env.distributed and env.label == "[rank 3/4]"
    assert rank_env({"RANK": "1", "WORLD_SIZE": "2"}) == RankEnv(1, 2, 1, 2)
    for bad in ({"RANK": "2", "WORLD_SIZE": "2"}, {"WORLD_SIZE": "two"}):
        with pytest.raises(SegpipeError):
            rank_env(bad)
    monkeypatch.setattr("pipeline.inference.run.shards.available_cores", lambda: 8)
    assert [threads_per_process(n) for n in (1, 2, 3, 16)] == [8, 4, 2, 1]


def test_prefixed_stream_prefixes_lines_and_redrawn_bars() -> None:
    out = io.StringIO()
    stream = PrefixedStream(out, "[rank 1/2] ")
    stream.write("a.tif: done\nb.tif")
    stream.write(": done\n")
    stream.write("\rbar 10%\rbar 20%")
    assert out.getvalue() == "[rank 1/2] a.tif: done\n[rank 1/2] b.tif: done\n\r[rank 1/2] bar 10%\r[rank 1/2] bar 20%"


def _network() -> nn.Module:
    from pipeline.networks import build_network

    torch.manual_seed(0)
    net = build_network("unet", 3, 2, padding="same", base_width=4, depth=2, batch_norm=True, dropout=0.0)
    for m in net.modules():  # varied labels, not one class everywhere
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def test_torchrun_two_processes_share_the_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """2 ranks: every good input written once, bit for bit as one process writes it; a corrupt input
    fails its rank, which waits for the other rank (torchrun would stop it) and exits naming it."""
    from pipeline.networks import save_checkpoint
    from pipeline.stages.infer import run_infer

    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SEGPIPE_CONFIG_DIR", str(REPO_ROOT / "configs"))
    ckpt = save_checkpoint(_network(), tmp_path / "model.pt")
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    # shares: rank 0 gets big (65536 px), rank 1 the three small ones and bad (0 px, fails at once)
    for name, (h, w) in {"big": (256, 256), "a": (64, 64), "b": (64, 96), "c": (80, 80)}.items():
        tifffile.imwrite(inputs / f"{name}.tif", rng.integers(0, 256, (h, w, 3), dtype=np.uint8), photometric="rgb")
    (inputs / "bad.tif").write_bytes(b"garbage")
    args = ["--tile", "32", "--save-probabilities", "--probabilities-dtype", "float32"]

    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES}
    env["PYTHONPATH"] = str(REPO_ROOT)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "pipeline",
            "infer",
            "--model",
            str(ckpt),
            "--input",
            str(inputs / "*.tif"),
            "--output",
            str(tmp_path / "out"),
            *args,
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = run.stdout + run.stderr
    assert run.returncode != 0, log  # rank 1 failed: torchrun reports it
    assert "segpipe infer: error: [rank 1/2] 1 of 4 input(s) failed: " in log and "bad.tif" in log, log
    threads = threads_per_process(2)  # default: the cores shared by the node's 2 processes
    assert f"[rank 0/2] 1 input(s), 0.0655 of 0.0822 Mpx; {threads} torch thread(s)" in log, log
    assert f"[rank 1/2] 4 input(s), 0.0166 of 0.0822 Mpx; {threads} torch thread(s)" in log, log
    for rank, names in ((0, ["big"]), (1, ["a", "b", "c"])):
        for name in names:
            assert f"[rank {rank}/2] {name}.tif: " in log, log
    assert "[rank 0/2] job: 5 input(s) over 2 processes" in log and "rank 1: 1 of 4 input(s) failed" in log, log

    reference = tmp_path / "reference"
    run_infer(
        ckpt,
        [str(inputs / f"{n}.tif") for n in ("a", "b", "big", "c")],
        reference,
        show_progress=False,
        threads=1,
        tile=32,
        save_probabilities=True,
        probabilities_dtype="float32",
    )
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == sorted(p.name for p in reference.iterdir()) and len(written) == 8  # each once, no leftovers
    for name in written:
        ours, ref = tifffile.imread(tmp_path / "out" / name), tifffile.imread(reference / name)
        assert ours.dtype == ref.dtype and np.array_equal(ours, ref), name
    assert np.ptp(tifffile.imread(reference / "big_prob.tif")) > 0.01  # not a constant output
