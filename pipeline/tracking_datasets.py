"""A stage's data as MLflow dataset inputs: the rows of a prepared manifest.csv a stage reads (or
writes), digested with the dataset's stats.json, so runs on the same data show the same dataset."""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable


@dataclass(frozen=True)
class DataInput:
    """The rows of a prepared dataset's manifest.csv a stage reads (or writes): one `split`, or all
    rows (None). `context` is MLflow's dataset context: training, validation, testing, output.
    `fold` k: cross-validation's split, val = the train and val cases of fold k, train = the others."""

    manifest: Path
    dataset: str
    split: str | None
    context: str
    fold: int | None = None

    @property
    def name(self) -> str:
        name = f"{self.dataset}-{self.split}" if self.split else self.dataset
        return name if self.fold is None else f"{name}-fold{self.fold}"


def _split_rows(manifest: Path, split: str | None, fold: int | None = None) -> Any:
    """The manifest rows of `split` (all rows: None) as a DataFrame of strings; with `fold`, the train
    and val rows re-split as `PreparedDataset.with_fold` does (val: fold `fold`, train: the others)."""
    import pandas as pd

    table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    if split is None:
        return table
    if fold is not None and split in ("train", "val"):
        in_fold = table["fold"] == str(fold)
        keep = (table["split"] != "test") & (in_fold if split == "val" else ~in_fold)
        return table[keep].reset_index(drop=True)
    return table[table["split"] == split].reset_index(drop=True)


def data_digest(manifest: Path, split: str | None, rows: Any = None) -> str:
    """16 hex digits of sha256 over the manifest rows of `split` (all rows: None) and the sibling
    stats.json (seed, class weights, intensity statistics, archive hashes)."""
    rows = _split_rows(manifest, split) if rows is None else rows
    stats = Path(manifest).with_name("stats.json")
    payload = rows.to_csv(index=False).encode() + (stats.read_bytes() if stats.is_file() else b"")
    return hashlib.sha256(payload).hexdigest()[:16]


def log_datasets(tracker: Any, inputs: Iterable[DataInput]) -> None:
    """Log each input as an MLflow dataset (the split's manifest rows; source: the manifest path as
    configured, relative to the repo root under DVC, so the same on every clone; input tags
    `mlflow.data.context`, `split` and `dataset`). Splits without rows are left out. MLflow keeps one
    dataset per (experiment, name, digest): the source is the one of its first logging."""
    from mlflow.data.pandas_dataset import from_pandas

    for item in inputs:
        rows = _split_rows(item.manifest, item.split, item.fold)
        if rows.empty:
            continue
        with warnings.catch_warnings():  # MLflow registers its local source for "" and "file:" alike
            warnings.filterwarnings("ignore", "The specified dataset source can be interpreted in multiple ways")
            dataset = from_pandas(
                rows,
                source=Path(item.manifest).as_posix(),
                name=item.name,
                digest=data_digest(item.manifest, item.split, rows),
            )
        tracker.log_input(dataset, context=item.context, tags={"split": item.split or "all", "dataset": item.dataset})
