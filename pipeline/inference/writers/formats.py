"""Output formats of `segpipe infer` (`--format`): their names, output paths, and writers.

* `auto` (the default, unchanged): like the input: NIfTI for NIfTI input (same suffix), a flat
  OME-TIFF for OME-TIFF input (`.ome.tif`), otherwise a flat tiled BigTIFF (`.tif`).
* `tiff`: a flat tiled BigTIFF (`.tif`, `TiffRowWriter`), the input's resolution tags kept.
* `ome-tiff`: a pyramidal tiled OME-TIFF (`.ome.tif`, `OmeTiffWriter`).
* `ome-zarr`: an OME-NGFF multiscale image (`.ome.zarr` directory, `OmeZarrWriter`).
* `nifti`: NIfTI-1 (`.nii.gz`, or a NIfTI input's own suffix; `NiftiRowWriter`).

For a path given directly (`predict_file`), `auto` goes by its suffix: .nii/.nii.gz NIfTI, .zarr
OME-Zarr, a TIFF suffix a flat TIFF (OME-TIFF when .ome.tif). Pyramid levels of label maps keep
the top-left pixel of each 2 x 2 block (`nearest`); those of probabilities average it (`mean`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.errors import SegpipeError
from pipeline.files import NIFTI_SUFFIXES, TIFF_SUFFIXES, has_suffix
from pipeline.inference.readers.images import ImageReader
from pipeline.inference.settings import OUTPUT_FORMATS as FORMATS
from pipeline.inference.settings import InferenceSettings
from pipeline.inference.writers.base import RowWriter, TiffRowWriter
from pipeline.inference.writers.nifti import NiftiRowWriter
from pipeline.inference.writers.ome_meta import INSTANCE_CHANNEL, LABEL_CHANNEL, probability_names
from pipeline.inference.writers.ome_tiff import OmeTiffWriter
from pipeline.inference.writers.ome_zarr import OmeZarrWriter

_SUFFIXES = {"tiff": ".tif", "ome-tiff": ".ome.tif", "ome-zarr": ".ome.zarr", "nifti": ".nii.gz"}
_OME_TIFF = (".ome.tif", ".ome.tiff")


def check_format(output_format: str) -> str:
    """`output_format` if it is one of `FORMATS`, else SegpipeError."""
    if output_format not in FORMATS:
        raise SegpipeError(f"output format {output_format!r} is not one of {', '.join(FORMATS)}")
    return output_format


def _stem(path: Path, output_format: str) -> tuple[str, str]:
    """(name without its image suffix, output suffix) of an input in `output_format`."""
    lower = path.name.lower()
    for suffix in (*NIFTI_SUFFIXES[::-1], *_OME_TIFF):
        if lower.endswith(suffix):
            stem, kind = path.name[: -len(suffix)], suffix
            break
    else:
        stem, kind = path.stem, ".tif"
    if output_format == "auto":
        return stem, ".ome.tif" if kind in _OME_TIFF else kind
    if output_format == "nifti" and kind in NIFTI_SUFFIXES:
        return stem, kind
    return stem, _SUFFIXES[output_format]


def output_paths(
    input_path: str | os.PathLike[str], output_dir: str | os.PathLike[str], output_format: str = "auto"
) -> tuple[Path, Path]:
    """(label map, probabilities) paths for `input_path` in `output_dir`: NAME_seg.*, NAME_prob.*."""
    stem, suffix = _stem(Path(input_path), check_format(output_format))
    out = Path(output_dir)
    return out / f"{stem}_seg{suffix}", out / f"{stem}_prob{suffix}"


def resolve_format(path: Path, output_format: str) -> str:
    """The format `path` is written in: `output_format`, or for `auto` the one its suffix names;
    SegpipeError if the suffix does not fit."""
    if has_suffix(path, NIFTI_SUFFIXES):
        by_suffix = "nifti"
    elif has_suffix(path, (".zarr",)):
        by_suffix = "ome-zarr"
    elif has_suffix(path, TIFF_SUFFIXES):
        by_suffix = "tiff"
    else:
        by_suffix = None
    if check_format(output_format) == "auto":
        if by_suffix is None:
            raise SegpipeError(
                f"{path}: output must be a TIFF (.tif, .tiff, .ome.tif), OME-Zarr (.ome.zarr) or "
                "NIfTI (.nii, .nii.gz) path"
            )
        return by_suffix
    fits = has_suffix(path, _OME_TIFF) if output_format == "ome-tiff" else by_suffix == output_format
    if not fits:
        raise SegpipeError(f"{path}: an {output_format} output needs a name ending in {_SUFFIXES[output_format]}")
    return output_format


def _open(
    path: Path,
    output_format: str,
    reader: ImageReader,
    channels: int,
    dtype: np.dtype | str,
    settings: InferenceSettings,
    uuid: str | None,
    **ome: Any,
) -> RowWriter:
    """The writer of `output_format` for a (channels, H, W) result of `reader`'s image; `ome` are the
    OME writers' channel_names, label_names and downsampling; `uuid` the OME-TIFF's (None: a new one)."""
    _, h, w = reader.shape
    tile, compression = settings.tiff_tile, settings.compression
    if output_format == "nifti":
        return NiftiRowWriter(path, h, w, channels, dtype, meta=reader.meta, two_d=reader.two_d and channels == 1)
    if output_format == "tiff":
        return TiffRowWriter(path, h, w, channels, dtype, tile=tile, compression=compression, meta=reader.meta)
    if output_format == "ome-tiff":
        return OmeTiffWriter(
            path, h, w, channels, dtype, tile=tile, compression=compression, meta=reader.meta, uuid=uuid, **ome
        )
    return OmeZarrWriter(path, h, w, channels, dtype, chunk=tile, compression=compression, meta=reader.meta, **ome)


def label_writer(
    path: Path,
    output_format: str,
    reader: ImageReader,
    settings: InferenceSettings,
    names: Sequence[str],
    uuid: str | None = None,
) -> RowWriter:
    """The writer of the uint8 label map, whose values 0, 1, ... are the classes `names`."""
    return _open(
        path,
        output_format,
        reader,
        1,
        np.uint8,
        settings,
        uuid,
        channel_names=[LABEL_CHANNEL],
        label_names=names,
        downsampling="nearest",
    )


def instance_writer(
    path: Path, output_format: str, reader: ImageReader, settings: InferenceSettings, uuid: str | None = None
) -> RowWriter:
    """The writer of the uint32 instance map (0 background, 1..n the objects): a label map whose values
    name no class (OME-Zarr `image-label` without properties; OME-TIFF without a value map)."""
    return _open(
        path,
        output_format,
        reader,
        1,
        np.uint32,
        settings,
        uuid,
        channel_names=[INSTANCE_CHANNEL],
        label_names=[],
        downsampling="nearest",
    )


def instance_path(label_path: Path) -> Path:
    """NAME_inst.* beside the label map NAME_seg.* (any other name: NAME_inst.* of its stem)."""
    name = label_path.name
    head, sep, tail = name.partition("_seg.")
    if sep:
        return label_path.with_name(f"{head}_inst.{tail}")
    stem, dot, suffix = name.partition(".")
    return label_path.with_name(f"{stem}_inst{dot}{suffix}")


def probability_writer(
    path: Path,
    output_format: str,
    reader: ImageReader,
    settings: InferenceSettings,
    names: Sequence[str],
    channels: int,
    uuid: str | None = None,
) -> RowWriter:
    """The writer of the `channels` probabilities (`settings.probabilities_dtype`) of the classes `names`."""
    return _open(
        path,
        output_format,
        reader,
        channels,
        settings.probabilities_dtype,
        settings,
        uuid,
        channel_names=probability_names(names, channels),
        downsampling="mean",
    )
