"""Inference settings: `InferenceSettings` (with the one copy of the defaults) and its validation.

The library takes settings as values and never reads `configs/`. `InferenceSettings()` holds the
defaults, equal to the values shipped in `configs/inference.yaml` (the DVC params; a test keeps the
two equal). The `segpipe infer` stage entry (`pipeline.stages.infer`) reads that file and builds
its settings with `settings_from_config`; `load_settings` applies keyword overrides. Validation
uses the shared helpers of `pipeline.config`: errors name where the value came from and the key.

`threshold` (one-channel networks: label = probability >= threshold) is a number in (0, 1) or the name
of an operating point training picked on the validation split and stored in the checkpoint (and its
ONNX export): `val` = best_f1, `val-dice` = best_dice (`THRESHOLD_NAMES`, see
`pipeline.training.validation.validation_thresholds`); `resolve_threshold` turns it into the number.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Mapping

from pipeline.config import (
    ConfigError,
    check_bool,
    check_choice,
    check_int,
    check_keys,
    check_list,
    check_number,
)
from pipeline.errors import SegpipeError
from pipeline.inference.engine.tta import TTA_TRANSFORMS
from pipeline.networks.precision import PRECISIONS

BLENDS = ("gaussian", "constant")
INTENSITIES = ("scale", "none")
PREPROCESSING = ("checkpoint", "intensity")
"""`preprocess`: the checkpoint's recorded training preprocessing (when it has one), or `intensity`."""
PROBABILITY_DTYPES = ("uint8", "float16", "float32")
COMPRESSIONS = ("zlib", "zstd", "lzw", "lzma", "none")
BACKENDS = ("torch", "onnxruntime")
"""`backend`: the torch graph of `optimize_network`, or ONNX Runtime (`pipeline.inference.backends.onnx_runtime`)."""
OUTPUT_FORMATS = ("auto", "tiff", "ome-tiff", "ome-zarr", "nifti")
"""`output_format`: `auto` = like the input (see `pipeline.inference.writers.formats`)."""
INSTANCE_OUTPUTS = ("auto", "off")
"""`instances`: `auto` writes NAME_inst.* when the model records instance settings (`segpipe train` on a
dataset with reference instances), `off` never."""
THRESHOLD_NAMES = {"val": "best_f1", "val-dice": "best_dice"}
"""`threshold` names -> the key of the checkpoint's `thresholds` record they read."""
SECTIONS: dict[str, tuple[str, ...]] = {
    "graph": ("fold_batch_norm", "inplace_activations", "channels_last", "compile"),
    "output": (
        "output_format",
        "tiff_tile",
        "compression",
        "threshold",
        "save_probabilities",
        "probabilities_dtype",
        "instances",
    ),
}
"""The sections of `configs/inference.yaml` and their keys; every other field is a top-level key."""


@dataclass(frozen=True)
class InferenceSettings:
    """The knobs of `configs/inference.yaml` (DVC params); see that file for their meaning.

    The defaults below are the only ones in the code, equal to the values shipped in that file.
    Call `validated()` (or build through `load_settings` / `settings_from_config`, which do).
    """

    tile: int = 256
    overlap: float = 0.25
    blend: str = "gaussian"
    sigma_scale: float = 0.125
    batch_size: int = 1
    tta: tuple[str, ...] = ()
    intensity: str = "scale"
    preprocess: str = "checkpoint"
    preprocess_max_megapixels: float = 128
    device: str = "cpu"
    precision: str = "fp32"
    threads: int | None = None
    backend: str = "torch"
    resume: bool = True
    fold_batch_norm: bool = True
    inplace_activations: bool = True
    channels_last: bool = True
    compile: bool = False
    output_format: str = "auto"
    tiff_tile: int = 256
    compression: str = "zlib"
    threshold: float | str = 0.5
    save_probabilities: bool = False
    probabilities_dtype: str = "uint8"
    instances: str = "auto"

    def validated(self, where: str = "inference settings") -> "InferenceSettings":
        """Self, after checking every value; ConfigError naming `where` and the key otherwise."""
        for key in ("tile", "batch_size", "tiff_tile"):
            check_int(getattr(self, key), key, where, minimum=1)
        if self.tiff_tile % 16:
            raise ConfigError(f"{where}: tiff_tile must be a multiple of 16 (TIFF tiles), got {self.tiff_tile!r}")
        check_int(self.threads, "threads", where, minimum=1, optional=True)
        check_number(self.overlap, "overlap", where, low=0, high=1, high_open=True)
        check_number(self.sigma_scale, "sigma_scale", where, low=0, low_open=True)
        check_threshold(self.threshold, where)
        check_number(self.preprocess_max_megapixels, "preprocess_max_megapixels", where, low=0, low_open=True)
        for key, choices in (
            ("blend", BLENDS),
            ("intensity", INTENSITIES),
            ("preprocess", PREPROCESSING),
            ("probabilities_dtype", PROBABILITY_DTYPES),
            ("compression", COMPRESSIONS),
            ("precision", PRECISIONS),
            ("output_format", OUTPUT_FORMATS),
            ("backend", BACKENDS),
            ("instances", INSTANCE_OUTPUTS),
        ):
            check_choice(getattr(self, key), key, choices, where)
        if not isinstance(self.tta, tuple):
            raise ConfigError(f"{where}: tta must be a tuple of window transforms, got {self.tta!r}")
        for name in self.tta:
            check_choice(name, "tta", tuple(TTA_TRANSFORMS), where)
        for key in (
            "resume",
            "fold_batch_norm",
            "inplace_activations",
            "channels_last",
            "compile",
            "save_probabilities",
        ):
            check_bool(getattr(self, key), key, where)
        return self


def check_threshold(value: Any, where: str) -> float | str:
    """`value` if it is a number in (0, 1) or one of `THRESHOLD_NAMES`; ConfigError naming `where` otherwise."""
    if isinstance(value, str):
        if value not in THRESHOLD_NAMES:
            raise ConfigError(f"{where}: threshold must be a number in (0, 1), 'val' or 'val-dice', got {value!r}")
        return value
    return check_number(value, "threshold", where, low=0, high=1, low_open=True, high_open=True)


def parse_threshold(text: str, where: str) -> float | str:
    """A threshold as typed (command line, MLflow param): a name of `THRESHOLD_NAMES`, else a number
    in (0, 1); ConfigError naming `where` otherwise."""
    try:
        value: float | str = float(text)
    except ValueError:
        value = text.strip()
    return check_threshold(value, where)


def resolve_threshold(threshold: float | str, recorded: Mapping[str, Any] | None, channels: int, model: str) -> float:
    """The number `threshold` stands for: itself, or for a name (`THRESHOLD_NAMES`) the value the model's
    `thresholds` record holds. SegpipeError naming `model` for a name when the model has K > 1 output
    channels (its labels are the argmax) or records no thresholds."""
    if not isinstance(threshold, str):
        return float(threshold)
    if channels != 1:
        raise SegpipeError(
            f"{model}: threshold {threshold!r} applies to two-class (one-channel) models; this one has "
            f"{channels} classes and labels by argmax: pass a number (it is not used) instead"
        )
    value = (recorded or {}).get(THRESHOLD_NAMES[threshold])
    if value is None:
        raise SegpipeError(
            f"{model}: records no validation thresholds (trained by an older segpipe, or its validation "
            f"images had no foreground); retrain it (`segpipe train`, then `segpipe export` for ONNX) "
            f"or pass a number, e.g. --threshold 0.5"
        )
    return check_number(
        value, THRESHOLD_NAMES[threshold], f"{model}: thresholds", low=0, high=1, low_open=True, high_open=True
    )


FIELDS = tuple(f.name for f in fields(InferenceSettings))
"""Every setting, in declaration order."""


def settings_from_config(cfg: Mapping[str, Any], where: str) -> InferenceSettings:
    """Settings from the dict of `configs/inference.yaml`, validated; `where` names the file.

    Every key is required, in its place: the `graph` and `output` sections (`SECTIONS`) are
    flattened, everything else is top level. Missing and unknown keys are named, as is any bad
    value (NaN and infinities included). `tta: null` means no augmentation.
    """
    top = [key for key in FIELDS if not any(key in keys for keys in SECTIONS.values())]
    flat = check_keys(cfg, [*top, *SECTIONS], where)
    for section, keys in SECTIONS.items():
        flat.update(check_keys(flat.pop(section), keys, f"{where}: {section}"))
    flat["tta"] = tuple(check_list(flat["tta"], "tta", where, optional=True) or ())
    return InferenceSettings(**flat).validated(where)


def load_settings(base: InferenceSettings | None = None, **overrides: Any) -> InferenceSettings:
    """`base` (default: `InferenceSettings()`) with the non-None `overrides` applied, validated.

    `overrides` are field names of `InferenceSettings`; `tta` may be any sequence of names.
    """
    if base is None:
        base = InferenceSettings()
    given = {k: v for k, v in overrides.items() if v is not None}
    if "tta" in given:
        given["tta"] = tuple(given["tta"])
    unknown = sorted(set(given) - set(FIELDS))
    if unknown:
        raise ConfigError(f"unknown inference setting(s): {', '.join(unknown)}")
    return replace(base, **given).validated("inference arguments")


__all__ = [
    "BACKENDS",
    "BLENDS",
    "COMPRESSIONS",
    "FIELDS",
    "INTENSITIES",
    "OUTPUT_FORMATS",
    "PREPROCESSING",
    "PROBABILITY_DTYPES",
    "SECTIONS",
    "THRESHOLD_NAMES",
    "InferenceSettings",
    "check_threshold",
    "load_settings",
    "parse_threshold",
    "resolve_threshold",
    "settings_from_config",
]
