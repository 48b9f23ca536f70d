"""The training transform chain per dataset, built from `configs/augment.yaml` (DVC params).

U-Net paper (Ronneberger et al. 2015) section 3.1 recipe, over the prepared-data dict
{"image" (C, H, W), "label" (1, H, W), "weight" (1, H, W), "fov" (1, H, W) for DRIVE}:

    normalise intensities (deterministic: CacheDataset caches it)
    -> RandOverlapTilePatchd   patch + halo + elastic margin, every key, class balanced, in the FOV
    -> RandElasticd            one field for all keys; image trimmed to patch + 2 halo, label,
                               weight and fov to the patch (the network's output size)
    -> RandFlipd x 2, RandRotate90d          (MONAI)
    -> gray values: RandAdjustContrastd, RandScaleIntensityd, RandShiftIntensityd,
                    RandGaussianNoised      (MONAI, image only)
    -> EnsureTyped                           torch tensors without metadata

Output per patch: image float32 (C, P + 2 halo, P + 2 halo), label int64 (1, P, P), weight
float32 (1, P, P), fov uint8 (1, P, P) when the preset names a FOV key.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from monai.transforms import (
    CastToTyped,
    Compose,
    EnsureTyped,
    MapTransform,
    NormalizeIntensityd,
    RandAdjustContrastd,
    RandFlipd,
    RandGaussianNoised,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRangePercentilesd,
)

from pipeline.config import check_choice, check_int, check_keys, check_list, check_number
from pipeline.errors import SegpipeError
from pipeline.transforms.elastic import RandElasticd
from pipeline.transforms.patches import RandOverlapTilePatchd

CONFIG_NAME = "augment"
NORMALIZERS = ("zscore", "percentile")
AUTO = "auto"
"""A preset's `normalize: auto`: the training plan (`pipeline.training.planning`) picks one of
NORMALIZERS before any transform is built."""
SCHEMA: dict[str, Any] = {
    "channels": None,
    "clahe": None,
    "normalize": None,
    "patches": {"num_samples": None, "pos": None, "neg": None, "fov_key": None},
    "elastic": {"prob": None, "sigma": None, "grid_size": None, "margin": None, "image_mode": None},
    "flip_prob": None,
    "rot90_prob": None,
    "gray": {
        "gamma_prob": None,
        "gamma": None,
        "scale_prob": None,
        "scale": None,
        "shift_prob": None,
        "shift": None,
        "noise_prob": None,
        "noise_std": None,
    },
}


def _check(section: Any, schema: Mapping[str, Any], where: str) -> None:
    """Every key of the schema present, no other key: errors name the config and the keys."""
    check_keys(section, schema, where)
    for key, sub in schema.items():
        if sub is not None:
            _check(section[key], sub, f"{where}.{key}")


def preset(dataset: str, config: Mapping[str, Any]) -> Mapping[str, Any]:
    """`config`, the section of `dataset` in configs/augment.yaml (read by the stage entry), validated."""
    where = f"configs/{CONFIG_NAME}.yaml: {dataset}"
    _check(config, SCHEMA, where)
    check_choice(config["normalize"], "normalize", (*NORMALIZERS, AUTO), where)
    channels = check_list(config["channels"], "channels", where, optional=True, nonempty=True)
    for channel in channels or []:
        check_int(channel, "channels[]", where, minimum=0)
    check_number(config["clahe"], "clahe", where, low=0, high=1, low_open=True, optional=True)
    return config


def preset_section(augment: Mapping[str, Any], dataset: str) -> Mapping[str, Any]:
    """The validated preset of `dataset` from all of configs/augment.yaml (`augment`)."""
    if dataset not in augment:
        raise SegpipeError(f"configs/{CONFIG_NAME}.yaml: no preset '{dataset}'; presets: {sorted(augment)}")
    return preset(dataset, augment[dataset])


def preprocess(dataset: str, image: np.ndarray, augment: Mapping[str, Any]) -> np.ndarray:
    """The dataset's deterministic normalisation of an image (C, H, W) -> float32 (C', H, W), as
    `augment` (its configs/augment.yaml section, or a checkpoint's record of it) says; training,
    validation, evaluation and `segpipe infer` all apply it."""
    try:
        out = build_preprocess_transforms(dataset, augment)({"image": image})["image"]
    except RuntimeError as exc:  # MONAI's Compose wraps errors of its transforms
        if isinstance(exc.__cause__, SegpipeError):
            raise exc.__cause__ from None
        raise
    return np.asarray(out, dtype=np.float32)


class SelectChannelsd(MapTransform):
    """Keep the listed channels of a channel-first image, e.g. DRIVE's green channel [1], where
    vessels have the most contrast (Staal et al. 2004; most DRIVE methods use it)."""

    def __init__(self, keys: str, channels: list[int]) -> None:
        super().__init__(keys)
        self.channels = list(channels)

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(data)
        for key in self.key_iterator(out):
            image = out[key]
            if max(self.channels) >= image.shape[0]:
                raise SegpipeError(f"channels {self.channels}: the image has only {image.shape[0]} channel(s)")
            out[key] = image[self.channels]
        return out


class Clahed(MapTransform):
    """Contrast-limited adaptive histogram equalisation per channel (skimage
    `equalize_adapthist`, Zuiderveld 1994) after min-max scaling to [0, 1]; the usual DRIVE
    pre-processing (e.g. orobix/retina-unet). `clip_limit` is skimage's (0.01 default there)."""

    def __init__(self, keys: str, clip_limit: float) -> None:
        super().__init__(keys)
        self.clip_limit = float(clip_limit)

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        from skimage.exposure import equalize_adapthist

        out = dict(data)
        for key in self.key_iterator(out):
            image = np.asarray(out[key], dtype=np.float64)
            low = image.min(axis=(1, 2), keepdims=True)
            span = np.maximum(image.max(axis=(1, 2), keepdims=True) - low, 1e-12)
            scaled = (image - low) / span
            out[key] = np.stack([equalize_adapthist(c, clip_limit=self.clip_limit) for c in scaled]).astype(np.float32)
        return out


def build_preprocess_transforms(dataset: str, config: Mapping[str, Any]) -> Compose:
    """The deterministic intensity pre-processing of the image (C, H, W); inference must apply the
    same: optional channel selection, optional CLAHE, then zscore (per image and channel) or
    percentile (0.5..99.5 percentiles -> 0..1, clipped)."""
    cfg = preset(dataset, config)
    if cfg["normalize"] == AUTO:
        raise SegpipeError(
            f"configs/{CONFIG_NAME}.yaml: {dataset}.normalize is auto, which the training plan "
            f"resolves (plan.json); give zscore or percentile here"
        )
    chain: list[Any] = []
    if cfg["channels"] is not None:
        chain.append(SelectChannelsd("image", cfg["channels"]))
    if cfg["clahe"] is not None:
        chain.append(Clahed("image", cfg["clahe"]))
    if cfg["normalize"] == "zscore":
        normalize = NormalizeIntensityd("image", channel_wise=True)
    else:
        normalize = ScaleIntensityRangePercentilesd("image", 0.5, 99.5, 0.0, 1.0, clip=True, channel_wise=True)
    return Compose([*chain, CastToTyped("image", dtype=torch.float32), normalize])


def build_train_transforms(
    dataset: str,
    halo: int,
    patch_size: int,
    config: Mapping[str, Any],
) -> Compose:
    """The training Compose of `dataset` (module docstring for the chain and outputs).

    halo: the network's `halo` (0 for same padding); patch_size: its output size P (square).
    config: the dataset's section of configs/augment.yaml.
    """
    cfg = preset(dataset, config)
    if halo < 0 or patch_size < 1:
        raise SegpipeError(f"transforms: expected halo >= 0 and patch_size >= 1, got {halo}, {patch_size}")
    pc, ec, gc = cfg["patches"], cfg["elastic"], cfg["gray"]
    fov_key = pc["fov_key"]
    keys = ["image", "label", "weight"] + ([fov_key] if fov_key else [])
    context = halo + int(ec["margin"])
    labels = [k for k in keys if k != "image"]
    chain = [
        *build_preprocess_transforms(dataset, cfg).transforms,
        RandOverlapTilePatchd(
            keys,
            label_key="label",
            patch_size=patch_size,
            halo=context,
            label_halo=context,
            fov_key=fov_key,
            pos=float(pc["pos"]),
            neg=float(pc["neg"]),
            num_samples=int(pc["num_samples"]),
        ),
        RandElasticd(
            keys,
            sigma=float(ec["sigma"]),
            grid_size=int(ec["grid_size"]),
            prob=float(ec["prob"]),
            mode=[ec["image_mode"], "nearest", "bilinear"] + ["nearest"] * (len(keys) - 3),
            output_size={"image": patch_size + 2 * halo, **{k: patch_size for k in labels}},
        ),
        RandFlipd(keys, prob=float(cfg["flip_prob"]), spatial_axis=0),
        RandFlipd(keys, prob=float(cfg["flip_prob"]), spatial_axis=1),
        RandRotate90d(keys, prob=float(cfg["rot90_prob"]), max_k=3),
        RandAdjustContrastd("image", prob=float(gc["gamma_prob"]), gamma=tuple(gc["gamma"])),
        RandScaleIntensityd("image", factors=float(gc["scale"]), prob=float(gc["scale_prob"])),
        RandShiftIntensityd("image", offsets=float(gc["shift"]), prob=float(gc["shift_prob"])),
        RandGaussianNoised("image", prob=float(gc["noise_prob"]), std=float(gc["noise_std"])),
        EnsureTyped(
            keys,
            data_type="tensor",
            dtype=[torch.float32, torch.int64, torch.float32] + [torch.uint8] * (len(keys) - 3),
            track_meta=False,
        ),
    ]
    return Compose(chain)
