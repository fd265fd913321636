"""Estimators of a field's constant reduced shear: the ensemble mean and the hierarchical model.

**Ensemble** (:func:`ensemble_shear`): ``g = sum(w e) / sum(w R)``, the
weighted mean of shear-type ellipticities over a responsivity. It is the quick
look: posterior summaries are shrunk towards round by the prior and by the
noise, so without a responsivity measured on simulations (``R = 1``) it is
biased low (RESULTS, "Shear bias").

**Hierarchical** (:func:`hierarchical_shear`, Schneider et al. 2015,
arXiv:1411.2608): each source's posterior draws ``e_ij`` were made under the
interim prior ``pi(e)``, the scene model's own prior on the ellipticity
parameter, known exactly (:class:`~bayesblend.shear.lensing.InterimPrior`).
The likelihood of the population parameters is

    L(g, s) = prod_i (1/n_i) sum_j p(e_ij | g, s) / pi(e_ij),

with ``p(e | g, s)`` the lensed intrinsic density
(:func:`~bayesblend.shear.lensing.sheared_log_density`). NUTS runs over
``(g1, g2, s)``; the per-source importance-weight effective sample size says
where the posterior draws do not cover the population model. No calibration
from simulations enters.

Errors: delete-one-block jackknife over groups for the ensemble, the
posterior standard deviation for the hierarchical model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from bayesblend.errors import BayesblendError
from bayesblend.shear.catalog import valid_shapes
from bayesblend.shear.lensing import InterimPrior, component_sigma, sheared_log_density
from bayesblend.shear.statistics import jackknife, jackknife_blocks, weighted_ratio_replicates

#: Importance-weight ESS below which the hierarchical estimate counts a source as poorly covered.
IS_ESS_MIN = 5.0
#: Largest |g| and the range of the intrinsic scale ``s`` the hierarchical model allows.
G_MAX = 0.2
S_RANGE = (0.02, 1.0)
_MODE_START = (0.0, 0.0, 0.25)  # (g1, g2, s) where the maximum-likelihood search starts


@dataclass
class ShearEstimate:
    """A field's shear with its errors.

    Attributes
    ----------
    g1, g2, g1_err, g2_err : float
    n : int
        Sources used.
    estimator : str
    details : dict
        Estimator-specific extras (responsivity, sigma_e, ESS...).
    """

    g1: float
    g2: float
    g1_err: float
    g2_err: float
    n: int
    estimator: str
    details: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return (
            f"g1 = {self.g1:+.5f} ± {self.g1_err:.5f}   g2 = {self.g2:+.5f} ± {self.g2_err:.5f}   "
            f"({self.estimator}, {self.n} sources)"
        )


def ensemble_shear(
    e1: np.ndarray,
    e2: np.ndarray,
    weight: np.ndarray | None = None,
    responsivity: float | np.ndarray = 1.0,
    groups: np.ndarray | None = None,
    n_blocks: int = 100,
) -> ShearEstimate:
    """``g = sum(w e) / sum(w R)`` with delete-one-block jackknife errors.

    Parameters
    ----------
    e1, e2 : array
        Shear-type ellipticities (dimensionless); non-finite rows are skipped.
    weight : array, optional
        Per-source weights (default 1); rows of weight 0 are skipped.
    responsivity : float or array
        ``R`` of ``<e> = R g``: one for all sources, or one per source (a
        :class:`ResponsivityTable`'s); the jackknife replicates the ratio.
    groups : array, optional
        Group label per source (e.g. blend id); a group is never split across
        jackknife blocks. Default: each source its own group.
    n_blocks : int
        Jackknife blocks.
    """
    e = np.stack([np.asarray(e1, float), np.asarray(e2, float)], axis=1)
    w = np.ones(len(e)) if weight is None else np.asarray(weight, float)
    R = np.broadcast_to(np.asarray(responsivity, float), (len(e),))
    ok = np.all(np.isfinite(e), axis=1) & np.isfinite(w) & (w > 0)
    if not np.all(np.isfinite(R[ok]) & (R[ok] > 0)):
        raise BayesblendError(f"responsivity must be positive numbers, got {np.unique(R[ok])[:5]}")
    if ok.sum() < 2:
        raise BayesblendError(f"a shear estimate needs at least 2 usable sources, got {int(ok.sum())}")
    groups = np.arange(len(e)) if groups is None else np.asarray(groups)
    blocks = jackknife_blocks(groups[ok], n_blocks)
    g, reps, mean_R = weighted_ratio_replicates(e[ok], R[ok], w[ok], blocks)
    err = jackknife(g, reps)
    return ShearEstimate(
        g1=float(g[0]),
        g2=float(g[1]),
        g1_err=float(err[0]),
        g2_err=float(err[1]),
        n=int(ok.sum()),
        estimator="ensemble",
        details={"responsivity": mean_R, "n_blocks": int(blocks.max()) + 1},
    )


# ----------------------------------------------------------------------------- hierarchical
def _log_like_terms(params, e, log_interim, valid):
    """Per-source log of the mean importance weight, and the log weights ``(source, draw)``."""
    g = params[0] + 1j * params[1]
    logw = sheared_log_density(e, g, params[2]) - log_interim
    logw = jnp.where(valid, logw, -jnp.inf)
    n = jnp.maximum(jnp.sum(valid, axis=1), 1)
    per_source = jax.nn.logsumexp(logw, axis=1) - jnp.log(n)
    return jnp.where(jnp.any(valid, axis=1), per_source, 0.0), logw


def hierarchical_log_likelihood(
    params: jnp.ndarray,
    e: jnp.ndarray,
    log_interim: jnp.ndarray,
    valid: jnp.ndarray,
    source_weight: jnp.ndarray | None = None,
) -> jnp.ndarray:
    """``sum_i w_i log( mean_j p(e_ij | g, s) / pi(e_ij) )`` for ``params = (g1, g2, s)``.

    ``e`` is complex ``(source, draw)``; ``valid`` marks real draws;
    ``source_weight`` (default 1) lets the jackknife drop sources.
    """
    per_source, _ = _log_like_terms(params, e, log_interim, valid)
    if source_weight is not None:
        per_source = per_source * source_weight
    return jnp.sum(per_source)


def importance_ess(
    params: jnp.ndarray | np.ndarray | Sequence[float],
    e: jnp.ndarray,
    log_interim: jnp.ndarray,
    valid: jnp.ndarray,
) -> jnp.ndarray:
    """Effective sample size of each source's importance weights at ``params``.

    Parameters
    ----------
    params : array ``(3,)``
        ``(g1, g2, s)``: reduced shear and intrinsic shape dispersion.
    e : array ``(source, draw)``
        Complex shear-type ellipticities of the posterior draws.
    log_interim : array ``(source, draw)``
        ``log pi(e)`` of the draws under the interim prior.
    valid : bool array ``(source, draw)``
        Real draws with a valid shape.

    Returns
    -------
    jax.Array
        ``(source,)`` ``(sum w)^2 / sum w^2``, in draws.
    """
    _, logw = _log_like_terms(jnp.asarray(params), e, log_interim, valid)
    w = jnp.exp(logw - jnp.max(logw, axis=1, keepdims=True))
    w = jnp.where(valid, w, 0.0)
    return jnp.sum(w, axis=1) ** 2 / jnp.maximum(jnp.sum(w**2, axis=1), 1e-30)


def _prepare_samples(e1: np.ndarray, e2: np.ndarray, interim: InterimPrior):
    e1 = np.asarray(e1, np.float32)
    e2 = np.asarray(e2, np.float32)
    if e1.ndim != 2 or e1.shape != e2.shape:
        raise BayesblendError(
            f"ellipticity samples must be (source, draw) arrays of one shape, got {e1.shape}, {e2.shape}"
        )
    valid = valid_shapes(e1, e2)
    e = jnp.asarray(np.where(valid, e1, 0.0) + 1j * np.where(valid, e2, 0.0), jnp.complex64)
    return e, interim.log_prob(e), jnp.asarray(valid)


def _unconstrain(p):
    """(g1, g2, s) -> unbounded coordinates (the optimiser's)."""
    g = p[:2] / G_MAX
    s01 = (p[2] - S_RANGE[0]) / (S_RANGE[1] - S_RANGE[0])
    return jnp.concatenate([jnp.arctanh(g), jnp.log(s01 / (1 - s01))[None]])


def _constrain(q):
    g = G_MAX * jnp.tanh(q[:2])
    s = S_RANGE[0] + (S_RANGE[1] - S_RANGE[0]) * jax.nn.sigmoid(q[2])
    return jnp.concatenate([g, s[None]])


@jax.jit
def _mode(e, log_interim, valid, source_weight, start):
    """Maximum-likelihood ``(g1, g2, s)`` by Newton steps in unconstrained coordinates."""

    def nll(q):
        return -hierarchical_log_likelihood(_constrain(q), e, log_interim, valid, source_weight)

    def step(q, _):
        grad = jax.grad(nll)(q)
        hess = jax.hessian(nll)(q)
        hess = hess + 1e-3 * jnp.eye(3) * (1.0 + jnp.abs(jnp.diag(hess)))
        dq = jnp.linalg.solve(hess, grad)
        dq = jnp.clip(dq, -0.5, 0.5)
        return q - dq, None

    q, _ = jax.lax.scan(step, _unconstrain(start), None, length=30)
    return _constrain(q)


def hierarchical_mode(
    e1: np.ndarray,
    e2: np.ndarray,
    interim: InterimPrior,
    source_weight: np.ndarray | None = None,
    start: Sequence[float] = _MODE_START,
) -> np.ndarray:
    """Maximum-likelihood ``(g1, g2, s)`` of the hierarchical model.

    ``source_weight`` may have leading axes ``(..., source)``: one fit per row
    (vmapped; the jackknife uses it).
    """
    return _modes(*_prepare_samples(e1, e2, interim), source_weight, start)


def _modes(e, logi, valid, source_weight, start) -> np.ndarray:
    """:func:`hierarchical_mode` on samples already through :func:`_prepare_samples`."""
    n = e.shape[0]
    sw = jnp.ones(n) if source_weight is None else jnp.asarray(source_weight, jnp.float32)
    start = jnp.asarray(start, jnp.float32)
    if sw.ndim == 1:
        return np.asarray(_mode(e, logi, valid, sw, start))
    flat = sw.reshape(-1, n)
    fits = jax.vmap(lambda w: _mode(e, logi, valid, w, start))(flat)
    return np.asarray(fits).reshape(sw.shape[:-1] + (3,))


def hierarchical_shear(
    e1: np.ndarray,
    e2: np.ndarray,
    interim: InterimPrior,
    num_warmup: int = 300,
    num_samples: int = 500,
    num_chains: int = 2,
    seed: int = 0,
) -> ShearEstimate:
    """Posterior of ``(g1, g2, s)`` by NUTS from posterior ellipticity draws made under ``interim``.

    Parameters
    ----------
    e1, e2 : array ``(source, draw)``
        Each source's posterior draws (NaN where a draw failed).
    interim : InterimPrior
        The prior the draws were made under (:func:`interim_prior_from_card` of
        the model that made them).
    num_warmup, num_samples, num_chains, seed
        NUTS settings (chains vectorised).

    Returns
    -------
    ShearEstimate
        Posterior means and standard deviations of g1, g2; ``details`` has the
        intrinsic scale ``s`` and ``sigma_e`` (per component), the interim
        prior's scale ``interim_s``, r-hat, the per-source importance ESS and
        the number of sources below :data:`IS_ESS_MIN`.
    """
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer import MCMC, NUTS

    e, logi, valid = _prepare_samples(e1, e2, interim)
    has = np.asarray(jnp.any(valid, axis=1))
    if has.sum() < 2:
        raise BayesblendError(
            f"the hierarchical estimate needs at least 2 sources with draws, got {int(has.sum())}"
        )

    def model():
        g1 = numpyro.sample("g1", dist.Uniform(-G_MAX, G_MAX))
        g2 = numpyro.sample("g2", dist.Uniform(-G_MAX, G_MAX))
        s = numpyro.sample("s", dist.Uniform(*S_RANGE))
        numpyro.factor("loglike", hierarchical_log_likelihood(jnp.stack([g1, g2, s]), e, logi, valid))

    start = _modes(e, logi, valid, None, _MODE_START)
    init = {
        "g1": jnp.full(num_chains, start[0]),
        "g2": jnp.full(num_chains, start[1]),
        "s": jnp.full(num_chains, start[2]),
    }
    mcmc = MCMC(
        NUTS(model),
        num_warmup=num_warmup,
        num_samples=num_samples,
        num_chains=num_chains,
        chain_method="vectorized",
        progress_bar=False,
    )
    mcmc.run(jax.random.PRNGKey(seed), init_params=init)
    s = {k: np.asarray(v) for k, v in mcmc.get_samples(group_by_chain=True).items()}
    from numpyro.diagnostics import split_gelman_rubin

    r_hat = {k: float(split_gelman_rubin(v)) for k, v in s.items()}
    post_mean = np.array([s["g1"].mean(), s["g2"].mean(), s["s"].mean()])
    ess = np.asarray(importance_ess(jnp.asarray(post_mean, jnp.float32), e, logi, valid))
    ess = np.where(has, ess, 0.0)
    return ShearEstimate(
        g1=float(post_mean[0]),
        g2=float(post_mean[1]),
        g1_err=float(s["g1"].std()),
        g2_err=float(s["g2"].std()),
        n=int(has.sum()),
        estimator="hierarchical",
        details={
            "s": float(post_mean[2]),
            "sigma_e": component_sigma(float(post_mean[2])),
            "interim_s": float(interim.s),
            "r_hat": r_hat,
            "importance_ess": ess,
            "n_low_ess": int(np.sum(has & (ess < IS_ESS_MIN))),
            "mode": [float(x) for x in start],
            "samples": {k: v.reshape(-1) for k, v in s.items()},
        },
    )
