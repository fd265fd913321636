"""Metrics against truth: ellipticities by adaptive moments, fluxes, binned error statistics.

Ellipticities here are measured with GalSim's HSM adaptive moments
(``FindAdaptiveMom``), the field's reference implementation, on noiseless,
PSF-convolved images: the same measurement on a reconstruction and on its
target, as in Arcelin et al. (2021, sect. 4.1), so that only the
reconstruction differs. The measured shape is shear-type (``g``).
"""

from __future__ import annotations

import galsim
import numpy as np
from astropy.table import Table

#: Percentiles of a Gaussian's -2, -1, 0, +1, +2 sigma, as in the paper's box plots.
SIGMA_PERCENTILES = (2.275, 15.866, 50.0, 84.134, 97.725)


def adaptive_shape(images: np.ndarray, scale: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """HSM adaptive moments of each image ``(n, y, x)``; NaN where HSM fails.

    Returns
    -------
    ellipticity : numpy.ndarray
        ``(n, 2)`` shear-type ``(g1, g2)``.
    size : numpy.ndarray
        ``(n,)`` adaptive-moment sigma, arcsec (``scale`` is arcsec per pixel).
    """
    g = np.full((len(images), 2), np.nan)
    size = np.full(len(images), np.nan)
    for i, img in enumerate(np.asarray(images, dtype=np.float64)):
        res = galsim.hsm.FindAdaptiveMom(galsim.Image(img, scale=scale), strict=False)
        if res.moments_status == 0:
            g[i] = res.observed_shape.g1, res.observed_shape.g2
            size[i] = res.moments_sigma * scale
    return g, size


def adaptive_ellipticity(images: np.ndarray, scale: float = 0.2) -> np.ndarray:
    """Shear-type ellipticity ``(n, 2)`` of each image ``(n, y, x)``; NaN where HSM fails."""
    return adaptive_shape(images, scale)[0]


def binned_stats(x: np.ndarray, y: np.ndarray, edges: np.ndarray, name: str = "x") -> Table:
    """Counts and the -2..+2 sigma percentiles of ``y`` in bins of ``x``.

    Returns
    -------
    astropy.table.Table
        Columns ``<name>_lo``, ``<name>_hi``, ``n``, ``p02``, ``p16``, ``median``, ``p84``, ``p98``.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel = ok & (x >= lo) & (x < hi)
        if sel.sum() >= 5:
            p = np.percentile(y[sel], SIGMA_PERCENTILES)
        else:
            p = np.full(5, np.nan)
        rows.append((lo, hi, int(sel.sum()), *p))
    return Table(rows=rows, names=(f"{name}_lo", f"{name}_hi", "n", "p02", "p16", "median", "p84", "p98"))
