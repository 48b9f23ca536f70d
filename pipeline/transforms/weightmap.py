"""Per-pixel loss weight maps of the U-Net paper (Ronneberger et al., MICCAI 2015, equation 2).

    w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))**2 / (2 * sigma**2))

`w_c` balances the class frequencies; `d1`, `d2` are the Euclidean distances from a background
pixel to the border of the nearest and the second-nearest cell. A cell's "border" is its outermost
pixels, so `d_i(x)` is the distance between pixel centres from `x` to the closest pixel of cell `i`
(what `scipy.ndimage.distance_transform_edt(instances != i)` gives). The border term is added on
the pixels that belong to no cell (`instances == 0`); under the default `labels = instances > 0`
those are exactly the class-0 pixels.

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
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage as ndi

from pipeline.errors import SegpipeError

DEFAULT_TOL = 1e-6


def _check_instances(instances: np.ndarray) -> np.ndarray:
    inst = np.asarray(instances)
    if inst.ndim != 2:
        raise SegpipeError(f"instances: expected a 2-D (H, W) instance image, got shape {inst.shape}")
    if not (np.issubdtype(inst.dtype, np.integer) or inst.dtype == bool):
        raise SegpipeError(f"instances: expected integer instance ids, got dtype {inst.dtype}")
    if inst.size and inst.min() < 0:
        raise SegpipeError("instances: expected non-negative instance ids (0 = background)")
    return inst.astype(np.int32) if inst.dtype == bool else inst


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
    if lab.size and (lab.min() < 0 or lab.max() >= cw.size):
        raise SegpipeError(
            f"class_weights: {cw.size} weights given but labels hold classes "
            f"{int(lab.min())}..{int(lab.max())}"
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
    if sigma < 0 or w0 < 0 or tol <= 0:
        raise SegpipeError(f"weight map: expected w0 >= 0, sigma >= 0, tol > 0; got {w0}, {sigma}, {tol}")
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
