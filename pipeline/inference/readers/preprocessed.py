"""The training preprocessing a checkpoint records, applied to an image read by row bands.

`segpipe train` stores the dataset's section of configs/augment.yaml in the checkpoint (`augment`);
`pipeline.transforms.presets.build_preprocess_transforms` turns it into the deterministic chain
channel selection -> optional CLAHE -> float32 -> per channel either zscore (MONAI
NormalizeIntensity: (x - mean) / std, population std, std 0 -> 1) or percentile (MONAI
ScaleIntensityRangePercentiles: the 0.5 and 99.5 percentiles -> 0 and 1, clipped).
`PreprocessedReader` gives the same values band by band:

* channel selection: per band, free.
* zscore without CLAHE, streamed: one pass over bands of `band_rows` rows merges per-channel counts,
  means and sums of squared deviations in float64 (Chan, Golub & LeVeque 1979, pairwise update);
  bands are then normalised by MONAI's NormalizeIntensity given those statistics.
* percentile without CLAHE on integer images of at most 16 bits, streamed: one pass fills an exact
  per-channel histogram of the values; the order statistics it gives and numpy's "linear"
  interpolation (Hyndman & Fan 1996 definition 7) reproduce np.percentile exactly; bands are then
  scaled by MONAI's ScaleIntensityRange.
* CLAHE (its tile grid and min-max scaling are global) and percentile on other dtypes: the whole
  (channel-selected) image is loaded and run through `build_preprocess_transforms`, only when
  C' * H * W <= `max_megapixels` * 1e6; otherwise SegpipeError.

Memory of the streamed modes is the band (band_rows x W x C'), whatever the image height.

`CheckedReader` sits under all of it, directly on the file's reader: the one place where a failing
read (truncated or corrupt data, whatever the library's exception) becomes a SegpipeError naming the
file, and where non-finite values (NaN, +-Inf, or floats beyond float32's range) are refused or,
with `nonfinite`, replaced.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Mapping

import numpy as np

from pipeline.errors import SegpipeError
from pipeline.inference.readers.images import ImageReader

PERCENTILES = (0.5, 99.5)
"""The percentiles `build_preprocess_transforms` maps to 0 and 1 (normalize: percentile)."""
_BAND_ROWS = 256
"""Rows per band of the statistics pass."""


_F32_MAX = float(np.finfo(np.float32).max)


def _nonfinite_mask(rows: np.ndarray) -> np.ndarray | None:
    """Pixels (rows, W) with a value that is not a finite float32 in any channel; None if none."""
    if rows.dtype.kind != "f":
        return None
    bad = ~np.isfinite(rows)
    if rows.dtype.itemsize > 4:
        with np.errstate(invalid="ignore"):
            bad |= np.abs(rows) > _F32_MAX
    if not bad.any():
        return None
    return bad.any(axis=0)


class CheckedReader(ImageReader):
    """`reader` with every read checked: errors -> SegpipeError naming the file, non-finite values
    refused (SegpipeError with their count) or replaced by `nonfinite` (the count is `replaced`)."""

    def __init__(self, reader: ImageReader, nonfinite: float | None = None, band_rows: int = _BAND_ROWS) -> None:
        self.reader = reader
        self.path, self.shape, self.dtype = reader.path, reader.shape, reader.dtype
        self.meta, self.two_d = reader.meta, reader.two_d
        if nonfinite is not None and self.dtype.kind == "f" and abs(nonfinite) > float(np.finfo(self.dtype).max):
            raise SegpipeError(
                f"{self.path}: the replacement of non-finite values {nonfinite:g} does not fit the image's {self.dtype}"
            )
        self.nonfinite = nonfinite
        self.band_rows = band_rows
        self.replaced = 0
        self._counted = 0  # rows below this were counted in `replaced` (some rows are read twice)

    def _read(self, start: int, stop: int) -> np.ndarray:
        c, _, w = self.shape
        try:
            rows = np.asarray(self.reader.read_rows(start, stop))
        except SegpipeError:
            raise
        except Exception as exc:  # every library has its own exceptions for truncated or corrupt data
            raise SegpipeError(
                f"{self.path}: cannot read rows {start}..{stop} (truncated or corrupt file?): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if rows.shape != (c, stop - start, w):
            raise SegpipeError(
                f"{self.path}: rows {start}..{stop} read back with shape {rows.shape}, "
                f"expected {(c, stop - start, w)} (truncated or corrupt file?)"
            )
        return rows

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        rows = self._read(start, stop)
        bad = _nonfinite_mask(rows)
        if bad is None:
            return rows
        if self.nonfinite is None:
            raise SegpipeError(
                f"{self.path}: {self._count()} pixel(s) hold non-finite values (NaN, +-Inf or beyond float32's "
                f"range), the first in row {start + int(np.argmax(bad.any(axis=1)))}; fix the image, or replace "
                "them with a value (`segpipe infer --nonfinite VALUE`)"
            )
        lo = max(self._counted - start, 0)
        self.replaced += int(bad[lo:].sum())
        self._counted = max(self._counted, stop)
        rows = rows.copy()
        with np.errstate(invalid="ignore"):
            rows[~np.isfinite(rows) | (np.abs(rows) > _F32_MAX)] = self.nonfinite
        return rows

    def _count(self) -> str:
        """The number of non-finite pixels of the whole image (a streamed pass), as text."""
        h, total = self.shape[1], 0
        for start in range(0, h, self.band_rows):
            try:
                bad = _nonfinite_mask(self._read(start, min(start + self.band_rows, h)))
            except SegpipeError:
                return f"at least {total}"
            total += 0 if bad is None else int(bad.sum())
        return str(total)


def describe_preprocessing(augment: Mapping[str, Any]) -> str:
    """A recorded preprocessing in words, e.g. "channels [1], CLAHE 0.01, zscore"."""
    parts = [f"channels {list(augment['channels'])}"] if augment.get("channels") is not None else []
    parts += [f"CLAHE {augment['clahe']:g}"] if augment.get("clahe") is not None else []
    return ", ".join(parts + [str(augment.get("normalize"))])


def _histogram_dtype(dtype: np.dtype) -> bool:
    """True for dtypes whose values an exact histogram holds cheaply (bool, integers <= 16 bits)."""
    return dtype == np.bool_ or (dtype.kind in "ui" and dtype.itemsize <= 2)


def histogram_percentile(counts: np.ndarray, offset: int, q: float) -> float:
    """np.percentile(values.astype(float32), np.asarray(q)) of the values a histogram counts.

    `counts[i]` is the number of values equal to i + offset (integers, exact in float32). numpy's
    "linear" method: virtual index (n - 1) * q / 100 between the order statistics a = x_(floor),
    b = x_(floor + 1), gamma its fractional part; a + (b - a) * gamma below gamma 0.5, else
    b - (b - a) * (1 - gamma), (b - a) in float32 and the rest in float64 as numpy does for a
    float32 array and an array q.
    """
    n = int(counts.sum())
    if n == 0:
        raise SegpipeError("percentile of an empty image")
    cumulative = np.cumsum(counts)

    def order_statistic(k: int) -> np.float32:
        return np.float32(int(np.searchsorted(cumulative, k, side="right")) + offset)

    virtual = (n - 1) * np.true_divide(np.float64(q), 100)
    if virtual >= n - 1:
        return float(order_statistic(n - 1))
    below = math.floor(virtual)
    gamma = virtual - np.float64(below)
    a, b = order_statistic(below), order_statistic(below + 1)
    diff = np.float64(b - a)
    return float(np.float64(b) - diff * (1 - gamma) if gamma >= 0.5 else np.float64(a) + diff * gamma)


class PreprocessedReader(ImageReader):
    """`reader`'s image after the recorded preprocessing `augment`: (C', H, W) float32 by row bands.

    `augment` is a checkpoint's `augment` record (a configs/augment.yaml section); `where` names
    its source in errors. Statistics or the whole-image result are computed at the first
    `read_rows`. The wrapped reader stays open: its owner closes it.
    """

    def __init__(
        self,
        reader: ImageReader,
        augment: Mapping[str, Any],
        *,
        max_megapixels: float,
        where: str = "the checkpoint",
        band_rows: int = _BAND_ROWS,
    ) -> None:
        from pipeline.transforms.presets import preset

        self.augment = dict(preset(where, augment))
        self.reader = reader
        self.path = reader.path
        self.meta = reader.meta
        self.two_d = reader.two_d
        self.band_rows = int(band_rows)
        c, h, w = reader.shape
        channels = self.augment["channels"]
        if channels is not None and max(channels) >= c:
            raise SegpipeError(
                f"{reader.path}: the image has {c} channel(s), but the preprocessing recorded in {where} "
                f"selects channels {list(channels)} (augment.channels at training)"
            )
        identity = channels is None or list(channels) == list(range(c))
        self.channels: list[int] | None = None if identity else list(channels)
        self.shape = (len(channels) if channels is not None else c, h, w)
        self.dtype = np.dtype(np.float32)
        if self.augment["clahe"] is None and self.augment["normalize"] == "zscore":
            self.mode = "streamed"
        elif self.augment["clahe"] is None and _histogram_dtype(reader.dtype):
            self.mode = "streamed, exact histogram"
        else:
            self.mode = "whole image"
            values = self.shape[0] * h * w
            if values > max_megapixels * 1e6:
                raise SegpipeError(
                    f"{reader.path}: the preprocessing recorded in {where} ({describe_preprocessing(self.augment)}) "
                    f"needs the whole image in memory, and {self.shape[0]} channel(s) x {h} x {w} = "
                    f"{values / 1e6:g} megapixels exceed preprocess_max_megapixels = {max_megapixels:g} "
                    "(configs/inference.yaml); raise that limit if the memory allows (CLAHE peaks at about "
                    "60 bytes per value), or set preprocess: intensity to skip the checkpoint's preprocessing"
                )
        self._normalizers: list[Any] | None = None
        self._whole: np.ndarray | None = None

    def describe(self) -> str:
        """The preprocessing and how it runs, for the summary line."""
        return f"{describe_preprocessing(self.augment)} ({self.mode})"

    def _selected(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the wrapped reader, channels selected, (C', rows, W) as stored."""
        rows = self.reader.read_rows(start, stop)
        return rows if self.channels is None else rows[self.channels]

    def _bands(self) -> Iterator[np.ndarray]:
        """The image in bands of `band_rows` rows, channels selected, as stored."""
        h = self.shape[1]
        for start in range(0, h, self.band_rows):
            yield self._selected(start, min(start + self.band_rows, h))

    def _zscore(self) -> list[Any]:
        """MONAI NormalizeIntensity per channel with the image's mean and population std."""
        from monai.transforms import NormalizeIntensity

        c = self.shape[0]
        count = np.zeros(c)
        mean = np.zeros(c)
        m2 = np.zeros(c)
        for band in self._bands():
            for i in range(c):
                x = band[i].astype(np.float32)  # the values MONAI sees after CastToTyped
                n_b = x.size
                mean_b = float(x.mean(dtype=np.float64))
                m2_b = float(np.square(np.subtract(x, mean_b, dtype=np.float64)).sum())
                n = count[i] + n_b
                delta = mean_b - mean[i]
                mean[i] += delta * n_b / n
                m2[i] += m2_b + delta * delta * count[i] * n_b / n
                count[i] = n
        std = np.sqrt(m2 / count)
        return [
            NormalizeIntensity(subtrahend=[float(mean[i])], divisor=[float(std[i])], channel_wise=True)
            for i in range(c)
        ]

    def _percentile(self) -> list[Any]:
        """MONAI ScaleIntensityRange per channel from the exact histogram's percentiles."""
        from monai.transforms import ScaleIntensityRange

        dtype = self.reader.dtype
        offset = 0 if dtype == np.bool_ else int(np.iinfo(dtype).min)
        bins = 2 if dtype == np.bool_ else int(np.iinfo(dtype).max) - offset + 1
        counts = np.zeros((self.shape[0], bins), np.int64)
        for band in self._bands():
            for i in range(self.shape[0]):
                counts[i] += np.bincount((band[i].astype(np.int32) - offset).ravel(), minlength=bins)
        scalers = []
        for i in range(self.shape[0]):
            low, high = (histogram_percentile(counts[i], offset, q) for q in PERCENTILES)
            scalers.append(ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True))
        return scalers

    def _whole_image(self) -> np.ndarray:
        """`build_preprocess_transforms` on the whole channel-selected image, float32 (C', H, W)."""
        from pipeline.transforms.presets import build_preprocess_transforms

        c, h, w = self.shape
        image = np.empty((c, h, w), self.reader.dtype)
        for start in range(0, h, self.band_rows):
            stop = min(start + self.band_rows, h)
            image[:, start:stop] = self._selected(start, stop)
        chain = build_preprocess_transforms(str(self.path), {**self.augment, "channels": None})
        out = chain({"image": image})["image"]
        return np.ascontiguousarray(np.asarray(out, dtype=np.float32))

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Preprocessed rows [start, stop) as float32 (C', stop - start, W)."""
        from monai.utils import convert_to_numpy

        if self.mode == "whole image":
            if self._whole is None:
                self._whole = self._whole_image()
            return self._whole[:, start:stop]
        if self._normalizers is None:
            self._normalizers = self._zscore() if self.augment["normalize"] == "zscore" else self._percentile()
        rows = self._selected(start, stop).astype(np.float32)
        return np.stack(
            [convert_to_numpy(f(rows[i : i + 1]), dtype=np.float32)[0] for i, f in enumerate(self._normalizers)]
        )

    def close(self) -> None:
        """Drop the statistics and the whole-image result (the wrapped reader is not closed)."""
        self._normalizers = None
        self._whole = None


__all__ = ["PERCENTILES", "CheckedReader", "PreprocessedReader", "describe_preprocessing", "histogram_percentile"]
