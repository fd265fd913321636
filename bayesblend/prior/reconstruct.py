"""Amortised reconstruction of stamps: encoder -> q(z | stamp) -> decoder -> fluxes.

One pass of the VAE encoder (isolated galaxies) or of the deblender encoder
(blends, Arcelin et al. 2021 sect. 3.3) gives the mean latent code of the
centred galaxy; the decoder turns it into a model-frame morphology; the forward
model renders it with the stamp's PSF at the galaxy's offset; and the flux per
band is the inverse-variance weighted least-squares amplitude of that template
against the data (a linear fit, exact for a fixed morphology). This is the
prior's own test: the held-out reconstruction metrics of the model card
(``benchmarks/bench_reconstruction.py``, the paper's sect. 4.1) come from it.

It works on stamps centred on one galaxy. Deblending whole scenes is
:func:`bayesblend.infer.deblend`; its ``method="amortised"`` runs the same
encoder on each source's stamp but shares the light between neighbours with a
joint non-negative fit of all their fluxes.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from bayesblend.forward import difference_kernel, fft_size, render_source
from bayesblend.prior.bundle import PriorBundle
from bayesblend.prior.networks import scale_input
from bayesblend.survey import get_survey, poisson_variance


def template_flux(
    template: jnp.ndarray, data: jnp.ndarray, variance: jnp.ndarray
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Least-squares flux of unit-flux templates ``(..., band, y, x)`` against data; returns (flux, sigma).

    Parameters
    ----------
    template : array ``(..., band, y, x)``
        Unit-flux templates.
    data : array like ``template``
        Observed stamps, electrons.
    variance : array like ``template``
        Per-pixel variance, electrons^2.

    Returns
    -------
    flux, sigma : jax.Array
        ``(..., band)`` inverse-variance weighted flux and its Gaussian error, electrons.
    """
    w = 1.0 / variance
    tt = jnp.sum(w * template**2, axis=(-2, -1))
    flux = jnp.sum(w * template * data, axis=(-2, -1)) / tt
    return flux, 1.0 / jnp.sqrt(tt)


@partial(jax.jit, static_argnames=("network", "decoder", "encoder"))
def _reconstruct(network, params, decoder, encoder, noisy, psf, offset, sky, model_psf):

    sigma = jnp.sqrt(sky)
    mean, log_sigma = encoder.apply(params[network], scale_input(noisy, sigma))
    morph = decoder.apply(params["decoder"], mean)
    kernel = difference_kernel(psf, model_psf, fft_size(noisy.shape[-1]))
    ones = jnp.ones(noisy.shape[:-2])
    template = jax.vmap(render_source)(morph, ones, offset, kernel)
    var = poisson_variance(noisy, sky)
    flux, flux_sigma = template_flux(template, noisy, var)
    return {
        "z_mean": mean,
        "z_log_sigma": log_sigma,
        "morphology": morph,
        "flux": flux,
        "flux_sigma": flux_sigma,
        "image": flux[..., None, None] * template,
    }


def reconstruct(
    bundle: PriorBundle,
    noisy: np.ndarray,
    psf: np.ndarray,
    offset: np.ndarray,
    network: str = "encoder",
    batch_size: int = 256,
) -> dict[str, np.ndarray]:
    """Amortised reconstruction of the centred galaxy of each stamp.

    Parameters
    ----------
    bundle : PriorBundle
    noisy : numpy.ndarray
        ``(n, band, S, S)`` stamps, electrons, in the bundle's bands.
    psf : numpy.ndarray
        ``(n, band, P, P)`` PSF images (P odd).
    offset : numpy.ndarray
        ``(n, 2)`` ``(dx, dy)`` of the galaxy from the stamp centre, pixels.
    network : {"encoder", "deblender"}
        The VAE encoder (isolated galaxies) or the deblender encoder (blends).
    batch_size : int
        Stamps per compiled call (the last batch is padded, so one compilation).

    Returns
    -------
    dict of numpy.ndarray
        ``z_mean``, ``z_log_sigma`` ``(n, latent)``; ``morphology`` and ``image``
        ``(n, band, S, S)``; ``flux``, ``flux_sigma`` ``(n, band)`` electrons.
    """
    survey = get_survey(bundle.survey)
    sky = jnp.asarray(survey.sky_level(bundle.bands), dtype=jnp.float32)
    model_psf = jnp.asarray(survey.model_psf_image(psf.shape[-1]))
    n = len(noisy)
    outs: dict[str, list] = {}
    for start in range(0, n, batch_size):
        sl = slice(start, min(start + batch_size, n))
        k = sl.stop - sl.start
        pad = batch_size - k if n > batch_size else 0

        def padded(a, pad=pad):
            a = np.asarray(a, dtype=np.float32)
            return np.concatenate([a, np.repeat(a[-1:], pad, 0)]) if pad else a

        res = _reconstruct(
            network,
            bundle.params,
            bundle.decoder,
            bundle.encoder,
            jnp.asarray(padded(noisy[sl])),
            jnp.asarray(padded(psf[sl])),
            jnp.asarray(padded(offset[sl])),
            sky,
            model_psf,
        )
        for key, v in res.items():
            outs.setdefault(key, []).append(np.asarray(v)[:k])
    return {k: np.concatenate(v) for k, v in outs.items()}
