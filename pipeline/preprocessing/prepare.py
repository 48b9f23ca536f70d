"""`segpipe prepare DATASET`: read the dataset's card (configs/datasets/DATASET.yaml), unpack and
validate its archives or pair its folders, convert to NIfTI, split, compute weight maps.

Labels become the card's class indices 0..K-1 (its `classes`: name -> label value); pixels at its
`ignore_value` are left out of the field of view. Folder sources (and nnU-Net raw folders, MONAI
datalists: `pipeline.data.importers`) without labelled test cases hold out a seeded `test_fraction`
of the training cases for testing; a datalist's `validation` entries are the val split.

Output, `data/prepared/<dataset>/` (built in a temporary folder `.DATASET.tmp-HOST-PID-*` beside it
and renamed into place; temporary folders of killed prepares of the dataset are removed at the next
start):
  images/CASE.nii.gz     (C, H, W), original dtype (DRIVE: 3 x uint8 RGB; cells: 1 x uint8/uint16)
  labels/CASE.nii.gz     (1, H, W) uint8 class indices ({0, 1} for 2 classes); cells: instances > 0
                         with the pixels where two cells touch set to background, as in the U-Net
                         paper's training masks
  weights/CASE.nii.gz    (1, H, W) float32, U-Net eq. 2 (K-class balance from the train split; cells
                         from the instances, else each foreground class's connected components:
                         `weight_map_cells`)
  fov/CASE.nii.gz        (1, H, W) uint8 (DRIVE field-of-view mask; a folder's masks, minus ignore_value)
  instances/CASE.nii.gz  (1, H, W) uint16 (cells: CTC SEG instance ids; a folder's instances, as given)
  label2/CASE.nii.gz     (1, H, W) uint8 (DRIVE test: second observer)
  manifest.csv           case, split, fold, image, label, weight, fov, instances, label2 (relative
                         paths; fold: the case's cross-validation fold, empty for test cases)
  files.csv              folder sources: path, case, role and sha256 of every file read
  stats.json             split sizes, seed, folds ({"n": folds, "cases": {"0": [...], ...}}), the
                         card's classes and channels, class weights, intensity statistics
  fingerprint.json       the train and val cases' shapes, intensities, class frequencies and object
                         sizes, which the training plan reads (`pipeline.preprocessing.fingerprint`)
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
from scipy import ndimage
from tqdm import tqdm

from pipeline.data.archives import UnpackLimits, unpack
from pipeline.data.cards import DatasetCard, split_fraction
from pipeline.data.download import read_record
from pipeline.data.folders import file_rows, load_cases, map_labels, pair_cases
from pipeline.data.importers import list_cases
from pipeline.data.io import checked_image, read_raster, write_text, write_volume
from pipeline.data.manifest import FoundFile, find_files, validate
from pipeline.data.settings import DataConfig, PrepareConfig
from pipeline.data.sources import DatasetSource, Layout, get_source
from pipeline.errors import SegpipeError
from pipeline.preprocessing.fingerprint import FINGERPRINT_NAME, dataset_fingerprint, write_fingerprint
from pipeline.preprocessing.splits import assign_folds, assign_splits, fold_record, hold_out_test
from pipeline.tracking import TrackingSettings, stage_run
from pipeline.tracking_datasets import DataInput, log_datasets
from pipeline.tracking_store import pid_alive

log = logging.getLogger(__name__)

FILES_NAME = "files.csv"
MANIFEST_COLUMNS = ["case", "split", "fold", "image", "label", "weight", "fov", "instances", "label2"]
ROLE_DIRS = {
    "image": "images",
    "label": "labels",
    "weight": "weights",
    "fov": "fov",
    "instances": "instances",
    "label2": "label2",
}


def to_channel_first(array: np.ndarray) -> np.ndarray:
    """(H, W) -> (1, H, W); (H, W, C) -> (C, H, W)."""
    return array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)


def to_binary(array: np.ndarray) -> np.ndarray:
    """A 0/255 mask (grey or RGB, as DRIVE's GIFs are) to (H, W) uint8 {0, 1}."""
    grey = array.mean(axis=-1) if array.ndim == 3 else array
    return (grey >= 128).astype(np.uint8)


def separate_touching(instances: np.ndarray) -> np.ndarray:
    """Binary foreground of an instance image with every pixel that touches another cell set to 0.

    A pixel of cell i is a border pixel when its 3x3 neighbourhood holds a cell j != i (not
    background): this opens the one-pixel gaps the U-Net paper's weight map then emphasises.
    """
    inst = instances.astype(np.int64)
    top = ndimage.maximum_filter(inst, size=3)
    bottom = ndimage.minimum_filter(np.where(inst > 0, inst, inst.max() + 1), size=3)
    touching = (inst > 0) & ((top != inst) | (bottom != inst))
    return ((inst > 0) & ~touching).astype(np.uint8)


def weight_map_cells(label: np.ndarray, instances: np.ndarray | None) -> np.ndarray:
    """The cells of eq. 2's border term for a class-index label (H, W): the instance ids on the label's
    foreground (pixels the label makes background belong to no cell, so the gaps between touching
    cells get the term), and the connected components of each foreground class on its pixels
    without an instance id, numbered on; without instances, the components alone."""
    from pipeline.transforms.weightmap import instances_from_labels

    if instances is None:
        return instances_from_labels(label)
    cells = instances.astype(np.int64) * (label > 0)
    rest = instances_from_labels(np.where(cells > 0, 0, label))
    return np.where(rest > 0, rest + cells.max(), cells)


def _cases(files: list[FoundFile], layout: Layout, silver: bool = False) -> pd.DataFrame:
    """One row per case that has every required role (e.g. CTC frames with SEG ground truth). With
    `silver`, a training part's frame without `instances` takes its `silver` file (CTC silver truth) as
    its instances; column `truth` says which ("gold" or "silver")."""
    table = pd.DataFrame([{"part": f.split, "id": f.case, "role": f.role, "file": f.location} for f in files])
    wide = table.pivot_table(index=["part", "id"], columns="role", values="file", aggfunc="first").reset_index()
    wide["truth"] = "gold"
    if silver and "silver" in wide.columns:
        fill = wide["part"].isin(layout.train_parts) & wide["silver"].notna()
        fill &= wide["instances"].isna() if "instances" in wide.columns else True
        wide.loc[fill, "instances"] = wide.loc[fill, "silver"]
        wide.loc[fill, "truth"] = "silver"
    for role in layout.require_roles:
        if role not in wide.columns:
            raise SegpipeError(f"no {role} files found; expected {layout.require_roles} for every case")
    complete = wide.dropna(subset=list(layout.require_roles)).copy()
    complete["case"] = complete["part"] + "_" + complete["id"]
    return complete.sort_values("case").reset_index(drop=True)


def prepare_dataset(card: DatasetCard, cfg: DataConfig, tracking: TrackingSettings | None = None) -> Path:
    """Run the prepare stage for the dataset of `card` with configs/data.yaml (`cfg`, checked) and MLflow
    `tracking`; returns `data/prepared/<dataset>`."""
    dataset, prep_cfg = card.name, cfg.prepare
    final = Path(cfg.prepared_dir) / dataset
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_work_dirs(final)
    manifest, read = _reader(cfg, card, dataset)
    with stage_run(
        "prepare", dataset, params={"prepare": asdict(prep_cfg)}, manifest=manifest, tracking=tracking
    ) as tracker:
        stats = _prepare_into(final, read, card, prep_cfg)
        if tracker is not None:
            # what it wrote, split by split: the same datasets (name and digest) train and evaluate read
            log_datasets(
                tracker,
                [DataInput(final / "manifest.csv", dataset, split, "output") for split in ("train", "val", "test")],
            )
            tracker.log_metrics({f"cases_{split}": n for split, n in stats["splits"].items()})
            tracker.log_metrics({"foreground_fraction_train": stats["foreground_fraction_train"]})
            tracker.log_dict(stats, "stats.json")
            tracker.log_artifact(str(final / FINGERPRINT_NAME))
    print(f"{dataset}: prepared {sum(stats['splits'].values())} cases {stats['splits']} in {final}")
    return final


def _reader(cfg: DataConfig, card: DatasetCard, dataset: str) -> tuple[Path, Callable[[Path], "_Cases"]]:
    """The file MLflow tags as the data manifest, and the function reading the cases (given a
    temporary folder to unpack into)."""
    prep_cfg = cfg.prepare
    if card.archives is None:  # folders, an nnU-Net raw folder or a datalist, read in place
        max_values, seed = int(prep_cfg.limits["max_image_values"]), prep_cfg.seed
        return card.path, lambda work: _folder_cases(card, max_values, seed)
    source = get_source(Path(cfg.manifests_dir), card.archives or dataset)
    raw_dir = Path(cfg.raw_dir) / dataset
    records = read_record(raw_dir)
    archives = [raw_dir / r["name"] for r in records]
    for archive in archives:
        if not archive.is_file():
            raise SegpipeError(
                f"{archive}: listed in {raw_dir / 'download.json'} but missing; run segpipe download {dataset}"
            )
    manifest = source.files_manifest or Path(cfg.manifests_dir) / "sources.yaml"
    return manifest, lambda work: _archive_cases(work, archives, source, card, prep_cfg.limits, records)


@dataclass
class _Cases:
    """What a source gives prepare: the cases (case, part), their volumes, which parts train, which
    test (and which validate, if the source says), facts for stats.json and, for sources read in
    place, the per-file manifest rows."""

    table: pd.DataFrame
    loaded: dict[str, dict[str, np.ndarray]]
    train_parts: tuple[str, ...]
    test_parts: tuple[str, ...]
    facts: dict[str, Any]
    files: list[dict[str, str]] | None = None
    val_parts: tuple[str, ...] = ()


def _prepare_into(
    final: Path, read: Callable[[Path], _Cases], card: DatasetCard, prep_cfg: PrepareConfig
) -> dict[str, Any]:
    """Read the cases (`read`, given a temporary folder), split them, write the prepared folder and
    swap it into `final`; returns the statistics written."""
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}-", dir=final.parent))
    try:
        got = read(work)
        cases = got.table
        seed, val_fraction = prep_cfg.seed, prep_cfg.val_fraction
        silver = cases["truth"].eq("silver") if "truth" in cases else pd.Series(False, index=cases.index)
        cases["split"] = assign_splits(cases, got.train_parts, got.test_parts, seed, val_fraction, got.val_parts)
        folds = prep_cfg.folds
        cases["fold"] = assign_folds(cases["case"], cases["split"], seed, folds)
        out = work / "out"
        stats = _write(cases, got.loaded, out, prep_cfg.weight_map, card)
        stats.update(
            dataset=card.name,
            seed=seed,
            val_fraction=val_fraction,
            folds=fold_record(cases, folds),
            silver_cases=sorted(cases.loc[silver, "case"]),
            **card.facts,
            **got.facts,
        )
        if got.files is not None:
            write_text(out / FILES_NAME, pd.DataFrame(got.files).to_csv(index=False))
        write_text(out / "stats.json", json.dumps(stats, indent=2) + "\n")
        write_fingerprint(
            out, dataset_fingerprint(got.loaded, dict(zip(cases["case"], cases["split"])), card.facts, seed)
        )
        _swap_into_place(out, final, work / "previous")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return stats


def _archive_cases(
    work: Path,
    archives: list[Path],
    source: DatasetSource,
    card: DatasetCard,
    limits: dict[str, Any],
    records: list[dict[str, Any]],
) -> _Cases:
    """Unpack and validate the archives (layout or per-file manifest), then read every case."""
    max_values = int(limits["max_image_values"])
    root = unpack(archives, work / "unpacked", source.layout, card.name, UnpackLimits.from_config(limits))
    files = find_files(root, source.layout, card.name)
    validate(files, source, max_values)
    cases = _cases(files, source.layout, card.silver_truth)
    return _Cases(
        cases,
        _read_archive_cases(cases, card, max_values),
        source.layout.train_parts,
        source.layout.test_parts,
        {"archives": [r["sha256"] for r in records]},
    )


def _folder_cases(card: DatasetCard, max_values: int, seed: int) -> _Cases:
    """Pair the card's folders by stem (or list its nnU-Net / datalist cases), read and check every
    case, hold out test cases from the training ones if the source has none."""
    if card.folders is not None:
        found = pair_cases(card.folders)
    else:
        assert card.imported is not None  # a card without archives has folders or an imported source
        found = list_cases(card.imported)
    loaded = load_cases(found, card, max_values)
    cases = pd.DataFrame({"case": [c.case for c in found], "part": [c.part for c in found]})
    test_fraction = split_fraction(card, has_test=bool((cases["part"] == "test").any()))
    if test_fraction is not None:
        train = cases["part"] == "train"
        cases.loc[train, "part"] = hold_out_test(cases.loc[train, "part"], seed, test_fraction, card.path)
    return _Cases(
        cases, loaded, ("train",), ("test",), {"test_fraction": card.test_fraction}, file_rows(found), ("val",)
    )


def _remove_stale_work_dirs(final: Path) -> None:
    """Remove the temporary folders `.NAME.tmp-HOST-PID-*` beside `final` that a prepare of the same
    dataset on this host left behind when it was killed (its process is gone). Folders
    of live processes (another prepare of this dataset) and of other hosts are left alone."""
    pattern = re.compile(rf"\.{re.escape(final.name)}\.tmp-(?P<host>.+)-(?P<pid>\d+)-[a-z0-9_]+")
    host = socket.gethostname()
    for path in sorted(final.parent.glob(f".{final.name}.tmp-*")):
        found = pattern.fullmatch(path.name)
        if found and found["host"] == host and not pid_alive(int(found["pid"])):
            log.warning("removing %s: left behind by a killed prepare (process %s is gone)", path, found["pid"])
            shutil.rmtree(path, ignore_errors=True)


def _swap_into_place(new: Path, final: Path, trash: Path) -> None:
    """Replace `final` by `new` with renames only: the old version goes to `trash` (in the temporary
    folder, removed with it)."""
    if final.exists():
        os.replace(final, trash)
    os.replace(new, final)


def _read_archive_cases(cases: pd.DataFrame, card: DatasetCard, max_values: int) -> dict[str, dict[str, np.ndarray]]:
    """Every case's volumes, labels as class indices of the card. Images whose header declares more
    than `max_values` (H x W x C) are refused before decoding."""
    loaded: dict[str, dict[str, np.ndarray]] = {}
    for row in tqdm(cases.itertuples(index=False), total=len(cases), desc=f"convert {card.name}", unit="case"):
        image = checked_image(read_raster(row.image, max_values), row.image)
        vols: dict[str, np.ndarray] = {"image": to_channel_first(image)}
        if vols["image"].shape[0] != len(card.channels):
            raise SegpipeError(
                f"{row.image}: {vols['image'].shape[0]} channel(s); {card.path} declares "
                f"{len(card.channels)} ({', '.join(card.channels)})"
            )
        if "instances" in cases.columns and isinstance(row.instances, Path):
            inst = read_raster(row.instances, max_values).astype(np.uint16)
            vols["instances"] = inst[None]
            label, label_path = separate_touching(inst), row.instances
        else:
            label, label_path = to_binary(read_raster(row.label, max_values)), row.label
        for role in ("fov", "label2"):
            value = getattr(row, role, None)
            if isinstance(value, Path):
                vols[role] = to_binary(read_raster(value, max_values))[None]
        index, valid = map_labels(label, card, label_path)
        vols["label"] = index[None]
        if valid is not None:
            vols["fov"] = (valid & (vols["fov"][0] > 0) if "fov" in vols else valid).astype(np.uint8)[None]
        _check_same_size(vols, row.case)
        loaded[row.case] = vols
    return loaded


def _write(
    cases: pd.DataFrame, loaded: dict[str, dict[str, np.ndarray]], out: Path, wm_cfg: dict[str, Any], card: DatasetCard
) -> dict[str, Any]:
    """Compute the weight maps, write every case's volumes and the manifest; return statistics for
    stats.json."""
    from pipeline.transforms.weightmap import compute_class_weights, unet_weight_map

    for sub in ROLE_DIRS.values():
        (out / sub).mkdir(parents=True, exist_ok=True)
    train_cases = cases.loc[cases["split"] == "train", "case"]
    class_weights = compute_class_weights([loaded[c]["label"][0] for c in train_cases], num_classes=len(card.classes))
    w0, sigma = float(wm_cfg["w0"]), float(wm_cfg["sigma"])
    rows = []
    for case, split, fold in tqdm(
        zip(cases["case"], cases["split"], cases["fold"]), total=len(cases), desc="weight maps", unit="case"
    ):
        vols = loaded[case]
        label = vols["label"][0]
        inst = weight_map_cells(label, vols["instances"][0] if "instances" in vols else None)
        vols["weight"] = unet_weight_map(inst, w0=w0, sigma=sigma, class_weights=class_weights, labels=label)[None]
        entry = {"case": case, "split": split, "fold": fold}
        for role, sub in ROLE_DIRS.items():
            if role in vols:
                rel = f"{sub}/{case}.nii.gz"
                write_volume(out / rel, vols[role])
                entry[role] = rel
        rows.append(entry)
    write_text(out / "manifest.csv", pd.DataFrame(rows, columns=MANIFEST_COLUMNS).to_csv(index=False))
    return _statistics(cases, loaded, class_weights, w0, sigma)


def _check_same_size(vols: dict[str, np.ndarray], case: str) -> None:
    sizes = {role: v.shape[1:] for role, v in vols.items()}
    if len(set(sizes.values())) != 1:
        raise SegpipeError(f"case {case}: image, label and masks differ in size {sizes}; expected one H x W")


def _statistics(
    cases: pd.DataFrame, loaded: dict[str, dict[str, np.ndarray]], class_weights: np.ndarray, w0: float, sigma: float
) -> dict[str, Any]:
    train = [loaded[c] for c in cases.loc[cases["split"] == "train", "case"]]
    pixels = np.concatenate([v["image"].reshape(v["image"].shape[0], -1) for v in train], axis=1).astype(np.float64)
    foreground = float(np.mean([(v["label"] > 0).mean() for v in train]))
    return {
        "splits": {k: int(v) for k, v in cases["split"].value_counts().items()},
        "cases": {s: sorted(cases.loc[cases["split"] == s, "case"]) for s in ("train", "val", "test")},
        "foreground_fraction_train": foreground,
        "class_weights": [float(w) for w in class_weights],
        "weight_map": {"w0": w0, "sigma": sigma},
        "intensity_train": {"mean": pixels.mean(axis=1).tolist(), "std": pixels.std(axis=1).tolist()},
    }
