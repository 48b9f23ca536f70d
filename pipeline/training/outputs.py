"""A training's output files as one set: never a new run's config.json beside an old run's best.pt.

A fresh training first moves the previous run's files (`RUN_FILES`) aside into `PREVIOUS`; when it
succeeds that folder is deleted. When it fails before its first epoch is checkpointed, its files
are deleted and the previous run's come back. A run that fails or is killed later keeps its own
files (a consistent set that `--resume` continues) with the previous run still in `PREVIOUS`; the
next fresh start drops the failed run's files and keeps the previous run aside until a run
succeeds. `--resume` moves nothing and, when it succeeds, deletes `PREVIOUS`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

RUN_FILES = ("config.json", "log.csv", "best.pt", "last.pt", "thresholds.json", "plan.json", "instances.json")
PREVIOUS = ".previous-run"


def _move(files: tuple[str, ...], source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for name in files:
        if (source / name).exists():
            os.replace(source / name, target / name)


def _remove_run_files(out_dir: Path) -> None:
    for name in RUN_FILES:
        (out_dir / name).unlink(missing_ok=True)


@contextlib.contextmanager
def run_outputs(out_dir: Path, resume: bool, enabled: bool = True) -> Iterator[None]:
    """Keep `out_dir`'s run files consistent around a training (see the module docstring).

    `enabled` False (DDP ranks other than 0) does nothing.
    """
    if not enabled or resume:
        yield
        if enabled:
            shutil.rmtree(out_dir / PREVIOUS, ignore_errors=True)
        return
    previous = out_dir / PREVIOUS
    if previous.is_dir():
        _remove_run_files(out_dir)  # a killed fresh run's files; the run before it stays aside
    else:
        _move(RUN_FILES, out_dir, previous)
    try:
        yield
    except BaseException:
        if not (out_dir / "last.pt").exists():  # nothing to resume: the previous run comes back
            _remove_run_files(out_dir)
            _move(RUN_FILES, previous, out_dir)
            previous.rmdir()
        raise
    shutil.rmtree(previous, ignore_errors=True)


__all__ = ["PREVIOUS", "RUN_FILES", "run_outputs"]
