"""The dataset fingerprint: what the training plan needs to know about a prepared dataset.

In the spirit of nnU-Net v2's experiment planning (Isensee et al., Nature Methods 2021: a dataset
fingerprint, then rules that turn it into a training configuration; `pipeline.training.planning`
holds the rules). `segpipe prepare` computes it from the train and val cases it has in memory and
writes `data/prepared/DATASET/fingerprint.json`:

    format           "segpipe-fingerprint/1"
    cases            the cases measured (train and val splits) and their (H, W)
    shape            median, min and max (H, W) over those cases
    channels         count and the card's channel names; spacing, modality and plan (what the card
                     asks the training plan to choose, e.g. {"channels": "auto"}) as the card says
    intensity        the images' dtype (numpy's common type of the cases) and per channel (by name):
                     the 0.5 / 50 / 99.5 percentiles, mean and std of a seeded sample of at most
                     `max_pixels_per_case` pixels per case inside the field of view (the whole image
                     without one), at most `max_pixels_total` pixels in all; and per class name the
                     mean and std of the sample's pixels of that class (null without any)
    classes          per class name: pixels inside the field of view and their frequency
    objects          per foreground class: connected components (8-connected) of its pixels, their
                     count and min / median / 95th-percentile area in pixels
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from scipy import ndimage

from pipeline.data.io import write_text
from pipeline.errors import SegpipeError

FINGERPRINT_NAME = "fingerprint.json"
FORMAT = "segpipe-fingerprint/1"
SPLITS = ("train", "val")
PERCENTILES = (0.5, 50.0, 99.5)
MAX_PIXELS_PER_CASE = 100_000
MAX_PIXELS_TOTAL = 10_000_000
"""Sample bounds: at most this many pixels per case and per channel in all (float32: 40 MB per
channel), so the fingerprint of a large dataset fits in memory."""


def dataset_fingerprint(
    loaded: Mapping[str, Mapping[str, np.ndarray]],
    splits: Mapping[str, str],
    facts: Mapping[str, Any],
    seed: int,
    max_pixels_per_case: int = MAX_PIXELS_PER_CASE,
    max_pixels_total: int = MAX_PIXELS_TOTAL,
) -> dict[str, Any]:
    """The fingerprint (module docstring) of the `splits` (case -> split) train and val cases of
    `loaded` (case -> {"image" (C, H, W), "label" (1, H, W) class indices, optional "fov"}).
    `facts`: the card's facts (classes, channels, spacing, modality); `seed`: the pixel sample's."""
    cases = sorted(case for case, split in splits.items() if split in SPLITS)
    if not cases:
        raise SegpipeError("fingerprint: no train or val case")
    shapes = np.array([loaded[c]["image"].shape[1:] for c in cases], dtype=np.int64)
    channel_names = list(facts["channels"])
    class_names = list(facts["classes"])
    per_case = max(1, min(max_pixels_per_case, max_pixels_total // len(cases)))
    return {
        "format": FORMAT,
        "splits": list(SPLITS),
        "cases": {c: [int(s) for s in shape] for c, shape in zip(cases, shapes)},
        "shape": {
            "median": [float(v) for v in np.median(shapes, axis=0)],
            "min": [int(v) for v in shapes.min(axis=0)],
            "max": [int(v) for v in shapes.max(axis=0)],
        },
        "channels": {"count": len(channel_names), "names": channel_names},
        "spacing": facts.get("spacing"),
        "modality": facts.get("modality"),
        "plan": dict(facts.get("plan") or {}),
        "intensity": {
            "region": "fov" if any("fov" in loaded[c] for c in cases) else "all",
            "dtype": str(np.result_type(*[loaded[c]["image"].dtype for c in cases])),
            "sample": {"seed": seed, "max_pixels_per_case": per_case},
            "channels": intensity_statistics([loaded[c] for c in cases], channel_names, class_names, seed, per_case),
        },
        "classes": class_frequencies([loaded[c] for c in cases], class_names),
        "objects": object_sizes([loaded[c]["label"][0] for c in cases], class_names),
    }


def _region(vols: Mapping[str, np.ndarray]) -> np.ndarray:
    """The pixels that count, (H, W) bool: the field of view, or every pixel without one."""
    shape = vols["image"].shape[1:]
    return vols["fov"][0] > 0 if "fov" in vols else np.ones(shape, dtype=bool)


def intensity_statistics(
    cases: list[Mapping[str, np.ndarray]], channel_names: list[str], class_names: list[str], seed: int, per_case: int
) -> dict[str, dict[str, Any]]:
    """Per channel: percentiles, mean and std of a seeded sample of `per_case` in-region pixels per
    case (all of them when a case has fewer), and per class the mean and std of the sample's pixels
    of that class; case i draws with `default_rng([seed, i])`."""
    samples, labels = [], []
    for i, vols in enumerate(cases):
        image = vols["image"]
        if image.shape[0] != len(channel_names):
            raise SegpipeError(
                f"fingerprint: an image has {image.shape[0]} channel(s), the card names "
                f"{len(channel_names)} ({', '.join(channel_names)})"
            )
        where = np.flatnonzero(_region(vols))
        if where.size > per_case:
            where = np.sort(np.random.default_rng([seed, i]).choice(where, per_case, replace=False))
        samples.append(image.reshape(image.shape[0], -1)[:, where].astype(np.float32))
        labels.append(vols["label"].reshape(-1)[where])
    pooled = np.concatenate(samples, axis=1).astype(np.float64)
    pooled_labels = np.concatenate(labels)
    if pooled.shape[1] == 0:
        raise SegpipeError("fingerprint: no pixel inside the field of view in any train or val case")
    out = {}
    for name, values in zip(channel_names, pooled):
        low, mid, high = np.percentile(values, PERCENTILES)
        out[name] = {
            "p0.5": float(low),
            "p50": float(mid),
            "p99.5": float(high),
            "mean": float(values.mean()),
            "std": float(values.std()),
            "pixels": int(values.size),
            "classes": _class_statistics(values, pooled_labels, class_names),
        }
    return out


def _class_statistics(values: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict[str, dict[str, Any]]:
    """Per class name: mean and std of the `values` whose `labels` (class indices) are that class."""
    out = {}
    for k, name in enumerate(class_names):
        mine = values[labels == k]
        out[name] = (
            {"mean": float(mine.mean()), "std": float(mine.std()), "pixels": int(mine.size)}
            if mine.size
            else {"mean": None, "std": None, "pixels": 0}
        )
    return out


def class_frequencies(cases: list[Mapping[str, np.ndarray]], class_names: list[str]) -> dict[str, dict[str, Any]]:
    """Per class: its pixels inside the field of view (ignored pixels are outside it) and their share."""
    counts = np.zeros(len(class_names), dtype=np.int64)
    for vols in cases:
        counts += np.bincount(vols["label"][0][_region(vols)].ravel(), minlength=len(class_names))[: len(class_names)]
    total = max(int(counts.sum()), 1)
    return {name: {"pixels": int(n), "frequency": float(n) / total} for name, n in zip(class_names, counts)}


def object_sizes(labels: list[np.ndarray], class_names: list[str]) -> dict[str, dict[str, Any]]:
    """Per foreground class: its 8-connected components over all `labels` (H, W), their count and
    min / median / 95th-percentile area in pixels (null without any)."""
    structure = np.ones((3, 3), dtype=bool)
    out = {}
    for k, name in enumerate(class_names[1:], start=1):
        areas: list[np.ndarray] = []
        for label in labels:
            components, n = ndimage.label(label == k, structure=structure)
            areas.append(np.bincount(components.ravel(), minlength=n + 1)[1:])
        pooled = np.concatenate(areas)
        stats = (
            {"min": int(pooled.min()), "median": float(np.median(pooled)), "p95": float(np.percentile(pooled, 95))}
            if pooled.size
            else {"min": None, "median": None, "p95": None}
        )
        out[name] = {"count": int(pooled.size), **stats}
    return out


def write_fingerprint(folder: Path, fingerprint: Mapping[str, Any]) -> Path:
    """`folder/fingerprint.json`, written atomically."""
    path = Path(folder) / FINGERPRINT_NAME
    write_text(path, json.dumps(fingerprint, indent=2) + "\n")
    return path


def read_fingerprint(folder: Path, dataset: str) -> dict[str, Any]:
    """`folder/fingerprint.json`; SegpipeError naming the file and the command when it is missing or
    not a fingerprint."""
    path = Path(folder) / FINGERPRINT_NAME
    if not path.is_file():
        raise SegpipeError(
            f"{path}: not found (prepared before fingerprints existed?); run segpipe prepare {dataset} again"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SegpipeError(f"{path}: not valid JSON ({exc}); run segpipe prepare {dataset} again") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise SegpipeError(f"{path}: not a {FORMAT} fingerprint; run segpipe prepare {dataset} again")
    return data
