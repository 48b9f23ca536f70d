"""What the OME outputs (OME-TIFF, OME-Zarr) say about an image: its pixel size and channel names.

`pixel_size(meta)` takes the input's physical pixel size from what the reader found, first match
wins: OME-XML PhysicalSizeX/Y (and their units, µm by default as in the OME schema), TIFF
XResolution/YResolution with ResolutionUnit inch or centimeter (SimpleITK spacing and PNG dpi
arrive as these too), or the NIfTI pixdim of the image's two axes with the header's spatial unit
(unknown taken as millimetres, as ITK does, unless both are 1: no information). None if the input
has none. `name_classes` names the label values and probability channels, `image_name` the image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from pipeline.errors import SegpipeError
from pipeline.inference.readers.images import ImageMeta

_METRES = {"Å": 1e-10, "pm": 1e-12, "nm": 1e-9, "µm": 1e-6, "mm": 1e-3, "cm": 1e-2, "m": 1.0, "in": 0.0254}
"""OME UnitsLength symbols (the ones images use) in metres."""
_NGFF_UNITS = {
    "Å": "angstrom",
    "pm": "picometer",
    "nm": "nanometer",
    "µm": "micrometer",
    "mm": "millimeter",
    "cm": "centimeter",
    "m": "meter",
    "in": "inch",
}
_ALIASES = {
    "um": "µm",
    "\u03bcm": "µm",
    "micron": "µm",
    "micrometer": "µm",
    "A": "Å",
    "angstrom": "Å",
    "millimeter": "mm",
    "meter": "m",
    "nanometer": "nm",
}
_NIFTI_UNITS = {"mm": "mm", "micron": "µm", "meter": "m", "unknown": "mm"}
_TIFF_UNITS = {2: "in", 3: "cm"}
LABEL_CHANNEL = "labels"
INSTANCE_CHANNEL = "instances"
"""The name of a label map's one channel."""


@dataclass(frozen=True)
class PixelSize:
    """The physical size of a level-0 pixel along x and y, in `unit` (an OME UnitsLength symbol)."""

    x: float
    y: float
    unit: str

    def ome(self) -> dict[str, Any]:
        """OME Pixels attributes (tifffile metadata keys)."""
        return {
            "PhysicalSizeX": self.x,
            "PhysicalSizeXUnit": self.unit,
            "PhysicalSizeY": self.y,
            "PhysicalSizeYUnit": self.unit,
        }

    @property
    def ngff_unit(self) -> str:
        """The unit's OME-NGFF (UDUNITS-2) name, e.g. micrometer."""
        return _NGFF_UNITS[self.unit]

    def pixels_per_cm(self, factor: int = 1) -> tuple[float, float]:
        """TIFF XResolution/YResolution (pixels per centimeter) of a level `factor` times coarser."""
        metres = _METRES[self.unit] * factor
        return 0.01 / (self.x * metres), 0.01 / (self.y * metres)


def _unit(symbol: Any) -> str | None:
    symbol = _ALIASES.get(str(symbol), str(symbol))
    return symbol if symbol in _METRES else None


def _number(value: Any) -> float:
    """A TIFF RATIONAL (numerator, denominator) or a plain number as float."""
    if isinstance(value, (tuple, list)):
        return float(value[0]) / float(value[1]) if float(value[1]) else 0.0
    return float(value)


def _from_ome(pixels: dict[str, Any]) -> PixelSize | None:
    if "PhysicalSizeX" not in pixels or "PhysicalSizeY" not in pixels:
        return None
    ux, uy = _unit(pixels.get("PhysicalSizeXUnit", "µm")), _unit(pixels.get("PhysicalSizeYUnit", "µm"))
    if ux is None or uy is None:
        return None
    return PixelSize(float(pixels["PhysicalSizeX"]), float(pixels["PhysicalSizeY"]) * _METRES[uy] / _METRES[ux], ux)


def _from_tiff(resolution: tuple[Any, Any], unit: int | None) -> PixelSize | None:
    symbol = _TIFF_UNITS.get(unit or 1)
    ppx, ppy = _number(resolution[0]), _number(resolution[1])
    if symbol is None or ppx <= 0 or ppy <= 0:
        return None
    return PixelSize(1e6 * _METRES[symbol] / ppx, 1e6 * _METRES[symbol] / ppy, "µm")


def _from_nifti(header: Any) -> PixelSize | None:
    zooms = header.get_zooms()
    y, x = (zooms[0], zooms[1]) if len(header.get_data_shape()) == 2 else (zooms[1], zooms[2])
    space = header.get_xyzt_units()[0]
    if (space == "unknown" and (x, y) == (1.0, 1.0)) or space not in _NIFTI_UNITS or x <= 0 or y <= 0:
        return None
    return PixelSize(float(x), float(y), _NIFTI_UNITS[space])


def pixel_size(meta: ImageMeta) -> PixelSize | None:
    """The input's physical pixel size (see the module docstring), None if it has none."""
    found = _from_ome(meta.ome_pixels) if meta.ome_pixels else None
    if found is None and meta.resolution is not None:
        found = _from_tiff(meta.resolution, meta.resolution_unit)
    if found is None and meta.nifti_header is not None:
        found = _from_nifti(meta.nifti_header)
    return found


def image_name(path: Path) -> str:
    """The OME image name of an output: its file name without the format suffix."""
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr", ".zarr", ".tiff", ".tif"):
        if path.name.lower().endswith(suffix):
            return path.name[: -len(suffix)]
    return path.name


def name_classes(out_channels: int, given: Sequence[str] | None = None) -> list[str]:
    """The names of the label values 0 .. max(K, 2) - 1 of a K-channel network (a one-channel network
    labels 0 and 1): `given`, one per value, or "class 0", "class 1", ...; SegpipeError otherwise."""
    values = max(out_channels, 2)
    if given is None:
        return [f"class {v}" for v in range(values)]
    names = [str(name).strip() for name in given]
    if len(names) != values or not all(names) or len(set(names)) != len(names):
        raise SegpipeError(
            f"class names: the network's label map has {values} values (0..{values - 1}), so give "
            f"{values} distinct non-empty names, got {list(given)!r}"
        )
    return names


def probability_names(names: Sequence[str], out_channels: int) -> list[str]:
    """The names of the probability channels: every class, or class 1 alone for a one-channel network."""
    return list(names[-out_channels:])
