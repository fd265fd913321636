"""A PSF that varies over the image: PSF images at listed positions, interpolated to each blend.

A survey's PSF changes across a coadd patch (seeing, optics, the stack of
visits); its pipelines model it at any position. A scene file carries such a
model as PSF images at a set of positions (README "File formats":
``PSFGRID_<band>`` tables), the same positions in every band. Each blend (and
each detection tile) is fitted with the PSF interpolated to its cutout's
centre: linearly over the Delaunay triangles of the positions (each pixel of
the PSF image interpolated alike, so the result is a PSF image whose sum is
one), and from the nearest listed PSF beyond them. A blend spans a few
arcseconds, over which a survey PSF is constant to a fraction of a percent,
so one PSF per blend is the model's approximation.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bayesblend.errors import BayesblendError

#: A PSF image whose sum is further than this from 1 is renormalised, with a warning.
PSF_SUM_TOLERANCE = 1e-3


def check_psf(psf: np.ndarray, n_bands: int) -> np.ndarray:
    """A scene's PSF images ``(band, py, px)`` as float32 with unit sum per band, or a one-line error.

    Each band's image must be square with an odd side (centred on its middle
    pixel: an even side would place it half a pixel off), finite, and of
    positive sum. An image whose sum differs from 1 by more than
    :data:`PSF_SUM_TOLERANCE` is divided by it, with a warning: every fitted
    flux would otherwise be off by that factor.
    """
    psf = np.asarray(psf, dtype=np.float32)
    if psf.ndim != 3 or psf.shape[0] != n_bands:
        raise BayesblendError(f"scene PSF must be (band, py, px) with {n_bands} bands, got {psf.shape}")
    if psf.shape[1] != psf.shape[2] or psf.shape[1] % 2 == 0:
        raise BayesblendError(f"scene PSF images must be square with an odd side, got {psf.shape[1:]}")
    if not np.isfinite(psf).all():
        raise BayesblendError("scene PSF has non-finite pixels")
    total = psf.sum(axis=(1, 2), dtype=np.float64)
    if not (total > 0).all():
        raise BayesblendError(f"scene PSF has a band of non-positive sum ({total.min():.3g})")
    if np.any(np.abs(total - 1.0) > PSF_SUM_TOLERANCE):
        warnings.warn(
            f"scene PSF sums to {', '.join(f'{t:.4g}' for t in total)} per band: normalised to 1",
            stacklevel=3,
        )
        psf = (psf / total[:, None, None]).astype(np.float32)
    return psf


@dataclass
class PSFGrid:
    """PSF images of every band at listed positions of a scene.

    Attributes
    ----------
    x, y : numpy.ndarray
        ``(n,)`` positions of the PSF images, scene pixels (0-based).
    images : numpy.ndarray
        ``(band, n, py, px)`` float32: centred PSF images with unit sum, odd side.
    """

    x: np.ndarray
    y: np.ndarray
    images: np.ndarray

    def __post_init__(self) -> None:
        self.x = np.asarray(self.x, np.float64).reshape(-1)
        self.y = np.asarray(self.y, np.float64).reshape(-1)
        images = np.asarray(self.images, np.float32)
        n = self.x.size
        if self.y.size != n or n == 0:
            raise BayesblendError(
                f"PSF grid needs as many x as y positions, at least one ({n} and {self.y.size})"
            )
        if not (np.isfinite(self.x).all() and np.isfinite(self.y).all()):
            raise BayesblendError("PSF grid positions must be finite numbers")
        if images.ndim != 4 or images.shape[1] != n:
            raise BayesblendError(f"PSF grid images must be (band, {n}, py, px), got shape {images.shape}")
        if len(set(zip(self.x.tolist(), self.y.tolist(), strict=True))) != n:
            raise BayesblendError("PSF grid lists a position twice")
        nb = images.shape[0]
        # one (position, band) image at a time: the checks and normalisation of a scene's PSF
        flat = check_psf(images.transpose(1, 0, 2, 3).reshape(n * nb, *images.shape[2:]), n * nb)
        self.images = flat.reshape(n, nb, *images.shape[2:]).transpose(1, 0, 2, 3).copy()
        # shifted copies (cutouts) share the interpolators, built once on these positions
        self._shift = (0.0, 0.0)
        self._cache: dict = {}

    @property
    def n_bands(self) -> int:
        """Number of bands."""
        return self.images.shape[0]

    def at(self, x: float, y: float) -> np.ndarray:
        """The PSF images ``(band, py, px)`` at scene pixel ``(x, y)``, each with unit sum."""
        n = self.x.size
        cache = self._cache
        if "values" not in cache:
            cache["values"] = self.images.transpose(1, 0, 2, 3).reshape(n, -1).astype(np.float64)
        values = cache["values"]
        x, y = float(x) - self._shift[0], float(y) - self._shift[1]  # in the frame the cache was built in
        x0, y0 = self.x - self._shift[0], self.y - self._shift[1]
        if n < 3 or _collinear(x0, y0):
            psf = values[np.argmin(np.hypot(x0 - x, y0 - y))]
        else:
            if "linear" not in cache:
                from scipy.interpolate import LinearNDInterpolator, NearestNDInterpolator

                pts = np.c_[x0, y0]
                cache["linear"], cache["nearest"] = (
                    LinearNDInterpolator(pts, values),
                    NearestNDInterpolator(pts, values),
                )
            psf = cache["linear"]([[x, y]])[0]
            if not np.isfinite(psf).all():  # beyond the positions' hull
                psf = cache["nearest"]([[x, y]])[0]
        psf = psf.reshape(self.images.shape[0], *self.images.shape[2:])
        return (psf / psf.sum(axis=(1, 2), keepdims=True)).astype(np.float32)

    def shifted(self, dx: float, dy: float) -> PSFGrid:
        """The same grid with positions moved by ``(dx, dy)`` pixels (a cutout's frame).

        Shares the images and the interpolators: cutting a blend out costs nothing here.
        """
        new = copy.copy(self)
        new.x, new.y = self.x + dx, self.y + dy
        new._shift = (self._shift[0] + dx, self._shift[1] + dy)
        return new

    def select(self, index: Sequence[int]) -> PSFGrid:
        """The grid of the bands at ``index`` (in that order)."""
        return PSFGrid(self.x, self.y, self.images[list(index)])


def _collinear(x: np.ndarray, y: np.ndarray) -> bool:
    """Whether the positions lie on one line (no triangle to interpolate over)."""
    d = np.c_[x - x[0], y - y[0]]
    return np.linalg.matrix_rank(d, tol=1e-9 * (1.0 + np.abs(d).max())) < 2
