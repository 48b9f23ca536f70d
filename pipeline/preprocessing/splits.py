"""The prepared dataset's splits: train / val / test by the source's parts (seeded), a seeded test
hold-out for sources without test cases, and the cross-validation folds of the train and val cases."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.errors import SegpipeError


def assign_splits(
    cases: pd.DataFrame,
    train_parts: tuple[str, ...],
    test_parts: tuple[str, ...],
    seed: int,
    val_fraction: float,
    val_parts: tuple[str, ...] = (),
) -> pd.Series:
    """Test parts -> test, val parts -> val; the training parts shuffled with `seed`, `val_fraction`
    -> val (none when the source has val cases of its own)."""
    split = pd.Series("test", index=cases.index)
    train_idx = cases.index[cases["part"].isin(train_parts)].to_numpy()
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(np.sort(train_idx))
    own_val = cases["part"].isin(val_parts)
    n_val = 0
    if not own_val.any():
        n_val = int(round(val_fraction * len(shuffled)))
        n_val = min(max(n_val, 1 if len(shuffled) >= 2 and val_fraction > 0 else 0), max(len(shuffled) - 1, 0))
    split[shuffled] = "train"
    split[shuffled[:n_val]] = "val"
    split[own_val] = "val"
    unknown = ~cases["part"].isin(train_parts + test_parts + val_parts)
    if unknown.any():
        parts = sorted(cases.loc[unknown, "part"].unique())
        raise SegpipeError(f"parts {parts} are neither train nor test parts in sources.yaml")
    return split


def hold_out_test(parts: pd.Series, seed: int, test_fraction: float, where: Path) -> pd.Series:
    """`parts` with a seeded `test_fraction` of the cases (at least one, never all) moved to "test"."""
    n = len(parts)
    n_test = max(1, int(round(test_fraction * n)))
    if n_test >= n:
        raise SegpipeError(
            f"{where}: test_fraction {test_fraction} of {n} case(s) leaves no training case; add cases or test folders"
        )
    chosen = np.random.default_rng(seed).permutation(n)[:n_test]
    out = parts.copy()
    out.iloc[chosen] = "test"
    return out


def assign_folds(cases: pd.Series, split: pd.Series, seed: int, folds: int) -> pd.Series:
    """The cross-validation fold ("0".."folds-1") of every train and val case, "" for test cases: the
    non-test cases, by name, permuted with `seed`; the i-th of the permutation -> fold i % folds, so
    fold sizes differ by at most one."""
    pool = np.sort(cases[split != "test"].to_numpy())
    order = np.random.default_rng(seed).permutation(pool)
    fold_of = {case: str(i % folds) for i, case in enumerate(order)}
    return cases.map(lambda case: fold_of.get(case, ""))


def fold_record(cases: pd.DataFrame, folds: int) -> dict[str, Any]:
    """stats.json's `folds`: {"n": folds, "cases": {"0": [sorted cases of fold 0], ...}}."""
    return {"n": folds, "cases": {str(k): sorted(cases.loc[cases["fold"] == str(k), "case"]) for k in range(folds)}}
