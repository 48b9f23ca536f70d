"""Prepared cases for training and evaluation: `data/prepared/<dataset>/manifest.csv` + NIfTI.

A case is a dict of channel-first numpy arrays: "image" (C, H, W) as stored, "label" (1, H, W)
uint8 class indices 0..K-1 of the card's K classes, "weight" (1, H, W) float32 (U-Net eq. 2), and when
the dataset has them "fov" (DRIVE's field of view, a folder's masks, the pixels not at the card's
ignore_value), "instances" (cell ids, CTC) and "label2" (DRIVE's second observer).
The intensity normalisation of training lives with the transforms (`pipeline.transforms.presets.preprocess`).

Cross-validation: `with_fold(k)` makes fold k (manifest.csv's `fold` column, written by `segpipe
prepare`) the val split and the other folds the train split; test cases stay test.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.data.io import read_volume
from pipeline.data.settings import DataConfig
from pipeline.errors import SegpipeError
from pipeline.postprocessing.instances import BORDER_CLASSES, border_target

BINARY_CLASSES = ("background", "foreground")
ROLES = ("image", "label", "weight", "fov", "instances", "label2")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class PreparedDataset:
    """One prepared dataset: its folder, manifest rows and stats.json."""

    name: str
    root: Path
    manifest: pd.DataFrame
    stats: dict[str, Any]
    target: str = "labels"  # "border": labels are `border_target` of the instances (`with_target`)

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.csv"

    def rows(self, split: str) -> pd.DataFrame:
        """Manifest rows of `split` (train, val or test), in case order."""
        if split not in SPLITS:
            raise SegpipeError(f"split must be one of {SPLITS}, got {split!r}")
        return self.manifest[self.manifest["split"] == split].sort_values("case").reset_index(drop=True)

    def cases(self, split: str) -> list[str]:
        return list(self.rows(split)["case"])

    def with_fold(self, fold: int | None) -> PreparedDataset:
        """A copy whose val split is fold `fold` and whose train split is the other folds (None: self).
        SegpipeError when the dataset was prepared without folds, `fold` is out of range, or fold
        `fold` is empty or holds every non-test case."""
        if fold is None:
            return self
        n = (self.stats.get("folds") or {}).get("n")
        if "fold" not in self.manifest.columns or not isinstance(n, int):
            raise SegpipeError(
                f"{self.manifest_path}: no cross-validation folds (prepared before folds existed); "
                f"run `segpipe prepare {self.name}` again"
            )
        if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < n:
            raise SegpipeError(
                f"{self.root / 'stats.json'}: {n} folds (configs/data.yaml prepare.folds); "
                f"the fold (configs/train.yaml fold, --fold) must be 0..{n - 1}, got {fold!r}"
            )
        pool = self.manifest["split"] != "test"
        held = pool & (self.manifest["fold"] == str(fold))
        if not held.any() or held.sum() == pool.sum():
            raise SegpipeError(
                f"{self.manifest_path}: fold {fold} holds {int(held.sum())} of the {int(pool.sum())} "
                "train and val cases; cross-validation needs cases in the fold and outside it "
                "(fewer prepare.folds in configs/data.yaml, or more cases)"
            )
        manifest = self.manifest.copy()
        manifest.loc[pool, "split"] = np.where(held[pool], "val", "train")
        return replace(self, manifest=manifest)

    def with_target(self, target: str) -> PreparedDataset:
        """A copy whose labels are the dataset's classes ("labels": self) or the border-aware three
        classes of its reference instances ("border", `pipeline.postprocessing.instances.border_target`;
        class names BORDER_CLASSES). SegpipeError when the dataset has no instances."""
        if target == "labels":
            return self
        if target != "border":
            raise SegpipeError(f"target must be 'labels' or 'border', got {target!r}")
        missing = [c for c in self.cases("train") + self.cases("val") if not _has(self.manifest, c, "instances")]
        if missing:
            raise SegpipeError(
                f"{self.manifest_path}: target 'border' needs reference instances (the cell sets, a "
                f"folder with instances); cases {missing[:5]} have none"
            )
        stats = {k: v for k, v in self.stats.items() if k != "class_weights"}  # eq. 2's w_c are of the 2 classes
        return replace(self, target=target, stats=stats)

    def load(self, case: str) -> dict[str, np.ndarray]:
        """Every stored role of `case` as channel-first arrays."""
        match = self.manifest[self.manifest["case"] == case]
        if match.empty:
            raise SegpipeError(f"{self.manifest_path}: no case {case!r}")
        row = match.iloc[0]
        out: dict[str, np.ndarray] = {}
        for role in ROLES:
            rel = row.get(role)
            if isinstance(rel, str) and rel:
                out[role] = read_volume(self.root / rel)
        for role in ("image", "label", "weight"):
            if role not in out:
                raise SegpipeError(f"{self.manifest_path}: case {case!r} has no {role}")
        if self.target == "border" and "instances" in out:
            out["label"] = border_target(out["instances"][0])[None]
        if out["image"].ndim != 3 or out["label"].shape[1:] != out["image"].shape[1:]:
            raise SegpipeError(
                f"{self.root}: case {case!r}: expected image (C, H, W) and label (1, H, W) of one size, "
                f"got {out['image'].shape} and {out['label'].shape}"
            )
        return out

    def load_split(self, split: str) -> list[dict[str, Any]]:
        """Every case of `split` as {"case": name, role: array, ...}."""
        return [{"case": case, **self.load(case)} for case in self.cases(split)]

    @property
    def class_names(self) -> list[str]:
        """The card's class names, in class-index order (stats.json; binary before cards)."""
        return list(BORDER_CLASSES if self.target == "border" else self.stats.get("classes", BINARY_CLASSES))

    @property
    def in_channels(self) -> int:
        first = self.manifest.iloc[0]
        return int(read_volume(self.root / first["image"]).shape[0])


def prepared_root(data_config: DataConfig, dataset: str) -> Path:
    """data/prepared/<dataset> from configs/data.yaml (`data_config`: its `prepared_dir`)."""
    return Path(data_config.prepared_dir) / dataset


def open_prepared(dataset: str, root: Path) -> PreparedDataset:
    """The prepared dataset in `root`; SegpipeError naming the file and the command when it is missing."""
    root = Path(root)
    manifest_path, stats_path = root / "manifest.csv", root / "stats.json"
    for path in (manifest_path, stats_path):
        if not path.is_file():
            raise SegpipeError(f"{path}: not found; run `segpipe prepare {dataset}` first")
    manifest = pd.read_csv(manifest_path, dtype=str, keep_default_na=False)
    missing = {"case", "split", "image", "label", "weight"} - set(manifest.columns)
    if missing:
        raise SegpipeError(f"{manifest_path}: missing column(s) {sorted(missing)}")
    try:
        stats = json.loads(stats_path.read_text())
    except json.JSONDecodeError as exc:
        raise SegpipeError(f"{stats_path}: not valid JSON: {exc}") from exc
    dataset_obj = PreparedDataset(dataset, root, manifest, stats)
    if not dataset_obj.cases("train"):
        raise SegpipeError(f"{manifest_path}: no training cases")
    return dataset_obj


def _has(manifest: pd.DataFrame, case: str, role: str) -> bool:
    """Whether `case`'s manifest row names a file for `role`."""
    value = manifest.loc[manifest["case"] == case, role].iloc[0] if role in manifest else None
    return isinstance(value, str) and bool(value)
