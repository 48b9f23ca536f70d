"""`OmeZarrWriter`: an OME-NGFF 0.4 multiscale image (an OME-Zarr directory) written from row bands.

The store is zarr format 2 with "/" chunk keys, the OME-NGFF version that napari (napari-ome-zarr),
QuPath/Bio-Formats, vizarr and ome-zarr-py all read. Arrays "0", "1", ... hold the levels of
`Pyramid` (nearest for labels, mean for probabilities), chunked by the output tile, written chunk
row by chunk row as the bands stream: peak memory is a chunk row per level. Axes are ("y", "x") for
a label map and ("c", "y", "x") for probabilities, with the input's physical unit; each level's
coordinateTransformations scale by its pixel size (2^k times level 0's), and mean levels are
translated by half the block so that pixel centres stay in place. ome-zarr-py writes the
`multiscales` metadata; probabilities get `omero` channels (names, colours, value window), a label
map `image-label` properties naming the class of every value.

The store is built in a temp directory beside the output and renamed into place when complete; a
store already under that name is moved aside first and deleted after.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.errors import SegpipeError
from pipeline.files import file_mode, temp_prefix
from pipeline.inference.readers.images import ImageMeta
from pipeline.inference.writers.base import RowWriter, check_output_path, temp_beside
from pipeline.inference.writers.ome_meta import PixelSize, image_name, pixel_size
from pipeline.inference.writers.pyramid import Pyramid, Sink, level_shapes

_COLOURS = ("FFFFFF", "FF0000", "00FF00", "0000FF", "FFFF00", "FF00FF", "00FFFF")


def _compressor(compression: str, path: Path) -> Any:
    """The numcodecs codec of a `compression` setting; SegpipeError for LZW, which zarr lacks."""
    import numcodecs

    codecs = {"zlib": numcodecs.Zlib(level=6), "zstd": numcodecs.Zstd(level=3), "lzma": numcodecs.LZMA(), "none": None}
    if compression not in codecs:
        raise SegpipeError(
            f"{path}: OME-Zarr has no {compression} codec; set the output compression to zlib, zstd, lzma or none"
        )
    return codecs[compression]


class OmeZarrWriter(RowWriter):
    """An OME-Zarr (K, H, W) from row bands; see the module docstring. `label_names` makes it a label
    map (one channel, its values named); otherwise `channel_names` names the K channels."""

    def __init__(
        self,
        path: Path,
        height: int,
        width: int,
        channels: int,
        dtype: np.dtype | str,
        *,
        channel_names: Sequence[str],
        chunk: int = 256,
        compression: str = "zlib",
        meta: ImageMeta | None = None,
        downsampling: str = "nearest",
        label_names: Sequence[str] | None = None,
    ) -> None:
        import zarr

        self.path = Path(path)
        self.height, self.dtype = height, np.dtype(dtype)
        self.shapes = level_shapes(height, width, chunk)
        self.labels = label_names is not None
        self._image_label = (
            None
            if label_names is None
            else {
                "version": "0.4",
                "properties": [{"label-value": v, "class": name} for v, name in enumerate(label_names)],
            }
        )
        if self.labels and channels != 1:
            raise SegpipeError(f"{self.path}: a label map has one channel, not {channels}")
        compressor = _compressor(compression, self.path)
        self._tmp = temp_beside(self.path, ".tmp.ome.zarr", directory=True)
        try:
            self._group = zarr.open_group(str(self._tmp), mode="w", zarr_format=2)
            arrays = [
                self._group.create_array(
                    str(k),
                    shape=(h, w) if self.labels else (channels, h, w),
                    chunks=(chunk, chunk) if self.labels else (1, chunk, chunk),
                    dtype=self.dtype,
                    compressors=compressor,
                    fill_value=0,
                    chunk_key_encoding={"name": "v2", "separator": "/"},
                )
                for k, (h, w) in enumerate(self.shapes)
            ]
            self._pyramid = Pyramid(
                self.shapes, channels, self.dtype, chunk, downsampling, [self._sink(a) for a in arrays]
            )
            self._multiscales_kwargs = self._multiscales(pixel_size(meta or ImageMeta()), downsampling, channel_names)
        except BaseException:
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise
        self._next = 0

    def _sink(self, array: Any) -> Sink:
        def sink(y0: int, block: np.ndarray) -> None:
            array[..., y0 : y0 + block.shape[1], :] = block[0] if self.labels else block

        return sink

    def _multiscales(self, size: PixelSize | None, downsampling: str, channel_names: Sequence[str]) -> dict[str, Any]:
        """ome-zarr's `write_multiscales_metadata` arguments: the levels with their transforms, the axes,
        the name and, for probabilities, the omero channels."""
        unit = {"unit": size.ngff_unit} if size is not None else {}
        axes = [{"name": "y", "type": "space", **unit}, {"name": "x", "type": "space", **unit}]
        spacing = [size.y, size.x] if size is not None else [1.0, 1.0]
        lead = [] if self.labels else [1.0]  # the channel axis
        datasets = []
        for k in range(len(self.shapes)):
            transforms: list[dict[str, Any]] = [{"type": "scale", "scale": lead + [s * 2**k for s in spacing]}]
            if downsampling == "mean" and k:
                shift = [s * (2**k - 1) / 2 for s in spacing]  # the block's centre, in level-0 units
                transforms.append({"type": "translation", "translation": [0.0] * len(lead) + shift})
            datasets.append({"path": str(k), "coordinateTransformations": transforms})
        kwargs: dict[str, Any] = {"datasets": datasets, "axes": axes, "name": image_name(self.path)}
        if not self.labels:
            top = 255 if self.dtype == np.uint8 else 1.0
            kwargs["axes"] = [{"name": "c", "type": "channel"}, *axes]
            kwargs["metadata"] = {
                "omero": {
                    "rdefs": {"model": "color"},
                    "channels": [
                        {
                            "label": name,
                            "color": _COLOURS[c % len(_COLOURS)],
                            "active": True,
                            "window": {"min": 0, "max": top, "start": 0, "end": top},
                        }
                        for c, name in enumerate(channel_names)
                    ],
                }
            }
        return kwargs

    def write(self, y0: int, rows: np.ndarray) -> None:
        """Rows [y0, y0 + n) as (K, n, W); bands must arrive in order."""
        if y0 != self._next:
            raise SegpipeError(f"{self.path}: rows arrive out of order ({y0}, expected {self._next})")
        try:
            self._pyramid.push(rows.astype(self.dtype, copy=False))
        except OSError as exc:
            raise SegpipeError(f"{self.path}: writing the OME-Zarr failed ({exc.strerror or exc})") from exc
        self._next = y0 + rows.shape[1]

    def finish(self) -> None:
        from ome_zarr.format import FormatV04
        from ome_zarr.writer import add_metadata, write_multiscales_metadata

        if self._next != self.height:
            self.abort()
            raise SegpipeError(f"{self.path}: only {self._next} of {self.height} rows were produced")
        try:
            self._pyramid.close()
            write_multiscales_metadata(self._group, fmt=FormatV04(), **self._multiscales_kwargs)
            if self._image_label is not None:
                add_metadata(self._group, {"image-label": self._image_label}, fmt=FormatV04())
        except OSError as exc:
            self.abort()
            raise SegpipeError(f"{self.path}: writing the OME-Zarr failed ({exc.strerror or exc})") from exc
        except BaseException:
            self.abort()
            raise
        self._done = self._tmp

    def abort(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._done = None

    def publish(self) -> Path:
        """Rename the finished store onto the output name (a store there is moved aside, then deleted)."""
        if self._done is None:
            raise SegpipeError(f"{self.path}: publish() before finish()")
        check_output_path(self.path)
        aside: Path | None = None
        try:
            os.chmod(self._done, file_mode(directory=True))  # mkdtemp creates 0700
            if os.path.lexists(self.path):
                aside = Path(tempfile.mkdtemp(prefix=temp_prefix(), suffix=".old", dir=self.path.parent))
                os.replace(self.path, aside / "store")
            os.replace(self._done, self.path)
        except OSError as exc:
            if aside is not None and not os.path.lexists(self.path):
                os.replace(aside / "store", self.path)
            shutil.rmtree(self._done, ignore_errors=True)
            raise SegpipeError(f"{self.path}: cannot write the output ({exc.strerror or exc})") from exc
        finally:
            if aside is not None and os.path.lexists(self.path):  # the new store, or the old one back, is in place
                shutil.rmtree(aside, ignore_errors=True)
        self._done = None
        return self.path
