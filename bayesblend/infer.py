"""Inference on blends: amortised, MAP, SVI and NUTS, batched under ``vmap``, giving a Posterior.

Every method starts from the one before it:

- ``amortised``: the pose encoder on a stamp around each source gives a
  diagonal Gaussian q over its latent code, ellipticity, size and offset
  (:class:`~bayesblend.prior.amortised.PoseLayout`); the fluxes of each draw
  are the joint non-negative least-squares amplitudes of all sources' stamps
  rendered at that draw (:func:`joint_flux`) plus their Gaussian (Fisher)
  error. Fastest, and the start of the others.
- ``map``: Adam on the joint log posterior from the amortised start (every
  parameter is an unconstrained real), polished by damped Gauss-Newton steps.
  The result carries the Laplace approximation around the optimum as its
  draws, with the Gauss-Newton precision ``J^T W J`` plus the prior's, which is
  positive definite everywhere (the exact Hessian at an Adam optimum had
  negative eigenvalues, and flooring them inflated the flux errors).
- ``svi``: NumPyro SVI with a full-covariance (``AutoMultivariateNormal``) or
  low-rank (``AutoLowRankMultivariateNormal``) guide, started at MAP (the full
  guide with the Laplace covariance).
- ``nuts``: NumPyro NUTS, several chains started from Laplace draws around MAP,
  with the Laplace covariance as the dense inverse mass matrix; warm-up tunes
  the step size only (``adapt_mass_matrix=False`` by default: a dense estimate
  from a short warm-up window did no better).

Blends with the same :class:`~bayesblend.model.SceneSpec` (padded source count
and cutout shape) run together: one per-blend function is ``vmap``-ed over a
batch and ``jit``-compiled once per (spec, method, configuration); the network
weights are arguments, not constants, so compilation stays small.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from bayesblend.blends import PreparedBlend, blend_region, check_scene, group_sources, prepare_blend
from bayesblend.errors import BayesblendError, MaskedBlendError, MaskedBlendWarning
from bayesblend.forward import paste_stamps
from bayesblend.model import (
    LOG_FLUX_SIGMA,
    MODEL_ERROR,
    POSITION_SIGMA,
    SceneSpec,
    inverse_variance,
    prior_precision,
    scene_model,
    source_stamps,
)
from bayesblend.posterior import Posterior
from bayesblend.prior.amortised import PoseLayout
from bayesblend.prior.bundle import Networks, PriorBundle
from bayesblend.scene import Scene

if TYPE_CHECKING:  # types only: astropy is imported where a table is read
    import os

    from astropy.table import Table

#: The inference methods, fastest first.
METHODS = ("amortised", "map", "svi", "nuts")


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise BayesblendError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


@dataclass(frozen=True)
class InferenceConfig:
    """Settings of the inference methods (hashable: one compilation per distinct config).

    Attributes
    ----------
    num_chains, num_draws : int
        NUTS chains and kept draws per chain; the other methods give
        ``num_draws`` independent draws as one chain.
    num_warmup : int
        NUTS warm-up steps per chain (step-size adaptation).
    max_tree_depth : int
        NUTS tree depth limit (at most ``2**depth - 1`` leapfrog steps per draw).
    target_accept : float
        NUTS target acceptance probability.
    adapt_mass_matrix : bool
        Adapt the (dense, Laplace-initialised) mass matrix during warm-up.
    init_spread : float
        Chains start at MAP plus this many Laplace standard deviations of scatter.
    map_steps : int
        Adam steps of MAP.
    map_learning_rate : float
        Initial Adam learning rate (cosine-decayed to a tenth).
    newton_steps : int
        Damped Gauss-Newton steps polishing the Adam optimum.
    laplace_min_precision : float
        Floor of the precision's eigenvalues (a guard; the Gauss-Newton
        precision is already at least the prior's).
    svi_guide : str
        ``"full"`` or ``"lowrank"``.
    svi_rank : int
        Rank of the low-rank guide.
    svi_steps, svi_particles : int
        Optimisation steps and ELBO particles per step.
    svi_learning_rate : float
    batch_size : int
        Blends per ``vmap`` batch.
    linking_length : float
        Sources closer than this (pixels) are fitted together as one blend.
    region_margin : int
        Pixels around a blend's sources in its cutout.
    log_flux_sigma, position_sigma : float
        Prior widths (natural log of flux; pixels).
    flux_prior : str
        Centre of the log-flux prior: ``"detection"`` (a box sum at the
        position over the PSF's fraction in the box, which counts every
        neighbour's light in the box) or ``"amortised"`` (the joint
        non-negative least-squares fluxes of the encoder's morphologies, which
        shares the light between neighbours).
    model_error : float
        Fractional error of the model (dimensionless): ``(model_error *
        data)**2`` is added to every pixel's variance. 0 is the survey's noise
        alone.
    """

    num_chains: int = 2
    num_draws: int = 300
    num_warmup: int = 150
    max_tree_depth: int = 6
    target_accept: float = 0.8
    adapt_mass_matrix: bool = False
    init_spread: float = 0.5
    map_steps: int = 300
    map_learning_rate: float = 0.05
    newton_steps: int = 4
    laplace_min_precision: float = 0.1
    svi_guide: str = "full"
    svi_rank: int = 8
    svi_steps: int = 300
    svi_particles: int = 4
    svi_learning_rate: float = 0.005
    batch_size: int = 4
    linking_length: float = 16.0
    region_margin: int = 16
    log_flux_sigma: float = LOG_FLUX_SIGMA
    position_sigma: float = POSITION_SIGMA
    flux_prior: str = "amortised"
    model_error: float = MODEL_ERROR

    def __post_init__(self) -> None:
        positive = (
            "num_chains",
            "num_draws",
            "max_tree_depth",
            "map_steps",
            "svi_steps",
            "svi_particles",
            "svi_rank",
            "batch_size",
            "log_flux_sigma",
            "position_sigma",
            "laplace_min_precision",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise BayesblendError(f"inference setting {name} must be positive, got {getattr(self, name)}")
        if min(self.num_warmup, self.region_margin, self.linking_length, self.model_error) < 0:
            raise BayesblendError("num_warmup, region_margin, linking_length and model_error must be >= 0")
        if not 0 < self.target_accept < 1:
            raise BayesblendError(f"target_accept must be in (0, 1), got {self.target_accept}")
        if self.flux_prior not in ("detection", "amortised"):
            raise BayesblendError(f"flux_prior must be 'detection' or 'amortised', got {self.flux_prior!r}")
        if self.svi_guide not in ("full", "lowrank"):
            raise BayesblendError(f"svi_guide must be 'full' or 'lowrank', got {self.svi_guide!r}")

    @classmethod
    def parse_settings(cls, pairs: Sequence[str]) -> dict:
        """Settings from ``name=value`` strings (command lines), typed as the fields' defaults."""
        defaults, out = cls(), {}
        for kv in pairs:
            name, sep, value = kv.partition("=")
            if not sep or not hasattr(defaults, name):
                raise BayesblendError(f"expected an inference setting as name=value, got {kv!r}")
            kind = type(getattr(defaults, name))
            try:
                out[name] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
            except ValueError:
                raise BayesblendError(
                    f"inference setting {name} must be of type {kind.__name__}, got {value!r}"
                ) from None
        return out

    def replace(self, **changes: Any) -> InferenceConfig:
        """A copy with ``changes`` (unknown names are an error).

        Parameters
        ----------
        **changes
            New values of fields, by name (e.g. ``num_draws=500``).

        Returns
        -------
        InferenceConfig
            The copy (validated again).
        """
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise BayesblendError(f"unknown inference setting(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)


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


def _unit_stamps(nets: Networks, w: dict, spec, data: dict, params: dict) -> jnp.ndarray:
    """Each source's stamp at unit flux per band, ``(source, band, S, S)`` (zero for padded sources)."""
    params = dict(params, log_flux=jnp.zeros_like(params["log_flux"]))
    return source_stamps(spec, data, partial(nets.decode, w), nets.to_latent(w), params)


def _potential(nets: Networks, w: dict, spec: SceneSpec, data: dict) -> Callable:
    from numpyro.infer.util import log_density

    decode = partial(nets.decode, w)
    to_latent = nets.to_latent(w)

    def potential(params):
        return -log_density(scene_model, (spec, data, decode, to_latent), {}, params)[0]

    return potential


def _amortised(nets: Networks, w: dict, spec, data: dict, stamp: int):
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
    flux, _ = joint_flux(_unit_stamps(nets, w, spec, data, start), data, survey_noise)
    return m, sd, start | {"log_flux": jnp.log(jnp.maximum(flux, floor))}


def _map(potential: Callable, start: dict, cfg: InferenceConfig):
    tx = optax.adam(optax.cosine_decay_schedule(cfg.map_learning_rate, cfg.map_steps, alpha=0.1))

    def step(carry, _):
        p, o = carry
        loss, g = jax.value_and_grad(potential)(p)
        upd, o = tx.update(g, o, p)
        return (optax.apply_updates(p, upd), o), loss

    (p, _), trace = jax.lax.scan(step, (start, tx.init(start)), None, length=cfg.map_steps)
    return p, jnp.append(trace, potential(p))


def _gauss_newton(nets: Networks, w: dict, spec: SceneSpec, data: dict, flat, unravel) -> jnp.ndarray:
    """Gauss-Newton precision ``J^T W J + P`` at ``flat``: positive definite by construction.

    J is the Jacobian of the expected scene with respect to the flattened
    parameters, W the inverse variance of the unmasked pixels and P the
    diagonal prior precision. Unlike the exact Hessian it never has negative
    eigenvalues away from the optimum, so it serves as the Newton matrix, the
    Laplace covariance and NUTS's mass matrix.

    J is built one source at a time: a source's parameters move only its own
    stamp (:func:`bayesblend.model.source_stamps`), so its columns take
    forward-mode derivatives of that one stamp, which are then pasted into the
    canvas. The cost grows as the number of sources, where differentiating the
    whole scene per column grew as its square.
    """
    decode = partial(nets.decode, w, forward_mode=True)
    to_latent = nets.to_latent(w)
    params = unravel(flat)
    nb = data["image"].shape[0]

    def stamp(p, valid):  # the stamp twice: as the output to differentiate and as the aux value
        one = {"source_valid": valid[None], "psf_ft": data["psf_ft"]}
        out = source_stamps(spec, one, decode, to_latent, jax.tree_util.tree_map(lambda a: a[None], p))[0]
        return out, out

    jac, stamps = jax.vmap(jax.jacfwd(stamp, has_aux=True))(params, data["source_valid"])

    def canvas_columns(j):  # (source, band, S, S, k) -> (source * k, band, H, W), parameters in ravel order
        cols = jnp.moveaxis(j.reshape(j.shape[:4] + (-1,)), -1, 1)  # a scalar per source: k = 1
        paste = jax.vmap(lambda c, a: paste_stamps(c[None], a[None], spec.shape), in_axes=(0, None))
        return jax.vmap(paste)(cols, data["anchor"]).reshape((-1, nb) + spec.shape)

    jmat = jnp.concatenate([canvas_columns(j) for j in jax.tree_util.tree_leaves(jac)])
    wgt = inverse_variance(spec, data, paste_stamps(stamps, data["anchor"], spec.shape))
    prec, _ = ravel_pytree(prior_precision(spec, nb))
    h = jnp.einsum("ibyx,jbyx,byx->ij", jmat, jmat, wgt) + jnp.diag(prec)
    return 0.5 * (h + h.T)


def _newton_laplace(nets, w, spec, data, potential: Callable, params: dict, cfg: InferenceConfig):
    """Polish MAP by damped Gauss-Newton steps, then the Laplace covariance there.

    Returns the flat optimum, ``unravel``, the covariance and a square root of it.
    """
    flat, unravel = ravel_pytree(params)

    def pot(f):
        return potential(unravel(f))

    scales = jnp.array([1.0, 0.5, 0.25, 0.0])

    def newton(f, _):
        g = jax.grad(pot)(f)
        step = jnp.linalg.solve(_gauss_newton(nets, w, spec, data, f, unravel), g)
        cands = f[None] - scales[:, None] * step[None]
        vals = jax.vmap(pot)(cands)
        vals = jnp.where(jnp.isfinite(vals), vals, jnp.inf)
        return cands[jnp.argmin(vals)], jnp.min(vals)

    flat, trace = jax.lax.scan(newton, flat, None, length=cfg.newton_steps)
    h = _gauss_newton(nets, w, spec, data, flat, unravel)
    lam, vec = jnp.linalg.eigh(h)
    lam = jnp.maximum(lam, cfg.laplace_min_precision)
    cov = (vec / lam) @ vec.T
    return flat, unravel, 0.5 * (cov + cov.T), vec / jnp.sqrt(lam), trace


def _gaussian_draws(flat, root, unravel, n: int, key):
    eps = jax.random.normal(key, (n, flat.shape[0]), flat.dtype)
    return jax.vmap(unravel)(flat + eps @ root.T)


def _with_chain(tree):
    return jax.tree_util.tree_map(lambda a: a[None], tree)


def _blend_fit(
    nets: Networks, method: str, spec: SceneSpec, cfg: InferenceConfig, stamp: int, w: dict, data: dict, key
) -> dict:
    """One blend: draws ``(chain, draw, source, ...)`` of the sampled parameters, and statistics.

    Also ``log_flux0``, the log-flux prior's centre the fit used (the amortised
    joint fluxes under ``flux_prior="amortised"``), so the Posterior's blend
    data describe the model that was fitted.
    """
    k_draw, k_svi, k_nuts = jax.random.split(key, 3)
    mean, sigma, start = _amortised(nets, w, spec, data, stamp)
    if cfg.flux_prior == "amortised" and method != "amortised":
        data = dict(data, log_flux0=start["log_flux"])
    return {"log_flux0": data["log_flux0"]} | _fit_method(
        nets, method, cfg, w, spec, data, mean, sigma, start, k_draw, k_svi, k_nuts
    )


def _fit_method(nets, method, cfg, w, spec, data, mean, sigma, start, k_draw, k_svi, k_nuts) -> dict:
    """The method's draws from the amortised start (mean, sigma, start) on the fitted data."""
    if method == "amortised":
        return _amortised_draws(nets, cfg, w, spec, data, mean, sigma, start, k_draw, k_svi)
    potential = _potential(nets, w, spec, data)
    point, trace = _map(potential, start, cfg)
    flat, unravel, cov, root, newton_trace = _newton_laplace(nets, w, spec, data, potential, point, cfg)
    point = unravel(flat)
    out = {"point": point, "map_trace": jnp.concatenate([trace, newton_trace])}
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
        f, a = joint_flux(_unit_stamps(nets, w, spec, data, p), data, spec)
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


def _batch_function(nets: Networks, method: str, spec: SceneSpec, cfg: InferenceConfig) -> Callable:
    """The jitted, vmapped per-blend fit for this (networks, method, spec, config): compiled once."""
    key = (nets, method, spec, cfg)
    if key not in _COMPILED:
        fit = partial(_blend_fit, nets, method, spec, cfg, nets.bundle.stamp)
        _COMPILED[key] = jax.jit(jax.vmap(fit, in_axes=(None, 0, 0)))
    return _COMPILED[key]


def fit_blends(
    bundle: PriorBundle,
    blends: Sequence[PreparedBlend],
    method: str = "nuts",
    latent_prior: str | None = None,
    seed: int = 0,
    config: InferenceConfig | None = None,
    progress: bool = False,
) -> list[dict]:
    """Fit prepared blends with ``method``; one result dict per blend (numpy arrays).

    Blends are grouped by spec and run in ``vmap`` batches of up to
    ``config.batch_size``; a short batch is padded by repetition to the next
    power of two, so only a few batch widths are ever compiled. Blend ``i``
    draws from the key ``fold_in(PRNGKey(seed), i)``, so results do not
    depend on the batching.
    """
    _check_method(method)
    cfg = config or InferenceConfig()
    nets = Networks(bundle, bundle.check_latent_prior(latent_prior))
    weights = nets.weights()
    base = jax.random.PRNGKey(seed)
    by_spec: dict[SceneSpec, list[int]] = {}
    for i, b in enumerate(blends):
        by_spec.setdefault(b.spec, []).append(i)
    batches = [
        (spec, idx[j : j + cfg.batch_size])
        for spec, idx in by_spec.items()
        for j in range(0, len(idx), cfg.batch_size)
    ]
    results: list[dict | None] = [None] * len(blends)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(blends), desc=f"deblend ({method})", unit="blend")
    for spec, idx in batches:
        width = min(1 << (len(idx) - 1).bit_length(), cfg.batch_size)  # 1, 2, 4...: few compiled widths
        full = idx + [idx[-1]] * (width - len(idx))
        data = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[blends[i].data for i in full])
        keys = jnp.stack([jax.random.fold_in(base, i) for i in full])
        out = jax.device_get(_batch_function(nets, method, spec, cfg)(weights, data, keys))
        for j, i in enumerate(idx):
            results[i] = jax.tree_util.tree_map(lambda a, j=j: np.asarray(a[j]), out)
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    return results  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# the entry point


def _as_positions(sources, scene: Scene) -> tuple[np.ndarray, np.ndarray] | None:
    """``(x, y)`` from a table or array of sources, or None to run detection."""
    if sources is None:
        return None
    from astropy.table import Table

    if isinstance(sources, str | bytes) or hasattr(sources, "__fspath__"):
        from bayesblend.io import read_table

        sources = read_table(sources)
    if isinstance(sources, Table):
        names = {c.lower(): c for c in sources.colnames}
        if "x" not in names or "y" not in names:
            raise BayesblendError(f"source list needs columns x and y (pixels), has {sources.colnames}")
        x, y = np.asarray(sources[names["x"]], float), np.asarray(sources[names["y"]], float)
    else:
        arr = np.asarray(sources, float)
        if arr.ndim != 2 or arr.shape[-1] != 2:
            raise BayesblendError(
                f"sources must be a table with x, y or an (n, 2) array, got shape {arr.shape}"
            )
        x, y = arr[:, 0], arr[:, 1]
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise BayesblendError("source positions must be finite numbers")
    ny, nx = scene.shape
    outside = (x < -0.5) | (x > nx - 0.5) | (y < -0.5) | (y > ny - 0.5)
    if outside.any():
        warnings.warn(f"{int(outside.sum())} source(s) outside the scene dropped", stacklevel=3)
        x, y = x[~outside], y[~outside]
    return x, y


def prepare_scene(
    scene: Scene,
    x: np.ndarray,
    y: np.ndarray,
    bundle: PriorBundle,
    config: InferenceConfig,
    name: str = "the scene",
) -> tuple[list[PreparedBlend], list[np.ndarray], list[bool]]:
    """Group a scene's sources into blends and prepare each cutout; also the groups and split flags.

    A blend whose every pixel is masked is left out with a warning naming its
    sources, so that one masked blend does not stop the rest of a field (or of
    the other scenes); :func:`deblend` raises :class:`MaskedBlendError` when no
    blend of any scene is left.
    """
    groups, split = group_sources(x, y, config.linking_length)
    preps, kept_groups, kept_split, masked = [], [], [], []
    for g, s in zip(groups, split, strict=True):
        x0, y0, h, w = blend_region(x[g], y[g], scene.shape, config.region_margin + bundle.stamp // 2)
        cut = scene.cutout(x0, y0, h, w)
        try:
            prep = prepare_blend(
                cut,
                x[g] - x0,
                y[g] - y0,
                bundle,
                config.log_flux_sigma,
                config.position_sigma,
                config.model_error,
                origin=(x0, y0),
            )
        except MaskedBlendError:
            masked.append(g)
            continue
        preps.append(prep)
        kept_groups.append(g)
        kept_split.append(s)
    if masked:
        left_out = np.concatenate(masked)
        where = ", ".join(f"({x[i]:.1f}, {y[i]:.1f})" for i in left_out[:5])
        more = f" and {len(left_out) - 5} more" if len(left_out) > 5 else ""
        warnings.warn(
            f"{len(left_out)} source(s) of {name} in fully masked blends left out, at x, y = {where}{more}",
            MaskedBlendWarning,
            stacklevel=3,
        )
    return preps, kept_groups, kept_split


def deblend(
    scene: Scene | Sequence[Scene],
    sources: Table | np.ndarray | str | os.PathLike | Sequence | None = None,
    method: str = "nuts",
    prior: PriorBundle | str | None = None,
    seed: int = 0,
    latent_prior: str | None = None,
    config: InferenceConfig | None = None,
    progress: bool = False,
    redetect: bool = True,
    **settings: Any,
) -> Posterior:
    """Deblend one scene or several: detect (or take) sources, group them into blends, infer.

    Parameters
    ----------
    scene : Scene or sequence of Scene
        Multi-band scenes (bands must include the prior's).
    sources : None, astropy Table, (n, 2) array, path, or a sequence of these (one per scene)
        Source positions ``x, y`` in pixels (0-based); None runs
        :func:`bayesblend.detect.detect_sources`.
    method : str
        ``"amortised"``, ``"map"``, ``"svi"`` or ``"nuts"``.
    prior : PriorBundle or str, optional
        The prior bundle (or its name or path); default the shipped ``lsst-v2``.
    seed : int
        Seed of every random draw.
    latent_prior : str, optional
        ``"flow"`` or ``"normal"`` (default: the bundle's recommendation).
    config : InferenceConfig, optional
        Settings; ``**settings`` override single fields (e.g. ``num_draws=500``).
    progress : bool
        Show a progress bar over blends.
    redetect : bool
        On the scenes whose sources were detected, fit the detections with
        MAP first (the amortised method for ``method="amortised"``), add the
        sources found in its residual (:func:`bayesblend.detect.residual_sources`:
        galaxies detection missed on a neighbour's wing), then run ``method``.
        On the held-out blends this finds 18 % more galaxies and cuts the
        median flux error at S/N > 30 from 11 % to 4 % (RESULTS "Detection").
        Costs the pilot fit. Ignored when sources are given.
    **settings
        Single :class:`InferenceConfig` fields overriding those of ``config``.

    Returns
    -------
    Posterior
        Draws of every source of every scene.
    """
    from bayesblend.detect import detect_sources, residual_sources
    from bayesblend.prior.bundle import load_bundle

    _check_method(method)
    bundle = prior if isinstance(prior, PriorBundle) else load_bundle(prior)
    cfg = (config or InferenceConfig()).replace(**settings)
    latent_prior = bundle.check_latent_prior(latent_prior)
    scenes = [scene] if isinstance(scene, Scene) else list(scene)
    if not scenes or not all(isinstance(s, Scene) for s in scenes):
        raise BayesblendError("deblend needs a Scene or a sequence of Scene objects")
    if isinstance(scene, Scene) or sources is None:
        per_scene = [sources] * len(scenes)
    else:
        per_scene = list(sources)
        if len(per_scene) != len(scenes):
            raise BayesblendError(f"{len(scenes)} scenes but {len(per_scene)} source lists")
    positions: list[tuple[np.ndarray, np.ndarray]] = []
    detected: list[int] = []
    for si, (sc, src) in enumerate(zip(scenes, per_scene, strict=True)):
        check_scene(sc, bundle)
        pos = _as_positions(src, sc)
        if pos is None:
            det = detect_sources(sc.select_bands(bundle.bands), survey=bundle.survey)
            pos = (np.asarray(det["x"], float), np.asarray(det["y"], float))
            detected.append(si)
        positions.append(pos)
    if redetect and any(len(positions[si][0]) for si in detected):
        # a pilot fit (MAP, or the amortised start for the amortised method) of the detected
        # sources; the sources in its residual join them, then the method runs once on all
        pilot_method = "amortised" if method == "amortised" else "map"
        # only its point estimates are read, unless it is returned as the result below: then it
        # needs the method's draws; else one draw spares decoding and measuring the rest
        pilot_cfg = cfg if pilot_method == method else cfg.replace(num_draws=1)
        with warnings.catch_warnings():  # the run below says it again
            warnings.simplefilter("ignore", MaskedBlendWarning)
            pilot = deblend(
                scenes,
                [np.c_[x, y] for x, y in positions],
                pilot_method,
                bundle,
                seed,
                latent_prior,
                pilot_cfg,
            )
        added = 0
        for si in detected:
            x, y = positions[si]
            model = pilot.scene_model(si)
            new = residual_sources(
                scenes[si].select_bands(bundle.bands), model, x, y, cfg.model_error, bundle.survey
            )
            positions[si] = (np.r_[x, np.asarray(new["x"], float)], np.r_[y, np.asarray(new["y"], float)])
            added += len(new)
        if not added and pilot_method == method:
            return pilot
    preps: list[PreparedBlend] = []
    members: list[dict] = []
    for si, (sc, (x, y)) in enumerate(zip(scenes, positions, strict=True)):
        if len(x) == 0:
            continue
        p, _, split = prepare_scene(sc, x, y, bundle, cfg, name=f"scene {si}")
        members += [{"scene": si, "split": s} for s in split]
        preps.extend(p)
    n_given = sum(len(x) for x, _ in positions)
    if not preps and n_given:
        raise MaskedBlendError(
            f"every pixel of every blend is masked ({n_given} source(s)): nothing to deblend"
        )
    results = fit_blends(bundle, preps, method, latent_prior, seed, cfg, progress)
    # the blends as fitted: the flux prior's centre is the one the fit used (amortised by default)
    for i, r in enumerate(results):
        preps[i] = dataclasses.replace(
            preps[i], data=dict(preps[i].data, log_flux0=jnp.asarray(r.pop("log_flux0")))
        )
    return Posterior.from_fits(bundle, latent_prior, method, seed, cfg, scenes, preps, members, results)
