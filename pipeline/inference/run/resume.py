"""Resume of a killed `predict_file`: the finished rows, kept beside the outputs until the run completes.

Each band of final rows the engine emits is appended, exactly as the writers get it (uint8 labels,
probabilities in their stored dtype), to a raw file per output in `.NAME.resume/` beside the label
map, and `progress.json` there (rows done, and the key: input, model, settings, outputs) is replaced
atomically after each band. A run that finds a record with the same key replays the stored rows into
fresh writers (no network work) and restarts the engine at the first window touching the next row
(`stream_probabilities(start_row=...)`): the windows, their batches and their blending order are
those of an uninterrupted run, so the outputs are equal bit for bit. A changed input (path, size,
modification time, shape, dtype), model (sha256 of the checkpoint, or of the weights of a module),
setting or output starts over and says why. The cost: disk for the stored rows (one byte per pixel
for the labels, K x the dtype's size for probabilities) until the run completes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import psutil

from pipeline.errors import SegpipeError
from pipeline.files import atomic_path
from pipeline.inference.backends.torch_graph import InferenceNetwork
from pipeline.inference.settings import InferenceSettings
from pipeline.tracking_store import pid_alive

log = logging.getLogger(__name__)

RECORD = "progress.json"
FORMAT = 1
"""The record's format version; a different one starts over."""
_NOT_KEYED = ("resume",)
"""Settings that do not change the outputs."""


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_digest(net: InferenceNetwork) -> str:
    """sha256 of the checkpoint (or .onnx) the network came from, else of its weights and buffers."""
    if net.source is not None:
        return _sha256_file(net.source)
    digest = hashlib.sha256()
    for name, tensor in net.module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def run_key(
    input_path: Path,
    shape: tuple[int, ...],
    dtype: str,
    net: InferenceNetwork,
    settings: InferenceSettings,
    targets: Sequence[tuple[Path, str]],
    names: Sequence[str],
    nonfinite: float | None,
) -> dict[str, Any]:
    """What the outputs of one `predict_file` run depend on, as JSON-able values."""
    stat = input_path.stat()
    return {
        "input": {
            "path": str(input_path.resolve()),
            "bytes": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "shape": list(shape),
            "dtype": dtype,
        },
        "model": model_digest(net),
        "settings": {
            k: (list(v) if isinstance(v, tuple) else v)
            for k, v in dataclasses.asdict(settings).items()
            if k not in _NOT_KEYED
        },
        "outputs": [[str(path.resolve()), fmt] for path, fmt in targets],
        "classes": list(names),
        "nonfinite": nonfinite,
    }


def output_uuid(key: dict[str, Any], path: Path) -> str:
    """The OME UUID of the output `path` of the run `key`: derived from both (uuid5), so that a resumed
    run, or the same run again, writes the same bytes (tifffile's default, uuid1, is new each time)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return uuid.uuid5(uuid.NAMESPACE_URL, f"segpipe:{digest}:{path.resolve()}").urn


def _changes(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What differs between two keys, for the start-over message."""
    said = []
    if old.get("input") != new["input"]:
        said.append("the input changed (its size, modification time, shape or dtype)")
    if old.get("model") != new["model"]:
        said.append("the model changed")
    settings = old.get("settings") or {}
    said += [f"{k} {settings.get(k)!r} -> {v!r}" for k, v in new["settings"].items() if settings.get(k) != v]
    if old.get("outputs") != new["outputs"] or old.get("classes") != new["classes"]:
        said.append("the outputs asked for changed")
    if old.get("nonfinite") != new["nonfinite"]:
        said.append("the non-finite replacement changed")
    return "; ".join(said) or "the record is of another format"


class RowLog:
    """The stored final rows of one run: `replay()` what a killed run finished, `append()` each band."""

    def __init__(
        self,
        folder: Path,
        key: dict[str, Any],
        layouts: Sequence[tuple[int, int, np.dtype]],
        height: int,
        rows_done: int,
    ) -> None:
        self.folder, self.key, self.height, self.rows_done = folder, key, height, rows_done
        self.layouts = [(k, w, np.dtype(dtype)) for k, w, dtype in layouts]
        self.files = [folder / f"output{i}.raw" for i in range(len(self.layouts))]

    @property
    def row_bytes(self) -> list[int]:
        return [k * w * dtype.itemsize for k, w, dtype in self.layouts]

    def replay(self, chunk: int) -> Iterator[tuple[int, list[np.ndarray]]]:
        """The stored rows [0, rows_done) as (first row, one (K, n, W) array per output), `chunk` rows at a time."""
        handles = [open(path, "rb") for path in self.files]
        try:
            for y0 in range(0, self.rows_done, chunk):
                n = min(chunk, self.rows_done - y0)
                parts = []
                for fh, (k, w, dtype), size in zip(handles, self.layouts, self.row_bytes):
                    fh.seek(y0 * size)
                    rows = np.frombuffer(fh.read(n * size), dtype).reshape(n, k, w)
                    parts.append(np.ascontiguousarray(rows.transpose(1, 0, 2)))
                yield y0, parts
        finally:
            for fh in handles:
                fh.close()

    def append(self, y0: int, parts: Sequence[np.ndarray]) -> None:
        """Store the final rows starting at `y0` (the next row), then record them as done."""
        if y0 != self.rows_done:
            raise SegpipeError(f"{self.folder}: rows from {y0} handed on, {self.rows_done} expected")
        for path, part in zip(self.files, parts):
            with open(path, "ab") as fh:
                fh.write(np.ascontiguousarray(part.transpose(1, 0, 2)).tobytes())
        self.rows_done += parts[0].shape[1]
        self._record()

    def _record(self) -> None:
        body = {
            "format": FORMAT,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": process_start(os.getpid()),
            "rows_done": self.rows_done,
            "height": self.height,
            "layouts": [[k, w, dtype.str] for k, w, dtype in self.layouts],
            "key": self.key,
        }
        with atomic_path(self.folder / RECORD) as tmp:
            tmp.write_text(json.dumps(body))

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def progress_folder(label_path: Path) -> Path:
    """Where the progress of the run writing `label_path` is kept."""
    return label_path.parent / f".{label_path.name}.resume"


def open_log(
    label_path: Path, key: dict[str, Any], layouts: Sequence[tuple[int, int, np.dtype]], height: int
) -> tuple[RowLog, str | None]:
    """The row log of this run: the one a killed run with the same key left (resumed), else a new one.

    Returns the log and a note for the summary ("resumed at row R of H", or why it started over);
    SegpipeError if a live process on this host is writing the same output.
    """
    folder = progress_folder(label_path)
    old = _read_record(folder)
    note = None
    if old is not None:
        other = old.get("host") == socket.gethostname() and old.get("pid") != os.getpid()
        if other and _still_running(old):
            raise SegpipeError(f"{label_path}: another segpipe infer (process {old['pid']}) is writing this output")
        layouts_now = [[k, w, np.dtype(d).str] for k, w, d in layouts]
        reason = None
        if not old:
            reason = f"its progress record {folder / RECORD} is missing or unreadable"
        elif old["rows_done"] > height:
            reason = f"its progress record {folder / RECORD} says {old['rows_done']} rows of {height} are done"
        elif old.get("format") != FORMAT or old.get("key") != key or old.get("layouts") != layouts_now:
            reason = _changes(old.get("key") or {}, key)
        else:
            log_ = RowLog(folder, key, layouts, height, int(old["rows_done"]))
            short = [
                p
                for p, size in zip(log_.files, log_.row_bytes)
                if not p.is_file() or p.stat().st_size < log_.rows_done * size
            ]
            if short:
                reason = f"{short[0]} holds fewer rows than recorded"
            else:
                for path, size in zip(log_.files, log_.row_bytes):
                    os.truncate(path, log_.rows_done * size)  # a band written after the last record
                if log_.rows_done:
                    note = f"resumed at row {log_.rows_done} of {height} ({folder})"
                    log.warning("%s: %s", label_path, note)
                return log_, note
        note = f"started over: {reason}"
        log.warning("%s: a previous run's progress does not apply, %s", label_path, note)
        shutil.rmtree(folder, ignore_errors=True)
    try:
        folder.mkdir(parents=True)
    except OSError as exc:
        raise SegpipeError(
            f"{folder.parent}: output directory is not writable ({exc.strerror or exc}): the run's "
            f"progress is kept there, in {folder.name}"
        ) from exc
    log_ = RowLog(folder, key, layouts, height, 0)
    for path in log_.files:
        path.touch()
    log_._record()
    return log_, note


def discard_log(label_path: Path) -> str | None:
    """With `resume: false`: the progress a previous run left for `label_path` is removed (SegpipeError
    if a live process on this host is writing that output); returns the note saying so, or None."""
    folder = progress_folder(label_path)
    old = _read_record(folder)
    if old is None:
        return None
    if old and old["host"] == socket.gethostname() and old["pid"] != os.getpid() and _still_running(old):
        raise SegpipeError(f"{label_path}: another segpipe infer (process {old['pid']}) is writing this output")
    shutil.rmtree(folder, ignore_errors=True)
    return f"started over: resume is off ({folder.name} removed)"


def _read_record(folder: Path) -> dict[str, Any] | None:
    """The progress record in `folder`: None without the folder, {} if it cannot be read."""
    if not folder.is_dir():
        return None
    try:
        record = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(record, dict):
        return {}
    counts = [record.get("rows_done"), record.get("pid")]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts):
        return {}  # damaged: reported as unreadable and discarded, the run starts over
    if not isinstance(record.get("host"), str) or not isinstance(record.get("started", 0.0), (int, float)):
        return {}
    return record


def process_start(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), None if it is gone: with the pid it names
    one process, so a pid reused after a restart is not taken for the run that wrote a record."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, ValueError):
        return None


def _still_running(record: Mapping[str, Any]) -> bool:
    """Whether the process that wrote `record` (its pid and, when recorded, its start time) still runs."""
    if not pid_alive(record["pid"]):
        return False
    started = record.get("started")
    return started is None or process_start(record["pid"]) == started


__all__ = ["RowLog", "discard_log", "model_digest", "open_log", "progress_folder", "run_key"]
