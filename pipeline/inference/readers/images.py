"""Lazy readers of 2-D images, row band by row band: `open_image(path)` -> `ImageReader`.

Every reader gives `shape` (C, H, W), `dtype` and `read_rows(start, stop)` -> (C, stop - start, W)
in native byte order, reading only what those rows need:

* TIFF / BigTIFF / OME-TIFF (tifffile): uncompressed contiguous data by direct reads at the row
  offsets; tiled or stripped (any codec tifffile decodes) by reading and decoding only the tiles or
  strips the rows touch. Channels: samples of a page (YXS, planar SYX) or one page per channel
  (OME/ImageJ CYX). Memory-mapping is avoided on purpose: mapped pages count in the process's
  resident memory until unmapped, so a mapped 3 GB image would show 3 GB of RSS at the end.
* NIfTI (nibabel): arrays (C, H, W), as `pipeline.data.io.write_volume` stores them, or (H, W);
  sliced through nibabel's array proxy (file reads of the needed bytes). A `.nii.gz` is first
  decompressed, streaming, into a temporary `.nii` (gzip cannot seek backwards cheaply).
* PNG / JPEG (imageio): read whole; they are small by construction.
* Anything else SimpleITK reads (MHA, NRRD, ...): ITK's streaming region reads where the format
  supports them (ImageFileReader extract region).

`meta` carries the spacing/metadata a writer can keep: TIFF resolution tags, OME physical pixel
sizes, the NIfTI header (affine, pixdim), SimpleITK spacing as a TIFF resolution.
"""

from __future__ import annotations

import gzip
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import SegpipeError
from pipeline.files import NIFTI_SUFFIXES, PNG_JPEG_SUFFIXES, TIFF_SUFFIXES, has_suffix
from pipeline.inference.readers.tiff_checks import check_segments, check_series

_CHANNEL_AXES = "CQI"
"""Series axes tifffile uses for a stack of 2-D planes that we read as channels."""


@dataclass
class ImageMeta:
    """Spacing/metadata a writer may keep. TIFF convention: pixels per unit along (x, y)."""

    resolution: tuple[Any, Any] | None = None
    resolution_unit: int | None = None
    """TIFF ResolutionUnit: 1 none, 2 inch, 3 centimeter."""
    ome_pixels: dict[str, Any] = field(default_factory=dict)
    """OME Pixels attributes PhysicalSizeX/Y and their units."""
    nifti_header: Any = None
    """The input's nibabel Nifti1Header (affine, pixdim, codes) when the input is NIfTI."""


class ImageReader:
    """Base: a 2-D image of `shape` (C, H, W) read by row bands."""

    path: Path
    shape: tuple[int, int, int]
    dtype: np.dtype
    meta: ImageMeta
    two_d: bool = False
    """True when the file stores the image without a channel axis (a 2-D NIfTI)."""

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as (C, stop - start, W), native byte order."""
        raise NotImplementedError

    def close(self) -> None:
        """Release file handles and temporary files."""

    def __enter__(self) -> "ImageReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check(self) -> None:
        c, h, w = self.shape
        if h < 1 or w < 1 or c < 1:
            raise SegpipeError(f"{self.path}: zero-size image (C, H, W) = {self.shape}")
        self.dtype = np.dtype(self.dtype).newbyteorder("=")
        if (
            not (
                np.issubdtype(self.dtype, np.integer)
                or np.issubdtype(self.dtype, np.floating)
                or self.dtype == np.bool_
            )
            or self.dtype == np.uint64
        ):
            raise SegpipeError(
                f"{self.path}: pixel type {self.dtype} is not supported (bool, int8..int64, "
                "uint8..uint32, float); convert the image, e.g. to float32"
            )


class ArrayReader(ImageReader):
    """An in-memory (C, H, W) array read by row bands (used by `predict`)."""

    def __init__(self, array: np.ndarray, name: str = "<array>") -> None:
        self.path = Path(name)
        if array.ndim != 3:
            raise SegpipeError(f"{name}: expected an array (C, H, W), got shape {array.shape}")
        self.array = array
        self.shape = tuple(int(s) for s in array.shape)  # type: ignore[assignment]
        self.dtype = array.dtype
        self.meta = ImageMeta()
        self._check()

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.array[:, start:stop, :], dtype=self.dtype)


class TiffReader(ImageReader):
    """TIFF, BigTIFF, OME-TIFF through tifffile, reading only the segments a row band touches."""

    def __init__(self, path: Path) -> None:
        import tifffile

        self.path = path
        self._tif = tifffile.TiffFile(path)
        try:
            series = self._tif.series[0]
            axes = "".join(a for a, n in zip(series.axes, series.shape) if n != 1 or a in "YX")
            shape = [n for a, n in zip(series.axes, series.shape) if n != 1 or a in "YX"]
            pages = [p.aspage() if hasattr(p, "aspage") else p for p in series.pages if p is not None]
            if axes in ("YX", "YXS", "SYX"):
                self._pages = pages[:1]
            elif len(axes) == 3 and axes[0] in _CHANNEL_AXES and axes[1:] == "YX" and len(pages) == shape[0]:
                self._pages = pages
            else:
                raise SegpipeError(
                    f"{path}: expected a 2-D image with channels (axes YX, YXS, SYX or CYX), "
                    f"got axes {series.axes} with shape {series.shape}"
                )
            check_series(self._tif, series, self.path)
            first = self._pages[0]
            h, w = int(first.imagelength), int(first.imagewidth)
            c = sum(int(p.samplesperpixel) for p in self._pages)
            self.shape = (c, h, w)
            self.dtype = first.dtype
            if first.dtype is None:
                raise SegpipeError(f"{path}: TIFF sample format not supported")
            for p in self._pages:
                if (p.imagelength, p.imagewidth, p.dtype) != (h, w, first.dtype) or p.imagedepth > 1:
                    raise SegpipeError(f"{path}: the channel pages differ in size or type")
            self.meta = self._read_meta(first)
            self._check()
            for p in self._pages:
                check_segments(p, int(self._tif.filehandle.size), self.path)
        except Exception:
            self._tif.close()
            raise

    def _read_meta(self, page: Any) -> ImageMeta:
        import tifffile

        meta = ImageMeta()
        tags = page.tags
        if "XResolution" in tags and "YResolution" in tags:
            meta.resolution = (tags["XResolution"].value, tags["YResolution"].value)
            meta.resolution_unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2
            if meta.resolution_unit not in (1, 2, 3):  # a damaged tag: keep no spacing rather than fail
                meta.resolution, meta.resolution_unit = None, None
        if self._tif.is_ome and self._tif.ome_metadata:
            image = tifffile.xml2dict(self._tif.ome_metadata).get("OME", {}).get("Image", {})
            image = image[0] if isinstance(image, list) else image
            pixels = image.get("Pixels", {}) if isinstance(image, dict) else {}
            meta.ome_pixels = {
                k: v
                for k, v in pixels.items()
                if k in ("PhysicalSizeX", "PhysicalSizeY", "PhysicalSizeXUnit", "PhysicalSizeYUnit")
            }
        return meta

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        planes = [self._page_rows(p, start, stop) for p in self._pages]
        out = planes[0] if len(planes) == 1 else np.concatenate(planes, axis=0)
        return out.astype(self.dtype, copy=False)

    def _page_rows(self, page: Any, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of one page as (samples, rows, W)."""
        h, w, spp = int(page.imagelength), int(page.imagewidth), int(page.samplesperpixel)
        separate = page.planarconfig == 2 and spp > 1
        fh = self._tif.filehandle
        dtype = np.dtype(self._tif.byteorder + page.dtype.char)
        n = stop - start
        if page.is_final and fh.is_file:
            base = page.dataoffsets[0]
            with fh.lock:
                if separate:
                    return np.stack(
                        [
                            fh.read_array(dtype, n * w, base + ((s * h + start) * w) * dtype.itemsize).reshape(n, w)
                            for s in range(spp)
                        ]
                    )
                row = w * spp
                data = fh.read_array(dtype, n * row, base + start * row * dtype.itemsize)
            return data.reshape(n, w, spp).transpose(2, 0, 1)
        if page.is_tiled:
            th, tw = int(page.tilelength), int(page.tilewidth)
        else:
            th, tw = min(int(page.rowsperstrip), h), w
        nty, ntx = math.ceil(h / th), math.ceil(w / tw)
        nsep = spp if separate else 1
        index = [
            s * nty * ntx + ty * ntx + tx
            for s in range(nsep)
            for ty in range(start // th, (stop - 1) // th + 1)
            for tx in range(ntx)
        ]
        out = np.zeros((spp, n, w), dtype)
        decode = page.decode
        offsets, counts = page.dataoffsets, page.databytecounts
        for data, i in fh.read_segments(
            [offsets[i] for i in index], [counts[i] for i in index], indices=index, sort=True, lock=fh.lock
        ):
            seg, (s, _, y, x, _), _ = decode(data, i, jpegtables=page.jpegtables, jpegheader=page.jpegheader)
            if seg is None:  # an empty segment (offset/bytecount 0): zeros
                continue
            seg = seg.reshape(seg.shape[-3:])  # (rows, cols, samples)
            lo, hi = max(start, y), min(stop, y + seg.shape[0], h)
            cols = min(seg.shape[1], w - x)
            block = seg[lo - y : hi - y, :cols].transpose(2, 0, 1)
            out[s : s + block.shape[0], lo - start : hi - start, x : x + cols] = block
        return out

    def close(self) -> None:
        self._tif.close()


class NiftiReader(ImageReader):
    """NIfTI (C, H, W) or (H, W) through nibabel's array proxy; .nii.gz via a temporary .nii."""

    def __init__(self, path: Path) -> None:
        import nibabel as nib

        self.path = path
        self._tmp: Path | None = None
        source = path
        try:
            if has_suffix(path, (".gz",)):
                fd, tmp = tempfile.mkstemp(prefix="segpipe-", suffix=".nii")
                self._tmp = Path(tmp)
                with gzip.open(path, "rb") as src, os.fdopen(fd, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)
                source = self._tmp
            img = nib.load(str(source))
            if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
                raise SegpipeError(f"{path}: not a NIfTI image")
            shape = tuple(int(s) for s in img.shape)
            if len(shape) == 2:
                self.two_d = True
                self.shape = (1, shape[0], shape[1])
            elif len(shape) == 3:
                self.two_d = False
                self.shape = shape  # type: ignore[assignment]
            else:
                raise SegpipeError(
                    f"{path}: expected a NIfTI array (C, H, W) (as `segpipe prepare` writes) or (H, W), "
                    f"got shape {shape}"
                )
            self._img = img
            need = int(getattr(img.dataobj, "offset", 0)) + math.prod(shape) * img.get_data_dtype().itemsize
            if os.path.getsize(source) < need:  # header and data: the (decompressed) file is shorter
                raise SegpipeError(f"{path}: truncated NIfTI: {need} bytes expected, {os.path.getsize(source)} found")
            self.meta = ImageMeta(nifti_header=img.header.copy())
            self.dtype = np.asarray(img.dataobj[(slice(0, 1),) * len(shape)]).dtype if min(shape) else np.uint8
            self._check()
        except SegpipeError:
            self.close()
            raise
        except Exception as exc:
            self.close()
            raise SegpipeError(f"{path}: cannot read as NIfTI ({type(exc).__name__}: {exc})") from exc

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        if self.two_d:
            return np.asarray(self._img.dataobj[start:stop, :], dtype=self.dtype)[None]
        return np.asarray(self._img.dataobj[:, start:stop, :], dtype=self.dtype)

    def close(self) -> None:
        self._img = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None


class WholeReader(ImageReader):
    """PNG / JPEG, read whole through imageio (small by construction)."""

    def __init__(self, path: Path) -> None:
        import imageio.v3 as iio

        self.path = path
        try:
            data = np.asarray(iio.imread(path))
            info = iio.immeta(path)
        except Exception as exc:
            raise SegpipeError(f"{path}: cannot read as an image ({type(exc).__name__}: {exc})") from exc
        if data.ndim == 2:
            data = data[None]
        elif data.ndim == 3:
            data = np.moveaxis(data, -1, 0)
        else:
            raise SegpipeError(f"{path}: expected a 2-D image (H, W) or (H, W, C), got shape {data.shape}")
        self.array = np.ascontiguousarray(data)
        self.shape = tuple(int(s) for s in data.shape)  # type: ignore[assignment]
        self.dtype = data.dtype
        self.meta = ImageMeta()
        dpi = info.get("dpi")
        if dpi and len(dpi) == 2 and all(d and d > 0 for d in dpi):
            self.meta.resolution, self.meta.resolution_unit = (float(dpi[0]), float(dpi[1])), 2
        self._check()

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        return self.array[:, start:stop, :]


class SitkReader(ImageReader):
    """Any other format SimpleITK reads, by ITK region reads (streamed where the format allows)."""

    def __init__(self, path: Path) -> None:
        import SimpleITK as sitk

        self.path = path
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError as exc:
            raise SegpipeError(f"{path}: cannot read as an image ({str(exc).strip().splitlines()[-1]})") from exc
        size = reader.GetSize()
        if len(size) == 3 and size[2] == 1:
            size = size[:2]
        if len(size) != 2:
            raise SegpipeError(f"{path}: expected a 2-D image, got size {reader.GetSize()} (x, y, z)")
        self._reader = reader
        self._ndim = reader.GetDimension()
        w, h = int(size[0]), int(size[1])
        self.shape = (int(reader.GetNumberOfComponents()), h, w)
        self.dtype = np.uint8
        self.meta = ImageMeta()
        spacing = reader.GetSpacing()[:2]
        if all(s > 0 for s in spacing) and tuple(spacing) != (1.0, 1.0):
            # ITK spacing is in mm; TIFF resolution in pixels per cm
            self.meta.resolution = (10.0 / spacing[0], 10.0 / spacing[1])
            self.meta.resolution_unit = 3
        if h and w:
            self.dtype = self.read_rows(0, 1).dtype
        self._check()

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        import SimpleITK as sitk

        w = self.shape[2]
        extra = (0,) * (self._ndim - 2)
        self._reader.SetExtractIndex((0, start) + extra)
        self._reader.SetExtractSize((w, stop - start) + (1,) * (self._ndim - 2))
        try:
            arr = sitk.GetArrayFromImage(self._reader.Execute())
        except RuntimeError as exc:
            raise SegpipeError(f"{self.path}: cannot read rows {start}..{stop} ({str(exc).strip()[-200:]})") from exc
        arr = arr.reshape(stop - start, w, self.shape[0])
        return np.ascontiguousarray(arr.transpose(2, 0, 1))


def open_image(path: str | os.PathLike[str]) -> ImageReader:
    """A lazy reader for `path`, chosen by suffix; SegpipeError naming the file if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise SegpipeError(f"{path}: input image not found")
    try:
        if has_suffix(path, TIFF_SUFFIXES):
            return TiffReader(path)
        if has_suffix(path, NIFTI_SUFFIXES):
            return NiftiReader(path)
        if has_suffix(path, PNG_JPEG_SUFFIXES):
            return WholeReader(path)
        return SitkReader(path)
    except SegpipeError:
        raise
    except Exception as exc:  # each library has its own exception types for corrupt files
        expected = (
            "a TIFF"
            if has_suffix(path, TIFF_SUFFIXES)
            else "a NIfTI image"
            if has_suffix(path, NIFTI_SUFFIXES)
            else "in a format segpipe reads (TIFF, NIfTI, PNG, JPEG, or one SimpleITK reads)"
        )
        raise SegpipeError(
            f"{path}: cannot read as an image ({type(exc).__name__}: {exc}); the file is damaged or not {expected}"
        ) from exc
