"""Structural checks of a TIFF before any pixel is decoded: one image size per file, and every
tile or strip listed and inside the file (a truncated or corrupt file is refused up front)."""

from __future__ import annotations

import math
from typing import Any

from pipeline.errors import SegpipeError


def check_series(tif: Any, series: Any, path: object) -> None:
    """Refuse a file holding several images of different sizes (reduced-resolution copies aside)."""
    shapes = [
        tuple(s.shape) for s in tif.series if s is series or not (s.keyframe is not None and s.keyframe.is_reduced)
    ]
    if len(set(shapes)) > 1:
        raise SegpipeError(
            f"{path}: the TIFF holds {len(shapes)} images of different sizes {shapes}; segpipe reads "
            "one 2-D image per file and does not guess which one is meant: save that image on its own"
        )


def check_segments(page: Any, file_size: int, path: object) -> None:
    """Every tile/strip the image needs is listed and lies inside the file's `file_size` bytes."""
    h, w, spp = int(page.imagelength), int(page.imagewidth), int(page.samplesperpixel)
    offsets, counts = page.dataoffsets, page.databytecounts
    end = max((int(o) + int(c) for o, c in zip(offsets, counts) if o and c), default=0)
    if page.is_final:
        end = max(end, int(offsets[0]) + h * w * spp * page.dtype.itemsize)
    else:
        th, tw = (int(page.tilelength), int(page.tilewidth)) if page.is_tiled else (int(page.rowsperstrip), w)
        need = math.ceil(h / max(th, 1)) * math.ceil(w / max(tw, 1)) * (spp if page.planarconfig == 2 else 1)
        listed = min(len(offsets), len(counts))
        if listed < need:
            raise SegpipeError(f"{path}: corrupt TIFF: {h} x {w} needs {need} tiles/strips, {listed} listed")
    if end > file_size:
        raise SegpipeError(f"{path}: truncated TIFF: the image data runs to byte {end}, the file has {file_size}")
