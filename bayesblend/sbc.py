"""Simulation-based calibration (SBC) of the posteriors: scenes drawn from the scene model's own prior.

Talts et al. (2018, arXiv:1804.06788): if parameters are drawn from the prior,
data from the likelihood at them, and the posterior of those data is exact,
then the rank of each true value among ``L`` posterior draws is uniform on
``0..L``. A posterior too narrow piles ranks at both ends, one biased piles
them at one end, one too wide piles them in the middle.

Here the model is exactly the scene model of :mod:`bayesblend.model`: a
blend's real layout (cutout shape, PSF, sky, source positions) is kept, every
source's ``u``, ``eta``, ``log_hlr``, ``log_flux`` and ``offset`` is drawn
from the model's prior (:func:`draw_from_prior`), the scene rendered by the
model (:func:`~bayesblend.model.source_stamps`, pasted), and Gaussian noise of variance
``sky + mean`` added; that variance is the data's variance plane, so the
likelihood of the fit is the one that made the data. The flux prior's
centre is fixed before the data are seen (``flux_prior="detection"`` keeps
it), and the model-error term is off (the model is exact by construction).
What SBC tests is the inference (MAP's Laplace approximation, SVI's guide,
NUTS's mixing), not the galaxy model; coverage on simulator blends tests
both.

:func:`ranks` and :func:`coverage` read draws ``(sample, source)`` of any
quantity; :func:`rank_uniformity` is a chi-square test of binned ranks.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from bayesblend.blends import PreparedBlend
from bayesblend.ellipticity import EtaPrior, to_ellipticity
from bayesblend.errors import BayesblendError
from bayesblend.forward import paste_stamps
from bayesblend.model import source_stamps
from bayesblend.prior.bundle import Networks
from bayesblend.survey import poisson_variance

#: The quantities SBC ranks, per source.
QUANTITIES = ("flux_r", "e1", "e2", "size")


def draw_from_prior(
    nets: Networks,
    blend: PreparedBlend,
    key: jax.Array,
    log_flux0: np.ndarray,
    log_flux_sigma: float,
) -> tuple[PreparedBlend, dict[str, np.ndarray]]:
    """A blend whose data are drawn from the scene model's prior and likelihood, and the drawn truth.

    Parameters
    ----------
    nets : Networks
        Decoder and flow of the bundle (the model's own).
    blend : PreparedBlend
        The layout to keep: cutout shape, PSF, sky, anchors and detected
        positions (``offset0``) of its sources. Padded sources must be none
        (use a blend whose source count is a padded size).
    key : jax.Array
        PRNG key.
    log_flux0 : numpy.ndarray
        ``(band,)`` or ``(source, band)`` centre of the log-flux prior (natural
        log of electrons), fixed before the data are drawn.
    log_flux_sigma : float
        Width of the log-flux prior (natural log).

    Returns
    -------
    blend : PreparedBlend
        The same layout with ``image`` = noisy draw, ``variance`` = ``sky +
        mean``, every pixel valid, the given flux prior and no model-error
        term (``spec.model_error = 0``).
    truth : dict of numpy.ndarray
        The drawn parameters (``u``, ``eta``, ``log_hlr``, ``log_flux``,
        ``offset``), the ranked quantities of :data:`QUANTITIES`, and
        ``snr``: each source's optimal S/N alone in r, ``sqrt(sum(mean^2 / variance))``.
    """
    spec, data = blend.spec, blend.data
    if blend.n_real != spec.n_sources:
        raise BayesblendError(
            f"SBC needs a blend without padded sources ({blend.n_real} real of {spec.n_sources})"
        )
    n, nb = spec.n_sources, len(blend.bands)
    spec = dataclasses.replace(spec, log_flux_sigma=float(log_flux_sigma), model_error=0.0, has_variance=True)
    log_flux0 = jnp.broadcast_to(jnp.asarray(log_flux0, jnp.float32), (n, nb))
    k = jax.random.split(key, 6)
    truth = {
        "u": jax.random.normal(k[0], (n, spec.latent_dim)),
        "eta": EtaPrior(spec.ellipticity_scale, (n,)).sample(k[1]),
        "log_hlr": data["log_hlr0"] + spec.log_hlr_sigma * jax.random.normal(k[2], (n,)),
        "log_flux": log_flux0 + spec.log_flux_sigma * jax.random.normal(k[3], (n, nb)),
        "offset": data["offset0"] + spec.position_sigma * jax.random.normal(k[4], (n, 2)),
    }
    w = nets.weights()
    alone = _alone(nets, w, spec, data, truth)  # (source, band, H, W)
    mean = alone.sum(axis=0)
    variance = poisson_variance(mean, data["sky"])
    image = mean + jnp.sqrt(variance) * jax.random.normal(k[5], mean.shape)
    new = dict(
        data,
        image=image,
        variance=variance,
        valid=jnp.ones_like(data["valid"]),
        log_flux0=log_flux0,
    )
    out = {name: np.asarray(v) for name, v in truth.items()}
    out.update(_quantities(out, list(blend.bands)))
    ib = list(blend.bands).index("r") if "r" in blend.bands else 0
    out["snr"] = np.sqrt(np.asarray((alone[:, ib] ** 2 / variance[ib]).sum(axis=(-2, -1))))
    return dataclasses.replace(blend, spec=spec, data=new), out


@partial(jax.jit, static_argnums=(0, 2))
def _alone(nets: Networks, w: dict, spec, data: dict, params: dict) -> jnp.ndarray:
    """Each source's expected image alone on the blend's canvas, ``(source, band, H, W)``."""
    stamps = source_stamps(spec, data, partial(nets.decode, w), nets.to_latent(w), params)
    return jax.vmap(lambda st, a: paste_stamps(st[None], a[None], spec.shape))(stamps, data["anchor"])


def _quantities(params: dict[str, np.ndarray], bands: list[str], band: str = "r") -> dict[str, np.ndarray]:
    """flux_r (electrons), e1, e2 and size (arcsec) of parameters ``(..., source, ...)``."""
    e = np.asarray(to_ellipticity(jnp.asarray(params["eta"])))
    return {
        "flux_r": np.exp(params["log_flux"][..., bands.index(band)]),
        "e1": e[..., 0],
        "e2": e[..., 1],
        "size": np.exp(params["log_hlr"]),
    }


def quantities(draws: dict[str, np.ndarray], bands: list[str], band: str = "r") -> dict[str, np.ndarray]:
    """The ranked quantities (:data:`QUANTITIES`) of draws ``(chain, draw, source, ...)``.

    Returned as ``(sample, source)`` arrays.

    ``band`` is the flux's band (``flux_r`` is named for the default).
    """
    flat = {k: np.asarray(v).reshape((-1,) + np.shape(v)[2:]) for k, v in draws.items()}
    return _quantities(flat, bands, band)


def ranks(draws: np.ndarray, truth: np.ndarray, thin: int = 1) -> np.ndarray:
    """Rank of each true value among its posterior draws, ``0..L`` (``L`` kept draws).

    Parameters
    ----------
    draws : numpy.ndarray
        ``(sample, item)`` posterior draws.
    truth : numpy.ndarray
        ``(item,)`` true values.
    thin : int
        Keep every ``thin``-th draw (correlated MCMC draws make ranks
        non-uniform even for an exact posterior: thin to about the ESS).

    Returns
    -------
    numpy.ndarray
        ``(item,)`` int: the number of kept draws below the truth (ties
        broken at random would matter only for discrete draws).
    """
    kept = np.asarray(draws)[::thin]
    return (kept < np.asarray(truth)[None]).sum(axis=0)


def rank_uniformity(r: np.ndarray, n_draws: int, bins: int = 10) -> tuple[float, float]:
    """Chi-square test that ranks ``0..n_draws`` are uniform, in ``bins`` equal bins.

    Returns
    -------
    chi2 : float
    p_value : float
        Small p rejects uniformity (the posterior is miscalibrated).
    """
    r = np.asarray(r)
    if r.size < 2 * bins:
        raise BayesblendError(f"{r.size} ranks are too few for {bins} bins (need at least {2 * bins})")
    edges = np.linspace(0, n_draws + 1, bins + 1)
    counts, _ = np.histogram(r, bins=edges)
    expected = r.size * np.diff(edges) / (n_draws + 1)
    chi2 = float(np.sum((counts - expected) ** 2 / expected))
    return chi2, float(stats.chi2.sf(chi2, bins - 1))


def coverage(draws: np.ndarray, truth: np.ndarray, level: float) -> float:
    """Fraction of items whose true value lies in the central ``level`` interval of its draws.

    ``draws`` ``(sample, item)``, ``truth`` ``(item,)``; ``level`` in (0, 1).
    """
    lo, hi = np.percentile(np.asarray(draws), [50 * (1 - level), 50 * (1 + level)], axis=0)
    t = np.asarray(truth)
    return float(np.mean((t >= lo) & (t <= hi)))
