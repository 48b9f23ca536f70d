"""Per-pixel loss weight maps of the U-Net paper (Ronneberger et al., MICCAI 2015, equation 2).

    w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))**2 / (2 * sigma**2))

`w_c` balances the frequencies of the K classes; `d1`, `d2` are the Euclidean distances from a
background pixel to the border of the nearest and the second-nearest cell. Cells are the instances
when the dataset has them, else the connected components of each foreground class
(`instances_from_labels`; d1, d2 run over the components of all foreground classes). A cell's
"border" is its outermost pixels, so `d_i(x)` is the distance between pixel centres from `x` to the
closest pixel of cell `i` (what `scipy.ndimage.distance_transform_edt(instances != i)` gives). The
border term is added on the pixels that belong to no cell (`instances == 0`); under the default
`labels = instances > 0` (and for the components of a class-index map) those are exactly the
class-0 pixels.

Exact and fast (`unet_weight_map`): each cell's distance transform is computed only inside its
bounding box grown by the radius R = ceil(sigma * sqrt(2 * ln(w0 / tol))) beyond which the border
term is below `tol`. Why the result is exact up to `tol` (the brute force runs one full-image
distance transform per cell, `unet_weight_map_reference`):

* a pixel within distance R of a cell lies inside that cell's grown box, so every cell at distance
  <= R from `x` is seen at `x`, with its exact distance (the box holds the whole cell);
* if the true second-nearest distance t2 <= R, the two nearest cells are both seen, so the two
  smallest seen distances are exactly (t1, t2) and the term is exact;
* otherwise t1 + t2 > R >= sigma * sqrt(2 ln(w0 / tol)), so the true term is < tol; the seen
  distances are minima over a subset of the cells, hence >= the true ones, so the computed term is
  in [0, tol) as well. Fewer than two cells within R of `x` is this case.

Hence |fast - reference| < tol everywhere (default tol = 1e-6, far below the 1e-4 the tests use).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage as ndi

from pipeline.config import check_number
from pipeline.errors import SegpipeError

DEFAULT_TOL = 1e-6


def compact_ids(inst: np.ndarray) -> np.ndarray:
    """Instance ids renumbered 1..n in order of value, 0 kept as background (int32 or int64).

    Work and memory then depend on the number of cells, not on the largest id (`find_objects`
    allocates one entry per id up to the largest)."""
    ids, inverse = np.unique(inst, return_inverse=True)
    inverse = inverse.reshape(inst.shape)
    if ids.size and ids[0] != 0:
        inverse += 1
    return inverse.astype(np.int32 if ids.size < 2**31 - 1 else np.int64)


def check_parameters(w0: float, sigma: float, where: str = "weight map", **names: str) -> tuple[float, float]:
    """(w0, sigma) as finite numbers >= 0 (ConfigError naming the option otherwise); `names` maps
    "w0"/"sigma" to how the caller calls them (e.g. "--w0")."""
    return (
        check_number(_plain(w0), names.get("w0", "w0"), where, low=0),
        check_number(_plain(sigma), names.get("sigma", "sigma"), where, low=0),
    )


def _plain(value: object) -> object:
    """A numpy scalar as a Python number (what the config checks take); anything else unchanged."""
    return value.item() if isinstance(value, (np.integer, np.floating)) else value


def _check_instances(instances: np.ndarray) -> np.ndarray:
    inst = np.asarray(instances)
    if inst.ndim != 2:
        raise SegpipeError(f"instances: expected a 2-D (H, W) instance image, got shape {inst.shape}")
    if not (np.issubdtype(inst.dtype, np.integer) or inst.dtype == bool):
        raise SegpipeError(f"instances: expected integer instance ids, got dtype {inst.dtype}")
    if inst.size and inst.min() < 0:
        raise SegpipeError("instances: expected non-negative instance ids (0 = background)")
    if inst.dtype == bool:
        return inst.astype(np.int32)
    return compact_ids(inst) if inst.size and int(inst.max()) > inst.size else inst


def _class_term(
    inst: np.ndarray,
    class_weights: Sequence[float] | np.ndarray | None,
    labels: np.ndarray | None,
) -> np.ndarray:
    """w_c(x) = class_weights[labels[x]] as float64 (H, W); 1.0 everywhere if no weights."""
    if labels is None:
        lab = (inst > 0).astype(np.int64)
    else:
        lab = np.asarray(labels)
        if lab.shape != inst.shape:
            raise SegpipeError(f"labels: expected shape {inst.shape} like the instances, got {lab.shape}")
        if not (np.issubdtype(lab.dtype, np.integer) or lab.dtype == bool):
            raise SegpipeError(f"labels: expected integer class indices, got dtype {lab.dtype}")
        lab = lab.astype(np.int64, copy=False)
    if class_weights is None:
        return np.ones(inst.shape, dtype=np.float64)
    cw = np.asarray(class_weights, dtype=np.float64).ravel()
    for k, value in enumerate(cw):
        check_number(float(value), "class_weights", "weight map", low=0)
    if lab.size and (lab.min() < 0 or lab.max() >= cw.size):
        raise SegpipeError(
            f"class_weights: {cw.size} weights given but labels hold classes {int(lab.min())}..{int(lab.max())}"
        )
    return cw[lab]


def border_radius(w0: float, sigma: float, tol: float = DEFAULT_TOL) -> float:
    """Distance sum D with w0 * exp(-D**2 / (2 sigma**2)) = tol; the border term is < tol beyond."""
    if w0 <= tol or sigma == 0:
        return 0.0
    return sigma * math.sqrt(2.0 * math.log(w0 / tol))


def _border_term(d1: np.ndarray, d2: np.ndarray, background: np.ndarray, w0: float, sigma: float) -> np.ndarray:
    """w0 * exp(-(d1 + d2)**2 / (2 sigma**2)) on `background`, 0 elsewhere (inf distances give 0).

    Overwrites d1 (its buffer holds the result).
    """
    s = np.add(d1, d2, out=d1)
    np.square(s, out=s)
    s *= -1.0 / (2.0 * sigma * sigma)
    np.exp(s, out=s)
    s *= w0
    s *= background
    return s


def unet_weight_map(
    instances: np.ndarray,
    w0: float = 10.0,
    sigma: float = 5.0,
    class_weights: Sequence[float] | np.ndarray | None = None,
    labels: np.ndarray | None = None,
    tol: float = DEFAULT_TOL,
) -> np.ndarray:
    """U-Net eq. 2 weight map, exact up to `tol` (see the module docstring for the proof).

    instances: (H, W) integer cell ids, 0 = background. labels: (H, W) class index per pixel,
    default `instances > 0`. class_weights: w_c per class (1.0 everywhere if None). The border
    term is added where `instances == 0`. Returns float32 (H, W).
    """
    w0, sigma = check_parameters(w0, sigma)
    check_number(_plain(tol), "tol", "weight map", low=0, low_open=True)
    inst = _check_instances(instances)
    weight = _class_term(inst, class_weights, labels)
    if w0 == 0 or sigma == 0:
        return weight.astype(np.float32)
    boxes = ndi.find_objects(inst)
    if sum(b is not None for b in boxes) < 2:
        return weight.astype(np.float32)
    r = int(math.ceil(border_radius(w0, sigma, tol)))
    h, w = inst.shape
    d1 = np.full(inst.shape, np.inf)
    d2 = np.full(inst.shape, np.inf)
    for cell_id, box in enumerate(boxes, start=1):
        if box is None:
            continue
        win = (
            slice(max(box[0].start - r, 0), min(box[0].stop + r, h)),
            slice(max(box[1].start - r, 0), min(box[1].stop + r, w)),
        )
        d = ndi.distance_transform_edt(inst[win] != cell_id)
        w1, w2 = d1[win], d2[win]  # views: the running nearest / second-nearest distances
        np.minimum(w2, np.maximum(w1, d), out=w2)
        np.minimum(w1, d, out=w1)
    weight += _border_term(d1, d2, inst == 0, w0, sigma)
    return weight.astype(np.float32)


def unet_weight_map_reference(
    instances: np.ndarray,
    w0: float = 10.0,
    sigma: float = 5.0,
    class_weights: Sequence[float] | np.ndarray | None = None,
    labels: np.ndarray | None = None,
) -> np.ndarray:
    """Brute-force U-Net eq. 2: one full-image distance transform per cell (cells x pixels).

    The reference the fast version is tested and benchmarked against; same arguments and output.
    """
    inst = _check_instances(instances)
    weight = _class_term(inst, class_weights, labels)
    ids = np.unique(inst)
    ids = ids[ids > 0]
    if w0 == 0 or sigma == 0 or ids.size < 2:
        return weight.astype(np.float32)
    d1 = np.full(inst.shape, np.inf)
    d2 = np.full(inst.shape, np.inf)
    for cell_id in ids:
        d = ndi.distance_transform_edt(inst != cell_id)
        d2 = np.minimum(d2, np.maximum(d1, d))
        d1 = np.minimum(d1, d)
    weight += _border_term(d1, d2, inst == 0, w0, sigma)
    return weight.astype(np.float32)


def compute_class_weights(label_images: Iterable[np.ndarray], num_classes: int = 2) -> np.ndarray:
    """Class-frequency balancing weights over a set of label images (the training split).

    w_k = N / (K * n_k), with n_k the number of pixels of class k over all images, N = sum n_k and
    K = num_classes: inverse class frequency, scaled so that the pixel-average of w_c over the
    training split is 1. Labels may have any shape (e.g. (1, H, W)). Returns float64 (K,).
    """
    counts = np.zeros(num_classes, dtype=np.int64)
    n_images = 0
    for i, lab in enumerate(label_images):
        arr = np.asarray(lab)
        if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
            raise SegpipeError(f"label image {i}: expected integer class indices, got dtype {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            raise SegpipeError(
                f"label image {i}: expected classes 0..{num_classes - 1}, found {int(arr.min())}..{int(arr.max())}"
            )
        counts += np.bincount(arr.ravel().astype(np.int64), minlength=num_classes)
        n_images += 1
    if n_images == 0:
        raise SegpipeError("class weights: no label images given")
    missing = [k for k in range(num_classes) if counts[k] == 0]
    if missing:
        raise SegpipeError(f"class weights: classes {missing} never occur in the {n_images} label images")
    return counts.sum() / (num_classes * counts.astype(np.float64))


def reweigh_classes(weight: np.ndarray, labels: np.ndarray, old: Sequence[float], new: Sequence[float]) -> np.ndarray:
    """Eq. 2 with other class weights: w(x) - old[labels[x]] + new[labels[x]] (the border term
    w0 * exp(...) is kept). `weight` and `labels` of one shape; returns float32."""
    delta = np.asarray(new, dtype=np.float64) - np.asarray(old, dtype=np.float64)
    return (weight + delta[np.asarray(labels, dtype=np.int64)]).astype(np.float32)


def instances_from_binary(mask: np.ndarray, connectivity: int = 2) -> np.ndarray:
    """Instance ids (H, W) int32 from a binary mask by connected components (nonzero = foreground).

    connectivity 2 (8-neighbourhood, default) keeps thin diagonal structures such as DRIVE vessels
    in one piece; 1 is the 4-neighbourhood.
    """
    from skimage.measure import label

    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise SegpipeError(f"mask: expected a 2-D (H, W) binary mask, got shape {arr.shape}")
    if connectivity not in (1, 2):
        raise SegpipeError(f"mask: connectivity must be 1 or 2, got {connectivity}")
    return label(arr != 0, connectivity=connectivity).astype(np.int32)


def instances_from_labels(labels: np.ndarray, connectivity: int = 2) -> np.ndarray:
    """Instance ids (H, W) int32 of a class-index map (0 = background): the connected components of
    each foreground class, numbered on from one class to the next (class 1's first). The borders of
    eq. 2 for multi-class labels without instance masks: d1, d2 run over the components of every
    foreground class. For {0, 1} labels this is `instances_from_binary`."""
    arr = np.asarray(labels)
    if arr.ndim != 2 or not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        raise SegpipeError(f"labels: expected a 2-D (H, W) map of class indices, got {arr.dtype} {arr.shape}")
    out = np.zeros(arr.shape, np.int32)
    for k in np.unique(arr[arr > 0]):
        components = instances_from_binary(arr == k, connectivity)
        inside = components > 0
        out[inside] = components[inside] + out.max()
    return out


def _read_2d(path: Path, what: str) -> np.ndarray:
    """A label or image file as (H, W) or (H, W, C) (channel-first NIfTI is moved channel-last)."""
    from pipeline.data.io import read_raster

    arr = np.asarray(read_raster(path))
    if path.name.lower().endswith((".nii", ".nii.gz")) and arr.ndim == 3:
        arr = np.moveaxis(arr, 0, -1)  # prepared volumes are channel-first
    arr = arr.squeeze(axis=tuple(i for i in range(2, arr.ndim) if arr.shape[i] == 1)) if arr.ndim > 2 else arr
    if arr.ndim != 2 and not (what == "image" and arr.ndim == 3 and arr.shape[-1] in (3, 4)):
        raise SegpipeError(f"{path}: expected a single-channel 2-D {what}, got shape {arr.shape}")
    return arr


def _default_output(label_path: Path) -> Path:
    name = label_path.name
    if name.lower().endswith((".nii", ".nii.gz")):
        return label_path.with_name(name[: name.lower().rindex(".nii")] + "_weight.nii.gz")
    return label_path.with_name(label_path.stem + "_weight.tif")


def write_weight_map_file(
    label_path: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    w0: float = 10.0,
    sigma: float = 5.0,
    class_weights: str | Sequence[float] = "auto",
    mode: str = "auto",
    image_path: str | os.PathLike[str] | None = None,
) -> tuple[Path, Path]:
    """`segpipe weightmap`: the eq. 2 weight map of one label image, plus a PNG preview.

    mode: "instances" (ids as stored, e.g. CTC man_seg), "binary" (connected components of the
    nonzero pixels, e.g. DRIVE), "auto" (binary if at most two distinct values). class_weights:
    "auto" (`compute_class_weights` of this image alone), "none" (1.0) or (w_bg, w_fg).
    output: .nii.gz/.nii (channel-first (1, H, W), the prepared-data layout) or .tif/.tiff
    ((H, W)); default beside the label. The preview (heat map over `image_path`, else over the
    label) goes to the output path with .png. Both written atomically. Returns (output, preview).
    """
    from pipeline.data.io import write_volume
    from pipeline.files import atomic_path

    w0, sigma = check_parameters(w0, sigma, "weightmap")
    label_path = Path(label_path)
    out = Path(output) if output is not None else _default_output(label_path)
    name = out.name.lower()
    if not name.endswith((".nii", ".nii.gz", ".tif", ".tiff")):
        raise SegpipeError(f"{out}: the weight map is written as NIfTI (.nii.gz, .nii) or TIFF (.tif, .tiff)")
    labels = _read_2d(label_path, "label image")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise SegpipeError(f"{label_path}: expected integer labels, got dtype {labels.dtype}")
    if mode not in ("auto", "binary", "instances"):
        raise SegpipeError(f"weightmap: mode must be auto, binary or instances, got {mode!r}")
    if mode == "binary" or (mode == "auto" and np.unique(labels).size <= 2):
        instances = instances_from_binary(labels)
    else:
        instances = labels
    classes = (instances > 0).astype(np.uint8)
    if isinstance(class_weights, str):
        if class_weights not in ("auto", "none"):
            raise SegpipeError(f"weightmap: class_weights must be auto, none or two numbers, got {class_weights!r}")
        if class_weights == "auto":
            try:
                cw: np.ndarray | None = compute_class_weights([classes])
            except SegpipeError as exc:
                raise SegpipeError(f"{label_path}: {exc}; pass class weights explicitly") from exc
        else:
            cw = None
    else:
        cw = np.asarray(class_weights, dtype=np.float64)
        if cw.shape != (2,):
            raise SegpipeError(f"weightmap: expected two class weights (background, foreground), got {class_weights}")
    weight = unet_weight_map(instances, w0=w0, sigma=sigma, class_weights=cw)
    if name.endswith((".tif", ".tiff")):
        import tifffile

        with atomic_path(out) as tmp:
            tifffile.imwrite(tmp, weight)
    else:
        write_volume(out, weight[None])
    stem = out.name[: name.rindex(".nii")] if ".nii" in name else out.stem
    preview = out.with_name(stem + ".png")
    background = _read_2d(Path(image_path), "image") if image_path is not None else labels
    if background.shape[:2] != weight.shape:
        raise SegpipeError(f"{image_path}: image shape {background.shape[:2]} differs from the label's {weight.shape}")
    _write_preview(preview, background, weight, f"{label_path.name}: U-Net weight map (w0={w0}, sigma={sigma})")
    return out, preview


def _write_preview(path: Path, background: np.ndarray, weight: np.ndarray, title: str) -> None:
    """PNG: the weight map as a heat map (with colour bar) over the gray or RGB background."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.files import atomic_path

    bg = background.astype(np.float64)
    bg = (bg - bg.min()) / max(float(bg.max() - bg.min()), 1e-12)
    h, w = weight.shape
    fig, ax = plt.subplots(figsize=(8, 8 * h / w + 0.6), dpi=100)
    ax.imshow(bg, cmap="gray" if bg.ndim == 2 else None, interpolation="nearest")
    heat = ax.imshow(weight, cmap="inferno", alpha=0.6, interpolation="nearest")
    fig.colorbar(heat, ax=ax, fraction=0.046, pad=0.02, label="w(x)")
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
