"""Reading raw dataset files and reading/writing prepared NIfTI volumes, atomically.

TIFF through tifffile, GIF/PNG/JPEG through imageio (the scikit-image stack), NIfTI through
nibabel, anything else through SimpleITK.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np

from pipeline.errors import SegpipeError
from pipeline.files import IMAGEIO_SUFFIXES, NIFTI_SUFFIXES, TIFF_SUFFIXES, atomic_path


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def header_shape(path: Path) -> tuple[int, ...]:
    """An image's shape as its header declares it, without decoding pixels: (H, W) or (H, W, C)
    (a TIFF: its first series, all pages; a palette image counts one channel)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in TIFF_SUFFIXES:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            return tuple(tif.series[0].shape)
    if suffix in IMAGEIO_SUFFIXES:
        from PIL import Image  # Pillow reads the size from the header; its own bomb check applies

        with Image.open(path) as image:
            width, height = image.size
            bands = len(image.getbands())
        return (height, width) if bands == 1 else (height, width, bands)
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        import nibabel as nib

        return tuple(nib.load(str(path)).shape)
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    components = reader.GetNumberOfComponents()
    return tuple(reversed(reader.GetSize())) + ((components,) if components > 1 else ())


def read_raster(path: Path, max_values: int | None = None) -> np.ndarray:
    """Read a 2-D raster as stored: (H, W) or (H, W, C). GIFs give their first frame.

    With `max_values`, an image whose header declares more values (H x W x C) is refused before
    any pixel is decoded."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if max_values is not None and math.prod(shape := header_shape(path)) > max_values:
            raise SegpipeError(
                f"{path}: the header declares a {'x'.join(map(str, shape))} image ({math.prod(shape)} values), more "
                f"than the limit of {max_values} (prepare.limits.max_image_values); refused before decoding"
            )
        if suffix in TIFF_SUFFIXES:
            import tifffile

            return tifffile.imread(path)
        if suffix in IMAGEIO_SUFFIXES:
            import imageio.v3 as iio

            return iio.imread(path, index=0) if suffix == ".gif" else iio.imread(path)
        if path.name.lower().endswith(NIFTI_SUFFIXES):
            return read_volume(path)
        import SimpleITK as sitk

        return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    except SegpipeError:
        raise
    except Exception as exc:  # every reader has its own exception types
        raise SegpipeError(f"{path}: cannot read as an image ({type(exc).__name__}: {exc})") from exc


FLOAT32_MAX = float(np.finfo(np.float32).max)


def checked_image(array: np.ndarray, path: Path) -> np.ndarray:
    """An image's pixels as training can use them: NaN, +-inf and floats beyond float32 are an error
    naming `path` and the count (they would poison the statistics and the loss silently); 64-bit
    integers are stored as int32 when they fit, else an error; bool becomes uint8."""
    kind = array.dtype.kind
    if kind == "b":
        return array.astype(np.uint8)
    if kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(array) | (np.abs(array) > FLOAT32_MAX)))
        if bad:
            raise SegpipeError(
                f"{path}: {bad} pixel(s) are NaN, infinite or beyond float32 ({array.dtype}); expected finite "
                "values (replace them in the image, e.g. by 0)"
            )
        return array
    if kind in "iu" and array.dtype.itemsize == 8:
        if array.size and (array.min() < np.iinfo(np.int32).min or array.max() > np.iinfo(np.int32).max):
            raise SegpipeError(
                f"{path}: {array.dtype} pixels up to {array.max()} do not fit 32 bits; expected an image of at most "
                "32-bit integers or floats"
            )
        return array.astype(np.int32)
    if kind not in "iu":
        raise SegpipeError(f"{path}: {array.dtype} pixels; expected integer or floating-point image values")
    return array


def read_volume(path: Path) -> np.ndarray:
    """Read a prepared NIfTI volume back as the channel-first array it was written from."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        return np.asarray(img.dataobj)
    except Exception as exc:
        raise SegpipeError(f"{path}: cannot read as NIfTI ({type(exc).__name__}: {exc})") from exc


def write_volume(path: Path, array: np.ndarray) -> None:
    """Write a channel-first array as NIfTI (identity affine), atomically."""
    import nibabel as nib

    with atomic_path(Path(path)) as tmp:
        nib.save(nib.Nifti1Image(np.ascontiguousarray(array), affine=np.eye(4)), str(tmp))


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(text)
