"""`OmeTiffWriter`: a pyramidal, tiled OME-TIFF (BigTIFF) written from row bands, memory bounded.

Layout, the OME pyramid layout tifffile writes and QuPath, napari and Bio-Formats read: one page
per channel (axes CYX; YX for a label map), each page's reduced levels stored as its SubIFDs
(NewSubfileType 1), every level tiled with the same tile and compression, resolution tags per level
(pixels per centimeter) and the OME-XML on the first page: PhysicalSizeX/Y, the channel names and,
for a label map, a MapAnnotation (namespace `LABEL_VALUES_NAMESPACE`) naming the class of every
label value. `tifffile.TiffFile(path).series[0].levels` are the levels.

Streaming: tifffile writes pages one after another, each from a generator of tiles, in a background
thread fed from a small queue (as `TiffRowWriter`). The first channel of level 0 comes straight
from the row stream; as its strips pass, the other channels of level 0 and every reduced level
(`Pyramid`: nearest for labels, mean for probabilities) are spooled, zlib-compressed, into a temp
file beside the output (`ChunkSpool`), and read back a tile row at a time when tifffile reaches
them. Peak memory is a few tile rows per level, whatever the image's height; the spool costs disk
(compressed, about (K - 1) / K + 1/3 of the image for K channels) and is removed at the end.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from pipeline.errors import SegpipeError
from pipeline.inference.readers.images import ImageMeta
from pipeline.inference.writers.base import TiffRowWriter, WriteAborted, strip_tiles, temp_beside
from pipeline.inference.writers.ome_meta import image_name, pixel_size
from pipeline.inference.writers.pyramid import Pyramid, Sink, level_shapes
from pipeline.inference.writers.spool import ChunkSpool

LABEL_VALUES_NAMESPACE = "segpipe.label-values"
"""Namespace of the OME MapAnnotation whose keys are a label map's values and whose values are class names."""
OME_DTYPES = ("int8", "int16", "int32", "uint8", "uint16", "uint32", "float32", "float64")
"""The pixel types of OME-XML (no float16)."""


class OmeTiffWriter(TiffRowWriter):
    """A pyramidal OME-TIFF (K, H, W) from row bands: one name per channel in `channel_names`,
    `label_names` (a label map) names the class of every label value, `downsampling` nearest or mean."""

    def __init__(
        self,
        path: Path,
        height: int,
        width: int,
        channels: int,
        dtype: np.dtype | str,
        *,
        channel_names: Sequence[str],
        tile: int = 256,
        compression: str = "zlib",
        meta: ImageMeta | None = None,
        downsampling: str = "nearest",
        label_names: Sequence[str] | None = None,
        uuid: str | None = None,
    ) -> None:
        path = Path(path)
        if np.dtype(dtype).name not in OME_DTYPES:
            raise SegpipeError(f"{path}: OME-TIFF cannot store {np.dtype(dtype).name} (use uint8 or float32)")
        if len(channel_names) != channels:
            raise SegpipeError(f"{path}: {len(channel_names)} channel names for {channels} channels")
        self.shapes = level_shapes(height, width, tile)
        self.size = pixel_size(meta or ImageMeta())
        self.channel_names, self.label_names, self.uuid = list(channel_names), label_names, uuid
        self._codec = None if compression == "none" else compression
        self._cancel = threading.Event()
        self._spool = ChunkSpool(temp_beside(path, ".spool"), dtype)
        try:
            self._pyramid = Pyramid(
                self.shapes,
                channels,
                dtype,
                tile,
                downsampling,
                [self._sink(k, channels) for k in range(len(self.shapes))],
            )
            super().__init__(path, height, width, channels, dtype, tile=tile, compression=compression, meta=meta)
        except BaseException:
            self._spool.close()
            raise

    def _sink(self, k: int, channels: int) -> Sink | None:
        """Level k's rows into the spool: every channel, but at level 0 the ones after the first
        (None if none), one block per tile row of a channel."""
        first = int(k == 0)
        if first == channels:
            return None

        def sink(y0: int, block: np.ndarray) -> None:
            for c in range(first, channels):
                self._spool.put((k, c, y0), block[c])

        return sink

    def _level_kwargs(self, k: int) -> dict[str, Any]:
        """tifffile's `write` arguments of level k (tiles come from a generator)."""
        h, w = self.shapes[k]
        t = self.tile
        kwargs: dict[str, Any] = dict(
            shape=(h, w) if self.channels == 1 else (self.channels, h, w),
            dtype=self.dtype,
            tile=(t, t),
            photometric="minisblack",
            compression=self._codec,
            buffersize=t * -(-w // t) * t * self.dtype.itemsize,  # one tile row at a time (see TiffRowWriter)
        )
        if self.size is not None:
            kwargs.update(resolution=self.size.pixels_per_cm(2**k), resolutionunit="CENTIMETER")
        if k:
            kwargs["subfiletype"] = 1
        return kwargs

    def _tiff_kwargs(self, meta: ImageMeta, compression: str) -> dict[str, Any]:
        """Level 0's arguments: room for the reduced levels as SubIFDs, and the OME-XML."""
        metadata: dict[str, Any] = {
            "axes": "YX" if self.channels == 1 else "CYX",
            "Name": image_name(self.path),
            "Channel": {"Name": self.channel_names},
            **(self.size.ome() if self.size is not None else {}),
            **({"UUID": self.uuid} if self.uuid else {}),
        }
        if self.label_names:  # an instance map ([]) names no values
            metadata["MapAnnotation"] = {
                "Namespace": LABEL_VALUES_NAMESPACE,
                "Value": {str(v): name for v, name in enumerate(self.label_names)},
            }
        return {**self._level_kwargs(0), "subifds": len(self.shapes) - 1, "metadata": metadata}

    def _level0_tiles(self) -> Iterator[np.ndarray]:
        """Channel 0 from the stream (feeding the pyramid and spool), then the spooled channels."""
        y = 0
        for strip in self._strips():  # (tile, W, K)
            rows = min(self.tile, self.height - y)
            self._pyramid.push(strip[:rows].transpose(2, 0, 1))
            y += rows
            if y == self.height:  # the last strip: tifffile asks for no tile beyond the last one it needs
                self._pyramid.close()
            yield from strip_tiles(strip[..., 0], self.tile)
            if y == self.height:
                break
        yield from self._spooled_tiles(0, range(1, self.channels))

    def _spooled_tiles(self, k: int, channels: Iterable[int]) -> Iterator[np.ndarray]:
        """The tiles of level k's `channels`, page after page, read back a tile row at a time."""
        h, _ = self.shapes[k]
        for c in channels:
            for y in range(0, h, self.tile):
                if self._cancel.is_set():
                    raise WriteAborted()
                yield from strip_tiles(self._spool.get((k, c, y)), self.tile)

    def _run(self, kwargs: dict[str, Any]) -> None:
        import tifffile

        try:
            with tifffile.TiffWriter(self._tmp, bigtiff=True, ome=True) as tif:
                tif.write(self._level0_tiles(), **kwargs)
                for k in range(1, len(self.shapes)):
                    tif.write(self._spooled_tiles(k, range(self.channels)), **self._level_kwargs(k))
        except BaseException as exc:  # reported to the caller by _put / finish
            self._error = exc

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self._spool.close()

    def abort(self) -> None:
        self._cancel.set()
        try:
            super().abort()
        finally:
            self._spool.close()
