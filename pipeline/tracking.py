"""MLflow tracking: one experiment per dataset, one run per DVC stage execution.

The tracking URI defaults to `sqlite:///mlflow.db` in the working directory (the repo root under DVC;
in the temporary copies of `dvc exp run --temp/--queue`, the repo root DVC names in `DVC_ROOT`):
embedded, nothing to start; `mlflow ui --backend-store-uri sqlite:///mlflow.db` shows
it. `MLFLOW_TRACKING_URI` points to a team server instead. Under torchrun only rank 0 logs.

What a user sees in the UI:
- experiments are model-training experiments (tag `mlflow.experimentKind` =
  `custom_model_development`, the UI's "Machine learning"); an existing experiment without the
  tag gets it on the next stage run. MLflow 3.17's UI takes its GenAI / Model training switch from
  the browser (or `?workflowType=machine_learning`), not from this tag: `segpipe report` prints
  each experiment's runs-table link;
- the data a stage read (or wrote) as MLflow dataset inputs: the prepared manifest.csv rows of a
  split, with its source path, a digest and the context (training, validation, testing, output);
- system metrics (CPU, memory, disk, network; GPU with `nvidia-ml-py`) when
  configs/tracking.yaml enables them;
- the stage runs of one pipeline execution nested under one parent run per (experiment, run
  group), and tagged `segpipe.run_group` (see `run_group`);
- no run left RUNNING by a killed stage: `pipeline.tracking_store` creates the store under a file
  lock and marks stale RUNNING runs KILLED; a resumed training reopens its run (`run_id`);
- the best model of a training as an MLflow model, registered as `segpipe-DATASET-NETWORK`, when
  configs/tracking.yaml says so (`log_model`, `register_model`; `pipeline.training.mlflow_model`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from pipeline.config import ConfigError, check_bool, check_keys, check_number
from pipeline.torchrun import rank_env
from pipeline.tracking_datasets import DataInput, log_datasets
from pipeline.tracking_store import MARKED_KILLED_TAG, init_store, mark_stale_runs, process_tags

DEFAULT_URI = "sqlite:///mlflow.db"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
"""MLflow 3's experiment kind of "Machine learning" (model training)."""
RUN_GROUP_TAG = "segpipe.run_group"
PARENT_STAGE = "pipeline-run"
"""The `stage` tag of the parent runs (stage runs carry prepare, train, evaluate)."""
SAMPLING_ENV = "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"
TRACKING_KEYS = ("system_metrics", "run_groups", "log_model", "register_model")
SYSTEM_METRICS_KEYS = ("enabled", "sampling_interval_seconds")


@dataclass(frozen=True)
class TrackingSettings:
    """configs/tracking.yaml as the stages use it. `group`: the run group of this pipeline execution
    (None: no parent run). `log_model`: a training logs best.pt as an MLflow model;
    `register_model`: and registers it (`pipeline.training.mlflow_model`)."""

    system_metrics: bool = False
    sampling_interval: float = 10.0
    group: str | None = None
    log_model: bool = False
    register_model: bool = False


def tracking_settings(cfg: Mapping[str, Any], where: str) -> TrackingSettings:
    """configs/tracking.yaml (`cfg`, read from the file `where`) checked; the run group is resolved here
    (`run_group` of the params files beside `where`)."""
    cfg = check_keys(cfg, TRACKING_KEYS, where)
    system = check_keys(cfg["system_metrics"], SYSTEM_METRICS_KEYS, f"{where}: system_metrics")
    enabled = check_bool(system["enabled"], "system_metrics.enabled", where)
    interval = check_number(
        system["sampling_interval_seconds"], "system_metrics.sampling_interval_seconds", where, low=0, low_open=True
    )
    groups = check_bool(cfg["run_groups"], "run_groups", where)
    log_model = check_bool(cfg["log_model"], "log_model", where)
    register = check_bool(cfg["register_model"], "register_model", where)
    if register and not log_model:
        raise ConfigError(f"{where}: register_model: true needs log_model: true (only a logged model is registered)")
    return TrackingSettings(
        enabled, float(interval), run_group(Path(where).parent) if groups else None, log_model, register
    )


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` if set, else the embedded SQLite store `mlflow.db` of the working directory,
    or, when a stage runs in a temporary copy (`DVC_ROOT` elsewhere), of the repo root `DVC_ROOT`."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    root = os.environ.get("DVC_ROOT")
    if root and Path(root).resolve() != Path.cwd().resolve():
        return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"
    return DEFAULT_URI


def is_logging_rank() -> bool:
    """True on rank 0 of a torchrun job, and always outside one."""
    return rank_env().main


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


def params_digest(params_dir: Path) -> str:
    """sha256 over every params file (`*.yaml`, names and contents) of `params_dir`."""
    digest = hashlib.sha256()
    for path in sorted(Path(params_dir).glob("*.yaml")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def run_group(params_dir: Path) -> str:
    """The id shared by the stage runs of one pipeline execution: `SEGPIPE_RUN_GROUP` if set; under
    `dvc exp run`, `exp:<name>` (DVC sets `DVC_EXP_NAME` for every stage); otherwise the git commit
    and the hash of the params files, `<commit[:8]>+<params[:8]>`, the same for every stage of one
    `dvc repro` (and for a re-run of the same commit and params)."""
    explicit = os.environ.get("SEGPIPE_RUN_GROUP") or (
        f"exp:{os.environ['DVC_EXP_NAME']}" if os.environ.get("DVC_EXP_NAME") else ""
    )
    if not explicit:
        commit = git_commit()
        explicit = f"{commit[:8] if commit != 'unknown' else 'nogit'}+{params_digest(params_dir)[:8]}"
    return re.sub(r"[^A-Za-z0-9_.:+@-]", "-", explicit)[:200]


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


def run_record(tracker: Any) -> dict[str, str | None]:
    """{"run_id", "experiment_id", "tracking_uri"} of the active run (ids None without a tracker)."""
    run = tracker.active_run() if tracker is not None else None
    return {
        "run_id": run.info.run_id if run else None,
        "experiment_id": run.info.experiment_id if run else None,
        "tracking_uri": tracking_uri(),
    }


def use_experiment(tracker: Any, client: Any, name: str) -> str:
    """Set the experiment `name` (created if missing) as the active one and make sure it is a
    model-training experiment (an inferred or missing kind is replaced); returns its id."""
    from mlflow.exceptions import MlflowException

    if client.get_experiment_by_name(name) is None:
        try:
            client.create_experiment(
                name, artifact_location=_artifact_location(name), tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
            )
        except MlflowException:  # created meanwhile by a concurrent stage: set_experiment finds it
            pass
    experiment = tracker.set_experiment(name)  # a deleted experiment of that name is an error, as before
    kind = experiment.tags.get(EXPERIMENT_KIND_TAG)
    if kind is None or kind.endswith("_inferred"):
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


def _artifact_location(name: str) -> str | None:
    """Artifacts of a new experiment in the repo root's mlruns/ when the stage runs in a temporary
    copy (`dvc exp run --temp/--queue`) and logs to the default store; else MLflow's default."""
    root = os.environ.get("DVC_ROOT")
    if not root or os.environ.get("MLFLOW_TRACKING_URI") or Path(root).resolve() == Path.cwd().resolve():
        return None
    return (Path(root).resolve() / "mlruns" / name).as_uri()


def parent_run(client: Any, experiment_id: str, group: str, tags: Mapping[str, str]) -> str:
    """The id of the parent run of `group` in the experiment, created (already FINISHED) when there
    is none. Two stages racing to create it keep the oldest one; the other is deleted."""

    def parents() -> list[Any]:
        found = client.search_runs(
            [experiment_id],
            filter_string=(f"tags.`{RUN_GROUP_TAG}` = '{group}' and tags.stage = '{PARENT_STAGE}'"),
            max_results=100,
        )
        return sorted(found, key=lambda r: (r.info.start_time, r.info.run_id))

    existing = parents()
    if existing:
        return existing[0].info.run_id
    note = (
        f"One pipeline execution (run group {group}): the stage runs are nested below. "
        "Created by segpipe; FINISHED from the start, its end time follows the last stage run."
    )
    run = client.create_run(
        experiment_id,
        run_name=f"pipeline {group}",
        tags={**tags, "stage": PARENT_STAGE, RUN_GROUP_TAG: group, "mlflow.note.content": note},
    )
    client.set_terminated(run.info.run_id, "FINISHED")
    oldest = parents()[0].info.run_id
    if oldest != run.info.run_id:
        client.delete_run(run.info.run_id)
    return oldest


def _reopenable(client: Any, run_id: str | None, experiment_id: str) -> Any:
    """The run `run_id` if the store has it, not deleted, in the experiment; else None."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return None
    if run.info.experiment_id != experiment_id or run.info.lifecycle_stage != "active":
        return None
    return run


@contextlib.contextmanager
def _sampling_interval(seconds: float) -> Iterator[None]:
    """`seconds` as MLflow's system-metrics sampling interval while a run starts (the monitor reads
    it then); a value the user set in the environment wins and is left alone."""
    if os.environ.get(SAMPLING_ENV):
        yield
        return
    os.environ[SAMPLING_ENV] = str(seconds)
    try:
        yield
    finally:
        os.environ.pop(SAMPLING_ENV, None)


@contextlib.contextmanager
def stage_run(
    stage: str,
    dataset: str,
    *,
    params: Mapping[str, Any],
    manifest: Path,
    network: str | None = None,
    datasets: Iterable[DataInput] = (),
    tracking: TrackingSettings | None = None,
    run_id: str | None = None,
) -> Iterator[Any]:
    """An MLflow run for one stage execution, tagged with stage, network, git commit, params, the
    data manifest hash and the pid and host of the process; `datasets` are logged as dataset inputs;
    `tracking` (configs/tracking.yaml, default: no system metrics, no group) adds system metrics and
    nests the run under its group's parent run. `run_id`: a run of this stage to continue (a resumed
    training's), reopened when it is in the store's experiment, else a new run starts. Stale RUNNING
    runs of the same stage are marked KILLED first (`pipeline.tracking_store`). It ends FINISHED,
    FAILED on an exception, KILLED on Ctrl-C; never RUNNING. Yields the `mlflow` module (or None on
    a non-zero rank, which logs nothing)."""
    if not is_logging_rank():
        yield None
        return
    import mlflow

    settings = tracking or TrackingSettings()
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    client = init_store(uri)
    experiment_id = use_experiment(mlflow, client, dataset)
    commit = git_commit()
    tags = {
        "stage": stage,
        "dataset": dataset,
        "network": network or "",
        "git_commit": commit,
        "data_manifest_sha256": file_digest(manifest),
    }
    tags.update(
        {
            key: os.environ[env]
            for key, env in (("segpipe.dvc_stage", "DVC_STAGE"), ("segpipe.dvc_exp", "DVC_EXP_NAME"))
            if os.environ.get(env)
        }
    )
    parent = None
    if settings.group:
        tags[RUN_GROUP_TAG] = settings.group
    reopen = _reopenable(client, run_id, experiment_id)
    mark_stale_runs(
        client, experiment_id, tags, ("network", RUN_GROUP_TAG), keep=reopen.info.run_id if reopen is not None else None
    )
    if reopen is not None:  # keeps its parent and run group; the data and params are the checkpoint's
        parent = reopen.data.tags.get("mlflow.parentRunId")
        tags.pop(RUN_GROUP_TAG, None)
        if MARKED_KILLED_TAG in reopen.data.tags:  # it runs again
            client.delete_tag(reopen.info.run_id, MARKED_KILLED_TAG)
    elif settings.group:
        parent = parent_run(client, experiment_id, settings.group, {"dataset": dataset, "git_commit": commit})
    tags.update(process_tags())
    run_name = f"{stage}-{network}" if network else stage
    with _sampling_interval(settings.sampling_interval):
        if reopen is not None:
            mlflow.start_run(run_id=reopen.info.run_id, tags=tags, log_system_metrics=settings.system_metrics)
        else:
            mlflow.start_run(
                run_name=run_name, tags=tags, parent_run_id=parent, log_system_metrics=settings.system_metrics
            )
    try:
        if reopen is None:
            mlflow.log_params(flatten(params))
            log_datasets(mlflow, datasets)
        else:  # MLflow params cannot change: log the new keys only, name the changed ones
            logged = reopen.data.params
            flat = flatten(params)
            mlflow.log_params({k: v for k, v in flat.items() if k not in logged})
            changed = sorted(k for k, v in flat.items() if k in logged and logged[k] != v)
            if changed:
                mlflow.set_tag("segpipe.resume_changed_params", ", ".join(changed)[:5000])
        yield mlflow
    except KeyboardInterrupt:
        mlflow.end_run(status="KILLED")
        raise
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    else:
        mlflow.end_run(status="FINISHED")
    finally:
        if parent is not None:
            with contextlib.suppress(Exception):  # cosmetic: the parent's end time follows its last stage
                client.set_terminated(parent, "FINISHED")
