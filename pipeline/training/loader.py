"""Training patches: every patch a pure function of (seed, epoch, item index).

The training split's normalised cases sit in a MONAI `CacheDataset`; patches come from the
dataset's augmentation preset (`pipeline.transforms.presets`: overlap-tile crop, elastic
deformation, flips, gray values). Item `index` of `epoch` is re-seeded from those three numbers,
so the data do not depend on DataLoader workers, on the number of DDP ranks, or on where a run
was resumed. A step takes `batch_size` patches (all ranks together).
"""

from __future__ import annotations

import logging
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from monai.data import CacheDataset, list_data_collate
from monai.transforms import Compose
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.data.prepared import PreparedDataset
from pipeline.errors import SegpipeError
from pipeline.networks import SegmentationNetwork
from pipeline.training.distributed import Dist
from pipeline.training.settings import TrainSettings
from pipeline.transforms.presets import build_preprocess_transforms, build_train_transforms
from pipeline.transforms.weightmap import compute_class_weights, reweigh_classes

log = logging.getLogger(__name__)


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The transform seed of item `index` of `epoch` (independent of workers and ranks)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0] % (2**31))


class PatchDataset(Dataset):
    """Training patches: key (epoch, index) -> the list of patch dicts of one augmented case.

    Item `index` of `epoch` uses case `perm[index % n]` of a seeded permutation per pass over the
    n cases, and its transforms are seeded with `item_seed(seed, epoch, index)`.
    """

    def __init__(self, cases: CacheDataset, augment: Compose, seed: int) -> None:
        self.cases = cases
        self.augment = augment
        self.seed = seed

    def __len__(self) -> int:
        return len(self.cases)

    def case_index(self, epoch: int, index: int) -> int:
        n = len(self.cases)
        perm = np.random.default_rng([self.seed, epoch, index // n]).permutation(n)
        return int(perm[index % n])

    def __getitem__(self, key: tuple[int, int]) -> list[dict[str, torch.Tensor]]:
        epoch, index = key
        case = dict(self.cases[self.case_index(epoch, index)])
        self.augment.set_random_state(seed=item_seed(self.seed, epoch, index))
        out = self.augment(case)
        return out if isinstance(out, list) else [out]


class StepSampler(Sampler[tuple[int, int]]):
    """Keys (epoch, index) of this rank: step s of the epoch covers items [s*G, (s+1)*G) of all
    ranks (G items per step), rank r takes the r-th contiguous share."""

    def __init__(self, steps: int, items_per_step: int, rank: int, world: int) -> None:
        self.steps, self.items, self.rank, self.world = steps, items_per_step, rank, world
        self.per_rank = items_per_step // world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps * self.per_rank

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for step in range(self.steps):
            first = step * self.items + self.rank * self.per_rank
            for index in range(first, first + self.per_rank):
                yield self.epoch, index


def training_cases(prepared: PreparedDataset, keys: list[str]) -> list[dict[str, np.ndarray]]:
    """The training split as dicts holding only the keys the patch transforms handle."""
    cases = []
    for case in prepared.cases("train"):
        arrays = prepared.load(case)
        missing = [k for k in keys if k not in arrays]
        if missing:
            raise SegpipeError(f"{prepared.manifest_path}: case {case!r} lacks {missing}, needed for training")
        cases.append({k: arrays[k] for k in keys})
    if "weight" in keys:
        fold_class_weights(prepared, cases)
    return cases


def fold_class_weights(prepared: PreparedDataset, cases: list[dict[str, np.ndarray]]) -> None:
    """Give the weight maps of `cases` eq. 2's class term w_c of this training split, in place.

    `segpipe prepare` baked into every weight map the w_c of its own train split (stats.json
    `class_weights`); a k-fold's training part holds other cases, so the held-out fold's labels must
    not weigh on its w_c: recomputed over `cases` (compute_class_weights' rule) and swapped in.
    """
    old, recorded = prepared.stats.get("class_weights"), (prepared.stats.get("cases") or {}).get("train")
    if old is None or recorded is None or sorted(recorded) == prepared.cases("train"):
        return
    try:
        new = compute_class_weights([c["label"] for c in cases], num_classes=len(old))
    except SegpipeError as exc:
        raise SegpipeError(f"{prepared.root}: eq. 2 class weights of this fold's training cases: {exc}") from exc
    log.info(
        "%s: eq. 2 class weights over this fold's %d training cases %s (prepare's train split: %s)",
        prepared.name,
        len(cases),
        np.round(new, 4).tolist(),
        np.round(old, 4).tolist(),
    )
    for case in cases:
        case["weight"] = reweigh_classes(case["weight"], case["label"], old, new)


def patch_keys(settings: TrainSettings) -> list[str]:
    fov = settings.augment["patches"]["fov_key"]
    return ["image", "label", "weight"] + ([fov] if fov else [])


def check_ignore_value(prepared: PreparedDataset, augment: Mapping[str, Any]) -> None:
    """SegpipeError when the card's ignore_value would count in the loss: its pixels are left out of the
    prepared "fov", which masks the loss only as the preset's (`augment`) `patches.fov_key`."""
    ignore = prepared.stats.get("ignore_value")
    if ignore is not None and not augment["patches"]["fov_key"]:
        raise SegpipeError(
            f"configs/augment.yaml: {prepared.name}.patches.fov_key is null, but the card's "
            f"ignore_value {ignore} ({prepared.root / 'stats.json'}) must stay out of the loss; "
            "set fov_key: fov"
        )


def build_loader(
    prepared: PreparedDataset, settings: TrainSettings, model: SegmentationNetwork, ctx: Dist
) -> tuple[DataLoader, StepSampler, int]:
    """The patch loader of this rank; returns (loader, sampler, patches per step and rank)."""
    check_ignore_value(prepared, settings.augment)
    num_samples = int(settings.augment["patches"]["num_samples"])
    batch = int(settings.batch_size)
    if batch % (num_samples * ctx.world):
        raise SegpipeError(
            f"batch_size {batch} must be a multiple of patches.num_samples ({num_samples}, configs/augment.yaml) "
            f"x the number of processes ({ctx.world})"
        )
    patch = int(settings.patch_size)
    out_size = model.valid_output_size(patch) if model.padding == "valid" else patch
    try:
        model.input_size(out_size)
    except SegpipeError as exc:
        raise SegpipeError(f"patch_size {out_size} does not fit network {settings.network}: {exc}") from exc
    dataset, augment_cfg = settings.dataset, settings.augment
    full = build_train_transforms(dataset, model.halo, out_size, augment_cfg)
    n_pre = len(build_preprocess_transforms(dataset, augment_cfg).transforms)
    cache = CacheDataset(
        training_cases(prepared, patch_keys(settings)),
        Compose(full.transforms[:n_pre]),
        cache_rate=1.0,
        num_workers=None,
        copy_cache=False,
        progress=False,
    )
    patches = PatchDataset(cache, Compose(full.transforms[n_pre:]), int(settings.seed))
    sampler = StepSampler(int(settings.steps_per_epoch), batch // num_samples, ctx.rank, ctx.world)
    workers = int(settings.workers)
    loader = DataLoader(
        patches,
        batch_size=sampler.per_rank,
        sampler=sampler,
        num_workers=workers,
        collate_fn=list_data_collate,
        persistent_workers=workers > 0,
        pin_memory=ctx.device.type == "cuda",
    )
    return loader, sampler, batch // ctx.world
