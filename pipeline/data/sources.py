"""The dataset sources file (`data_manifests/sources.yaml`): archives, layout and expectations."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import SegpipeError


@dataclass(frozen=True)
class Archive:
    """One downloadable archive of a dataset."""

    name: str
    url: str
    sha256: str
    size: int | None = None


@dataclass(frozen=True)
class FilePattern:
    """A regex over archive paths; named groups `split` and `case` identify the file's case."""

    regex: re.Pattern[str]
    role: str
    folder: re.Pattern[str]  # the regex's folder part: a file there that breaks the pattern is refused


@dataclass(frozen=True)
class Layout:
    """What a dataset's unpacked archives must contain."""

    patterns: tuple[FilePattern, ...]
    ignore: tuple[re.Pattern[str], ...]
    counts: dict[str, int]
    min_counts: dict[str, int]
    expect: dict[str, dict[str, Any]]
    train_parts: tuple[str, ...]
    test_parts: tuple[str, ...]
    require_roles: tuple[str, ...]
    skip_extra_folders: bool = False  # `extra_folders: skip`: folders of no role are left aside, not refused

    def ignores(self, path: str) -> bool:
        """Whether `path` (a file path inside the unpacked archives) is one the layout leaves aside."""
        return any(rx.search(path) for rx in self.ignore)

    def match(self, path: str) -> tuple[re.Match[str], FilePattern] | None:
        """The first pattern matching `path`, with its match; None for a file of no known role."""
        return next(((m, p) for p in self.patterns if (m := p.regex.search(path))), None)

    def role_folder(self, folder: str) -> bool:
        """Whether `folder` is where a pattern's files live (their path without the file name)."""
        return any(p.folder.search(folder) for p in self.patterns)


@dataclass(frozen=True)
class DatasetSource:
    """A dataset's entry in the sources file."""

    name: str
    title: str
    licence: str
    archives: tuple[Archive, ...]
    layout: Layout
    files_manifest: Path | None


def _pattern(regex: str, role: str) -> FilePattern:
    folder = regex.rpartition("/")[0]
    return FilePattern(re.compile(r"(?:^|/)" + regex + r"$"), role, re.compile(r"(?:^|/)" + folder + r"$"))


def _extra_folders(value: Any, where: str) -> bool:
    if value not in ("skip", "refuse"):
        raise SegpipeError(f"{where}: layout.extra_folders is {value!r}; expected 'skip' or 'refuse'")
    return value == "skip"


def _layout(raw: dict[str, Any], where: str) -> Layout:
    try:
        return Layout(
            patterns=tuple(_pattern(p["regex"], p["role"]) for p in raw["patterns"]),
            ignore=tuple(re.compile(p) for p in raw.get("ignore", [])),
            counts={str(k): int(v) for k, v in (raw.get("counts") or {}).items()},
            min_counts={str(k): int(v) for k, v in (raw.get("min_counts") or {}).items()},
            expect=dict(raw.get("expect") or {}),
            train_parts=tuple(str(s) for s in raw["train_parts"]),
            test_parts=tuple(str(s) for s in raw["test_parts"]),
            require_roles=tuple(raw["require_roles"]),
            skip_extra_folders=_extra_folders(raw.get("extra_folders", "refuse"), where),
        )
    except (KeyError, TypeError, re.error) as exc:
        raise SegpipeError(f"{where}: layout is malformed ({type(exc).__name__}: {exc})") from exc


def load_sources(manifests_dir: Path) -> dict[str, DatasetSource]:
    """Parse `<manifests_dir>/sources.yaml` into DatasetSource entries keyed by dataset name."""
    path = Path(manifests_dir) / "sources.yaml"
    if not path.is_file():
        raise SegpipeError(f"{path}: sources file not found (expected data_manifests/sources.yaml)")
    try:
        raw = yaml.safe_load(path.read_text())["datasets"]
    except (yaml.YAMLError, KeyError, TypeError) as exc:
        raise SegpipeError(f"{path}: expected a YAML mapping with a 'datasets' key ({exc})") from exc
    out: dict[str, DatasetSource] = {}
    for name, entry in raw.items():
        where = f"{path} [{name}]"
        try:
            archives = tuple(
                Archive(a["name"], a["url"], str(a["sha256"]).lower(), a.get("size")) for a in entry["archives"]
            )
            manifest = entry.get("files_manifest")
            out[name] = DatasetSource(
                name=name,
                title=entry.get("title", name),
                licence=entry.get("licence", ""),
                archives=archives,
                layout=_layout(entry["layout"], where),
                files_manifest=Path(manifests_dir) / manifest if manifest else None,
            )
        except (KeyError, TypeError) as exc:
            raise SegpipeError(f"{where}: missing or malformed key {exc}") from exc
    return out


def get_source(manifests_dir: Path, dataset: str) -> DatasetSource:
    """One dataset's entry; an unknown name lists the known ones."""
    sources = load_sources(manifests_dir)
    if dataset not in sources:
        raise SegpipeError(
            f"unknown dataset {dataset!r}: {Path(manifests_dir) / 'sources.yaml'} lists {', '.join(sorted(sources))}"
        )
    return sources[dataset]
