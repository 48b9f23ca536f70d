"""The MLflow store around the stage runs (pipeline/tracking.py): created once under a file lock,
and stale RUNNING runs of killed stages marked KILLED.

- A fresh SQLite store is created (schema migrations) by one process at a time: stages that DVC or
  a user starts in parallel wait on `<db>.lock` beside the database instead of racing in alembic.
- Each stage run carries the tags `segpipe.pid` and `segpipe.host` of the process that runs it.
  When a stage starts, RUNNING runs of the same stage (experiment, stage, network, run group)
  whose process is gone on this host (killed with SIGKILL, a power cut) are marked KILLED with
  the tag `segpipe.marked_killed`. Runs of other hosts or without those tags are left alone.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

PID_TAG = "segpipe.pid"
HOST_TAG = "segpipe.host"
MARKED_KILLED_TAG = "segpipe.marked_killed"
SQLITE_PREFIX = "sqlite:///"
LOCK_TIMEOUT_SECONDS = 600.0


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///PATH` URI (None for other stores and in-memory SQLite)."""
    if not uri.startswith(SQLITE_PREFIX):
        return None
    path = uri[len(SQLITE_PREFIX) :].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Hold the file lock `<db>.lock` beside a SQLite store (nothing for other stores)."""
    db = sqlite_path(uri)
    if db is None or not db.parent.is_dir():
        yield
        return
    from filelock import FileLock

    with FileLock(str(db.with_name(db.name + ".lock")), timeout=LOCK_TIMEOUT_SECONDS):
        yield


def init_store(uri: str) -> Any:
    """An `MlflowClient` of `uri` whose store exists: a new SQLite store is created (and an old one
    migrated) under `store_lock`, so concurrent stages do not race in the schema migration."""
    from mlflow.tracking import MlflowClient

    with store_lock(uri):  # MlflowClient builds the store: creates, migrates or checks the schema
        client = MlflowClient(uri)
        client.search_experiments(max_results=1)
    return client


def process_tags() -> dict[str, str]:
    """The pid and host tags of the current process, as each stage run carries them."""
    return {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (a process of another user counts as alive).

    psutil, not `os.kill(pid, 0)`: on Windows that call terminates the process it asks about."""
    import psutil

    return pid > 0 and psutil.pid_exists(pid)


def mark_stale_runs(
    client: Any, experiment_id: str, tags: Mapping[str, str], same: Iterable[str], keep: str | None = None
) -> list[str]:
    """Mark KILLED the RUNNING runs of the experiment with the same `stage` tag as `tags` and the
    same values of the tags `same` (a missing tag counts as empty) whose pid tag names a process
    gone on this host; `keep` (a run id) is never touched. Returns the ids marked."""
    keys = ("stage", *same)
    host = socket.gethostname()
    found = client.search_runs(
        [experiment_id],
        filter_string=(
            f"attributes.status = 'RUNNING' and tags.stage = '{tags['stage']}' and tags.`{HOST_TAG}` = '{host}'"
        ),
        max_results=1000,
    )
    marked = []
    for run in found:
        run_tags = run.data.tags
        matches = all(run_tags.get(key, "") == tags.get(key, "") for key in keys)
        pid = run_tags.get(PID_TAG, "")
        if run.info.run_id == keep or not matches or not pid.isdigit() or pid_alive(int(pid)):
            continue
        when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())
        client.set_tag(
            run.info.run_id, MARKED_KILLED_TAG, f"stale RUNNING run found when the stage started again at {when}"
        )
        client.set_terminated(run.info.run_id, "KILLED")
        marked.append(run.info.run_id)
    return marked
