"""Shear-type ellipticity as a model parameter: the unit-disk map, the intrinsic-shape prior, lensing.

A source's ellipticity ``e = (e1, e2)``, ``|e| = (a - b) / (a + b) < 1``, is
sampled through an unconstrained ``eta`` in the plane: ``e = tanh(|eta|)
eta / |eta|``, which keeps the orientation and maps the plane onto the open
unit disk smoothly (``e ~ eta`` near zero), so NUTS and MAP never meet the
boundary. The intrinsic-ellipticity prior is the Bernstein & Armstrong (2014,
MNRAS 438, 1880, eq. 24) form, ``p(e) ~ (1 - |e|^2)^2 exp(-|e|^2 / 2 s^2)``
per unit area of the e-plane (its ``|e|`` distribution carries the extra
factor ``|e|``), normalised on the disk; the simulator draws from the same
form (:func:`bayesblend.simulate.population.draw_ellipticities`).

A reduced shear ``g`` acts on a shear-type ellipticity exactly as
``e ⊕ g = (e + g) / (1 + conj(g) e)`` (Seitz & Schneider 1997;
:func:`lens`, :func:`unlens`): the one lensing formula of the package, used by
the simulator and by the shear estimators.

Pure JAX, jit/vmap/grad-friendly; NumPy inputs are accepted. :class:`EtaPrior`
wraps the prior as a NumPyro distribution for the scene model.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro.distributions import constraints

#: Below this |eta| the map uses its Taylor series (exact to float32 and smooth at 0).
_SMALL = 1e-3


def to_ellipticity(eta: jnp.ndarray) -> jnp.ndarray:
    """``(..., 2)`` unconstrained ``eta`` -> ellipticity ``e`` inside the unit disk."""
    r2 = jnp.sum(eta**2, axis=-1, keepdims=True)
    r = jnp.sqrt(jnp.where(r2 > _SMALL**2, r2, 1.0))
    ratio = jnp.where(r2 > _SMALL**2, jnp.tanh(r) / r, 1.0 - r2 / 3.0)  # tanh(r)/r
    return eta * ratio


def to_eta(e: jnp.ndarray) -> jnp.ndarray:
    """Ellipticity ``(..., 2)``, ``|e| < 1`` -> unconstrained ``eta`` (inverse of :func:`to_ellipticity`)."""
    r2 = jnp.sum(e**2, axis=-1, keepdims=True)
    r = jnp.sqrt(jnp.where(r2 > _SMALL**2, r2, 1.0))
    ratio = jnp.where(r2 > _SMALL**2, jnp.arctanh(jnp.minimum(r, 1.0 - 1e-7)) / r, 1.0 + r2 / 3.0)
    return e * ratio


def log_jacobian(eta: jnp.ndarray) -> jnp.ndarray:
    """``log |det de/deta|`` of :func:`to_ellipticity`, shape ``(...)``.

    For the radial map ``|e| = tanh(r)`` in two dimensions the determinant is
    ``sech^2(r) tanh(r) / r``.
    """
    r2 = jnp.sum(eta**2, axis=-1)
    r = jnp.sqrt(jnp.where(r2 > _SMALL**2, r2, 1.0))
    # log sech^2(r) = 2 (log 2 - r - log(1 + exp(-2 r))), stable for large r
    log_sech2 = 2.0 * (jnp.log(2.0) - r - jnp.log1p(jnp.exp(-2.0 * r)))
    log_ratio = jnp.log(jnp.tanh(r) / r)
    small = -r2 - r2 / 3.0  # log sech^2 ~ -r^2, log(tanh r / r) ~ -r^2/3
    return jnp.where(r2 > _SMALL**2, log_sech2 + log_ratio, small)


def lens(e: jnp.ndarray, g: jnp.ndarray | complex) -> jnp.ndarray:
    """Lensed shear-type ellipticity ``(e + g) / (1 + conj(g) e)``.

    ``e`` and ``g`` are complex (``e1 + i e2``): JAX or NumPy arrays or Python
    numbers, broadcast together; NumPy in, NumPy out (the simulator keeps
    float64), JAX in, JAX out (traceable).
    """
    return (e + g) / (1.0 + g.conjugate() * e)


def unlens(e: jnp.ndarray, g: jnp.ndarray | complex) -> jnp.ndarray:
    """Intrinsic ellipticity ``(e - g) / (1 - conj(g) e)`` of an observed one (inverse of :func:`lens`)."""
    return (e - g) / (1.0 - g.conjugate() * e)


@functools.lru_cache(maxsize=64)
def _log_norm(s: float) -> float:
    """``log`` of the disk integral of the unnormalised Bernstein & Armstrong density."""
    r = (np.arange(20000) + 0.5) / 20000.0
    dens = (1 - r**2) ** 2 * np.exp(-(r**2) / (2 * s**2))
    return float(np.log(2 * np.pi * np.sum(r * dens) / 20000.0))


def prior_log_density(e: jnp.ndarray, s: float) -> jnp.ndarray:
    """Normalised log density per unit e-plane area of the Bernstein & Armstrong prior, ``(...)``.

    Parameters
    ----------
    e : array
        ``(..., 2)`` ellipticities, ``|e| < 1``.
    s : float
        The form's scale (static); :func:`bayesblend.simulate.population.ellipticity_scale`
        gives the one of a per-component dispersion.
    """
    e2 = jnp.sum(e**2, axis=-1)
    return 2.0 * jnp.log1p(-jnp.minimum(e2, 1.0 - 1e-7)) - e2 / (2.0 * s**2) - _log_norm(float(s))


def eta_prior_log_density(eta: jnp.ndarray, s: float) -> jnp.ndarray:
    """The prior of :func:`prior_log_density` as a density of ``eta`` (Jacobian included)."""
    return prior_log_density(to_ellipticity(eta), s) + log_jacobian(eta)


@functools.lru_cache(maxsize=64)
def _radial_cdf(s: float, n: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Table ``(|e|, CDF)`` of the prior's ``|e|`` distribution, for sampling by inverse transform."""
    r = np.linspace(0.0, 1.0, n + 1)
    dens = r * (1 - r**2) ** 2 * np.exp(-(r**2) / (2 * s**2))
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (dens[1:] + dens[:-1]))])
    return r.astype(np.float32), (cdf / cdf[-1]).astype(np.float32)


class EtaPrior(dist.Distribution):
    """The Bernstein & Armstrong ellipticity prior as a NumPyro distribution over ``eta`` (event ``(2,)``).

    ``log_prob`` is :func:`eta_prior_log_density`; ``sample`` draws ``|e|``
    by inverse transform of a tabulated CDF and a uniform orientation, then
    maps to ``eta``. Proper and normalised, so padded sources that keep it
    add a constant and prior-predictive draws (simulation-based calibration)
    come from it directly.
    """

    support = constraints.real_vector
    reparametrized_params: list[str] = []

    def __init__(self, s: float, batch_shape: tuple[int, ...] = (), *, validate_args: bool | None = None):
        self.s = float(s)
        super().__init__(batch_shape=batch_shape, event_shape=(2,), validate_args=validate_args)

    def sample(self, key, sample_shape=()):
        r_tab, cdf = _radial_cdf(self.s)
        shape = sample_shape + self.batch_shape
        k_r, k_a = jax.random.split(key)
        mod = jnp.interp(jax.random.uniform(k_r, shape), jnp.asarray(cdf), jnp.asarray(r_tab))
        mod = jnp.minimum(mod, 1.0 - 1e-6)
        angle = jax.random.uniform(k_a, shape, maxval=2.0 * jnp.pi)
        e = jnp.stack([mod * jnp.cos(angle), mod * jnp.sin(angle)], axis=-1)
        return to_eta(e)

    def log_prob(self, value):
        return eta_prior_log_density(value, self.s)
