"""MLflow tracking: one experiment per dataset, one run per DVC stage execution.

The tracking URI defaults to `sqlite:///mlflow.db` in the working directory (the repo root under
DVC): embedded, nothing to start; `mlflow ui --backend-store-uri sqlite:///mlflow.db` shows it.
`MLFLOW_TRACKING_URI` points to a team server instead. Under torchrun only rank 0 logs.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
from pathlib import Path
from typing import Any, Iterator, Mapping

DEFAULT_URI = "sqlite:///mlflow.db"


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` if set, else the embedded SQLite store in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def is_logging_rank() -> bool:
    """True on rank 0 of a torchrun job, and always outside one."""
    return int(os.environ.get("RANK", "0")) == 0


def git_commit() -> str:
    """The checkout's commit, or 'unknown' outside a git work tree (e.g. a DVC copy without git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def file_digest(path: Path) -> str:
    """sha256 of a small file (a data manifest), or 'missing'."""
    path = Path(path)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {'a.b.c': 'value'} as MLflow params want them."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


@contextlib.contextmanager
def stage_run(
    stage: str,
    dataset: str,
    *,
    params: Mapping[str, Any],
    manifest: Path,
    network: str | None = None,
) -> Iterator[Any]:
    """An MLflow run for one stage execution, tagged with stage, network, git commit, params and
    the data manifest hash. It ends FINISHED, FAILED on an exception, KILLED on Ctrl-C; never
    RUNNING. Yields the `mlflow` module (or None on a non-zero rank, which logs nothing)."""
    if not is_logging_rank():
        yield None
        return
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(dataset)
    tags = {
        "stage": stage,
        "dataset": dataset,
        "network": network or "",
        "git_commit": git_commit(),
        "data_manifest_sha256": file_digest(manifest),
    }
    run_name = f"{stage}-{network}" if network else stage
    with mlflow.start_run(run_name=run_name, tags=tags):
        mlflow.log_params(flatten(params))
        try:
            yield mlflow
        except KeyboardInterrupt:
            mlflow.end_run(status="KILLED")
            raise
        except BaseException:
            mlflow.end_run(status="FAILED")
            raise
