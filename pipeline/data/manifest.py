"""Checking the unpacked files against a dataset's layout or per-file manifest (`segpipe manifest`).

The per-file manifest (`data_manifests/<dataset>_files.csv`) is the contract: one row per file with
its path relative to the dataset root, dataset, split (the dataset's own part: DRIVE `training`/`test`,
CTC sequence `01`/`02`), role (image / label / label2 / fov / instances), case, sha256, shape and dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline.data.archives import UnpackLimits, unpack
from pipeline.data.io import read_raster, sha256_file, write_text
from pipeline.data.settings import DataConfig
from pipeline.data.sources import DatasetSource, Layout, get_source
from pipeline.errors import SegpipeError, raise_problems

MANIFEST_COLUMNS = ["path", "dataset", "split", "role", "case", "sha256", "shape", "dtype"]


@dataclass(frozen=True)
class FoundFile:
    """A file of the unpacked dataset recognised by a layout pattern."""

    path: str  # relative to the dataset root, e.g. training/images/21_training.tif
    location: Path  # where it is on disk
    split: str
    case: str
    role: str


def find_files(root: Path, layout: Layout, dataset: str) -> list[FoundFile]:
    """Recognise every file under `root`; unknown (extra) or duplicate files are errors."""
    found: dict[tuple[str, str, str], FoundFile] = {}
    problems: list[str] = []
    for location in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = location.relative_to(root).as_posix()
        if layout.ignores(rel):
            continue
        match = layout.match(rel)
        if match is None:
            problems.append(f"{rel}: unexpected file (matches no {dataset} layout pattern)")
            continue
        m, pattern = match
        item = FoundFile(m.group(0).lstrip("/"), location, m.group("split"), m.group("case"), pattern.role)
        key = (item.split, item.case, item.role)
        if key in found:
            problems.append(
                f"{rel}: duplicate of {found[key].location.relative_to(root)} ({item.role} of case {item.case})"
            )
            continue
        found[key] = item
    raise_problems(problems, f"{dataset}: the archives do not have the expected layout")
    return sorted(found.values(), key=lambda f: (f.split, f.case, f.role))


def describe(item: FoundFile, max_values: int) -> dict[str, str]:
    """The manifest row of a found file: hashes and reads it (header first: at most `max_values`)."""
    array = read_raster(item.location, max_values)
    return {
        "path": item.path,
        "split": item.split,
        "role": item.role,
        "case": item.case,
        "sha256": sha256_file(item.location),
        "shape": shape_of(array),
        "dtype": str(array.dtype),
    }


def validate(files: list[FoundFile], source: DatasetSource, max_values: int) -> None:
    """Check the found files against the per-file manifest if the dataset has one, else the layout.
    An image whose header declares more than `max_values` (H x W x C) is refused before decoding."""
    if source.files_manifest is not None:
        _validate_manifest(files, source.files_manifest, source.name, max_values)
    else:
        _validate_layout(files, source.layout, source.name, max_values)


def _validate_manifest(files: list[FoundFile], manifest_path: Path, dataset: str, max_values: int) -> None:
    expected = read_file_manifest(manifest_path)
    rows = {row.path: row for row in expected.itertuples(index=False)}
    problems = [f"{f.path}: extra file, not listed in {manifest_path.name}" for f in files if f.path not in rows]
    present = {f.path for f in files}
    problems += [f"{p}: missing (listed in {manifest_path.name} as {rows[p].role})" for p in rows if p not in present]
    for item in tqdm([f for f in files if f.path in rows], desc=f"validate {dataset}", unit="file", leave=False):
        want, got = rows[item.path], describe(item, max_values)
        for key in ("shape", "dtype", "sha256"):
            if got[key] != str(getattr(want, key)):
                problems.append(
                    f"{item.location}: {key} {got[key]}, expected {getattr(want, key)} ({manifest_path.name})"
                )
                break
    raise_problems(problems, f"{dataset}: files do not match {manifest_path}")


def _validate_layout(files: list[FoundFile], layout: Layout, dataset: str, max_values: int) -> None:
    counts: dict[str, int] = {}
    for f in files:
        counts[f"{f.split}/{f.role}"] = counts.get(f"{f.split}/{f.role}", 0) + 1
    problems = [
        f"{key}: {counts.get(key, 0)} files, expected exactly {n}"
        for key, n in layout.counts.items()
        if counts.get(key, 0) != n
    ]
    problems += [
        f"{key}: {counts.get(key, 0)} files, expected at least {n}"
        for key, n in layout.min_counts.items()
        if counts.get(key, 0) < n
    ]
    for item in tqdm(files, desc=f"validate {dataset}", unit="file", leave=False):
        expect = layout.expect.get(item.role)
        if not expect:
            continue
        array = read_raster(item.location, max_values)
        shape, dtypes = tuple(expect.get("shape") or ()), list(expect.get("dtype") or [])
        if shape and array.shape != shape:
            problems.append(f"{item.location}: shape {array.shape}, expected {shape} for a {dataset} {item.role}")
        elif dtypes and str(array.dtype) not in dtypes:
            problems.append(
                f"{item.location}: dtype {array.dtype}, expected one of {dtypes} for a {dataset} {item.role}"
            )
    raise_problems(problems, f"{dataset}: files do not match the layout in sources.yaml")


def read_file_manifest(path: Path) -> pd.DataFrame:
    """Load a per-file manifest CSV, checking its columns."""
    if not Path(path).is_file():
        raise SegpipeError(f"{path}: per-file manifest not found")
    table = pd.read_csv(path, dtype=str)
    missing = [c for c in MANIFEST_COLUMNS if c not in table.columns]
    if missing:
        raise SegpipeError(f"{path}: missing columns {missing}; expected {MANIFEST_COLUMNS}")
    return table


def write_file_manifest(dataset: str, source_path: str | Path, cfg: DataConfig, output: str | None = None) -> Path:
    """`segpipe manifest`: hash and describe every file of a verified copy (folder or archive) into a
    CSV; `cfg`: configs/data.yaml, checked."""
    import tempfile

    limits = cfg.prepare.limits
    manifests_dir = Path(cfg.manifests_dir)
    source = get_source(manifests_dir, dataset)
    src = Path(source_path)
    out = Path(output) if output else manifests_dir / f"{dataset}_files.csv"
    with tempfile.TemporaryDirectory() as tmp:
        if src.is_file():
            root = unpack([src], Path(tmp), source.layout, dataset, UnpackLimits.from_config(limits))
        elif src.is_dir():
            root = src
        else:
            raise SegpipeError(f"{src}: expected a folder or an archive (.zip, .tar...) holding the {dataset} dataset")
        files = find_files(root, source.layout, dataset)
        max_values = int(limits["max_image_values"])
        _validate_layout(files, source.layout, dataset, max_values)
        rows = [{"dataset": dataset, **describe(f, max_values)} for f in tqdm(files, desc="hash", unit="file")]
    table = pd.DataFrame(rows, columns=MANIFEST_COLUMNS).sort_values("path")
    write_text(out, table.to_csv(index=False))
    print(f"{dataset}: wrote {len(table)} rows to {out}")
    return out


def shape_of(array: np.ndarray) -> str:
    """Shape in the manifest's notation, e.g. 584x565x3."""
    return "x".join(str(s) for s in array.shape)
