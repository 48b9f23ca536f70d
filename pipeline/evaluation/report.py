"""`segpipe report`: every results/<dataset>/<network>/metrics.json in one table (issue 6).

Writes, atomically, results/summary.csv (every key of every metrics.json, one row per dataset x
network, plus the training facts) and results/report.md (a markdown table of the key metrics).
Training facts come from models/<dataset>/<network>/log.csv when it exists: `train_minutes` is the
training's wall time (its last `elapsed_seconds`: set-up, validation and checkpoints included),
`epochs` its last epoch. DRIVE's second observer (`observer2_*` of metrics.json) gets a reference row.
An evaluation of K > 2 classes (metrics.json lists its `classes`) gets its per-class Dice and IoU
(means over the test images and pooled) in a second table, "Per class" (summary.csv: `classes` as a
JSON list).
The MLflow run of each evaluation comes from results/<dataset>/<network>/mlflow.json (columns
mlflow_run_id, mlflow_experiment_id, mlflow_tracking_uri; "MLflow run" in report.md). The pairs of
the pipeline's matrix (configs/data.yaml datasets x configs/train.yaml networks) without a
metrics.json are listed under "Not evaluated yet" with the command that produces them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd

from pipeline.data.io import write_text
from pipeline.errors import SegpipeError
from pipeline.files import atomic_path
from pipeline.metrics import MEAN_FG

NETWORK_ORDER = ("unet", "unetpp", "u2net")
OBSERVER_ROW = "2nd observer"
REPORT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("dataset", "dataset"),
    ("network", "network"),
    ("network_used", "checkpoint"),
    ("dice", "Dice"),
    ("iou", "IoU"),
    ("pooled_f1", "F1 pooled"),
    ("pooled_f1_best", "F1 pooled @ val t"),
    ("pooled_auc", "AUC-ROC"),
    ("pooled_accuracy", "accuracy"),
    ("seg", "SEG"),
    ("ap50", "AP@0.5"),
    ("maxf", "maxFβ"),
    ("mae", "MAE"),
    ("train_minutes", "train min"),
    ("epochs", "epochs"),
    ("mlflow_run_id", "MLflow run"),
)
"""(summary.csv column, report.md header) of the markdown table."""
CLASS_COLUMNS = (("dice_", "Dice"), ("iou_", "IoU"), ("pooled_dice_", "Dice pooled"), ("pooled_iou_", "IoU pooled"))
"""(metrics.json key prefix before a class, report.md header) of the per-class table."""


def training_facts(log_csv: Path) -> dict[str, float]:
    """train_minutes (wall time: the last `elapsed_seconds`) and epochs (last `epoch`) of a training log.csv."""
    log = pd.read_csv(log_csv)
    missing = {"epoch", "elapsed_seconds"} - set(log.columns)
    if missing:
        raise SegpipeError(f"{log_csv}: missing column(s) {sorted(missing)} (expected the log of `segpipe train`)")
    if log.empty:
        return {}
    return {"train_minutes": float(log["elapsed_seconds"].max()) / 60.0, "epochs": int(log["epoch"].max())}


def collect(
    results_dir: Path,
    models_dir: Path,
    datasets: Iterable[str] | None = None,
    networks: Iterable[str] | None = None,
) -> pd.DataFrame:
    """One row per results/<dataset>/<network>/metrics.json (filtered), with the training facts."""
    keep_ds = None if datasets is None else set(datasets)
    keep_net = None if networks is None else set(networks)
    rows = []
    for path in sorted(results_dir.glob("*/*/metrics.json")):
        dataset, network = path.parent.parent.name, path.parent.name
        if (keep_ds is not None and dataset not in keep_ds) or (keep_net is not None and network not in keep_net):
            continue
        metrics = _json_object(path, "a JSON object of metrics")
        row: dict[str, Any] = {**metrics, "dataset": dataset, "network": network}
        row.update(mlflow_record(path.parent / "mlflow.json"))
        log_csv = models_dir / dataset / network / "log.csv"
        if log_csv.is_file():
            row.update(training_facts(log_csv))
        rows.append(row)
    if not rows:
        wanted = (
            ""
            if keep_ds is None and keep_net is None
            else (
                f" for datasets {sorted(keep_ds) if keep_ds else 'any'}"
                f" and networks {sorted(keep_net) if keep_net else 'any'}"
            )
        )
        raise SegpipeError(
            f"{results_dir}: no <dataset>/<network>/metrics.json found{wanted}; "
            "run `segpipe evaluate DATASET NETWORK` first"
        )
    table = sorted_rows(pd.DataFrame(rows))
    first = ["dataset", "network"]
    return table[first + [c for c in table.columns if c not in first]]


def sorted_rows(table: pd.DataFrame) -> pd.DataFrame:
    """Rows by dataset, then unet, unetpp, u2net, other networks by name, the second observer last."""

    def key(i: int) -> tuple[str, int, str]:
        network = table.at[i, "network"]
        rank = (
            len(NETWORK_ORDER) + 1
            if network == OBSERVER_ROW
            else (NETWORK_ORDER.index(network) if network in NETWORK_ORDER else len(NETWORK_ORDER))
        )
        return table.at[i, "dataset"], rank, network

    return table.loc[sorted(table.index, key=key)].reset_index(drop=True)


def observer_rows(table: pd.DataFrame) -> pd.DataFrame:
    """Per dataset with a second observer: its pooled F1 and accuracy as a reference row."""
    if "observer2_pooled_f1" not in table.columns:
        return pd.DataFrame()
    rows = []
    for dataset, group in table.groupby("dataset", sort=True):
        known = group.dropna(subset=["observer2_pooled_f1"])
        if not known.empty:
            first = known.iloc[0]
            rows.append(
                {
                    "dataset": dataset,
                    "network": OBSERVER_ROW,
                    "pooled_f1": first["observer2_pooled_f1"],
                    "pooled_accuracy": first.get("observer2_pooled_accuracy"),
                }
            )
    return pd.DataFrame(rows)


def _json_object(path: Path, expected: str) -> dict[str, Any]:
    """The JSON object in `path`; SegpipeError naming the file and `expected` otherwise."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SegpipeError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise SegpipeError(f"{path}: expected {expected}")
    return data


def mlflow_record(path: Path) -> dict[str, Any]:
    """mlflow.json of an evaluation (written by `segpipe evaluate`) as summary.csv columns
    mlflow_run_id, mlflow_experiment_id, mlflow_tracking_uri; {} when there is none."""
    if not path.is_file():
        return {}
    record = _json_object(path, "a JSON object with run_id, experiment_id, tracking_uri")
    return {f"mlflow_{key}": record.get(key) for key in ("run_id", "experiment_id", "tracking_uri")}


def cell(key: str, value: Any) -> str:
    """A report.md cell of the summary.csv column `key`."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if key == "epochs":
        return str(int(value))
    if isinstance(value, float):
        return f"{value:.1f}" if key == "train_minutes" else f"{value:.4f}"
    return str(value)


def markdown(table: pd.DataFrame, missing: Sequence[tuple[str, str]] = ()) -> str:
    """report.md: the key metrics of every dataset x network, the second observers, where the MLflow
    runs are, and the pairs of the matrix (`missing`) that have no metrics yet."""
    rows = sorted_rows(pd.concat([table, observer_rows(table)], ignore_index=True))
    columns = [(key, title) for key, title in REPORT_COLUMNS if key in rows.columns]
    lines = ["| " + " | ".join(title for _, title in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for record in rows.to_dict("records"):
        lines.append("| " + " | ".join(cell(key, record.get(key)) for key, _ in columns) + " |")
    notes = [
        "# Evaluation report",
        "",
        "Test split, whole images. Dice/IoU: mean over test images at threshold "
        "(configs/evaluate.yaml, inside the FOV for DRIVE; more than two classes: the mean over the "
        "foreground classes of the argmax label map); F1/AUC/accuracy: pooled over all test pixels "
        '("@ val t": at the best-F1 threshold picked on validation); SEG: Cell Tracking Challenge SEG '
        '(the U-Net paper\'s "IOU") of the instance maps segpipe infer writes; AP@0.5: their average '
        "precision at IoU 0.5 (StarDist, Cellpose); maxFβ (β² = 0.3) and MAE: U2-Net's protocol; "
        "train min: training wall "
        "time (elapsed_seconds of models/<dataset>/<network>/log.csv). Every value: results/summary.csv.",
        "",
    ]
    return "\n".join(notes + lines + _class_notes(table) + _mlflow_notes(table) + _missing_notes(missing)) + "\n"


def _class_notes(table: pd.DataFrame) -> list[str]:
    """The per-class table of the evaluations of K > 2 classes (the rows whose metrics.json lists
    `classes`): every class, background included, and the mean over the foreground classes."""
    records = [r for r in table.to_dict("records") if isinstance(r.get("classes"), list)]
    if not records:
        return []
    lines = [
        "",
        "## Per class",
        "",
        "Datasets of more than two classes: each class one-vs-rest on the argmax label map, inside the FOV; "
        "Dice/IoU: mean over test images, pooled: over all test pixels; mean fg: over the foreground "
        "classes (the Dice/IoU above).",
        "",
        "| dataset | network | class | " + " | ".join(title for _, title in CLASS_COLUMNS) + " |",
        "|" + "|".join("---" for _ in range(3 + len(CLASS_COLUMNS))) + "|",
    ]
    for record in records:
        for key in [*record["classes"], MEAN_FG]:
            cells = [cell(prefix + key, record.get(prefix + key)) for prefix, _ in CLASS_COLUMNS]
            name = "mean fg" if key == MEAN_FG else key
            lines.append(f"| {record['dataset']} | {record['network']} | {name} | " + " | ".join(cells) + " |")
    return lines


def _mlflow_notes(table: pd.DataFrame) -> list[str]:
    """How to open the MLflow run of a row (when the evaluations recorded one)."""
    if "mlflow_run_id" not in table.columns or table["mlflow_run_id"].isna().all():
        return []
    uris = sorted({str(u) for u in table.get("mlflow_tracking_uri", pd.Series(dtype=object)).dropna()})
    uri = uris[0] if len(uris) == 1 else "<tracking URI of summary.csv>"
    links = [
        f"- {dataset}: http://127.0.0.1:5000/#/experiments/{experiment}?workflowType=machine_learning"
        for dataset, experiment in sorted(
            {(str(d), str(e)) for d, e in zip(table["dataset"], table["mlflow_experiment_id"]) if pd.notna(e)}
        )
    ]
    return [
        "",
        "MLflow run: the `evaluate` run of the row (results/<dataset>/<network>/mlflow.json; "
        "experiment = dataset, its parent run groups the stages of one pipeline execution). Open it with "
        f"`mlflow ui --backend-store-uri {uri}` (runs table, search `attributes.run_id = 'ID'`) or "
        f"`MLFLOW_TRACKING_URI={uri} mlflow runs describe --run-id ID`. The experiments' runs tables "
        "(`workflowType=machine_learning`: MLflow 3's UI otherwise opens on its GenAI overview):",
        "",
        *links,
    ]


def _missing_notes(missing: Sequence[tuple[str, str]]) -> list[str]:
    """The pairs of the matrix without metrics.json, each with the command that produces it."""
    if not missing:
        return []
    lines = [
        "",
        "## Not evaluated yet",
        "",
        f"{len(missing)} dataset x network pair(s) of the pipeline (configs/data.yaml `datasets` x "
        "configs/train.yaml `networks`) have no results/<dataset>/<network>/metrics.json yet: they are "
        'missing from the table above, and `dvc metrics show` warns "DVC failed to load some metrics" '
        "because of them. `dvc repro` produces all of them (and this report); one pair:",
        "",
    ]
    lines += [
        f"- {dataset} × {network}: `dvc repro evaluate@{dataset}-{network}` "
        f"(or `segpipe train {dataset} {network} && segpipe evaluate {dataset} {network}`)"
        for dataset, network in missing
    ]
    return lines


def csv_cells(table: pd.DataFrame) -> pd.DataFrame:
    """`table` with its lists (the `classes` of K > 2 classes) as JSON text, for summary.csv."""
    if "classes" not in table.columns:
        return table
    return table.assign(classes=[json.dumps(v) if isinstance(v, list) else v for v in table["classes"]])


def write_report(
    results_dir: Path,
    models_dir: Path,
    matrix: Iterable[tuple[str, str]],
    *,
    datasets: Iterable[str] | None = None,
    networks: Iterable[str] | None = None,
) -> Path:
    """Collect results_dir/*/*/metrics.json (and the training facts of models_dir/*/*/log.csv) into
    results_dir/summary.csv and results_dir/report.md; the pairs of `matrix` (dataset, network) without
    a metrics.json are listed as not evaluated yet. Returns the path of report.md; SegpipeError when no
    metrics.json matches."""
    keep_ds = None if datasets is None else set(datasets)
    keep_net = None if networks is None else set(networks)
    table = collect(results_dir, models_dir, keep_ds, keep_net)
    missing = [
        (d, n)
        for d, n in matrix
        if (keep_ds is None or d in keep_ds)
        and (keep_net is None or n in keep_net)
        and not (results_dir / d / n / "metrics.json").is_file()
    ]
    with atomic_path(results_dir / "summary.csv") as tmp:
        csv_cells(table).to_csv(tmp, index=False)
    out = results_dir / "report.md"
    text = markdown(table, missing)
    write_text(out, text)
    print(text)
    return out
