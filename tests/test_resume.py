"""Resume of an interrupted or killed `segpipe infer` (`pipeline.inference.run.resume`): the outputs of a
resumed run equal those of an uninterrupted one bit for bit, in every output format and window
strategy; a changed input, model or setting starts over and says why; SIGKILL at random moments."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from torch import nn

from pipeline.errors import SegpipeError
from pipeline.inference import inference_network, load_settings, predict_file
from pipeline.inference.run.resume import RECORD, _still_running, process_start, progress_folder
from pipeline.networks import build_network, save_checkpoint

torch.set_num_threads(1)
REPO_ROOT = Path(__file__).resolve().parent.parent


class Interrupting(nn.Module):
    """The inference graph, interrupted (KeyboardInterrupt) on its n-th forward call."""

    def __init__(self, module: nn.Module, after: int) -> None:
        super().__init__()
        self.inner, self.after, self.calls = module, after, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls > self.after:
            raise KeyboardInterrupt("simulated interruption")
        return self.inner(x)


def _checkpoint(tmp_path: Path, padding: str = "same", cout: int = 2, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    net = build_network("unet", 3, cout, padding=padding, base_width=4, depth=2, batch_norm=True, dropout=0.0)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return save_checkpoint(net.eval(), tmp_path / f"model_{padding}_{seed}.pt")


def _image(path: Path, h: int = 150, w: int = 70, seed: int = 7) -> Path:
    rng = np.random.default_rng(seed)
    tifffile.imwrite(path, rng.integers(0, 256, (h, w, 3), dtype=np.uint8), photometric="rgb")
    return path


def _contents(path: Path) -> dict[str, bytes]:
    """The bytes of a file, or of every file of a directory (a zarr store), by relative name."""
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _run(ckpt: Path, image: Path, out: Path, prob: Path | None, settings, after: int | None = None):
    net = inference_network(ckpt, settings)
    if after is not None:
        net.module = Interrupting(net.module, after)
    return predict_file(net, image, out, probabilities_path=prob, settings=settings)


SAME, VALID = (6, 14, 25), (3, 3, 3)
"""Forward calls before each interruption: a resumed blended run recomputes the window rows that
overlap its first row, an overlap-tile run only the rows it lacks."""
CASES = [  # (label map name, probabilities name, padding, settings overrides, interruptions)
    ("seg.tif", "prob.tif", "same", {"probabilities_dtype": "float16"}, SAME),
    ("seg.ome.tif", "prob.ome.tif", "same", {"output_format": "ome-tiff"}, SAME),
    ("seg.ome.zarr", None, "same", {"output_format": "ome-zarr"}, SAME),
    ("seg.nii.gz", "prob.nii.gz", "valid", {"probabilities_dtype": "float32"}, VALID),
    ("seg.tif", None, "same", {"batch_size": 8, "tta": ("h",)}, (4, 4, 2)),  # batches of whole window rows
]


@pytest.mark.parametrize("label, prob, padding, overrides, afters", CASES)
def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path, label, prob, padding, overrides, afters):
    ckpt, image = _checkpoint(tmp_path, padding), _image(tmp_path / "in.tif")
    settings = load_settings(None, tile=32, overlap=0.5, tiff_tile=16, **overrides)
    out = tmp_path / "out"
    targets = [out / label] + ([out / prob] if prob else [])
    _run(ckpt, image, targets[0], targets[1] if prob else None, settings)
    expected = [_contents(t) for t in targets]
    for t in targets:
        if t.is_dir():
            import shutil

            shutil.rmtree(t)
        else:
            t.unlink()
    notes = []
    for after in afters:  # interrupted three times, each run resuming the previous one's rows
        with pytest.raises(KeyboardInterrupt):
            _run(ckpt, image, targets[0], targets[1] if prob else None, settings, after=after)
        assert sorted(p.name for p in out.iterdir()) == [progress_folder(targets[0]).name]  # no temp, no output
        record = json.loads((progress_folder(targets[0]) / RECORD).read_text())
        notes.append(record["rows_done"])
    assert 0 < notes[0] < notes[-1] < 150, notes  # each run added rows
    report = _run(ckpt, image, targets[0], targets[1] if prob else None, settings)
    assert any(n.startswith(f"resumed at row {notes[-1]} of 150") for n in report.notes), report.notes
    assert [_contents(t) for t in targets] == expected
    assert sorted(p.name for p in out.iterdir()) == sorted(t.name for t in targets)  # progress removed


def test_a_change_starts_over_and_says_why(tmp_path, caplog):
    ckpt, image = _checkpoint(tmp_path), _image(tmp_path / "in.tif")
    out = tmp_path / "out" / "seg.tif"
    settings = load_settings(None, tile=32, tiff_tile=16)

    def interrupted(model: Path, s) -> None:
        with pytest.raises(KeyboardInterrupt):
            _run(model, image, out, None, s, after=4)

    interrupted(ckpt, settings)
    report = _run(ckpt, image, out, None, load_settings(settings, overlap=0.5))
    assert "started over: overlap 0.25 -> 0.5" in report.notes
    reference = out.read_bytes()

    interrupted(ckpt, settings)
    report = _run(_checkpoint(tmp_path, seed=1), image, out, None, settings)
    assert "started over: the model changed" in report.notes

    interrupted(ckpt, settings)
    _image(image, seed=8)  # same name, other pixels
    report = _run(ckpt, image, out, None, settings)
    assert any("the input changed" in n for n in report.notes), report.notes
    assert "a previous run's progress does not apply" in caplog.text

    _image(image, seed=7)
    interrupted(ckpt, load_settings(settings, overlap=0.5))
    (progress_folder(out) / RECORD).write_text("{not json")
    report = _run(ckpt, image, out, None, load_settings(settings, overlap=0.5))
    assert any("missing or unreadable" in n for n in report.notes), report.notes
    assert out.read_bytes() == reference

    # damaged records (a field missing, negative, not a number, more rows than the image): reported,
    # discarded, started over; the next run never fails on them
    for damage in ({"rows_done": None}, {"rows_done": -3}, {"rows_done": "12"}, {"pid": "x"}, {"rows_done": 10**6}):
        interrupted(ckpt, settings)
        path = progress_folder(out) / RECORD
        good = json.loads(path.read_text())
        path.write_text(json.dumps({k: v for k, v in {**good, **damage}.items() if v is not None}))
        report = _run(ckpt, image, out, None, settings)
        assert any(n.startswith("started over:") for n in report.notes), (damage, report.notes)
        assert not progress_folder(out).exists()


def test_resume_off_removes_what_a_killed_run_left(tmp_path):
    ckpt, image = _checkpoint(tmp_path), _image(tmp_path / "in.tif")
    out = tmp_path / "out" / "seg.tif"
    settings = load_settings(None, tile=32)
    with pytest.raises(KeyboardInterrupt):
        _run(ckpt, image, out, None, settings, after=3)
    assert progress_folder(out).is_dir()
    report = _run(ckpt, image, out, None, load_settings(settings, resume=False))  # --no-resume
    assert any(n.startswith("started over: resume is off") for n in report.notes), report.notes
    assert not progress_folder(out).exists() and sorted(p.name for p in out.parent.iterdir()) == ["seg.tif"]


def test_resume_off_and_failures_leave_nothing(tmp_path):
    ckpt, image = _checkpoint(tmp_path), _image(tmp_path / "in.tif")
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        _run(ckpt, image, out / "seg.tif", None, load_settings(None, tile=32, resume=False), after=3)
    assert list(out.iterdir()) == []
    settings = load_settings(None, tile=32)
    net = inference_network(ckpt, settings)
    inner = net.module
    net.module = lambda x: inner(x) * float("nan")  # a network output that is not finite: an error
    with pytest.raises(SegpipeError, match="not finite"):
        predict_file(net, image, out / "seg.tif", settings=settings)
    assert list(out.iterdir()) == []


def test_a_live_run_on_the_same_output_is_refused(tmp_path):
    ckpt, image = _checkpoint(tmp_path), _image(tmp_path / "in.tif")
    out = tmp_path / "out" / "seg.tif"
    settings = load_settings(None, tile=32)
    with pytest.raises(KeyboardInterrupt):
        _run(ckpt, image, out, None, settings, after=3)
    record_path = progress_folder(out) / RECORD
    record = json.loads(record_path.read_text())
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record_path.write_text(json.dumps({**record, "pid": sleeper.pid, "started": process_start(sleeper.pid)}))
        with pytest.raises(SegpipeError, match=f"another segpipe infer \\(process {sleeper.pid}\\)"):
            _run(ckpt, image, out, None, settings)
        # the same pid, started at another time (reused after a restart): not that run, so no lock
        record_path.write_text(json.dumps({**record, "pid": sleeper.pid, "started": 1.0}))
        assert _still_running(json.loads(record_path.read_text())) is False
    finally:
        sleeper.kill()
        sleeper.wait()
    report = _run(ckpt, image, out, None, settings)  # that process is gone: resumed
    assert any(n.startswith("resumed at row") for n in report.notes)


def _infer_cmd(ckpt: Path, image: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipeline",
        "infer",
        "--model",
        str(ckpt),
        "--input",
        str(image),
        "--output",
        str(out),
        "--tile",
        "64",
        "--overlap",
        "0.5",
        "--save-probabilities",
        "--format",
        "ome-tiff",
        "--no-progress",
    ]


def _rows_done(folder: Path) -> int:
    try:
        return int(json.loads((folder / RECORD).read_text())["rows_done"])
    except (OSError, ValueError, KeyError):
        return 0


def _record_pid(folder: Path) -> int | None:
    try:
        return int(json.loads((folder / RECORD).read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None


def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path):
    """`segpipe infer` killed with SIGKILL at seeded random moments (while rows are being stored, and
    at any time after start), run again each time until it completes: the outputs equal an
    uninterrupted run's bit for bit, and no temporary file is left."""
    ckpt, image = _checkpoint(tmp_path), _image(tmp_path / "big.tif", h=900, w=500)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    subprocess.run(_infer_cmd(ckpt, image, out), cwd=REPO_ROOT, env=env, check=True, capture_output=True)
    outputs = sorted(p for p in out.iterdir())
    expected = {p.name: p.read_bytes() for p in outputs}
    for p in outputs:
        p.unlink()
    folder = progress_folder(out / "big_seg.ome.tif")
    rng = random.Random(17)
    recorded, said = [], []  # rows done when each kill struck; what each run printed
    for run in range(10):
        proc = subprocess.Popen(
            _infer_cmd(ckpt, image, out),
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        start = _rows_done(folder)
        early = rng.random() < 0.25  # killed while starting, else once this run has its record
        more, delay = rng.randint(1, 400), rng.uniform(0.0, 2.0 if early else 3.0)
        began = time.monotonic() if early else None
        while run < 5 and proc.poll() is None:
            if began is None and _record_pid(folder) == proc.pid:
                began = time.monotonic()
            if began is not None and (_rows_done(folder) >= start + more or time.monotonic() - began > delay):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
        stdout, stderr = proc.communicate()
        said.append(stdout + stderr)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, stderr
        recorded.append(_rows_done(folder))
    else:
        pytest.fail(f"not finished after 10 runs (rows done at each kill: {recorded})")
    assert len([r for r in recorded if r > 0]) >= 2, recorded  # killed at least twice after rows were kept
    assert sum("resumed at row" in text for text in said) >= 2, said
    assert {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith(".")} == expected
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # killed runs' temps removed


def test_stale_temps_of_killed_processes_are_removed(tmp_path):
    from pipeline.files import remove_stale_temps, temp_prefix

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ours = temp_prefix()
    host = ours.split("-")[2]
    names = {
        f".segpipe-{dead.pid}-{host}-abc.tmp.tif": False,  # a killed process of this host: removed
        f".segpipe-{dead.pid}-{host}-xyz.tmp.ome.zarr": False,  # a folder
        f"{ours}def.tmp.tif": True,  # this process's
        f".segpipe-{dead.pid}-0badc0de-ghi.tmp.tif": True,  # another host's
        ".segpipe-oldstyle.tmp.tif": True,  # no process to check
        "image_seg.tif": True,
    }
    for name in names:
        (tmp_path / name).mkdir() if name.endswith(".zarr") else (tmp_path / name).write_bytes(b"x")
    removed = remove_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == sorted(n for n, keep in names.items() if not keep)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n, keep in names.items() if keep)
