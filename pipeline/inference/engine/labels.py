"""Probabilities into a label map: the last step of segmentation, shared by writers, evaluation and serving."""

from __future__ import annotations

import numpy as np


def to_labels(probs: np.ndarray, threshold: float) -> np.ndarray:
    """Label map (1, n, W) uint8: argmax over classes, or probability >= threshold for one channel."""
    if probs.shape[0] == 1:
        return (probs >= threshold).astype(np.uint8)
    labels = np.zeros((1, *probs.shape[1:]), np.uint8)  # argmax (first maximum), without int64 temporaries
    best = probs[0].copy()
    for k in range(1, probs.shape[0]):
        higher = probs[k] > best
        labels[0][higher] = k
        np.maximum(best, probs[k], out=best)
    return labels
