"""The inputs of `segpipe infer`: paths and glob patterns to files, and the outputs they would write."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Sequence

from pipeline.errors import SegpipeError
from pipeline.inference.writers.formats import output_paths


def expand_inputs(patterns: Sequence[str]) -> list[Path]:
    """Files named by paths or glob patterns, in order, without duplicates; SegpipeError if none match.

    A pattern naming an existing file is that file, even with glob characters ("a[1].tif")."""
    found: list[Path] = []
    for pattern in patterns:
        magic = not os.path.lexists(pattern) and any(ch in pattern for ch in "*?[")
        matches = sorted(glob.glob(pattern, recursive=True)) if magic else [pattern]
        files = [Path(m) for m in matches if Path(m).is_file()]
        if not files:
            raise SegpipeError(f"{pattern}: no input image matches")
        found.extend(f for f in files if f not in found)
    return found


def check_output_clashes(paths: Sequence[Path], output_dir: str | os.PathLike[str], output_format: str) -> None:
    """SegpipeError if two inputs would write the same label map."""
    targets: dict[Path, Path] = {}
    for path in paths:
        seg, _ = output_paths(path, output_dir, output_format)
        if seg in targets:
            raise SegpipeError(f"{path} and {targets[seg]} would both write {seg}; rename one of them")
        targets[seg] = path
