"""configs/data.yaml, checked by the entries that read it (`read_config("data", check_data_config)`).

Every key is required (the file is the one place its defaults live); errors name the file and the
key. `download.from.<dataset>` lists archives to import instead of downloading.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from pipeline.config import (
    ConfigError,
    check_int,
    check_keys,
    check_list,
    check_number,
    check_str,
)

TOP_KEYS = (
    "datasets",
    "cell_datasets",
    "folder_datasets",
    "manifests_dir",
    "raw_dir",
    "prepared_dir",
    "download",
    "prepare",
)
DOWNLOAD_KEYS = ("mirror", "from", "accept_sha256", "retries", "backoff_seconds", "timeout_seconds", "chunk_bytes")
PREPARE_KEYS = ("seed", "val_fraction", "folds", "weight_map", "limits")
LIMIT_KEYS = ("max_members", "max_unpacked_bytes", "max_compression_ratio", "max_image_values")


@dataclass(frozen=True)
class DownloadConfig:
    """The `download` section: where archives come from and how transfers retry."""

    mirror: str | None
    imports: Mapping[str, tuple[str, ...]]
    """`from:` dataset -> archives on disk imported instead of downloaded."""
    accept_sha256: tuple[str, ...]
    retries: int
    backoff_seconds: float
    timeout_seconds: float
    chunk_bytes: int


@dataclass(frozen=True)
class PrepareConfig:
    """The `prepare` section: the split, the weight map and the limits on what archives may hold."""

    seed: int
    val_fraction: float
    folds: int
    weight_map: Mapping[str, float]
    """U-Net eq. 2: w0, sigma."""
    limits: Mapping[str, float]
    """max_members, max_unpacked_bytes, max_compression_ratio (`UnpackLimits`), max_image_values."""


@dataclass(frozen=True)
class DataConfig:
    """configs/data.yaml, checked (`check_data_config`)."""

    datasets: tuple[str, ...]
    """The DVC matrix's datasets."""
    cell_datasets: tuple[str, ...]
    folder_datasets: tuple[str, ...]
    manifests_dir: str
    raw_dir: str
    prepared_dir: str
    download: DownloadConfig
    prepare: PrepareConfig


def check_data_config(cfg: Mapping[str, Any], where: str) -> DataConfig:
    """`cfg` (configs/data.yaml) validated into a `DataConfig`; errors name `where` and the key."""
    cfg = check_keys(cfg, TOP_KEYS, where)
    for key in ("datasets", "cell_datasets", "folder_datasets"):
        for name in check_list(cfg[key], key, where):
            check_str(name, f"{key}[]", where)
    strays = sorted(set(cfg["folder_datasets"]) - set(cfg["datasets"]))
    if strays:
        raise ConfigError(f"{where}: folder_datasets {strays} are not in datasets; a folder dataset is listed in both")
    for key in ("manifests_dir", "raw_dir", "prepared_dir"):
        check_str(cfg[key], key, where)
    dl = check_keys(cfg["download"], DOWNLOAD_KEYS, f"{where}: download")
    if dl["mirror"] is not None:
        check_str(dl["mirror"], "download.mirror", where)
    for dataset, paths in check_keys(
        dl["from"] or {}, cfg["datasets"], f"{where}: download.from", optional=cfg["datasets"]
    ).items():
        check_list(paths, f"download.from.{dataset}", where, optional=True)
    check_list(dl["accept_sha256"], "download.accept_sha256", where, optional=True)
    check_int(dl["retries"], "download.retries", where, minimum=1)
    check_number(dl["backoff_seconds"], "download.backoff_seconds", where, low=0)
    check_number(dl["timeout_seconds"], "download.timeout_seconds", where, low=0, low_open=True)
    check_int(dl["chunk_bytes"], "download.chunk_bytes", where, minimum=1)
    prep = check_keys(cfg["prepare"], PREPARE_KEYS, f"{where}: prepare")
    check_int(prep["seed"], "prepare.seed", where, minimum=0)
    check_number(prep["val_fraction"], "prepare.val_fraction", where, low=0, high=1, high_open=True)
    check_int(prep["folds"], "prepare.folds", where, minimum=2)
    wm = check_keys(prep["weight_map"], ("w0", "sigma"), f"{where}: prepare.weight_map")
    check_number(wm["w0"], "prepare.weight_map.w0", where, low=0)
    check_number(wm["sigma"], "prepare.weight_map.sigma", where, low=0, low_open=True)
    limits = check_keys(prep["limits"], LIMIT_KEYS, f"{where}: prepare.limits")
    for key in ("max_members", "max_unpacked_bytes", "max_image_values"):
        check_int(limits[key], f"prepare.limits.{key}", where, minimum=1)
    check_number(limits["max_compression_ratio"], "prepare.limits.max_compression_ratio", where, low=1)
    return DataConfig(
        *(tuple(cfg[key]) for key in ("datasets", "cell_datasets", "folder_datasets")),
        *(str(cfg[key]) for key in ("manifests_dir", "raw_dir", "prepared_dir")),
        DownloadConfig(
            dl["mirror"],
            {dataset: tuple(paths or ()) for dataset, paths in (dl["from"] or {}).items()},
            tuple(dl["accept_sha256"] or ()),
            int(dl["retries"]),
            float(dl["backoff_seconds"]),
            float(dl["timeout_seconds"]),
            int(dl["chunk_bytes"]),
        ),
        PrepareConfig(int(prep["seed"]), float(prep["val_fraction"]), int(prep["folds"]), dict(wm), dict(limits)),
    )
