"""The inference methods on one blend, pure JAX: amortised, MAP, SVI and NUTS, and their batched compilation.

Every method starts from the one before it:

- ``amortised``: the pose encoder on a stamp around each source gives a
  diagonal Gaussian q over its latent code, ellipticity, size and offset
  (:class:`~bayesblend.prior.amortised.PoseLayout`); the fluxes of each draw
  are the joint non-negative least-squares amplitudes of all sources' stamps
  rendered at that draw (:func:`joint_flux`) plus their Gaussian (Fisher)
  error. Fastest, and the start of the others.
- ``map``: Levenberg-Marquardt on the joint log posterior from the amortised
  start (every parameter is an unconstrained real), with the Gauss-Newton
  precision ``J^T W J`` plus the prior's as its curvature, which is positive
  definite everywhere (the exact Hessian at an optimum had negative
  eigenvalues, and flooring them inflated the flux errors). The result
  carries the Laplace approximation around the optimum as its draws, with
  the same precision. At most twenty iterations reach the optimum that 300
  Adam steps and four Gauss-Newton steps reached before, or a better one, in
  30-50 % of the time (RESULTS "Speed of MAP").
- ``svi``: NumPyro SVI with a full-covariance (``AutoMultivariateNormal``) or
  low-rank (``AutoLowRankMultivariateNormal``) guide, started at MAP (the full
  guide with the Laplace covariance).
- ``nuts``: NumPyro NUTS, several chains started from Laplace draws around MAP,
  with the Laplace covariance as the initial dense inverse mass matrix, which
  warm-up then adapts (``adapt_mass_matrix=True``): the latent code's
  posterior is broader and more curved than the Laplace approximation says
  (RESULTS "NUTS with galaxy model v2": on a bright galaxy, adaptation took
  the bulk ESS of flux and e from 118-350 to 218-421 per 300 draws and the
  divergences from 10 to 1).

Blends with the same :class:`~bayesblend.model.SceneSpec` (padded source count
and cutout shape) run together: one per-blend function is ``vmap``-ed over a
batch and ``jit``-compiled once per (spec, method, configuration); the network
weights are arguments, not constants, so compilation stays small.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import optax

from bayesblend.forward import paste_stamps
from bayesblend.model import (
    SceneSpec,
    inverse_variance,
    scene_model,
    source_stamps,
)
from bayesblend.optimum import map_laplace
from bayesblend.prior.amortised import PoseLayout
from bayesblend.prior.bundle import Networks
from bayesblend.settings import InferenceConfig

# --------------------------------------------------------------------------------------------
# building blocks (one blend, pure JAX)


def cutouts(image: jnp.ndarray, anchor: jnp.ndarray, stamp: int) -> jnp.ndarray:
    """Stamps ``(source, band, S, S)`` cut from ``image`` ``(band, H, W)`` at ``anchor`` (zero outside)."""
    nb = image.shape[0]
    padded = jnp.pad(image, ((0, 0), (stamp, stamp), (stamp, stamp)))
    h, w = image.shape[1:]

    def one(a):
        a = jnp.clip(a, -stamp, jnp.array([w, h])) + stamp
        return jax.lax.dynamic_slice(padded, (0, a[1], a[0]), (nb, stamp, stamp))

    return jax.vmap(one)(anchor)


def joint_flux(
    unit: jnp.ndarray, data: dict, spec: SceneSpec, sweeps: int = 50
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Joint non-negative weighted least-squares fluxes of fixed unit-flux source stamps on the scene.

    Per band, minimises ``|W^(1/2) (d - T f)|^2`` over ``f >= 0``, with T the
    unit-flux templates of all sources (``unit``, ``(source, band, S, S)``,
    pasted at their anchors), W the inverse variance and d the data, by
    projected coordinate descent on the normal equations (``sweeps`` passes;
    exact for the small systems here). The unconstrained solve lets
    overlapping templates trade flux into large positive and negative pairs;
    the constraint keeps every source physical.

    Returns
    -------
    flux : jax.Array
        ``(source, band)`` electrons (zero for padded sources).
    normal : jax.Array
        ``(band, source, source)`` the normal matrix ``T^T W T`` (its inverse
        is the flux covariance at fixed morphology and pose).
    """
    n = spec.n_sources
    valid = data["source_valid"].astype(jnp.float32)
    paste = jax.vmap(lambda st, a: paste_stamps(st[None], a[None], spec.shape))
    templates = paste(unit, data["anchor"])  # (source, band, H, W)
    w = inverse_variance(spec, data, data["image"])  # the data stand in for the model's Poisson term
    a = jnp.einsum("ibyx,jbyx,byx->bij", templates, templates, w)
    rhs = jnp.einsum("ibyx,byx,byx->bi", templates, w, data["image"])
    eye = jnp.eye(n)
    # padded sources (and templates that fall entirely off the data): unit diagonal, zero flux
    a = a * valid[None, :, None] * valid[None, None, :] + eye[None] * (1 - valid)[None, :, None]
    diag = jnp.maximum(jnp.diagonal(a, axis1=1, axis2=2), 1e-12)
    a = a + eye[None] * (diag[:, :, None] * 1e-6)
    rhs = rhs * valid[None]

    def coordinate(k, f):
        r = rhs[:, k] - jnp.einsum("bj,bj->b", a[:, k, :], f) + a[:, k, k] * f[:, k]
        return f.at[:, k].set(jnp.maximum(r / jnp.maximum(a[:, k, k], 1e-12), 0.0))

    def sweep(f, _):
        return jax.lax.fori_loop(0, n, coordinate, f), None

    f0 = jnp.maximum(rhs / jnp.maximum(diag, 1e-12), 0.0)
    f, _ = jax.lax.scan(sweep, f0, None, length=sweeps)
    return f.T * valid[:, None], a


def unit_stamps(nets: Networks, w: dict, spec, data: dict, params: dict) -> jnp.ndarray:
    """Each source's stamp at unit flux per band, ``(source, band, S, S)`` (zero for padded sources)."""
    params = dict(params, log_flux=jnp.zeros_like(params["log_flux"]))
    return source_stamps(spec, data, partial(nets.decode, w), nets.to_latent(w), params)


def scene_potential(nets: Networks, w: dict, spec: SceneSpec, data: dict) -> Callable:
    """The potential ``-log p(params, data)`` of :func:`~bayesblend.model.scene_model` (natural log).

    Returns a function of the parameter dict (``u``, ``eta``, ``log_hlr``,
    ``log_flux``, ``offset``), which is what MAP, the Laplace step and NUTS
    differentiate.
    """
    from numpyro.infer.util import log_density

    decode = partial(nets.decode, w)
    to_latent = nets.to_latent(w)

    def potential(params):
        return -log_density(scene_model, (spec, data, decode, to_latent), {}, params)[0]

    return potential


def amortised_start(nets: Networks, w: dict, spec, data: dict, stamp: int):
    """The pose encoder's mean and sigma per source, and the start of the fits at the mean.

    The encoder's q covers every parameter but the fluxes
    (:class:`~bayesblend.prior.amortised.PoseLayout`); the start ``(u, eta,
    log_hlr, log_flux, offset)`` is its mean, with the fluxes the joint
    non-negative fit of the sources rendered at that pose.
    """
    stamps = cutouts(data["image"], data["anchor"], stamp)
    mean, log_sigma = nets.encode(w, stamps, jnp.sqrt(data["sky"]))
    # the survey's noise alone: a model-error term down-weights a bright galaxy's core, and its
    # neighbours' templates then take more of the residual there (46x and 88x too bright for the
    # r = 27 neighbours of held-out blend 149, against 21x and 7.4x without; the 5x5 box sum gives
    # 66x and 148x: benchmarks/flux_prior_check.py --items 149)
    survey_noise = dataclasses.replace(spec, model_error=0.0)
    floor = jnp.exp(data["log_flux0"]) * 0.05
    layout = PoseLayout(spec.latent_dim, data["log_flux0"].shape[-1])
    m, sd = layout.unpack(mean), layout.unpack(jnp.exp(log_sigma))
    start = {k: m[k] for k in ("eta", "log_hlr", "log_flux", "offset")} | {"u": nets.to_base(w, m["z"])}
    flux, _ = joint_flux(unit_stamps(nets, w, spec, data, start), data, survey_noise)
    return m, sd, start | {"log_flux": jnp.log(jnp.maximum(flux, floor))}


def _gaussian_draws(flat, root, unravel, n: int, key):
    eps = jax.random.normal(key, (n, flat.shape[0]), flat.dtype)
    return jax.vmap(unravel)(flat + eps @ root.T)


def _with_chain(tree):
    return jax.tree_util.tree_map(lambda a: a[None], tree)


def blend_fit(
    nets: Networks,
    method: str,
    spec: SceneSpec,
    cfg: InferenceConfig,
    stamp: int,
    w: dict,
    data: dict,
    key,
    fitted: dict | None = None,
) -> dict:
    """One blend: draws ``(chain, draw, source, ...)`` of the sampled parameters, and statistics.

    Also ``log_flux0``, the log-flux prior's centre the fit used (the amortised
    joint fluxes under ``flux_prior="amortised"``), so the Posterior's blend
    data describe the model that was fitted. ``fitted``: the blend's MAP
    from an earlier fit (:func:`~bayesblend.optimum.map_laplace`), which the methods that start
    from MAP then take as it is.
    """
    k_draw, k_svi, k_nuts = jax.random.split(key, 3)
    mean, sigma, start = amortised_start(nets, w, spec, data, stamp)
    if cfg.flux_prior == "amortised" and method != "amortised":
        data = dict(data, log_flux0=start["log_flux"])
    return {"log_flux0": data["log_flux0"]} | _fit_method(
        nets, method, cfg, w, spec, data, mean, sigma, start, k_draw, k_svi, k_nuts, fitted
    )


def _fit_method(nets, method, cfg, w, spec, data, mean, sigma, start, k_draw, k_svi, k_nuts, fitted) -> dict:
    """The method's draws from the amortised start (mean, sigma, start) on the fitted data."""
    if method == "amortised":
        return _amortised_draws(nets, cfg, w, spec, data, mean, sigma, start, k_draw, k_svi)
    potential = scene_potential(nets, w, spec, data)
    flat, unravel, cov, root, trace = map_laplace(nets, w, spec, data, potential, start, cfg, fitted)
    point = unravel(flat)
    out = {"point": point, "map_trace": trace}
    if method == "map":
        out["draws"] = _with_chain(_gaussian_draws(flat, root, unravel, cfg.num_draws, k_draw))
        out["stats"] = {}
        return out
    if method == "svi":
        return out | _svi(nets, w, spec, data, point, flat, cov, cfg, k_svi)
    return out | _nuts(potential, flat, unravel, cov, root, cfg, k_nuts)  # method checked by fit_blends


def _amortised_draws(nets, cfg: InferenceConfig, w, spec, data, mean, sigma, start, k_draw, k_flux) -> dict:
    """Draws of the amortised posterior: the encoder's Gaussian, fluxes jointly fitted per draw.

    For each draw of the morphology and pose (``z``, ``eta``, ``log_hlr``,
    ``offset``) the fluxes are the joint non-negative fit of the sources'
    unit-flux stamps plus their Gaussian (Fisher) error at that draw.
    """
    n = cfg.num_draws
    names = ("z", "eta", "log_hlr", "offset")
    keys = dict(zip(names, jax.random.split(k_draw, len(names)), strict=True))
    q = {k: mean[k] + sigma[k] * jax.random.normal(keys[k], (n,) + mean[k].shape) for k in names}
    shape = {"u": nets.to_base(w, q.pop("z"))} | q
    keys = jax.random.split(k_flux, n)

    def one(p, k):
        p = p | {"log_flux": data["log_flux0"]}
        f, a = joint_flux(unit_stamps(nets, w, spec, data, p), data, spec)
        chol = jnp.linalg.cholesky(jnp.linalg.inv(a))  # (band, source, source)
        f = f.T + jnp.einsum("bij,bj->bi", chol, jax.random.normal(k, f.T.shape))
        return jnp.maximum(f.T, jnp.exp(data["log_flux0"]) * 0.01)

    flux = jax.lax.map(lambda a: one(*a), (shape, keys), batch_size=64)
    return {"draws": _with_chain(shape | {"log_flux": jnp.log(flux)}), "point": start, "stats": {}}


def _svi(nets, w, spec, data, point, flat, cov, cfg: InferenceConfig, key) -> dict:
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.infer.autoguide import AutoLowRankMultivariateNormal, AutoMultivariateNormal
    from numpyro.infer.initialization import init_to_value

    decode = partial(nets.decode, w)
    to_latent = nets.to_latent(w)

    def model(d):
        scene_model(spec, d, decode, to_latent)

    init = init_to_value(values=point)
    if cfg.svi_guide == "full":
        guide = AutoMultivariateNormal(model, init_loc_fn=init)
        init_params = {"auto_loc": flat, "auto_scale_tril": jnp.linalg.cholesky(cov)}
    else:
        guide = AutoLowRankMultivariateNormal(model, init_loc_fn=init, rank=cfg.svi_rank, init_scale=0.1)
        init_params = {"auto_loc": flat}
    svi = SVI(model, guide, optax.adam(cfg.svi_learning_rate), Trace_ELBO(num_particles=cfg.svi_particles))
    k_init, k_draw = jax.random.split(key)
    state = svi.init(k_init, data, init_params=init_params)
    state, losses = jax.lax.scan(lambda s, _: svi.update(s, data), state, None, length=cfg.svi_steps)
    params = svi.get_params(state)
    draws = guide.sample_posterior(k_draw, params, sample_shape=(cfg.num_draws,))
    draws = {k: draws[k] for k in point}
    return {"draws": _with_chain(draws), "elbo_trace": losses, "stats": {}}


def _nuts(potential, flat, unravel, cov, root, cfg: InferenceConfig, key) -> dict:
    from numpyro.infer.hmc import hmc

    init_kernel, sample_kernel = hmc(potential_fn=potential, algo="NUTS")
    k_start, k_chain = jax.random.split(key)
    eps = jax.random.normal(k_start, (cfg.num_chains, flat.shape[0]), flat.dtype)
    starts = flat + cfg.init_spread * eps @ root.T
    total = cfg.num_warmup + cfg.num_draws

    def chain(start, k):
        state = init_kernel(
            unravel(start),
            num_warmup=cfg.num_warmup,
            inverse_mass_matrix=cov,
            dense_mass=True,
            adapt_mass_matrix=cfg.adapt_mass_matrix,
            target_accept_prob=cfg.target_accept,
            max_tree_depth=cfg.max_tree_depth,
            find_heuristic_step_size=True,
            rng_key=k,
        )

        def step(s, _):
            s = sample_kernel(s)
            return s, (s.z, s.diverging, s.num_steps, s.accept_prob, s.potential_energy, s.energy)

        _, (z, div, steps, acc, pe, en) = jax.lax.scan(step, state, None, length=total)
        keep = slice(cfg.num_warmup, total)
        stats = {
            "diverging": div[keep],
            "n_steps": steps[keep],
            "tree_depth": jnp.ceil(jnp.log2(steps[keep].astype(jnp.float32) + 1.0)).astype(jnp.int32),
            "acceptance_rate": acc[keep],
            "lp": -pe[keep],
            "energy": en[keep],
        }
        return jax.tree_util.tree_map(lambda a: a[keep], z), stats

    draws, stats = jax.vmap(chain)(starts, jax.random.split(k_chain, cfg.num_chains))
    return {"draws": draws, "stats": stats}


# --------------------------------------------------------------------------------------------
# batches

_COMPILED: dict = {}


def batch_function(
    nets: Networks, method: str, spec: SceneSpec, cfg: InferenceConfig, fitted: bool = False
) -> Callable:
    """The jitted, vmapped per-blend fit for this (networks, method, spec, config): compiled once.

    It takes the weights, the stacked data and keys, and with ``fitted`` the
    blends' stacked earlier MAP (:func:`blend_fit`).
    """
    key = (nets, method, spec, cfg, fitted)
    if key not in _COMPILED:
        fit = partial(blend_fit, nets, method, spec, cfg, nets.bundle.stamp)
        _COMPILED[key] = jax.jit(jax.vmap(fit, in_axes=(None, 0, 0) + ((0,) if fitted else ())))
    return _COMPILED[key]
