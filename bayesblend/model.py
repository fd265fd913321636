"""The NumPyro scene model: galaxies with a learned morphology and an explicit pose, and the survey's noise.

A source is a canonical morphology (round, unit flux per band, a fixed
half-light radius in the reference band; decoded from a latent code ``z``)
put on the survey's pixel grid by an explicit pose and each band's PSF
(:func:`bayesblend.forward.render_pose`). Per source (a ``source`` plate of
fixed, padded size):

- ``u`` (latent dim): standard normal. The latent code is ``z = T(u)``, with
  ``T`` the bundle's flow mapping base draws to latent codes, or the identity
  for the N(0, I) prior; the prior on ``z`` is exactly the flow. Every method
  works in ``u``, where the prior is a plain standard normal.
- ``eta`` (2): the ellipticity, ``e = tanh|eta| eta / |eta|`` (shear-type,
  ``|e| = (a - b) / (a + b)``), with the Bernstein & Armstrong (2014) prior on
  the unit disk (:class:`bayesblend.ellipticity.EtaPrior`, scale ``s`` from the
  model card).
- ``log_hlr``: natural log of the half-light radius (arcsec), Normal around
  the population's size-magnitude relation at the source's estimated
  magnitude (the card's ``size_prior``), broadened (:data:`LOG_HLR_SIGMA`).
- ``log_flux`` (band): Normal(``log_flux0``, ``log_flux_sigma``), a proper
  and broad prior (default sigma = 2, a factor of 7 either way) around a flux
  estimate given with the data (the inference layer chooses it:
  ``InferenceConfig.flux_prior``).
- ``offset`` (2): Normal around the detected position, ``position_sigma``
  pixels (default 0.5): the profile centre, pixels from the stamp centre.

Scene mean = the sum of the sources' stamps pasted at their anchors
(:func:`scene_mean`). Likelihood: an independent Gaussian per pixel, written
with NumPyro's own ``Normal(...).mask(...).to_event(3)``. The variance is the
data's variance plane when given, else ``sky + max(mean, 0)`` (sky plus the
model's Poisson term), plus ``(alpha_b * max(data, 0))**2`` for the
galaxy model's own misfit in band b (``SceneSpec.model_error``, the bundle's
measured misfit by default: :mod:`bayesblend.misfit`; 0 gives the survey's
noise alone). Masked pixels carry no weight. Padded sources have zero flux, so they
add nothing to the scene; their parameters keep their (proper, normalised)
priors and are independent of everything else, so they leave the posterior of
the real sources unchanged. (Masking their priors instead leaves them flat and
improper, and NUTS then lets them drift without bound.)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist

from bayesblend.ellipticity import EtaPrior, to_ellipticity
from bayesblend.forward import canonical_spectrum, paste_stamps, render_pose
from bayesblend.survey import poisson_variance

#: Defaults of the scene model's priors and variance, the one source of them (``prepare_blend`` and
#: :class:`bayesblend.settings.InferenceConfig` use them too): log-flux prior sigma (natural log),
#: position prior sigma (pixels), and the fractional model error of a bundle whose card records no
#: measured misfit (``misfit``).
LOG_FLUX_SIGMA = 2.0
POSITION_SIGMA = 0.5
MODEL_ERROR = 0.03
#: Width of the log half-light-radius prior around the population's size-magnitude relation
#: (natural log): the training population's scatter about the relation (0.67, in the card) broadened.
LOG_HLR_SIGMA = 0.8


@dataclass(frozen=True)
class SceneSpec:
    """Static description of a (padded) scene model; hashable, so jit compiles once per spec.

    Attributes
    ----------
    shape : (int, int)
        ``(H, W)`` of the scene, pixels.
    n_sources : int
        Padded number of sources.
    latent_dim : int
    stamp : int
        Side of each source's stamp, survey pixels.
    pixel_scale : float
        Survey pixel scale, arcsec.
    hlr_pixels : float
        Half-light radius of the canonical frame, canonical pixels.
    ellipticity_scale : float
        ``s`` of the Bernstein & Armstrong prior (:class:`bayesblend.ellipticity.EtaPrior`).
    log_flux_sigma, log_hlr_sigma : float
        Widths of the log-flux and log-size priors, natural log units.
    position_sigma : float
        Width of the position prior, pixels.
    has_variance : bool
        Whether the data carry a variance plane (else sky + model Poisson term).
    model_error : tuple of float
        Fractional misfit of the galaxy model per band (dimensionless; one
        value serves every band): adds ``(alpha_b * max(data, 0))**2`` to
        every pixel's variance in band b (the data stand in for the true
        scene, so the term does not depend on the parameters). 0 is the
        survey's noise alone. A float is taken as one value for every band.
    """

    shape: tuple[int, int]
    n_sources: int
    latent_dim: int
    stamp: int
    pixel_scale: float
    hlr_pixels: float
    ellipticity_scale: float
    log_flux_sigma: float = LOG_FLUX_SIGMA
    log_hlr_sigma: float = LOG_HLR_SIGMA
    position_sigma: float = POSITION_SIGMA
    has_variance: bool = True
    model_error: tuple[float, ...] = (MODEL_ERROR,)

    def __post_init__(self) -> None:
        me = self.model_error
        me = (me,) if isinstance(me, int | float) else me
        object.__setattr__(self, "model_error", tuple(float(v) for v in me))


def pixel_variance(spec: SceneSpec, data: dict[str, jnp.ndarray], mean: jnp.ndarray) -> jnp.ndarray:
    """Per-pixel variance ``(band, H, W)`` of the likelihood, electrons^2 (1 on masked pixels).

    The data's variance plane when the scene has one, else the sky plus the
    Poisson term of ``mean`` (the model, or the data as its stand-in). Masked
    pixels get 1 so that everything built on it stays finite; they carry no
    weight anywhere.
    """
    if spec.has_variance:
        var = data["variance"]
    else:
        var = poisson_variance(mean, data["sky"])
    if any(a > 0 for a in spec.model_error):
        alpha = jnp.asarray(spec.model_error, jnp.float32).reshape(-1, 1, 1)
        var = var + (alpha * jnp.clip(data["image"], 0.0, None)) ** 2
    return jnp.where(data["valid"], var, 1.0)


def inverse_variance(spec: SceneSpec, data: dict[str, jnp.ndarray], mean: jnp.ndarray) -> jnp.ndarray:
    """Likelihood weights ``(band, H, W)``: 1 / :func:`pixel_variance`, zero on masked pixels."""
    return jnp.where(data["valid"], 1.0 / pixel_variance(spec, data, mean), 0.0)


def pixel_likelihood(spec: SceneSpec, data: dict[str, jnp.ndarray], mean: jnp.ndarray) -> None:
    """The ``obs`` site of the scene model: an independent Gaussian per unmasked pixel.

    Written with NumPyro's own ``Normal(...).mask(...).to_event(3)``, so each
    pixel counts once; the variance is :func:`pixel_variance` of ``mean``.
    """
    var = pixel_variance(spec, data, mean)
    numpyro.sample(
        "obs",
        dist.Normal(mean, jnp.sqrt(var)).mask(data["valid"]).to_event(3),
        obs=jnp.where(data["valid"], data["image"], 0.0),
    )


def prior_precision(spec: SceneSpec, n_bands: int) -> dict[str, jnp.ndarray]:
    """Diagonal prior precision at the prior's centre of every parameter (shapes as the parameters).

    For ``eta`` the curvature of :class:`~bayesblend.ellipticity.EtaPrior` at
    ``eta = 0``: ``1 / s^2`` from the Gaussian factor, 4 from ``(1 - |e|^2)^2``
    and 8 / 3 from the Jacobian of the unit-disk map.
    """
    n = spec.n_sources
    return {
        "u": jnp.ones((n, spec.latent_dim)),
        "eta": jnp.full((n, 2), spec.ellipticity_scale**-2 + 4.0 + 8.0 / 3.0),
        "log_hlr": jnp.full((n,), spec.log_hlr_sigma**-2),
        "log_flux": jnp.full((n, n_bands), spec.log_flux_sigma**-2),
        "offset": jnp.full((n, 2), spec.position_sigma**-2),
    }


def source_spectra(
    decode: Callable[[jnp.ndarray], jnp.ndarray],
    to_latent: Callable[[jnp.ndarray], jnp.ndarray] | None,
    u: jnp.ndarray,
) -> jnp.ndarray:
    """Canonical spectra ``(source, band, P, P)`` of base draws ``u`` ``(source, latent)``.

    The flow (``to_latent``; None for the identity), the decoder, then
    :func:`~bayesblend.forward.canonical_spectrum`.
    """
    z = u if to_latent is None else to_latent(u)
    return canonical_spectrum(decode(z))


def render_sources(
    spec: SceneSpec, data: dict[str, jnp.ndarray], spectrum: jnp.ndarray, pose: dict[str, jnp.ndarray]
) -> jnp.ndarray:
    """Stamps ``(source, band, S, S)``, electrons, of canonical spectra at their pose and flux.

    ``pose``: ``eta``, ``log_hlr``, ``log_flux`` and ``offset`` as in
    :func:`source_stamps` (other keys are ignored).
    """
    flux = jnp.exp(pose["log_flux"]) * data["source_valid"][:, None]
    render = functools.partial(
        render_pose, stamp=spec.stamp, pixel_scale=spec.pixel_scale, hlr_pixels=spec.hlr_pixels
    )
    e = to_ellipticity(pose["eta"])
    hlr = jnp.exp(pose["log_hlr"])
    offset = pose["offset"]
    return jax.vmap(render, in_axes=(0, 0, 0, 0, 0, None))(spectrum, flux, e, hlr, offset, data["psf_ft"])


def source_stamps(
    spec: SceneSpec,
    data: dict[str, jnp.ndarray],
    decode: Callable[[jnp.ndarray], jnp.ndarray],
    to_latent: Callable[[jnp.ndarray], jnp.ndarray] | None,
    params: dict[str, jnp.ndarray],
) -> jnp.ndarray:
    """Each source's expected image on its stamp, ``(source, band, S, S)`` electrons.

    ``params``: ``u`` ``(source, latent)``, ``eta`` ``(source, 2)``,
    ``log_hlr`` ``(source,)`` (arcsec), ``log_flux`` ``(source, band)``,
    ``offset`` ``(source, 2)`` (pixels of the profile centre from the stamp
    centre). Reads ``data["source_valid"]`` and ``data["psf_ft"]`` only, so it
    also serves one source at a time. The composition of
    :func:`source_spectra` (the morphology) and :func:`render_sources` (the
    pose), which the Gauss-Newton Jacobian differentiates separately.
    """
    return render_sources(spec, data, source_spectra(decode, to_latent, params["u"]), params)


def scene_mean(
    spec: SceneSpec,
    data: dict[str, jnp.ndarray],
    decode: Callable[[jnp.ndarray], jnp.ndarray],
    to_latent: Callable[[jnp.ndarray], jnp.ndarray] | None,
    params: dict[str, jnp.ndarray],
) -> jnp.ndarray:
    """Expected scene ``(band, H, W)``, electrons: the sources' stamps pasted at their anchors."""
    return paste_stamps(source_stamps(spec, data, decode, to_latent, params), data["anchor"], spec.shape)


def scene_model(
    spec: SceneSpec,
    data: dict[str, jnp.ndarray],
    decode: Callable[[jnp.ndarray], jnp.ndarray],
    to_latent: Callable[[jnp.ndarray], jnp.ndarray] | None = None,
) -> None:
    """NumPyro model of one scene (the priors and likelihood of the module docstring).

    Parameters
    ----------
    spec : SceneSpec
        Static shapes and prior widths.
    data : dict of jax.Array
        ``image`` ``(band, H, W)``; ``variance`` ``(band, H, W)`` (ignored
        unless ``spec.has_variance``); ``valid`` ``(band, H, W)`` bool (False =
        masked); ``sky`` ``(band,)``; ``psf_ft`` ``(band, n, n // 2 + 1)``
        (:func:`bayesblend.forward.psf_spectrum` of the scene's PSF images);
        ``anchor`` ``(source, 2)`` int; ``offset0`` ``(source, 2)``;
        ``log_flux0`` ``(source, band)``; ``log_hlr0`` ``(source,)`` (the
        population's ln half-light radius, arcsec, at the source's estimated
        magnitude); ``source_valid`` ``(source,)`` bool.
    decode : callable
        Latent codes ``(source, latent)`` -> canonical morphologies ``(source, band, C, C)``.
    to_latent : callable, optional
        Flow map from base draws ``u`` to latent codes (None: ``z = u``).
    """
    n, nb = spec.n_sources, data["log_flux0"].shape[-1]
    with numpyro.plate("source", n, dim=-1):
        u = numpyro.sample("u", dist.Normal(jnp.zeros((n, spec.latent_dim)), 1.0).to_event(1))
        eta = numpyro.sample("eta", EtaPrior(spec.ellipticity_scale, (n,)))
        log_hlr = numpyro.sample("log_hlr", dist.Normal(data["log_hlr0"], spec.log_hlr_sigma))
        log_flux = numpyro.sample(
            "log_flux", dist.Normal(data["log_flux0"], spec.log_flux_sigma * jnp.ones((n, nb))).to_event(1)
        )
        offset = numpyro.sample(
            "offset", dist.Normal(data["offset0"], spec.position_sigma * jnp.ones((n, 2))).to_event(1)
        )
    params = {"u": u, "eta": eta, "log_hlr": log_hlr, "log_flux": log_flux, "offset": offset}
    pixel_likelihood(spec, data, scene_mean(spec, data, decode, to_latent, params))
