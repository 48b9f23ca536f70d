"""`segpipe bench transforms`: our transforms side by side with MONAI in one run (not a test).

Three measurements, on synthetic data, torch on one thread, best of `rounds` interleaved rounds
(the machine is shared, the best round is the least disturbed one):

1. patches/s of the training chain (`build_train_transforms`, without the cached normalisation)
   on a DRIVE-sized (3x584x565) and a CTC-sized (1x512x512) image, against the equivalent MONAI
   chain: BorderPadd(reflect, halo) [cached] -> RandCropByPosNegLabeld (negatives in the FOV via
   image_key) -> Rand2DElasticd (control spacing = patch/2, magnitude sigma, reflection) ->
   CenterSpatialCropd of label/weight/fov -> the same flips, rot90, gray values and EnsureTyped.
   With MONAI's metadata tracking on (its default) and off (`monai.data.set_track_meta(False)`).
2. ms per patch of the elastic deformation alone (image, label, weight), ours vs Rand2DElasticd
   at the same output size.
3. The U-Net eq. 2 weight map: windowed exact version vs the brute force (one full-image distance
   transform per cell), with the largest difference between the two.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Mapping

import numpy as np
import torch

from pipeline.config import load_config
from pipeline.transforms.weightmap import unet_weight_map, unet_weight_map_reference


def _disks(shape: tuple[int, int], n: int, radius: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """(H, W) int32 instance image of n random disks (later ones paint over earlier ones)."""
    inst = np.zeros(shape, dtype=np.int32)
    for cell in range(1, n + 1):
        r = int(rng.integers(*radius))
        cy, cx = (int(rng.integers(0, s)) for s in shape)
        y0, y1, x0, x1 = max(cy - r, 0), min(cy + r + 1, shape[0]), max(cx - r, 0), min(cx + r + 1, shape[1])
        yy, xx = np.ogrid[y0:y1, x0:x1]
        inst[y0:y1, x0:x1][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = cell
    return inst


def synthetic_case(kind: str, seed: int = 0) -> dict[str, np.ndarray]:
    """A prepared-data dict: "drive" 3x584x565 vessels-like lines in a FOV disk, "ctc" 1x512x512 cells."""
    from scipy import ndimage as ndi
    from skimage.draw import line

    rng = np.random.default_rng(seed)
    if kind == "drive":
        shape = (584, 565)
        label = np.zeros(shape, dtype=bool)
        for _ in range(60):
            r0, c0, r1, c1 = (int(rng.integers(0, s)) for s in shape * 2)
            rr, cc = line(r0, c0, r1, c1)
            label[rr, cc] = True
        label = ndi.binary_dilation(label, iterations=1)
        yy, xx = np.ogrid[: shape[0], : shape[1]]
        fov = (yy - shape[0] / 2) ** 2 + (xx - shape[1] / 2) ** 2 <= (0.47 * min(shape)) ** 2
        label &= fov
        image = (rng.integers(0, 80, (3, *shape)) + 120 * label).astype(np.uint8)
        weight = np.where(label, 3.0, 0.6).astype(np.float32)
        return {
            "image": image,
            "label": label[None].astype(np.uint8),
            "weight": weight[None],
            "fov": fov[None].astype(np.uint8),
        }
    shape = (512, 512)
    inst = _disks(shape, 30, (10, 25), rng)
    image = (rng.integers(0, 60, (1, *shape)) + 140 * (inst > 0)).astype(np.uint8)
    weight = unet_weight_map(inst, class_weights=[0.6, 3.0])
    return {"image": image, "label": (inst > 0)[None].astype(np.uint8), "weight": weight[None]}


def monai_chain(cfg: Mapping[str, Any], halo: int, patch: int, keys: list[str], fov_key: str | None) -> tuple[Any, Any]:
    """The MONAI equivalent of our chain: (cached part, random part)."""
    from monai.transforms import (
        BorderPadd,
        CenterSpatialCropd,
        Compose,
        EnsureTyped,
        Rand2DElasticd,
        RandAdjustContrastd,
        RandCropByPosNegLabeld,
        RandFlipd,
        RandGaussianNoised,
        RandRotate90d,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )

    pc, ec, gc = cfg["patches"], cfg["elastic"], cfg["gray"]
    size = patch + 2 * halo
    labels = [k for k in keys if k != "image"]
    cached = Compose([BorderPadd(keys, spatial_border=halo, mode="reflect")] if halo else [])
    random = Compose(
        [
            RandCropByPosNegLabeld(
                keys,
                "label",
                spatial_size=size,
                pos=pc["pos"],
                neg=pc["neg"],
                num_samples=pc["num_samples"],
                image_key=fov_key,
                image_threshold=0.0,
            ),
            Rand2DElasticd(
                keys,
                spacing=(size / 2, size / 2),
                magnitude_range=(ec["sigma"], ec["sigma"]),
                prob=ec["prob"],
                spatial_size=(size, size),
                padding_mode="reflection",
                mode=[ec["image_mode"], "nearest", "bilinear"] + ["nearest"] * (len(keys) - 3),
            ),
            CenterSpatialCropd(labels, roi_size=patch),
            RandFlipd(keys, prob=cfg["flip_prob"], spatial_axis=0),
            RandFlipd(keys, prob=cfg["flip_prob"], spatial_axis=1),
            RandRotate90d(keys, prob=cfg["rot90_prob"], max_k=3),
            RandAdjustContrastd("image", prob=gc["gamma_prob"], gamma=tuple(gc["gamma"])),
            RandScaleIntensityd("image", factors=gc["scale"], prob=gc["scale_prob"]),
            RandShiftIntensityd("image", offsets=gc["shift"], prob=gc["shift_prob"]),
            RandGaussianNoised("image", prob=gc["noise_prob"], std=gc["noise_std"]),
            EnsureTyped(keys, data_type="tensor", track_meta=False),
        ]
    )
    return cached, random


def _best(fns: dict[str, Callable[[], object]], repeat: int, rounds: int) -> dict[str, float]:
    """Best (over interleaved rounds) seconds per call of each function."""
    for fn in fns.values():
        fn()  # warm-up
    best = {name: math.inf for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(repeat):
                fn()
            best[name] = min(best[name], (time.perf_counter() - start) / repeat)
    return best


def bench_chains(halo: int, patch: int, repeat: int, rounds: int) -> list[tuple[str, float, float]]:
    """(label, ours patches/s, MONAI patches/s) for DRIVE- and CTC-sized images, meta on and off."""
    from monai.data import set_track_meta

    from pipeline.transforms.presets import build_preprocess_transforms, build_train_transforms

    augment = load_config("augment")
    rows = []
    for kind, dataset in (("drive", "drive"), ("ctc", "hela")):
        cfg = augment[dataset]
        fov_key = cfg["patches"]["fov_key"]
        keys = ["image", "label", "weight"] + ([fov_key] if fov_key else [])
        case = build_preprocess_transforms(dataset, cfg)(synthetic_case(kind))
        n_pre = len(build_preprocess_transforms(dataset, cfg).transforms)
        ours = build_train_transforms(dataset, halo, patch, cfg)
        ours_random = type(ours)(ours.transforms[n_pre:])
        cached, theirs = monai_chain(cfg, halo, patch, keys, fov_key)
        case_monai = cached(dict(case))
        ours_random.set_random_state(0)
        theirs.set_random_state(0)
        out_ours, out_theirs = ours_random(dict(case)), theirs(dict(case_monai))
        for key in keys:
            if out_ours[0][key].shape != out_theirs[0][key].shape:
                raise RuntimeError(f"bench: '{key}' {out_ours[0][key].shape} vs MONAI {out_theirs[0][key].shape}")
        per_call = cfg["patches"]["num_samples"]
        for meta in (True, False):
            set_track_meta(meta)
            try:
                fns = {"ours": lambda: ours_random(dict(case)), "monai": lambda: theirs(dict(case_monai))}
                t = _best(fns, repeat, rounds)
            finally:
                set_track_meta(True)
            shape = "x".join(map(str, case["image"].shape))
            label = f"{kind} {shape}, meta {'on' if meta else 'off'}"
            rows.append((label, per_call / t["ours"], per_call / t["monai"]))
    return rows


def bench_elastic(size: int, repeat: int, rounds: int, sigma: float = 10.0) -> tuple[float, float]:
    """ms per (image, label, weight) patch of size^2: ours, MONAI Rand2DElasticd."""
    from monai.transforms import Rand2DElasticd

    from pipeline.transforms.elastic import RandElasticd

    rng = np.random.default_rng(0)
    data = {
        "image": torch.from_numpy(rng.random((1, size, size), dtype=np.float32)),
        "label": torch.from_numpy((rng.random((1, size, size)) > 0.5).astype(np.uint8)),
        "weight": torch.from_numpy(rng.random((1, size, size), dtype=np.float32)),
    }
    keys, modes = list(data), ["bilinear", "nearest", "bilinear"]
    ours = RandElasticd(keys, sigma=sigma, mode=modes).set_random_state(0)
    theirs = Rand2DElasticd(
        keys,
        spacing=(size / 2, size / 2),
        magnitude_range=(sigma, sigma),
        prob=1.0,
        spatial_size=(size, size),
        mode=modes,
        padding_mode="reflection",
    ).set_random_state(0)
    t = _best({"ours": lambda: ours(data), "monai": lambda: theirs(data)}, repeat, rounds)
    return 1000 * t["ours"], 1000 * t["monai"]


def bench_weightmap(
    size: int, cells: int, radius: tuple[int, int], rounds: int, ref_rounds: int
) -> tuple[float, float, float]:
    """(ours s, brute force s, max |difference|) on a random size^2 image of touching disks; best
    of `rounds` (ours) and `ref_rounds` (brute force) runs."""
    inst = _disks((size, size), cells, radius, np.random.default_rng(cells))
    fast = ref = None
    t_fast = t_ref = math.inf
    for _ in range(rounds):
        start = time.perf_counter()
        fast = unet_weight_map(inst)
        t_fast = min(t_fast, time.perf_counter() - start)
    for _ in range(ref_rounds):
        start = time.perf_counter()
        ref = unet_weight_map_reference(inst)
        t_ref = min(t_ref, time.perf_counter() - start)
    return t_fast, t_ref, float(np.abs(fast - ref).max())


def run(halo: int = 92, patch: int = 128, repeat: int = 10, rounds: int = 3, large_weightmap: bool = True) -> int:
    """Run the three benchmarks and print the tables with ratios."""
    torch.set_num_threads(1)
    print(f"segpipe bench transforms: torch threads 1, best of {rounds} interleaved rounds, synthetic data")
    print(f"\n1. training chain, patch {patch} + halo {halo} (image {patch + 2 * halo}^2, label {patch}^2)")
    print(f"{'image':<28}{'ours patches/s':>16}{'MONAI patches/s':>17}{'ratio':>8}")
    for label, ours, theirs in bench_chains(halo, patch, repeat, rounds):
        print(f"{label:<28}{ours:>16.1f}{theirs:>17.1f}{ours / theirs:>7.2f}x")
    print("\n2. elastic deformation alone (image + label + weight), ms per patch")
    print(f"{'patch':<28}{'ours ms':>16}{'Rand2DElasticd ms':>19}{'ratio':>8}")
    for size in (96, 128):
        ours, theirs = bench_elastic(size, repeat * 5, rounds)
        print(f"{f'{size}x{size}':<28}{ours:>16.2f}{theirs:>19.2f}{theirs / ours:>7.2f}x")
    print("\n3. U-Net eq. 2 weight map (w0 10, sigma 5), seconds (2048^2 brute force: one run)")
    print(f"{'image':<28}{'ours s':>16}{'brute force s':>17}{'ratio':>8}{'max |diff|':>12}")
    cases = [(512, 30, (10, 25), rounds)] + ([(2048, 300, (15, 40), 1)] if large_weightmap else [])
    for size, cells, radius, ref_rounds in cases:
        ours, ref, diff = bench_weightmap(size, cells, radius, rounds, ref_rounds)
        print(f"{f'{size}^2, {cells} cells':<28}{ours:>16.3f}{ref:>17.2f}{ref / ours:>7.1f}x{diff:>12.1e}")
    return 0
