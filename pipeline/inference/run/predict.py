"""`predict_file`: sliding-window inference from disk to disk, memory bounded by the tile band.

The reader (`readers/images.py`) delivers row bands of the input; the engine
(`engine/sliding_window.py`) runs the
windows of each band in batches and yields rows as soon as they are final; the writer of the
output format (`writers/formats.py`: flat TIFF, NIfTI, pyramidal OME-TIFF, OME-Zarr) encodes them (labels,
probabilities) and drops them. Nothing image-sized is held: peak memory is the band (a few tiles
high, the image wide) plus the network's activations; the pyramids' reduced levels are built from
the bands as they pass.
A checkpoint's recorded training preprocessing wraps the reader (`readers/preprocessed.py`): zscore and
percentile of <= 16-bit images stream (one extra statistics pass); CLAHE and other percentiles
hold the whole image, up to `preprocess_max_megapixels`.

Failures: every error of one file (unreadable or truncated data, non-finite pixels, a network
output that is not finite, an unwritable output, sizes beyond the memory) is a SegpipeError naming
the file, raised before anything appears under an output name; `infer_files` reports it and goes on
with the next input. A killed (or interrupted) run resumes when run again (`resume` setting,
`pipeline.inference.run.resume`): the rows it finished are replayed into the writers and the engine goes
on from the next row, giving the outputs of an uninterrupted run bit for bit.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from pipeline.config import check_number
from pipeline.errors import SegpipeError
from pipeline.files import remove_stale_temps
from pipeline.inference.backends.select import inference_network
from pipeline.inference.backends.torch_graph import InferenceNetwork, ModelLike
from pipeline.inference.engine.labels import to_labels
from pipeline.inference.engine.memory import check_memory, peak_rss_mb, reset_peak_rss
from pipeline.inference.engine.sliding_window import stream_probabilities
from pipeline.inference.readers.images import ImageReader, open_image
from pipeline.inference.readers.preprocessed import CheckedReader, PreprocessedReader
from pipeline.inference.run.inputs import check_output_clashes, expand_inputs
from pipeline.inference.run.report import InferenceReport
from pipeline.inference.run.resume import RowLog, discard_log, open_log, output_uuid, run_key
from pipeline.inference.settings import THRESHOLD_NAMES, InferenceSettings, load_settings, resolve_threshold
from pipeline.inference.writers.base import (
    RowWriter,
    check_output_path,
    encode_probabilities,
)
from pipeline.inference.writers.formats import (
    instance_path,
    instance_writer,
    label_writer,
    output_paths,
    probability_writer,
    resolve_format,
)
from pipeline.inference.writers.ome_meta import name_classes
from pipeline.postprocessing.instances import InstanceSettings
from pipeline.postprocessing.stitching import InstanceStream

log = logging.getLogger(__name__)

DEVICES = "cpu, cuda or cuda:N"
"""The devices inference runs on, as said in errors."""
_REPLAY_ROWS = 256
"""Rows of a resumed run's stored output handed to the writers at a time."""


def check_device(device: str) -> None:
    """SegpipeError unless `device` is cpu, cuda or cuda:N."""
    if not isinstance(device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise SegpipeError(f"device {device!r} is not supported: use {DEVICES}")


def check_nonfinite(value: float | None) -> float | None:
    """The replacement value of non-finite input pixels: None (refuse them) or a finite number."""
    return check_number(value, "nonfinite", "inference arguments", optional=True)


def recorded_instances(net: InferenceNetwork) -> InstanceSettings:
    """The instance settings the network's checkpoint or ONNX metadata records; SegpipeError naming the
    model when it records none (trained on a dataset without reference instances)."""
    where = str(net.source) if net.source is not None else "the model"
    if net.instances is None:
        raise SegpipeError(
            f"{where}: records no instance settings; instance maps need a model trained by "
            "`segpipe train` on a dataset with reference instances (the cell sets)"
        )
    return InstanceSettings.from_dict(net.instances.get("settings"), where)


def with_threshold(settings: InferenceSettings, net: InferenceNetwork) -> InferenceSettings:
    """`settings` with its threshold as a number: `val` / `val-dice` become the validation threshold the
    network's checkpoint or ONNX metadata records (`resolve_threshold`; SegpipeError naming the model
    if it has none, or K > 1 classes). The number is what the label maps and the resume key use."""
    where = str(net.source) if net.source is not None else "the model"
    return replace(settings, threshold=resolve_threshold(settings.threshold, net.thresholds, net.out_channels, where))


def predict_file(
    model: ModelLike | InferenceNetwork,
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    *,
    settings: InferenceSettings | None = None,
    probabilities_path: str | os.PathLike[str] | None = None,
    instances_path: str | os.PathLike[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    nonfinite: float | None = None,
    class_names: Sequence[str] | None = None,
    **overrides: Any,
) -> InferenceReport:
    """Segment the image at `input_path` into a label map at `output_path`, streaming.

    The label map is uint8 (argmax, or probability >= threshold for one output channel; `val` /
    `val-dice`: the checkpoint's validation threshold, `with_threshold`) as a tiled
    BigTIFF (`.tif`), NIfTI (`.nii`, `.nii.gz`, header taken from a NIfTI input) or OME-Zarr
    (`.ome.zarr`); `output_format="ome-tiff"` makes a `.ome.tif` a pyramidal OME-TIFF (see
    `pipeline.inference.writers.formats`). With `probabilities_path` the class probabilities are written too
    (K channels; uint8 scaled by 255, float16 or float32). `class_names` name the label values 0, 1,
    ... in the OME outputs (default: the names the checkpoint or ONNX model records, else "class 0", ...).
    `settings` (default: `InferenceSettings()`) with the non-None `overrides` (its fields: tile,
    overlap, threshold, output_format, ...) applied says how. `progress` is called after each band with
    (pixels finished, total pixels). With `instances_path` the objects are written too, as a uint32 instance map (0
    background, 1..n) made with the instance settings the model records (`pipeline.postprocessing`:
    blocks with a halo, stitched into image-wide ids; such a run does not resume, see
    `pipeline.inference.run.resume`). Outputs appear under their final names only when complete; any
    failure leaves nothing behind. Bad input raises SegpipeError naming the file.
    With `preprocess="checkpoint"` and a checkpoint that records its training preprocessing
    (`augment`), the image gets exactly that preprocessing (`PreprocessedReader`, as `segpipe
    evaluate` applies it) and `intensity` does not apply; otherwise `intensity` does.
    Non-finite input values (NaN, +-Inf, floats beyond float32) are an error, or with `nonfinite`
    replaced by that value; a non-finite network output is always an error.
    """
    settings = load_settings(settings, **overrides)
    check_device(settings.device)
    nonfinite = check_nonfinite(nonfinite)
    input_path, output_path = Path(input_path), Path(output_path)
    targets = [output_path] + ([Path(probabilities_path)] if probabilities_path is not None else [])
    targets += [Path(instances_path)] if instances_path is not None else []
    formats = [resolve_format(target, settings.output_format) for target in targets]
    for target in targets:
        if target.resolve() == input_path.resolve():
            raise SegpipeError(f"{target}: output would overwrite the input")
        check_output_path(target)
    net = inference_network(model, settings)
    settings = with_threshold(settings, net)
    names = name_classes(net.out_channels, class_names if class_names is not None else net.class_names)
    objects = recorded_instances(net) if instances_path is not None else None
    for directory in {target.parent for target in targets}:
        for path in remove_stale_temps(directory):
            log.warning("removed %s: left behind by a killed segpipe process", path)
    try:
        return _predict(net, input_path, list(zip(targets, formats)), names, nonfinite, settings, progress, objects)
    except SegpipeError as exc:
        if str(input_path) in str(exc):
            raise
        raise SegpipeError(f"{input_path}: {exc}") from exc  # e.g. an output's error: name the input too
    except Exception as exc:  # whatever a library raised while reading, computing or writing
        raise SegpipeError(f"{input_path}: {type(exc).__name__}: {exc}") from exc


def _predict(
    net: InferenceNetwork,
    input_path: Path,
    targets: list[tuple[Path, str]],
    names: list[str],
    nonfinite: float | None,
    settings: InferenceSettings,
    progress: Callable[[int, int], None] | None,
    objects: InstanceSettings | None = None,
) -> InferenceReport:
    """The work of `predict_file` (targets: (path, format) of the label map, then of the probabilities
    if wanted, then of the instance map with `objects`; `names`: the classes)."""
    instance_target = targets.pop() if objects is not None else None
    if net.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(net.device)
    start = time.perf_counter()
    recorded = net.augment if settings.preprocess == "checkpoint" else None
    with open_image(input_path) as raw:
        checked = CheckedReader(raw, nonfinite)
        reader: ImageReader = checked
        if recorded is not None:
            reader = PreprocessedReader(
                checked,
                recorded,
                max_megapixels=settings.preprocess_max_megapixels,
                where=str(net.source or "the checkpoint"),
            )
        check_memory(net, reader, settings)
        writers: list[RowWriter] = []
        rowlog: RowLog | None = None
        try:
            key = run_key(input_path, reader.shape, str(reader.dtype), net, settings, targets, names, nonfinite)
            rowlog, resumed = _open_row_log(
                key, reader, targets, net.out_channels, replace(settings, resume=settings.resume and objects is None)
            )
            start_row = rowlog.rows_done if rowlog is not None else 0
            stream = stream_probabilities(net, reader, settings, progress, start_row=start_row)
            writers.append(label_writer(*targets[0], reader, settings, names, uuid=output_uuid(key, targets[0][0])))
            if len(targets) > 1:
                writers.append(
                    probability_writer(
                        *targets[1], reader, settings, names, net.out_channels, uuid=output_uuid(key, targets[1][0])
                    )
                )
            stitched = None
            if instance_target is not None and objects is not None:
                stitched = (
                    InstanceStream(objects, reader.shape[1]),
                    instance_writer(*instance_target, reader, settings, uuid=output_uuid(key, instance_target[0])),
                )
                writers.append(stitched[1])
            if rowlog is not None:
                _replay(rowlog, writers, reader.shape, progress)
            for y0, probs in stream.rows:
                if not np.isfinite(probs).all():
                    raise SegpipeError(
                        f"{input_path}: the network's output is not finite at {int((~np.isfinite(probs)).sum())} "
                        f"value(s) from row {y0} on (non-finite weights, or an input scaled beyond float32); "
                        "nothing was written"
                    )
                parts = [to_labels(probs, settings.threshold)]
                if len(targets) > 1:
                    parts.append(encode_probabilities(probs, settings.probabilities_dtype))
                for writer, part in zip(writers, parts):
                    writer.write(y0, part)
                if stitched is not None:
                    for first, ids in stitched[0].push(y0, probs):
                        stitched[1].write(first, ids)
                if rowlog is not None:
                    rowlog.append(y0, parts)
            if stitched is not None:
                stitched[0].finish()
            for w in writers:  # all complete before any appears under its final name
                w.finish()
            outputs = [w.publish() for w in writers]
        except BaseException as exc:
            for w in writers:
                w.abort()
            if rowlog is not None and not isinstance(exc, KeyboardInterrupt):
                rowlog.remove()  # a failure leaves nothing behind; an interrupted run can resume
            raise
        finally:
            if reader is not raw:  # a PreprocessedReader drops its statistics or whole-image result
                reader.close()
        if rowlog is not None:
            rowlog.remove()
        shape, dtype = raw.shape, str(raw.dtype)
    seconds = time.perf_counter() - start
    notes = list(net.notes) + [f"tta {'+'.join(settings.tta)}"] * bool(settings.tta) + [resumed] * bool(resumed)
    if stitched is not None:
        notes.append(f"{stitched[0].count} objects in {stitched[1].path.name} ({objects.describe()}; not resumable)")
    if checked.replaced:
        notes.append(f"{checked.replaced} pixel(s) with non-finite values set to {nonfinite:g}")
    if isinstance(reader, PreprocessedReader):
        notes.append(f"preprocessing from checkpoint: {reader.describe()}")
    elif net.augment is not None:
        notes.append(f"checkpoint preprocessing off, intensity {settings.intensity}")
    if net.device.type == "cuda":
        notes.append(f"peak CUDA {torch.cuda.max_memory_allocated(net.device) / 2**20:.0f} MB")
    return InferenceReport(
        input_path, outputs, shape, dtype, stream.plan.describe(), stream.plan.n_windows, seconds, peak_rss_mb(), notes
    )


def _open_row_log(
    key: dict[str, Any],
    reader: ImageReader,
    targets: list[tuple[Path, str]],
    channels: int,
    settings: InferenceSettings,
) -> tuple[RowLog | None, str | None]:
    """The resume log of this run (`pipeline.inference.run.resume`), None with `resume: false`; and its note."""
    if not settings.resume:
        return None, discard_log(targets[0][0])
    _, h, w = reader.shape
    layouts = [(1, w, np.dtype(np.uint8))]
    if len(targets) > 1:
        layouts.append((channels, w, np.dtype(settings.probabilities_dtype)))
    return open_log(targets[0][0], key, layouts, h)


def _replay(
    rowlog: RowLog, writers: list[RowWriter], shape: tuple[int, int, int], progress: Callable[[int, int], None] | None
) -> None:
    """Hand the rows a killed run finished to the writers, as they were stored."""
    _, h, w = shape
    for y0, parts in rowlog.replay(_REPLAY_ROWS):
        for writer, part in zip(writers, parts):
            writer.write(y0, part)
        if progress is not None:
            progress(parts[0].shape[1] * w, h * w)


def infer_files(
    model: ModelLike | InferenceNetwork,
    inputs: Sequence[str],
    output_dir: str | os.PathLike[str],
    *,
    settings: InferenceSettings | None = None,
    save_probabilities: bool | None = None,
    show_progress: bool = True,
    nonfinite: float | None = None,
    class_names: Sequence[str] | None = None,
    **overrides: Any,
) -> list[InferenceReport]:
    """Every input through `predict_file` with the model loaded once (the work of `segpipe infer`,
    whose entry `pipeline.stages.infer.run_infer` passes the settings of configs/inference.yaml).

    `overrides` are `InferenceSettings` fields (tile, overlap, blend, tta, batch_size, device,
    preprocess, ...) replacing the values of `settings` (default: `InferenceSettings()`). With
    `preprocess: checkpoint` every image gets the checkpoint's recorded training preprocessing (see
    `predict_file`).
    Outputs go to `output_dir` as NAME_seg.* (and NAME_prob.*) in the `output_format` setting
    (`auto`: like the input; see `pipeline.inference.writers.formats`), `class_names` naming the classes in the
    OME formats. A progress bar per image shows
    Mpx/s and the ETA; a summary line per image is printed. An input that fails is reported and
    the others still run; SegpipeError at the end names every failed input. `nonfinite`: see
    `predict_file`.
    """
    from tqdm import tqdm

    settings = load_settings(settings, **overrides)
    check_device(settings.device)
    nonfinite = check_nonfinite(nonfinite)
    output_format = settings.output_format
    paths = expand_inputs(inputs)
    check_output_clashes(paths, output_dir, output_format)
    net = inference_network(model, settings)
    # fails once, not per input
    name_classes(net.out_channels, class_names if class_names is not None else net.class_names)
    named, settings = settings.threshold, with_threshold(settings, net)
    if isinstance(named, str):
        facts = net.thresholds or {}
        print(
            f"segpipe infer: threshold {named} = {settings.threshold:g} ({THRESHOLD_NAMES[named]} on "
            f"{facts.get('cases', '?')} validation image(s), recorded in {net.source or 'the model'})",
            flush=True,
        )
    probs = settings.save_probabilities if save_probabilities is None else save_probabilities
    objects = settings.instances == "auto" and net.instances is not None
    reports: list[InferenceReport] = []
    failed: list[str] = []
    for path in paths:
        seg, prob = output_paths(path, output_dir, output_format)
        bar = tqdm(desc=path.name, unit="px", unit_scale=True, disable=not show_progress, leave=False)
        reset_peak_rss()  # the summary's peak is this image's

        def advance(pixels: int, total: int, bar: tqdm = bar) -> None:
            if bar.total != total:
                bar.total = total
            bar.update(pixels)

        try:
            report = predict_file(
                net,
                path,
                seg,
                probabilities_path=prob if probs else None,
                nonfinite=nonfinite,
                settings=settings,
                progress=advance,
                class_names=class_names,
                instances_path=instance_path(seg) if objects else None,
            )
        except Exception as exc:  # SegpipeError by design; anything else is still this file's failure
            text = str(exc) if isinstance(exc, SegpipeError) else f"{path}: {type(exc).__name__}: {exc}"
            print(f"segpipe infer: error: {text}", file=sys.stderr)
            failed.append(str(path))
            continue
        finally:
            bar.close()
        print(report.summary(), flush=True)
        reports.append(report)
    if failed:
        raise SegpipeError(f"{len(failed)} of {len(paths)} input(s) failed: {', '.join(failed)}")
    return reports
