"""The `segpipe infer` stage entry: the one place of `pipeline.inference` that reads `configs/`.

`run_infer` reads `configs/inference.yaml` (DVC params) once, validates it into
`InferenceSettings`, applies the command line's overrides and passes the settings down to
`infer_files`; everything below takes values. Under torchrun (WORLD_SIZE > 1) each process runs its
share of the inputs (`pipeline.inference.shards`).
"""
from __future__ import annotations

import os
from typing import Any, Sequence

from pipeline.config import config_path, load_config
from pipeline.inference.optimize import InferenceNetwork, ModelLike
from pipeline.inference.settings import InferenceSettings, load_settings, settings_from_config
from pipeline.inference.streaming import InferenceReport, infer_files
from pipeline.torchrun import rank_env

CONFIG_NAME = "inference"


def config_settings() -> InferenceSettings:
    """`configs/inference.yaml` as validated settings (errors name the file and the key)."""
    return settings_from_config(load_config(CONFIG_NAME), str(config_path(CONFIG_NAME)))


def run_infer(
    model: ModelLike | InferenceNetwork,
    inputs: Sequence[str],
    output_dir: str | os.PathLike[str],
    *,
    save_probabilities: bool | None = None,
    show_progress: bool = True,
    nonfinite: float | None = None,
    class_names: Sequence[str] | None = None,
    **overrides: Any,
) -> list[InferenceReport]:
    """`segpipe infer`: `infer_files` with the settings of `configs/inference.yaml`, the non-None
    `overrides` (`InferenceSettings` fields: tile, overlap, tta, ...) applied on top.

    `save_probabilities` None keeps the file's `save_probabilities`. `nonfinite` replaces non-finite
    input values (None: they are an error). `class_names`: see `infer_files`.
    A failed input is reported and the others still run; SegpipeError at the end lists the failures.
    Under torchrun every process takes its share of the inputs (`pipeline.inference.shards.run_shard`)
    and returns the reports of its share.
    """
    settings = load_settings(config_settings(), **overrides)
    env = rank_env()
    if env.distributed:
        from pipeline.inference.shards import run_shard

        return run_shard(model, inputs, output_dir, settings=settings, env=env, show_progress=show_progress,
                         save_probabilities=save_probabilities, nonfinite=nonfinite, class_names=class_names)
    return infer_files(model, inputs, output_dir, settings=settings, save_probabilities=save_probabilities,
                       show_progress=show_progress, nonfinite=nonfinite,
                       class_names=class_names)


__all__ = ["config_settings", "run_infer"]
