"""The MONAI-standard baseline of issue 6's quality bar, and the scoring shared by every network.

Baseline recipe (issue 6, "Quality bar"), built from MONAI blocks only:

- network: ``monai.networks.nets.BasicUNet(spatial_dims=2, in_channels=C, out_channels=1,
  features=(16, 16, 32, 64, 128, 16))`` (MONAI defaults otherwise: LeakyReLU 0.1, instance norm,
  transposed-conv upsampling, same padding);
- loss: ``DiceCELoss(sigmoid=True)``, MONAI defaults otherwise (per-sample soft Dice with
  smooth 1e-5, plus binary cross-entropy with logits, weights 1 + 1). Vessel vs background is a
  binary problem: one logit channel with a sigmoid is the usual MONAI formulation, and with one
  channel ``DiceCELoss`` uses ``BCEWithLogitsLoss`` for its CE term;
- data: the training cases in a ``CacheDataset``; random 64² patches by
  ``RandCropByPosNegLabeld`` (pos = neg = 1, centres anywhere in the whole image, not only inside
  the field of view; foreground/background indices cached by ``FgBgToIndicesd``, MONAI's
  documented speed-up), then ``RandFlipd`` on each axis (p 0.5) and ``RandRotate90d`` (p 0.5,
  k in 1..3); ``samples_per_image`` patches per drawn image, ``batch_size / samples_per_image``
  images per batch (shuffled epochs, last incomplete batch dropped; with fewer training images than
  that, images drawn with replacement), MONAI ``DataLoader``;
- optimiser: Adam, lr 1e-3, constant, batch 32 patches;
- budget: wall-clock seconds counted from the start of ``train_baseline`` (reading and caching the
  cases included, then every step with its data loading); training stops after the step that
  crosses the budget. No validation and no checkpoint selection: the last weights are the model;
- inference: ``SlidingWindowInferer(roi_size=(128, 128), overlap=0.25, mode="gaussian")`` on the
  whole image, then a sigmoid.

Input: ``pipeline.transforms.presets.preprocess`` with the given ``augment`` section; with the
dataset's configs/augment.yaml section, that is the same normalised image as our pipeline (for DRIVE e.g. green
channel, CLAHE, z-score), not MONAI's ``ScaleIntensityd``: at the same budget the comparison then
measures the training recipe and the network, not the input normalisation. A section with
``channels: null, clahe: null, normalize: zscore`` gives MONAI's ``NormalizeIntensityd`` (per
channel) of the raw RGB image instead.

``evaluate_probabilities`` scores any predictor the same way (DRIVE protocol of Staal et al. 2004
as used by the DRIVE literature, e.g. orobix/retina-unet): every test pixel inside the field of
view pooled over all test images; AUC-ROC, and F1, accuracy, sensitivity, specificity, precision
at threshold 0.5 and at the best-F1 threshold picked on the (pooled) validation split; plus the
mean per-image Dice. Datasets without a field of view use every pixel.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, get_track_meta, set_track_meta
from monai.inferers import SlidingWindowInferer
from monai.losses import DiceCELoss
from monai.networks.nets import BasicUNet
from monai.transforms import (
    Compose,
    DeleteItemsd,
    EnsureTyped,
    FgBgToIndicesd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotate90d,
)
from torch.utils.data import RandomSampler

from pipeline.data.prepared import PreparedDataset
from pipeline.errors import SegpipeError
from pipeline.metrics import best_f1_threshold, confusion, label_instances, roc_auc
from pipeline.postprocessing.instances import InstanceSettings
from pipeline.postprocessing.planning import plan_instances, pooled_seg
from pipeline.postprocessing.stitching import instances_of
from pipeline.transforms.presets import preprocess, preset

FEATURES = (16, 16, 32, 64, 128, 16)
ROI_SIZE = (128, 128)
OVERLAP = 0.25
LEARNING_RATE = 1e-3
SCORE_KEYS = ("f1", "accuracy", "sensitivity", "specificity", "precision", "iou")


@dataclass(frozen=True)
class BaselineResult:
    """A trained baseline: the model (eval mode, CPU), optimizer steps, patches seen, seconds used."""

    model: BasicUNet
    steps: int
    patches: int
    wall_seconds: float
    cache_seconds: float  # part of wall_seconds spent reading, normalising and caching the cases
    final_loss: float  # mean DiceCE loss of the last 20 steps
    augment: dict[str, Any]  # the configs/augment.yaml section `preprocess` used: score with the same


def build_baseline_network(in_channels: int) -> BasicUNet:
    """The issue's BasicUNet: (B, in_channels, H, W) -> logits (B, 1, H, W), H, W multiples of 16."""
    return BasicUNet(spatial_dims=2, in_channels=in_channels, out_channels=1, features=FEATURES)


def baseline_transforms(patch: int, samples_per_image: int) -> Compose:
    """Cached part (typing, fg/bg indices) then the random part: crop, flips, rot90.

    In: {"image": float32 (C, H, W), "label": float32 (1, H, W)}; out: a list of
    `samples_per_image` dicts with image (C, patch, patch) and label (1, patch, patch) tensors.
    """
    keys = ["image", "label"]
    return Compose(
        [
            EnsureTyped(keys, data_type="tensor", dtype=torch.float32, track_meta=False),
            FgBgToIndicesd("label", fg_postfix="_fg_indices", bg_postfix="_bg_indices"),
            RandCropByPosNegLabeld(
                keys,
                label_key="label",
                spatial_size=(patch, patch),
                pos=1.0,
                neg=1.0,
                num_samples=samples_per_image,
                fg_indices_key="label_fg_indices",
                bg_indices_key="label_bg_indices",
            ),
            DeleteItemsd(["label_fg_indices", "label_bg_indices"]),
            RandFlipd(keys, prob=0.5, spatial_axis=0),
            RandFlipd(keys, prob=0.5, spatial_axis=1),
            RandRotate90d(keys, prob=0.5, max_k=3, spatial_axes=(0, 1)),
        ]
    )


def _train_items(prepared: PreparedDataset, augment: Mapping[str, Any]) -> list[dict[str, np.ndarray]]:
    items = []
    for case in prepared.load_split("train"):
        image = preprocess(prepared.name, case["image"], augment)
        items.append({"image": image, "label": case["label"].astype(np.float32)})
    return items


def train_baseline(
    prepared: PreparedDataset,
    seconds: float,
    *,
    seed: int = 0,
    batch_size: int = 32,
    patch: int = 64,
    samples_per_image: int = 4,
    workers: int = 0,
    max_steps: int | None = None,
    augment: Mapping[str, Any],
    progress: bool = True,
) -> BaselineResult:
    """Train the baseline on the train split for `seconds` of wall clock (module docstring).

    `max_steps` also stops training after that many steps (tests use it to be independent of
    timing). `augment`: the dataset's configs/augment.yaml section for `preprocess` (the result records
    it so that scoring normalises test images the same way).
    `workers`: DataLoader worker processes; 0 loads in this process. On the 2-core CPU one worker
    measured no faster on DRIVE (patch sampling ~20 ms of a ~230 ms step; the worker competes
    with the two compute threads).
    """
    if seconds <= 0 or (max_steps is not None and max_steps < 1):
        raise SegpipeError(f"baseline: expected seconds > 0 and max_steps >= 1, got {seconds}, {max_steps}")
    if patch % 16 or batch_size % samples_per_image:
        raise SegpipeError(
            f"baseline: patch must be a multiple of 16 (BasicUNet) and batch_size a multiple of "
            f"samples_per_image; got patch {patch}, batch_size {batch_size}, samples_per_image {samples_per_image}"
        )
    images_per_batch = batch_size // samples_per_image
    start = time.perf_counter()
    torch.manual_seed(seed)
    augment = dict(preset(prepared.name, augment))
    items = _train_items(prepared, augment)
    if not items:
        raise SegpipeError(f"{prepared.manifest_path}: no training cases for the baseline")
    model = build_baseline_network(items[0]["image"].shape[0])
    # copy_cache=False: the random part crops new tensors and never writes into the cached arrays
    # (MONAI's documented case for it); it saves a deep copy of the whole image per drawn patch set.
    dataset = CacheDataset(items, baseline_transforms(patch, samples_per_image), progress=False, copy_cache=False)
    # fewer training images than a batch draws (the 7 HeLa frames): images drawn with replacement
    few = len(items) < images_per_batch
    sampler = (
        RandomSampler(
            dataset, replacement=True, num_samples=images_per_batch * 64, generator=torch.Generator().manual_seed(seed)
        )
        if few
        else None
    )
    loader = DataLoader(
        dataset,
        batch_size=images_per_batch,
        shuffle=not few,
        sampler=sampler,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )
    cache_seconds = time.perf_counter() - start
    loss_fn = DiceCELoss(sigmoid=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    model.train()
    steps, losses = 0, []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=max_steps, desc="baseline", unit="step", leave=False)
    track_meta = get_track_meta()
    set_track_meta(False)  # plain tensors: MONAI's metadata tracking costs time and is unused here
    try:
        while True:
            for batch in loader:  # image (B, C, patch, patch), label (B, 1, patch, patch)
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(batch["image"]), batch["label"])
                loss.backward()
                optimizer.step()
                steps += 1
                losses.append(loss.item())
                elapsed = time.perf_counter() - start
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{losses[-1]:.3f}",
                        patches_s=f"{steps * batch_size / elapsed:.0f}",
                        left_s=f"{max(seconds - elapsed, 0):.0f}",
                    )
                if elapsed >= seconds or (max_steps is not None and steps >= max_steps):
                    wall = time.perf_counter() - start
                    model.eval()
                    return BaselineResult(
                        model, steps, steps * batch_size, wall, cache_seconds, float(np.mean(losses[-20:])), augment
                    )
    finally:
        set_track_meta(track_meta)
        if bar is not None:
            bar.close()


def predict_baseline(model: torch.nn.Module, image: np.ndarray, *, sw_batch_size: int = 1) -> np.ndarray:
    """Foreground probabilities (H, W) float32 of a normalised image (C, H, W), whole image.

    MONAI ``SlidingWindowInferer(roi_size=(128, 128), overlap=0.25, mode="gaussian")`` then a
    sigmoid; `sw_batch_size` windows per forward pass changes speed only.
    """
    if image.ndim != 3:
        raise SegpipeError(f"baseline: expected an image (C, H, W), got shape {image.shape}")
    inferer = SlidingWindowInferer(roi_size=ROI_SIZE, sw_batch_size=sw_batch_size, overlap=OVERLAP, mode="gaussian")
    model.eval()
    with torch.inference_mode():
        logits = inferer(torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None], model)
    return torch.sigmoid(logits)[0, 0].numpy()


def _foreground(probs: np.ndarray, shape: tuple[int, int], case: str) -> np.ndarray:
    """(H, W) foreground probabilities from a predictor's (H, W), (1, H, W) or softmax (K, H, W)
    (1 - P(background): the border target's K = 3 too)."""
    p = np.asarray(probs)
    if p.ndim == 3 and p.shape[0] == 1:
        p = p[0]
    elif p.ndim == 3 and p.shape[0] > 1:
        p = np.clip(1.0 - p[0], 0.0, 1.0)
    if p.shape != shape:
        raise SegpipeError(
            f"evaluate: case {case!r}: expected probabilities (H, W), (1, H, W) or softmax (K, H, W) with "
            f"(H, W) = {shape}, got {np.asarray(probs).shape}"
        )
    if not np.all(np.isfinite(p)) or p.min() < 0 or p.max() > 1:
        raise SegpipeError(f"evaluate: case {case!r}: probabilities must be finite and in [0, 1]")
    return p.astype(np.float32, copy=False)


def _predict_split(
    dataset: PreparedDataset,
    split: str,
    predict_fn: Callable[[np.ndarray], np.ndarray],
    augment: Mapping[str, Any],
) -> list[dict[str, Any]]:
    """Per case: name, probabilities (H, W), label (H, W) bool, mask (H, W) bool or None."""
    cases = dataset.cases(split)
    if not cases:
        raise SegpipeError(f"{dataset.manifest_path}: no {split} cases to evaluate")
    out = []
    for case in cases:
        arrays = dataset.load(case)
        label = arrays["label"][0].astype(bool)
        raw = np.asarray(predict_fn(preprocess(dataset.name, arrays["image"], augment)))
        probs = _foreground(raw, label.shape, case)
        fov = arrays.get("fov")
        out.append(
            {
                "case": case,
                "probs": probs,
                "label": label,
                "mask": None if fov is None else fov[0] > 0,
                "instances": arrays["instances"][0].astype(np.int64) if "instances" in arrays else None,
                "channels": raw if raw.ndim == 3 else probs[None],
            }
        )
    return out


def _seg(results: list[dict[str, Any]], objects: InstanceSettings | None) -> float:
    """Pooled SEG of the cases with reference instances: `objects`' instance maps, or (None) the
    connected components at 0.5."""
    return pooled_seg(
        (
            label_instances(r["probs"] >= 0.5) if objects is None else instances_of(r["channels"], objects),
            r["instances"],
        )
        for r in results
        if r["instances"] is not None
    )


def _pooled(results: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and labels of every valid pixel of every image, concatenated (N,)."""
    scores = [r["probs"] if r["mask"] is None else r["probs"][r["mask"]] for r in results]
    labels = [r["label"] if r["mask"] is None else r["label"][r["mask"]] for r in results]
    return np.concatenate([s.ravel() for s in scores]), np.concatenate([g.ravel() for g in labels])


def _at(scores: np.ndarray, gt: np.ndarray, results: list[dict[str, Any]], threshold: float) -> dict[str, float]:
    """Pooled confusion scores at `threshold` plus the mean per-image Dice."""
    pooled = confusion(scores >= threshold, gt).scores()
    out = {"threshold": float(threshold), **{k: pooled[k] for k in SCORE_KEYS}}
    out["mean_dice"] = float(np.mean([confusion(r["probs"] >= threshold, r["label"], r["mask"]).dice for r in results]))
    return out


def evaluate_probabilities(
    dataset: PreparedDataset,
    predict_fn: Callable[[np.ndarray], np.ndarray],
    *,
    augment: Mapping[str, Any],
    split: str = "test",
    val_threshold: bool = True,
    objects: InstanceSettings | None = None,
    median_area: float = 1.0,
) -> dict[str, Any]:
    """Score a predictor on `split` with the DRIVE protocol (module docstring).

    predict_fn: normalised image (C, H, W) float32 (``preprocess`` with `augment`) -> foreground
    probabilities (H, W), (1, H, W) or softmax (2, H, W) in [0, 1].
    Returns {"split", "images", "pixels", "auc", "at_0.5": scores, "at_val": scores (when
    `val_threshold`; also "val_f1", the pooled validation F1 at that threshold), "per_image":
    [{"case", "dice", "dice_val"}], "predict_seconds"}; scores hold threshold, f1, accuracy,
    sensitivity, specificity, precision, iou (pooled) and mean_dice (mean of per-image Dice).
    Cells (reference instances): "seg_components" (SEG of the components at 0.5) and "seg", "instances":
    SEG of the instance maps of `objects`, or when None of the settings `plan_instances` chooses on
    the validation split (objects of median area `median_area`, as training chooses them).
    """
    augment = dict(preset(dataset.name, augment))
    start = time.perf_counter()
    results = _predict_split(dataset, split, predict_fn, augment)
    val_results = _predict_split(dataset, "val", predict_fn, augment) if val_threshold else []
    predict_seconds = time.perf_counter() - start
    scores, gt = _pooled(results)
    out: dict[str, Any] = {
        "split": split,
        "images": len(results),
        "pixels": int(scores.size),
        "auc": roc_auc(scores, gt),
        "at_0.5": _at(scores, gt, results, 0.5),
    }
    per_image = [{"case": r["case"], "dice": confusion(r["probs"] >= 0.5, r["label"], r["mask"]).dice} for r in results]
    if val_threshold:
        threshold, val_f1 = best_f1_threshold(*_pooled(val_results))
        out["at_val"] = {**_at(scores, gt, results, threshold), "val_f1": val_f1}
        for row, r in zip(per_image, results):
            row["dice_val"] = confusion(r["probs"] >= threshold, r["label"], r["mask"]).dice
    out["per_image"] = per_image
    out["predict_seconds"] = predict_seconds
    if any(r["instances"] is not None for r in results):  # cells: SEG of the components, and of `objects`
        out["seg_components"] = _seg(results, None)
        if objects is None and any(r["instances"] is not None for r in val_results):
            objects = plan_instances(
                [(r["channels"], r["instances"]) for r in val_results if r["instances"] is not None], median_area
            ).settings
        if objects is not None:
            out["seg"], out["instances"] = _seg(results, objects), objects.describe()
    return out
