"""Quantities measured on a fitted scene: blendedness and the resolution factor of a source.

Shapes are not measured here: a source's ellipticity and half-light radius
are parameters of the scene model (:mod:`bayesblend.model`), and the
catalogue reports their posterior. What remains are the diagnostics a
shear catalogue cuts on: how much of a source's light is its neighbours'
(:func:`blendedness`) and how much larger than the PSF it is
(:func:`resolution`).
"""

from __future__ import annotations

import jax.numpy as jnp

FWHM_TO_SIGMA = 1.0 / 2.354820045


def resolution(size_sigma: jnp.ndarray, shape_psf_fwhm: float) -> jnp.ndarray:
    """Resolution factor ``R2 = s^2 / (s^2 + sigma_psf^2)`` of PSF-corrected sizes ``s``.

    ``size_sigma`` and ``shape_psf_fwhm`` in the same unit (pixels or arcsec).
    R2 near 1: resolved; near 0: point-like (Hirata & Seljak 2003; the HSC
    shear catalogue keeps R2 >= 0.3).
    """
    s2 = jnp.asarray(size_sigma) ** 2
    return s2 / (s2 + (shape_psf_fwhm * FWHM_TO_SIGMA) ** 2)


def blendedness(images: jnp.ndarray) -> jnp.ndarray:
    """Total blendedness of each source, ``1 - <I_i, I_i> / <I_i, I_total>`` (Arcelin et al. 2021, eq. 3).

    Parameters
    ----------
    images : jax.Array
        ``(source, y, x)`` each source's image alone on a common frame, one band
        (any unit); the scene's image ``I_total`` is their sum.

    Returns
    -------
    jax.Array
        ``(source,)``: 0 for a source alone, towards 1 when its pixels hold
        mostly other sources' light; 0 for a source without light.
    """
    total = images.sum(axis=0)
    self_dot = (images * images).sum(axis=(-2, -1))
    cross = (images * total).sum(axis=(-2, -1))
    return jnp.where(cross > 0, 1.0 - self_dot / jnp.where(cross > 0, cross, 1.0), 0.0)
