"""The per-dataset training chain from configs/augment.yaml: shapes, consistency, reproducibility."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from monai.data import CacheDataset, DataLoader, Dataset

from pipeline.config import load_config
from pipeline.errors import SegpipeError
from pipeline.transforms import build_preprocess_transforms, build_train_transforms
from pipeline.transforms.presets import preprocess, preset_section

torch.set_num_threads(1)


def _case(dataset: str, seed: int = 0, size: tuple[int, int] = (90, 80)) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: size[0], : size[1]]
    label = np.zeros((1, *size), np.uint8)
    for _ in range(6):
        cy, cx = rng.integers(0, size[0]), rng.integers(0, size[1])
        label[0][(yy - cy) ** 2 + (xx - cx) ** 2 <= rng.integers(4, 12) ** 2] = 1
    channels = 3 if dataset == "drive" else 1
    image = (label * 150 + rng.integers(0, 60, (channels, *size))).astype(np.uint8)
    case = {"image": image, "label": label, "weight": rng.random((1, *size)).astype(np.float32)}
    if dataset == "drive":
        case["fov"] = ((yy - size[0] / 2) ** 2 + (xx - size[1] / 2) ** 2 <= (min(size) / 2) ** 2)[None].astype(np.uint8)
    return case


@pytest.mark.parametrize("dataset", ["drive", "hela", "u373"])
@pytest.mark.parametrize("halo", [0, 30])
def test_chain_outputs(dataset: str, halo: int) -> None:
    chain = build_train_transforms(dataset, halo=halo, patch_size=24, config=load_config("augment")[dataset])
    chain.set_random_state(0)
    out = chain(_case(dataset))
    n = load_config("augment")[dataset]["patches"]["num_samples"]
    assert isinstance(out, list) and len(out) == n
    channels = len(load_config("augment")[dataset]["channels"] or [0])
    for s in out:
        assert s["image"].shape == (channels, 24 + 2 * halo, 24 + 2 * halo) and s["image"].dtype == torch.float32
        assert s["label"].shape == (1, 24, 24) and s["label"].dtype == torch.int64
        assert s["weight"].shape == (1, 24, 24) and s["weight"].dtype == torch.float32
        assert set(torch.unique(s["label"]).tolist()) <= {0, 1}
        assert ("fov" in s) == (dataset == "drive")
        assert type(s["image"]) is torch.Tensor  # no MetaTensor


def test_image_and_label_stay_registered_through_the_chain() -> None:
    """Every spatial step (crop, elastic, flips, rot90) moves image and label together."""
    cfg = copy.deepcopy(load_config("augment")["hela"])
    cfg["elastic"]["prob"] = 1.0
    cfg["flip_prob"] = cfg["rot90_prob"] = 0.5
    for key in ("gamma_prob", "scale_prob", "shift_prob", "noise_prob"):
        cfg["gray"][key] = 0.0
    case = _case("hela", seed=3)
    case["image"] = (case["label"] * 200 + 20).astype(np.uint8)  # intensity = f(label), no noise
    chain = build_train_transforms("hela", halo=10, patch_size=32, config=cfg)
    chain.set_random_state(1)
    for _ in range(5):
        for s in chain(case):
            centre = s["image"][0, 10:42, 10:42]
            lo, hi = centre.min(), centre.max()
            if hi - lo < 1e-3:  # a patch of one class only
                continue
            flat = (torch.isclose(centre, lo, atol=1e-4)) | (torch.isclose(centre, hi, atol=1e-4))
            assert flat.float().mean() > 0.7
            assert torch.equal((centre[flat] > (lo + hi) / 2).long(), s["label"][0][flat])


def _batches(loader: DataLoader, seed: int = 1234) -> list[torch.Tensor]:
    torch.manual_seed(seed)  # MONAI's DataLoader seeds each worker's transforms from torch's RNG
    return [torch.cat([b["image"].flatten(), b["label"].float().flatten()]) for b in loader]


def test_same_seed_same_patches_with_workers() -> None:
    data = [_case("drive", seed=i) for i in range(4)]
    chain = build_train_transforms("drive", halo=8, patch_size=16, config=load_config("augment")["drive"])
    for dataset in (Dataset(data, chain), CacheDataset(data, chain, progress=False)):
        loader = DataLoader(dataset, batch_size=2, num_workers=2)
        first, second, other = _batches(loader), _batches(loader), _batches(loader, seed=99)
        assert len(first) == 2 and all(torch.equal(a, b) for a, b in zip(first, second))
        assert not any(torch.equal(a, b) for a, b in zip(first, other))


def test_preprocess_normalises() -> None:
    img = _case("hela")["image"]
    out = build_preprocess_transforms("hela", load_config("augment")["hela"])({"image": img})["image"]
    assert abs(float(out.mean())) < 1e-4 and abs(float(out.std()) - 1.0) < 1e-2
    out = build_preprocess_transforms("u373", load_config("augment")["u373"])({"image": img})["image"]
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0


def test_green_channel_and_clahe() -> None:
    rng = np.random.default_rng(0)
    img = np.zeros((3, 64, 64), np.uint8)
    img[1] = 100 + rng.integers(0, 8, (64, 64))  # low-contrast green channel
    img[1, :, 30:34] += 20  # a faint vertical "vessel"
    img[0], img[2] = 255, 7
    cfg = copy.deepcopy(load_config("augment")["drive"])
    cfg.update(channels=[1], clahe=None, normalize="percentile")
    plain = build_preprocess_transforms("drive", cfg)({"image": img})["image"]
    assert plain.shape == (1, 64, 64)
    plain_np = np.asarray(plain[0])
    assert plain_np[:, 30:34].mean() > plain_np[:, :20].mean() + 0.5  # the green channel (with the vessel) was kept
    cfg["clahe"] = 0.01
    eq = np.asarray(build_preprocess_transforms("drive", cfg)({"image": img})["image"])
    assert eq.shape == (1, 64, 64) and not np.allclose(eq, np.asarray(plain))
    cfg["channels"] = [3]
    with pytest.raises(SegpipeError, match=r"channels \[3\]: the image has only 3"):
        preprocess("drive", img, cfg)
    for key, bad in (("channels", [-1]), ("clahe", 2.0), ("clahe", True)):
        cfg = copy.deepcopy(load_config("augment")["drive"])
        cfg[key] = bad
        with pytest.raises(SegpipeError, match=key):
            build_preprocess_transforms("drive", cfg)


def test_config_errors_name_the_problem() -> None:
    cfg = copy.deepcopy(load_config("augment")["drive"])
    cfg["elastic"]["sigmaa"] = 3
    with pytest.raises(
        SegpipeError, match=r"drive.elastic: unknown keys \['sigmaa'\] \('sigmaa': did you mean 'sigma'\?\)"
    ):
        build_train_transforms("drive", 0, 16, config=cfg)
    del cfg["elastic"]["sigmaa"]
    cfg["normalize"] = "minmax"
    with pytest.raises(SegpipeError, match="normalize"):
        build_train_transforms("drive", 0, 16, config=cfg)
    with pytest.raises(SegpipeError, match="no preset 'isbi'"):
        preset_section(load_config("augment"), "isbi")
