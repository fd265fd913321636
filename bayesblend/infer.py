"""Inference on a blend: amortised, MAP, SVI and NUTS, one entry point, one result type.

:func:`prepare_blend` turns a :class:`~bayesblend.scene.Scene` and source
positions into the static :class:`~bayesblend.model.SceneSpec` and the arrays
of :func:`~bayesblend.model.scene_model`, padding the sources to a few fixed
counts (:data:`PAD_SIZES`) so that every blend of the same size and padded
count reuses one compilation. The methods build on each other:

- ``amortised``: the deblender encoder on a stamp around each source gives z;
  fluxes from a linear fit of each template; positions at the detections.
- ``map``: Adam on the joint log density (all parameters are unconstrained
  reals), started from the amortised solution.
- ``svi``: NumPyro SVI with a low-rank multivariate normal guide, started at MAP.
- ``nuts``: NumPyro NUTS with a dense mass matrix, several chains started at MAP.

The posterior draws live in a :class:`~bayesblend.posterior.Posterior`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

from bayesblend.errors import BayesblendError
from bayesblend.forward import anchor_and_offset, difference_kernel, fft_size
from bayesblend.model import SceneSpec
from bayesblend.prior.bundle import PriorBundle
from bayesblend.scene import Scene
from bayesblend.survey import get_survey

#: Padded source counts: a blend of k sources is padded to the smallest size >= k.
PAD_SIZES = (1, 2, 4, 8, 16)
METHODS = ("amortised", "map", "svi", "nuts")


def padded_count(k: int) -> int:
    """The padded source count for ``k`` sources."""
    for p in PAD_SIZES:
        if k <= p:
            return p
    raise BayesblendError(f"blends of more than {PAD_SIZES[-1]} sources are not supported (got {k})")


@dataclass
class PreparedBlend:
    """A blend ready for the scene model: static spec, arrays, and what is needed to report.

    Attributes
    ----------
    spec : SceneSpec
    data : dict of jax.Array
        The arrays of :func:`bayesblend.model.scene_model`.
    n_real : int
        Number of real (unpadded) sources.
    x, y : numpy.ndarray
        Detected positions of the real sources, pixels.
    bands : tuple of str
    magzero : numpy.ndarray
    """

    spec: SceneSpec
    data: dict
    n_real: int
    x: np.ndarray
    y: np.ndarray
    bands: tuple[str, ...]
    magzero: np.ndarray


def prepare_blend(
    scene: Scene,
    x: Sequence[float],
    y: Sequence[float],
    bundle: PriorBundle,
    log_flux_sigma: float = 2.0,
    position_sigma: float = 0.5,
) -> PreparedBlend:
    """Arrays of the scene model for sources at ``(x, y)`` in ``scene`` (bands in the bundle's order).

    Bad pixels (non-finite values) are masked with a warning; a missing PSF is
    replaced by the survey's default PSF with a warning; missing bands are an error.
    """
    missing = [b for b in bundle.bands if b not in scene.bands]
    if missing:
        raise BayesblendError(f"scene lacks band(s) {', '.join(missing)} that the prior needs")
    sc = scene.select_bands(bundle.bands)
    survey = get_survey(bundle.survey)
    image = np.asarray(sc.image, dtype=np.float32)
    valid = np.isfinite(image)
    if sc.mask is not None:
        valid &= ~sc.mask
    if not valid.all() and not np.isfinite(image).all():
        warnings.warn(f"{np.sum(~np.isfinite(image))} non-finite pixels masked", stacklevel=2)
    if not valid.any():
        raise BayesblendError("every pixel of the blend is masked")
    image = np.where(valid, image, 0.0).astype(np.float32)
    psf = sc.psf
    if psf is None:
        warnings.warn("scene has no PSF: using the survey's default PSF per band", stacklevel=2)
        psf = survey.psf_images(bundle.bands)
    kernel = difference_kernel(psf, survey.model_psf_image(psf.shape[-1]), fft_size(bundle.stamp))
    sky = np.array([survey.sky_counts(b) for b in bundle.bands], dtype=np.float32)
    x, y = np.atleast_1d(np.asarray(x, float)), np.atleast_1d(np.asarray(y, float))
    k = len(x)
    if k == 0:
        raise BayesblendError("no sources to deblend")
    n = padded_count(k)
    anchor, offset0 = anchor_and_offset(x, y, bundle.stamp)
    # detection flux estimate: a 5x5 box sum over the PSF's fraction in the box, floored at 3 sigma
    c = psf.shape[-1] // 2
    frac = psf[:, c - 2 : c + 3, c - 2 : c + 3].sum(axis=(1, 2))
    flux0 = np.zeros((k, len(bundle.bands)))
    ny, nx = image.shape[1:]
    for i in range(k):
        xi, yi = int(round(x[i])), int(round(y[i]))
        box = image[:, max(yi - 2, 0) : yi + 3, max(xi - 2, 0) : xi + 3]
        flux0[i] = box.sum(axis=(1, 2)) / frac
    floor = 3 * np.sqrt(sky * 25) / frac
    log_flux0 = np.log(np.maximum(flux0, floor))
    pad = n - k

    def padded(a, fill):
        return np.concatenate([a, np.repeat(fill[None], pad, 0)]) if pad else a

    data = {
        "image": jnp.asarray(image),
        "variance": jnp.asarray(sc.variance if sc.variance is not None else np.ones_like(image)),
        "valid": jnp.asarray(valid),
        "sky": jnp.asarray(sky),
        "kernel": kernel,
        "anchor": jnp.asarray(padded(anchor, np.array([-bundle.stamp, -bundle.stamp], np.int32))),
        "offset0": jnp.asarray(padded(offset0, np.zeros(2, np.float32))),
        "log_flux0": jnp.asarray(padded(log_flux0, np.zeros(len(bundle.bands))), dtype=jnp.float32),
        "source_valid": jnp.asarray(np.arange(n) < k),
    }
    spec = SceneSpec(
        shape=(ny, nx),
        n_sources=n,
        latent_dim=bundle.latent_dim,
        log_flux_sigma=log_flux_sigma,
        position_sigma=position_sigma,
        has_variance=sc.variance is not None,
    )
    return PreparedBlend(spec, data, k, x, y, tuple(bundle.bands), np.asarray(sc.magzero))
