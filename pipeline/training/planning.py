"""The training plan: settings the profile and the augmentation preset leave open, planned from the
dataset fingerprint (`pipeline.preprocessing.fingerprint`), as nnU-Net v2 plans its experiments from
its fingerprint (Isensee et al., Nature Methods 2021). Deterministic: the same fingerprint and
settings give the same plan on any machine (no timing, no probing of the hardware).

An explicit setting always wins. Every entry of the plan records where its value comes from:

    {"value": v, "source": "profile" | "preset" | "card" | "planned", "why": "...",
     "planned": what the rule would have chosen (entries the profile or preset set)}

    patch_size     (profile, null: planned) the largest output size the network can produce (its
                   size contract, `valid_output_size`) <= the median image's shorter side and
                   <= plan.max_patch_size
    batch_size     (profile, null: planned) floor(budget / memory per patch), `estimate_memory`
    normalize      (preset, auto: planned) per channel: percentile when the card's modality is CT,
                   or when the central 99 % of the channel's pixels span less than
                   HEAVY_TAIL_SPREAD standard deviations (the extreme 1 % carries most of the
                   variance and would squash the z-scores of the rest); zscore otherwise. The
                   transforms apply one scheme to every channel: percentile if any kept channel
                   needs it
    class_weights  inverse class frequency w_k = N / (K n_k) of the fingerprint's in-FOV pixels
                   (the rule of `compute_class_weights`); recorded only: the eq. 2 weight maps that
                   training reads were computed by `segpipe prepare` (stats.json, train split; a
                   k-fold's training gets its own, `pipeline.training.loader.fold_class_weights`)
    channels       (preset; planned only when the card asks, `plan: {channels: auto}`, and the
                   preset's is null) the one channel with the largest mean, over the foreground
                   classes k, of the Fisher ratio (mu_k - mu_0)^2 / (sd_k^2 + sd_0^2) against class 0
                   (Fisher 1936), from the fingerprint's per-class statistics; one-channel data keep it
    clahe          (preset; planned only when the card asks, `plan: {clahe: auto}`, and the preset's
                   is null) CLAHE at clip CLAHE_CLIP when every kept channel's p99.5 - p0.5 is below
                   NARROW_RANGE x the range of the image dtype (uint8, uint16; float: never)

A setting the card asks to plan but the preset sets keeps the preset's value and records the planned
one. normalize is planned on the planned channels.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from pipeline.errors import SegpipeError
from pipeline.networks import SegmentationNetwork, build_network
from pipeline.training.settings import TrainSettings
from pipeline.training.trainer import output_channels
from pipeline.transforms.presets import AUTO

PLAN_FORMAT = "segpipe-plan/1"
MIN_BATCH = 2
ACTIVATION_FACTOR = 2
"""Training memory per stored activation: the forward outputs kept for the backward pass, plus their
gradients at the peak of the backward pass."""
STATE_BYTES_PER_PARAMETER = 16
"""fp32 weight, its gradient and two Adam moments (SGD with momentum needs less): per training, not
per patch."""
ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
HEAVY_TAIL_SPREAD = 2.0
"""A normal channel's p99.5 - p0.5 spans 5.2 std, a uniform one 3.4 std; below 2 std the pixels
beyond the central 99 % dominate the std."""
PERCENTILE_MODALITY = re.compile(r"\b(ct|computed tomography)\b", re.IGNORECASE)
CLAHE_CLIP = 0.01
"""The DRIVE preset's clip limit (configs/augment.yaml)."""
NARROW_RANGE = 0.5
DTYPE_RANGE = {"uint8": 255, "uint16": 65535}
FISHER_EPS = 1e-12
"""Floor of the Fisher ratio's denominator (classes of constant intensity)."""


@dataclass(frozen=True)
class Plan:
    """The resolved settings (what training uses) and the entries saying where each came from."""

    settings: TrainSettings
    entries: dict[str, dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        """plan.json's content."""
        s = self.settings
        return {
            "format": PLAN_FORMAT,
            "dataset": s.dataset,
            "network_key": s.network_key,
            "network": s.network,
            "limits": dict(s.plan),
            "entries": self.entries,
        }


def plan_training(fingerprint: Mapping[str, Any], settings: TrainSettings) -> Plan:
    """The plan of `settings` (`resolve_settings`; patch_size, batch_size may be None, the preset's
    normalize "auto") on the dataset of `fingerprint`."""
    limits, augment = settings.plan, settings.augment
    asked = fingerprint.get("plan") or {}
    channels = _requested("channels", augment["channels"], asked, lambda: plan_channels(fingerprint))
    clahe = _requested("clahe", augment["clahe"], asked, lambda: plan_clahe(fingerprint, channels["value"]))
    planned = {**copy.deepcopy(dict(augment)), "channels": channels["value"], "clahe": clahe["value"]}
    network = meta_network(settings.with_changes(augment=planned), fingerprint)
    largest = max(fingerprint["shape"].get("max") or [0])  # fingerprints before "max": no check
    if settings.patch_size is not None and largest and settings.patch_size > largest:
        raise SegpipeError(
            f"patch_size {settings.patch_size} ({settings.dataset}, configs/train.yaml or --set) is larger than the "
            f"largest image side of the dataset ({largest} px, fingerprint.json); expected at most {largest}, "
            "or null to plan it"
        )
    patch = _entry(settings.patch_size, *plan_patch_size(network, fingerprint, int(limits["max_patch_size"])))
    batch = _entry(
        settings.batch_size,
        *plan_batch_size(
            network,
            int(patch["value"]),
            settings.precision,
            int(limits["memory_budget_mb"]),
            int(limits["max_batch_size"]),
            int(augment["patches"]["num_samples"]),
        ),
    )
    normalize = plan_normalize(fingerprint, channels["value"])
    if augment["normalize"] != AUTO:
        normalize = {
            "value": augment["normalize"],
            "source": "preset",
            "why": "set in configs/augment.yaml",
            "planned": normalize["value"],
            "channels": normalize["channels"],
        }
    entries = {
        "patch_size": patch,
        "batch_size": batch,
        "normalize": normalize,
        "class_weights": plan_class_weights(fingerprint),
        "clahe": clahe,
        "channels": channels,
    }
    planned["normalize"] = normalize["value"]
    return Plan(settings.with_changes(patch_size=patch["value"], batch_size=batch["value"], augment=planned), entries)


def _requested(key: str, preset: Any, asked: Mapping[str, str], plan: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The entry of a preset setting the card may ask to plan (`asked`: the fingerprint's `plan`): the
    preset's value unless the card asks and the preset's is null; planned (`plan()`) when the card asks."""
    if asked.get(key) != AUTO:
        return {
            "value": preset,
            "source": "preset",
            "why": f"from configs/augment.yaml; planned only when the card sets plan.{key}: auto",
        }
    planned = plan()
    if preset is None:
        return planned
    return {
        **planned,
        "value": preset,
        "source": "preset",
        "why": f"set in configs/augment.yaml (wins over the card's plan.{key}: auto); planned: {planned['why']}",
        "planned": planned["value"],
    }


def _entry(explicit: Any, planned: Any, why: str) -> dict[str, Any]:
    """An entry: the profile's explicit value when set (recording the planned one), else the planned one."""
    if explicit is None:
        return {"value": planned, "source": "planned", "why": why}
    return {
        "value": explicit,
        "source": "profile",
        "why": f"set in configs/train.yaml (or --set); planned: {why}",
        "planned": planned,
    }


def meta_network(settings: TrainSettings, fingerprint: Mapping[str, Any]) -> SegmentationNetwork:
    """The network training builds, on the `meta` device (shapes only: no memory, no weights)."""
    channels = settings.augment["channels"]
    in_channels = len(channels) if channels else int(fingerprint["channels"]["count"])
    with torch.device("meta"):
        return build_network(
            settings.network, in_channels, output_channels(len(fingerprint["classes"])), **settings.network_config
        )


def plan_patch_size(
    network: SegmentationNetwork, fingerprint: Mapping[str, Any], max_patch_size: int
) -> tuple[int, str]:
    """(patch size, why): the largest output size `network` can produce that is <= the median image's
    shorter side and <= `max_patch_size`; the smallest it can produce when none is."""
    shorter = int(math.floor(min(fingerprint["shape"]["median"])))
    limit = min(shorter, max_patch_size)
    for size in range(limit, 0, -1):
        if network.valid_output_size(size) == size:
            return size, (
                f"largest output size of {network.network_name} ({network.padding} padding) <= "
                f"min(median shorter side {shorter}, plan.max_patch_size {max_patch_size})"
            )
    smallest = network.valid_output_size(1)
    return smallest, (
        f"{network.network_name} produces no output size <= {limit} (median shorter side "
        f"{shorter}, plan.max_patch_size {max_patch_size}): its smallest, {smallest}"
    )


def estimate_memory(network: SegmentationNetwork, patch_size: int, precision: str) -> tuple[int, int]:
    """(bytes per patch, bytes per training) of a training step, estimated from the shapes alone.

    Per patch: the elements of every leaf module's forward output in train() mode for an input of
    `network.input_size(patch_size)`² (a forward of MIN_BATCH patches, as batch norm needs more than
    one value per channel, on the `meta` device, counted with forward hooks, divided by MIN_BATCH),
    x ELEMENT_BYTES[precision] x ACTIVATION_FACTOR. Per training: STATE_BYTES_PER_PARAMETER per
    parameter. Approximate: in-place activations are counted as new tensors, the temporaries of
    the backward kernels, the allocator's caching and autocast's fp32 copies are not; the input and
    target patches and the loss are left out. Treat it as an order of magnitude, not a bound (its
    check against the peak RSS of one optimizer step is in docs/training.md); the libraries' own
    memory is not in the budget.
    """
    if precision not in ELEMENT_BYTES:
        raise SegpipeError(f"memory estimate: precision must be one of {sorted(ELEMENT_BYTES)}, got {precision!r}")
    counted = [0]

    def count(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
        for tensor in output if isinstance(output, (tuple, list)) else [output]:
            if isinstance(tensor, torch.Tensor):
                counted[0] += tensor.numel()
            elif isinstance(tensor, (tuple, list)):  # a network's aux heads
                counted[0] += sum(t.numel() for t in tensor if isinstance(t, torch.Tensor))

    leaves = [m for m in network.modules() if not any(True for _ in m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    was_training = network.training
    try:
        network.train()
        size = network.input_size(patch_size)
        with torch.no_grad():
            network(torch.empty(MIN_BATCH, network.in_channels, size, size, device="meta"))
    finally:
        for hook in hooks:
            hook.remove()
        network.train(was_training)
    per_patch = counted[0] // MIN_BATCH * ELEMENT_BYTES[precision] * ACTIVATION_FACTOR
    fixed = sum(p.numel() for p in network.parameters()) * STATE_BYTES_PER_PARAMETER
    return per_patch, fixed


def plan_batch_size(
    network: SegmentationNetwork,
    patch_size: int,
    precision: str,
    memory_budget_mb: int,
    max_batch_size: int,
    num_samples: int,
) -> tuple[int, str]:
    """(batch size, why): floor((budget - per-training memory) / memory per patch), clamped to
    [MIN_BATCH, max_batch_size], then rounded down to a multiple of `num_samples` (patches.num_samples:
    the loader draws that many patches per image), at least one multiple."""
    per_patch, fixed = estimate_memory(network, patch_size, precision)
    fits = (memory_budget_mb * 2**20 - fixed) // per_patch
    batch = min(max(fits, MIN_BATCH), max_batch_size)
    batch = max(num_samples, batch // num_samples * num_samples)
    why = (
        f"plan.memory_budget_mb {memory_budget_mb} - {fixed / 2**20:.0f} MB weights and optimizer state: room "
        f"for {max(fits, 0)} patches of ~{per_patch / 2**20:.1f} MB ({precision}, {patch_size} x {patch_size} "
        f"px), clamped to [{MIN_BATCH}, plan.max_batch_size {max_batch_size}], a multiple of "
        f"patches.num_samples {num_samples}"
    )
    return int(batch), why


def plan_normalize(fingerprint: Mapping[str, Any], channels: list[int] | None) -> dict[str, Any]:
    """The planned normalisation (module docstring) of the kept `channels` (None: all)."""
    names = list(fingerprint["channels"]["names"])
    kept = [names[i] for i in channels] if channels else names
    modality = fingerprint.get("modality") or ""
    per_channel = {}
    for name in kept:
        stats = fingerprint["intensity"]["channels"][name]
        spread = stats["p99.5"] - stats["p0.5"]
        if PERCENTILE_MODALITY.search(modality):
            per_channel[name] = {"value": "percentile", "source": "card", "why": f"modality {modality!r}"}
        elif spread < HEAVY_TAIL_SPREAD * stats["std"]:
            per_channel[name] = {
                "value": "percentile",
                "source": "planned",
                "why": f"heavy tails: p99.5 - p0.5 = {spread:.4g} < {HEAVY_TAIL_SPREAD:g} std ({stats['std']:.4g})",
            }
        else:
            per_channel[name] = {
                "value": "zscore",
                "source": "planned",
                "why": f"p99.5 - p0.5 = {spread:.4g} >= {HEAVY_TAIL_SPREAD:g} std ({stats['std']:.4g})",
            }
    value = "percentile" if any(c["value"] == "percentile" for c in per_channel.values()) else "zscore"
    source = "card" if any(c["source"] == "card" for c in per_channel.values()) else "planned"
    return {
        "value": value,
        "source": source,
        "channels": per_channel,
        "why": "percentile when any kept channel needs it (one scheme for all channels), else zscore",
    }


def plan_channels(fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    """The planned `channels` (module docstring): [the channel separating the classes best], with
    each channel's mean Fisher ratio under "fisher"; None (all) when there is nothing to choose."""
    names = list(fingerprint["channels"]["names"])
    if len(names) == 1:
        return {"value": None, "source": "planned", "why": f"one channel ({names[0]}): nothing to choose"}
    stats = fingerprint["intensity"]["channels"]
    ratios = {name: _mean_fisher_ratio(stats[name]["classes"]) for name in names}
    if any(r is None for r in ratios.values()):
        return {
            "value": None,
            "source": "planned",
            "fisher": ratios,
            "why": "class 0 or every foreground class has no pixel in the fingerprint's sample: all channels",
        }
    best = max(range(len(names)), key=lambda i: ratios[names[i]])
    return {
        "value": [best],
        "source": "planned",
        "fisher": ratios,
        "why": f"{names[best]}: the largest mean Fisher ratio (mu_k - mu_0)^2 / (sd_k^2 + sd_0^2) of the "
        f"foreground classes against class 0 ({ratios[names[best]]:.4g})",
    }


def _mean_fisher_ratio(classes: Mapping[str, Mapping[str, Any]]) -> float | None:
    """The mean over the foreground classes (with pixels) of (mu_k - mu_0)^2 / (sd_k^2 + sd_0^2) of one
    channel's per-class statistics (class 0 first); None without class 0 or foreground pixels."""
    background, *foreground = classes.values()
    present = [c for c in foreground if c["pixels"]]
    if not background["pixels"] or not present:
        return None
    mu0, sd0 = background["mean"], background["std"]
    return sum((c["mean"] - mu0) ** 2 / max(c["std"] ** 2 + sd0**2, FISHER_EPS) for c in present) / len(present)


def plan_clahe(fingerprint: Mapping[str, Any], channels: list[int] | None) -> dict[str, Any]:
    """The planned `clahe` (module docstring) for the kept `channels` (None: all), with each kept
    channel's p99.5 - p0.5 under "spread"."""
    dtype = fingerprint["intensity"]["dtype"]
    if dtype not in DTYPE_RANGE:
        return {
            "value": None,
            "source": "planned",
            "why": f"{dtype} images: no dtype range to compare the intensities with (only uint8, uint16); no CLAHE",
        }
    names = list(fingerprint["channels"]["names"])
    kept = [names[i] for i in channels] if channels else names
    stats = fingerprint["intensity"]["channels"]
    spread = {name: stats[name]["p99.5"] - stats[name]["p0.5"] for name in kept}
    limit = NARROW_RANGE * DTYPE_RANGE[dtype]
    narrow = all(v < limit for v in spread.values())
    shown = ", ".join(f"{name} {v:.4g}" for name, v in spread.items())
    why = (
        f"p99.5 - p0.5 ({shown}) {'<' if narrow else 'not all <'} {NARROW_RANGE:g} x {dtype} range "
        f"{DTYPE_RANGE[dtype]} = {limit:g}: {'narrow, CLAHE' if narrow else 'no CLAHE'}"
    )
    return {"value": CLAHE_CLIP if narrow else None, "source": "planned", "spread": spread, "why": why}


def plan_class_weights(fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse-frequency class weights of the fingerprint (recorded, see the module docstring)."""
    counts = [int(c["pixels"]) for c in fingerprint["classes"].values()]
    why = (
        "w_k = N / (K n_k) over the fingerprint's in-FOV pixels (compute_class_weights' rule); recorded "
        "only: the eq. 2 weight maps training reads hold stats.json's class_weights (train split; a "
        "k-fold's training swaps in its own)"
    )
    if min(counts) == 0:
        absent = [name for name, c in fingerprint["classes"].items() if int(c["pixels"]) == 0]
        return {"value": None, "source": "planned", "why": f"classes {absent} have no pixel in the train and val cases"}
    total = sum(counts)
    return {"value": [total / (len(counts) * n) for n in counts], "source": "planned", "why": why}
