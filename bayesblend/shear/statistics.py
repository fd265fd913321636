"""Errors of shear estimates: delete-one-block jackknife over groups of sources.

Neighbours in a blend share pixels, so their errors are correlated: whole
groups (blends, simulation items) go to one jackknife block.
"""

from __future__ import annotations

import numpy as np


def jackknife_blocks(groups: np.ndarray, n_blocks: int = 100) -> np.ndarray:
    """Block index of each row: whole groups go to one block, at most ``n_blocks`` blocks."""
    _, inverse = np.unique(np.asarray(groups), return_inverse=True)
    k = min(n_blocks, int(inverse.max()) + 1) if inverse.size else 1
    return inverse % k


def jackknife(values: np.ndarray, replicates: np.ndarray) -> np.ndarray:
    """Delete-one-block jackknife standard error from the ``(block, ...)`` leave-one-out ``replicates``."""
    k = replicates.shape[0]
    if k < 2:
        return np.full(np.shape(values), np.nan)
    mean = replicates.mean(axis=0)
    return np.sqrt((k - 1) / k * np.sum((replicates - mean) ** 2, axis=0))


def weighted_mean_replicates(
    x: np.ndarray, w: np.ndarray, blocks: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean of ``x`` ``(n, ...)`` over rows, and its leave-one-block-out replicates.

    A replicate is NaN where the other blocks have no weight (one block holds
    all of it), so the jackknife error is NaN: undefined, not zero.
    """
    x = np.asarray(x, float)
    w = np.asarray(w, float)
    wx = w.reshape(w.shape + (1,) * (x.ndim - 1)) * x
    k = int(blocks.max()) + 1 if blocks.size else 1
    sum_wx = np.zeros((k,) + x.shape[1:])
    sum_w = np.zeros(k)
    np.add.at(sum_wx, blocks, wx)
    np.add.at(sum_w, blocks, w)
    full = sum_wx.sum(0) / sum_w.sum()
    rest_w = (sum_w.sum() - sum_w).reshape((k,) + (1,) * (x.ndim - 1))
    with np.errstate(invalid="ignore", divide="ignore"):
        reps = (sum_wx.sum(0) - sum_wx) / rest_w
    return full, reps


def weighted_ratio_replicates(
    e: np.ndarray, responsivity: np.ndarray, w: np.ndarray, blocks: np.ndarray
) -> tuple[np.ndarray, np.ndarray, float]:
    """``sum(w e) / sum(w R)`` over rows, its leave-one-block-out replicates, and ``sum(w R) / sum(w)``.

    ``e`` ``(n, 2)``, ``responsivity`` and ``w`` ``(n,)``: numerator and
    denominator are replicated together, so the jackknife carries the
    galaxy-to-galaxy spread of R as well as of e.
    """
    full, reps = weighted_mean_replicates(np.c_[e, responsivity], w, blocks)
    return full[:2] / full[2], reps[:, :2] / reps[:, 2:], float(full[2])
