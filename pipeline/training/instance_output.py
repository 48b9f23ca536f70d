"""The instance settings of a trained network, chosen on its validation images (instance datasets).

After training, a dataset whose validation cases carry reference instances (the CTC sets, a folder
dataset with `instances`) has best.pt's network predict them (`validation_settings`, as validation
does) and the method and parameters with the best SEG (`pipeline.postprocessing.planning`) recorded
as `instances` in best.pt and in instances.json beside it; `segpipe infer` then writes instance maps
with them and `segpipe evaluate` scores the same.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from tqdm import tqdm

from pipeline.data.io import write_text
from pipeline.data.prepared import PreparedDataset
from pipeline.inference.backends.torch_graph import torch_network
from pipeline.inference.engine.sliding_window import predict
from pipeline.inference.settings import InferenceSettings
from pipeline.networks import load_model, read_checkpoint, save_checkpoint
from pipeline.postprocessing.planning import InstancePlan, plan_instances
from pipeline.training.settings import TrainSettings
from pipeline.transforms.presets import preprocess

RESERVED = ("format", "network", "config", "in_channels", "out_channels", "padding", "halo", "state_dict")
"""The keys `save_checkpoint` writes itself."""


def median_object_area(fingerprint: Mapping[str, Any]) -> float | None:
    """The median object area (px) of the fingerprint's first foreground class that has objects."""
    for stats in (fingerprint.get("objects") or {}).values():
        if isinstance(stats, Mapping) and stats.get("median"):
            return float(stats["median"])
    return None


def choose_instances(
    best: Path,
    prepared: PreparedDataset,
    settings: TrainSettings,
    inference: InferenceSettings,
    median_area: float | None,
) -> InstancePlan | None:
    """Choose and record the instance settings of `best` (module docstring); None when the validation
    cases have no reference instances or the fingerprint no objects."""
    names = [c for c in prepared.cases("val") if "instances" in prepared.load(c)]
    if not names or median_area is None:
        return None
    net = torch_network(load_model(best), inference)
    cases = []
    for name in tqdm(names, desc=f"{settings.dataset} instances", unit="image", leave=False):
        arrays = prepared.load(name)
        probs = predict(net, preprocess(settings.dataset, arrays["image"], settings.augment), settings=inference)
        cases.append((probs, arrays["instances"][0].astype(np.int64)))
    plan = plan_instances(cases, median_area, desc=f"{settings.dataset} instance methods")
    ckpt = read_checkpoint(best)
    extra = {k: v for k, v in ckpt.items() if k not in RESERVED}
    save_checkpoint(load_model(best), best, **{**extra, "instances": plan.record()})
    write_text(best.parent / "instances.json", json.dumps(plan.record(), indent=2) + "\n")
    return plan
