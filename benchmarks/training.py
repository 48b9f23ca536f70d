"""`segpipe bench train`: training throughput (patches/s) and data-wait share, ours vs MONAI.

For each network, the same number of optimizer steps with the same network, loss, optimizer,
batch and patch size through
  (a) our loader: CacheDataset of normalised cases + the dataset's augmentation preset
      (overlap-tile crop, U-Net elastic deformation, flips, gray values), seeded per item;
  (b) a MONAI-standard loader: CacheDataset + RandCropByPosNegLabeld + Rand2DElasticd + flips,
      MONAI's usual training recipe.
Data-wait share = time blocked on the next batch / step time. Input: a prepared dataset
(`--dataset`, default drive) or, when it is not prepared, synthetic vessel-like images.
Ours runs the model in the profile's memory layout (`channels_last`), as `segpipe train` does, in
each precision asked for (default fp32 and bf16, side by side); the MONAI-standard loop in
PyTorch's default (NCHW) and fp32. Every rate is also given as achieved GFLOP/s (the FLOPs of one
step, forward and backward, counted by torch's flop counter) and as a fraction of the machine's
conv peak in that precision, measured by a probe in the same run (`benchmarks.peak`).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pandas as pd
import torch
from monai.data import CacheDataset, DataLoader, list_data_collate, set_track_meta
from monai.transforms import Compose, EnsureTyped, Rand2DElasticd, RandCropByPosNegLabeld, RandFlipd, RandRotate90d

from benchmarks.peak import conv_peak, count_flops, peak_line
from pipeline.config import config_path, load_config, read_config
from pipeline.data.io import write_volume
from pipeline.data.prepared import PreparedDataset, open_prepared, prepared_root
from pipeline.data.settings import check_data_config
from pipeline.errors import SegpipeError
from pipeline.networks import build_network
from pipeline.networks.precision import autocast, check_precision, fp32_output
from pipeline.preprocessing.fingerprint import read_fingerprint
from pipeline.stages.train import load_train_configs
from pipeline.training.distributed import Dist
from pipeline.training.loader import build_loader, patch_keys
from pipeline.training.optim import build_optimizer
from pipeline.training.planning import plan_training
from pipeline.training.settings import resolve_settings
from pipeline.training.supervision import build_loss
from pipeline.transforms.presets import preprocess, preset_section


def synthetic_prepared(root: Path, cases: int = 8, size: int = 512, seed: int = 0) -> PreparedDataset:
    """A DRIVE-like prepared dataset: RGB images with dark random line "vessels" and a round FOV."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    fov = (((yy - size / 2) ** 2 + (xx - size / 2) ** 2) <= (size / 2 - 4) ** 2).astype(np.uint8)
    rows = []
    for i in range(cases):
        label = np.zeros((size, size), np.uint8)
        for _ in range(40):
            r0, c0, r1, c1 = rng.integers(0, size, 4)
            n = max(abs(r1 - r0), abs(c1 - c0)) + 1
            rr, cc = np.linspace(r0, r1, n).astype(int), np.linspace(c0, c1, n).astype(int)
            for d in range(int(rng.integers(1, 4))):
                label[np.clip(rr + d, 0, size - 1), cc] = 1
        label *= fov
        image = (rng.normal(150, 20, (3, size, size)) - 60 * label).clip(0, 255).astype(np.uint8)
        case = f"case_{i:02d}"
        vols = {"image": image, "label": label[None], "weight": np.ones((1, size, size), np.float32), "fov": fov[None]}
        for role, vol in vols.items():
            write_volume(root / role / f"{case}.nii.gz", vol)
        rows.append({"case": case, "split": "train", **{r: f"{r}/{case}.nii.gz" for r in vols}})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    (root / "stats.json").write_text(json.dumps({"synthetic": True}))
    return open_prepared("drive", root)


def _timed(batches: Iterable[Any], steps: int, step_fn) -> tuple[float, float]:
    """(patches/s, data-wait share) over `steps` steps after one warm-up step."""
    it: Iterator[Any] = iter(batches)
    step_fn(next(it))
    wait, n_patches, start = 0.0, 0, time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        batch = next(it)
        wait += time.perf_counter() - t
        n_patches += step_fn(batch)
    total = time.perf_counter() - start
    return n_patches / total, wait / total


def _monai_loader(prepared: PreparedDataset, settings: dict[str, Any], in_size: int, batches: int) -> DataLoader:
    """MONAI-standard patches: pos/neg crops, Rand2DElasticd, flips/rot90, from normalised cases."""
    aug = settings.augment
    num = int(aug["patches"]["num_samples"])
    keys = patch_keys(settings)  # image, label, weight (+ fov)
    data = []
    for case in prepared.cases("train"):
        arrays = prepared.load(case)
        data.append(
            {
                "image": preprocess(prepared.name, arrays["image"], aug),
                **{k: arrays[k].astype(np.float32) for k in keys[1:]},
            }
        )
    transforms = Compose(
        [
            RandCropByPosNegLabeld(keys, "label", (in_size, in_size), pos=1, neg=1, num_samples=num),
            Rand2DElasticd(
                keys,
                spacing=(in_size // 3, in_size // 3),
                magnitude_range=(1, 2),
                prob=float(aug["elastic"]["prob"]),
                mode=["bilinear", "nearest", "bilinear", "nearest"][: len(keys)],
                padding_mode="reflection",
            ),
            RandFlipd(keys, prob=0.5, spatial_axis=0),
            RandFlipd(keys, prob=0.5, spatial_axis=1),
            RandRotate90d(keys, prob=0.5, max_k=3),
            EnsureTyped(keys, track_meta=False),
        ]
    )
    dataset = CacheDataset(data * max(1, batches * num // len(data) + 1), transforms, progress=False)
    workers = int(settings.workers)
    return DataLoader(
        dataset,
        batch_size=int(settings.batch_size) // num,
        shuffle=True,
        num_workers=workers,
        collate_fn=list_data_collate,
        persistent_workers=workers > 0,
    )


def run_benchmark(
    networks: list[str],
    *,
    steps: int = 20,
    batch_size: int | None = None,
    patch_size: int | None = None,
    workers: int | None = None,
    threads: int | None = None,
    dataset: str = "drive",
    precisions: tuple[str, ...] = ("fp32", "bf16"),
) -> pd.DataFrame:
    """Print and return the table: per network, ours (per precision) vs MONAI-standard patches/s,
    data wait, GFLOP/s and the fraction of the conv peak."""
    if threads:
        torch.set_num_threads(threads)
    for precision in precisions:
        check_precision(precision, "cpu", "segpipe bench train --precision")
    peaks = {p: conv_peak(p) for p in dict.fromkeys(("fp32", *precisions))}
    set_track_meta(False)
    overrides = {
        k: v
        for k, v in {"batch_size": batch_size, "patch_size": patch_size, "workers": workers}.items()
        if v is not None
    }
    with tempfile.TemporaryDirectory() as tmp:
        try:
            prepared = open_prepared(dataset, prepared_root(read_config("data", check_data_config), dataset))
            source = f"prepared {dataset}"
        except SegpipeError:
            prepared = synthetic_prepared(Path(tmp) / "synthetic")
            source = "synthetic DRIVE-like images"
        rows = []
        for network in networks:
            settings = resolve_settings(load_train_configs(prepared.name), prepared.name, network, overrides=overrides)
            if source.startswith("prepared"):  # as `segpipe train` plans (the synthetic set is DRIVE's: explicit)
                settings = plan_training(read_fingerprint(prepared.root, dataset), settings).settings
            torch.manual_seed(0)
            channels = settings.augment["channels"]
            model = build_network(
                settings.network,
                len(channels) if channels else prepared.in_channels,
                1,
                **settings.network_config,
            )
            loss_fn = build_loss(settings.loss, network=model)
            optimizer = build_optimizer(model, settings.optimizer)
            keys = patch_keys(settings)
            model.train()

            def stepper(layout: torch.memory_format, precision: str) -> Callable[[dict[str, torch.Tensor]], int]:
                """One optimizer step on a batch, with the model and the batch in `layout`."""
                model.to(memory_format=layout)

                def step(batch: dict[str, torch.Tensor]) -> int:
                    image = torch.as_tensor(batch["image"]).contiguous(memory_format=layout)
                    mask = torch.as_tensor(batch[keys[3]]) if len(keys) > 3 else None
                    with autocast(precision, image.device):
                        output = model(image)
                    loss = loss_fn(
                        fp32_output(output),
                        torch.as_tensor(batch["label"]).long(),
                        torch.as_tensor(batch["weight"]),
                        mask,
                    )
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    return int(image.shape[0])

                return step

            layout = torch.channels_last if settings.channels_last else torch.contiguous_format
            in_size = model.input_size(int(settings.patch_size))
            if model.padding == "valid":
                raise SegpipeError("bench train compares same-padding networks (MONAI crops input = output)")
            batch = int(settings.batch_size)
            probe = {k: torch.zeros(batch, 1, in_size, in_size) for k in keys}
            probe["image"] = torch.zeros(batch, model.in_channels, in_size, in_size)
            flops = count_flops(lambda: stepper(layout, "fp32")(probe)) / batch  # per patch
            row: dict[str, Any] = {
                "network": settings.network,
                "patch": in_size,
                "batch": batch,
                "GFLOP_per_patch": flops / 1e9,
            }
            for precision in precisions:  # as `segpipe train` runs
                loader, _, _ = build_loader(
                    prepared, settings.with_changes(steps_per_epoch=steps + 1), model, Dist(0, 1, torch.device("cpu"))
                )
                rate, wait = _timed(loader, steps, stepper(layout, precision))
                row.update(
                    {
                        f"{precision}_patches_s": rate,
                        f"{precision}_wait": wait,
                        f"{precision}_GFLOP_s": rate * flops / 1e9,
                        f"{precision}_of_peak": rate * flops / 1e9 / peaks[precision],
                    }
                )
            monai = _timed(
                _monai_loader(prepared, settings, in_size, steps + 1), steps, stepper(torch.contiguous_format, "fp32")
            )
            row.update(
                {
                    "monai_fp32_patches_s": monai[0],
                    "monai_wait": monai[1],
                    "monai_of_peak": monai[0] * flops / 1e9 / peaks["fp32"],
                }
            )
            row.update({f"{p}/monai": row[f"{p}_patches_s"] / monai[0] for p in precisions})
            rows.append(row)
    table = pd.DataFrame(rows)
    print(
        f"bench train: {steps} steps per loader, {torch.get_num_threads()} torch threads, {source}, "
        f"workers {settings.workers}, channels-last {settings.channels_last}"
    )
    print(peak_line(peaks))
    print(table.T.to_string(header=False, float_format=lambda v: f"{v:.3f}"))
    return table


def run_quality(
    dataset: str = "drive",
    network: str = "unet",
    *,
    baseline_seconds: float | None = None,
    baseline_input: str = "monai",
    threads: int | None = None,
    seed: int = 0,
    workdir: Path | None = None,
    equal_steps: bool = False,
    overrides: dict[str, Any] | None = None,
) -> pd.DataFrame:
    """`segpipe bench quality`: issue 6's quality bar, side by side in one run.

    (a) `segpipe train DATASET NETWORK` with the current profile (its step count),
    (b) the MONAI-standard baseline (`benchmarks.baseline`) for `baseline_seconds` of wall time
        (default: the time (a) took),
    both scored by `evaluate_probabilities` (test split; pixels pooled inside the FOV; F1 at 0.5 and
    at the best-F1 threshold of the validation split). Ours is predicted with the inference settings
    of `segpipe evaluate` (configs/evaluate.yaml, e.g. flip TTA); the baseline with MONAI's
    SlidingWindowInferer as the issue specifies. `baseline_input`: "monai" feeds the baseline
    RGB images z-scored per channel (MONAI NormalizeIntensityd, no channel selection, no CLAHE);
    "ours" gives it our preprocessing, to separate the input's share of the difference.
    `equal_steps`: the baseline trains for our step count with our batch and patch size instead of
    for a wall time. `overrides`: training settings for (a), as `segpipe train --set`.
    Cells (reference instances): SEG of the connected components at 0.5 for both, and SEG of the
    instance maps: ours with the settings training chose, the baseline's chosen the same way on its
    validation probabilities.
    Training runs log to a throw-away MLflow store in the work directory.
    """
    import copy
    import os

    from benchmarks.baseline import evaluate_probabilities, predict_baseline, train_baseline
    from pipeline.evaluation.settings import evaluate_config
    from pipeline.inference import inference_network, load_settings, predict
    from pipeline.inference.settings import settings_from_config
    from pipeline.networks import read_checkpoint
    from pipeline.postprocessing.instances import InstanceSettings
    from pipeline.stages.train import train
    from pipeline.training.instance_output import median_object_area

    if threads:
        torch.set_num_threads(threads)
    prepared = open_prepared(dataset, prepared_root(read_config("data", check_data_config), dataset))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(workdir or tmp)
        old_uri = os.environ.get("MLFLOW_TRACKING_URI")
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'bench-mlflow.db'}"
        try:
            ours = train(dataset, network, models_dir=work / "models", prepared=prepared, overrides=overrides)
        finally:
            if old_uri is None:
                os.environ.pop("MLFLOW_TRACKING_URI")
            else:
                os.environ["MLFLOW_TRACKING_URI"] = old_uri
        ckpt = read_checkpoint(ours.checkpoint)
        inference = settings_from_config(load_config("inference"), str(config_path("inference")))
        overrides = evaluate_config(load_config("evaluate"), str(config_path("evaluate"))).inference
        settings = load_settings(inference, **overrides, intensity="none")  # as `segpipe evaluate`
        net = inference_network(ours.checkpoint, settings)
        recorded = ckpt.get("instances")
        objects = InstanceSettings.from_dict(recorded["settings"], str(ours.checkpoint)) if recorded else None
        median_area = median_object_area(read_fingerprint(prepared.root, dataset)) or 1.0
        ours_scores = evaluate_probabilities(
            prepared,
            lambda img: predict(net, img, settings=settings),
            augment=ckpt["augment"],
            objects=objects,
            median_area=median_area,
        )
        base_augment = copy.deepcopy(dict(preset_section(load_config("augment"), dataset)))
        if baseline_input == "monai":
            base_augment.update(channels=None, clahe=None, normalize="zscore")
        budget = ours.wall_seconds if baseline_seconds is None else baseline_seconds
        if equal_steps:
            config = json.loads((ours.checkpoint.parent / "config.json").read_text())
            baseline = train_baseline(
                prepared,
                float("inf"),
                seed=seed,
                augment=base_augment,
                max_steps=ours.steps,
                batch_size=int(config["batch_size"]),
                patch=int(config["patch_size"]),
            )
        else:
            baseline = train_baseline(prepared, budget, seed=seed, augment=base_augment)
        base_scores = evaluate_probabilities(
            prepared, lambda img: predict_baseline(baseline.model, img), augment=base_augment, median_area=median_area
        )
    rows = []
    for name, wall, patches, scores in (
        (f"segpipe {network} ({ckpt['network']})", ours.wall_seconds, None, ours_scores),
        (f"MONAI BasicUNet baseline (input: {baseline_input})", baseline.wall_seconds, baseline.patches, base_scores),
    ):
        rows.append(
            {
                "model": name,
                "train_s": wall,
                "patches": patches,
                "auc": scores["auc"],
                "f1@0.5": scores["at_0.5"]["f1"],
                "f1@val": scores["at_val"]["f1"],
                "threshold": scores["at_val"]["threshold"],
                "acc@val": scores["at_val"]["accuracy"],
                "sens@val": scores["at_val"]["sensitivity"],
                "spec@val": scores["at_val"]["specificity"],
                **{k: scores[k] for k in ("seg_components", "seg", "instances") if k in scores},
            }
        )
    table = pd.DataFrame(rows)
    print(f"bench quality: {dataset} test split, pixels pooled inside the FOV, {torch.get_num_threads()} threads")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(
        f"ratios ours/baseline: AUC {rows[0]['auc'] / rows[1]['auc']:.4f}, "
        f"F1@val {rows[0]['f1@val'] / rows[1]['f1@val']:.4f}, "
        f"training time {rows[0]['train_s'] / rows[1]['train_s']:.2f}"
        + (f", SEG {rows[0]['seg'] / rows[1]['seg']:.4f}" if "seg" in rows[0] and "seg" in rows[1] else "")
    )
    return table
