"""Shear-type ellipticity as a model parameter: the unit-disk map and the intrinsic-shape prior.

A source's ellipticity ``e = (e1, e2)``, ``|e| = (a - b) / (a + b) < 1``, is
sampled through an unconstrained ``eta`` in the plane: ``e = tanh(|eta|)
eta / |eta|``, which keeps the orientation and maps the plane onto the open
unit disk smoothly (``e ~ eta`` near zero), so NUTS and MAP never meet the
boundary. The intrinsic-ellipticity prior is the Bernstein & Armstrong (2014,
MNRAS 438, 1880, eq. 24) form, ``p(e) ~ (1 - |e|^2)^2 exp(-|e|^2 / 2 s^2)``
per unit area of the e-plane (its ``|e|`` distribution carries the extra
factor ``|e|``), normalised on the disk; the simulator draws from the same
form (:func:`bayesblend.simulate.population.draw_ellipticities`).

Pure JAX, jit/vmap/grad-friendly; NumPy inputs are accepted.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

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
