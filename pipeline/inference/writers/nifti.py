"""NIfTI-1 output written by row bands: `NiftiRowWriter`.

The input's header (affine, pixdim, codes) with the shape and dtype of the result. NIfTI stores
arrays in Fortran order, so a row band is strided on disk: each band is written column by column (a
seek and a write each) into a sparse temp `.nii`; `.nii.gz` is compressed from it at the end
(streaming). Temp files and publishing as for every `RowWriter` (base.py).
"""

from __future__ import annotations

import gzip
import io
import shutil
from pathlib import Path
from typing import BinaryIO

import numpy as np

from pipeline.errors import SegpipeError
from pipeline.files import has_suffix
from pipeline.inference.readers.images import ImageMeta
from pipeline.inference.writers.base import RowWriter, temp_beside


class NiftiRowWriter(RowWriter):
    """NIfTI-1 array (K, H, W) (or (H, W) when `two_d`) written by row bands, header from the input."""

    def __init__(
        self,
        path: Path,
        height: int,
        width: int,
        channels: int,
        dtype: np.dtype | str,
        *,
        meta: ImageMeta | None = None,
        two_d: bool = False,
    ) -> None:
        import nibabel as nib

        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.height, self.width, self.channels = height, width, channels
        if two_d and channels != 1:
            raise SegpipeError(f"{self.path}: a 2-D NIfTI holds one channel, not {channels}")
        header = meta.nifti_header.copy() if meta is not None and meta.nifti_header is not None else nib.Nifti1Header()
        if not isinstance(header, nib.Nifti1Header):
            header = nib.Nifti1Header.from_header(header)
        header.set_data_shape((height, width) if two_d else (channels, height, width))
        try:
            header.set_data_dtype(self.dtype)
        except Exception as exc:
            raise SegpipeError(f"{self.path}: NIfTI cannot store {self.dtype} (use uint8 or float32)") from exc
        header.set_slope_inter(None, None)
        buf = io.BytesIO()
        header.write_to(buf)
        self._offset = -(-buf.tell() // 16) * 16
        header.set_data_offset(self._offset)
        self._tmp = temp_beside(self.path, ".tmp.nii")
        with open(self._tmp, "wb") as fh:
            header.write_to(fh)
            fh.write(b"\0" * (self._offset - fh.tell()))
            fh.truncate(self._offset + height * width * channels * self.dtype.itemsize)
        self._file: BinaryIO | None = open(self._tmp, "r+b")
        self._next = 0

    def write(self, y0: int, rows: np.ndarray) -> None:
        """Rows [y0, y0 + n) as (K, n, W): one contiguous run per column (Fortran order on disk)."""
        if y0 != self._next:
            raise SegpipeError(f"{self.path}: rows arrive out of order ({y0}, expected {self._next})")
        k, n, w = rows.shape
        block = np.ascontiguousarray(rows.astype(self.dtype, copy=False).transpose(2, 1, 0))  # (W, n, K)
        size = self.dtype.itemsize
        if self._file is None:
            raise SegpipeError(f"{self.path}: rows written after the file was finished")
        for x in range(w):
            self._file.seek(self._offset + (x * self.height + y0) * k * size)
            self._file.write(block[x].tobytes())
        self._next = y0 + n

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def finish(self) -> None:
        self._close()
        if self._next != self.height:
            self._tmp.unlink(missing_ok=True)
            raise SegpipeError(f"{self.path}: only {self._next} of {self.height} rows were produced")
        if not has_suffix(self.path, (".gz",)):
            self._done = self._tmp
            return
        packed = temp_beside(self.path, ".tmp.nii.gz")
        try:
            # the gzip header names the final file and no time: the same result, the same bytes
            with (
                open(self._tmp, "rb") as src,
                open(packed, "wb") as raw,
                gzip.GzipFile(self.path.name[:-3], "wb", 6, raw, mtime=0) as dst,
            ):
                shutil.copyfileobj(src, dst, 1 << 22)
        except BaseException:
            packed.unlink(missing_ok=True)
            raise
        finally:
            self._tmp.unlink(missing_ok=True)
        self._done = packed

    def abort(self) -> None:
        self._close()
        self._tmp.unlink(missing_ok=True)
        if self._done is not None:
            self._done.unlink(missing_ok=True)
            self._done = None
