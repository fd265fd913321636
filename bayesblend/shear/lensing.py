"""The population side of shear: intrinsic ellipticities, their lensed density, and the interim prior.

A constant reduced shear ``g`` maps a source's intrinsic shear-type
ellipticity ``e_s`` to ``e = e_s ⊕ g`` (:func:`bayesblend.ellipticity.lens`,
Seitz & Schneider 1997). The intrinsic ellipticities follow the Bernstein &
Armstrong (2014) form ``p_s(e) ∝ (1 - |e|^2)^2 exp(-|e|^2 / 2 s^2)`` on the unit
disc (the simulator's population and the scene model's prior have the same
form), so the density of observed ellipticities is ``p_s(unlens(e, g))`` times
the Jacobian of the unlensing map. :class:`InterimPrior` is the prior the
scene model's posterior draws were made under, which the hierarchical
estimator divides out.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

from bayesblend.ellipticity import prior_log_density, unlens
from bayesblend.errors import BayesblendError

_QUAD = 256  # quadrature nodes of the intrinsic distribution's normalisation


def unlens_log_jacobian(e: jnp.ndarray, g: jnp.ndarray) -> jnp.ndarray:
    """``log |det d e_s / d e|`` of :func:`unlens` as a map of the plane (e1, e2) -> (e_s1, e_s2).

    The map is holomorphic, so the determinant is ``|f'(e)|^2`` with
    ``f'(e) = (1 - |g|^2) / (1 - conj(g) e)^2``.
    """
    return 2.0 * jnp.log1p(-(jnp.abs(g) ** 2)) - 4.0 * jnp.log(jnp.abs(1.0 - jnp.conj(g) * e))


def _log_norm(s: jnp.ndarray) -> jnp.ndarray:
    """log of 2 pi int_0^1 r (1 - r^2)^2 exp(-r^2 / 2 s^2) dr (midpoint rule, exact enough at 256 nodes)."""
    r = (jnp.arange(_QUAD, dtype=jnp.float32) + 0.5) / _QUAD
    f = r * (1.0 - r**2) ** 2 * jnp.exp(-(r**2) / (2.0 * s**2))
    return jnp.log(2.0 * jnp.pi * jnp.sum(f) / _QUAD)


def intrinsic_log_density(e: jnp.ndarray, s: jnp.ndarray) -> jnp.ndarray:
    """Log density per unit (e1, e2) area of the intrinsic distribution at complex ``e``.

    Bernstein & Armstrong (2014): ``∝ (1 - |e|^2)^2 exp(-|e|^2 / 2 s^2)`` for ``|e| < 1``.
    """
    r2 = jnp.abs(e) ** 2
    inside = r2 < 1.0
    val = 2.0 * jnp.log(jnp.clip(1.0 - r2, 1e-12, None)) - r2 / (2.0 * s**2) - _log_norm(s)
    return jnp.where(inside, val, -jnp.inf)


def sheared_log_density(e: jnp.ndarray, g: jnp.ndarray, s: jnp.ndarray) -> jnp.ndarray:
    """Log density of observed ellipticity ``e`` for shear ``g`` and intrinsic scale ``s``."""
    return intrinsic_log_density(unlens(e, g), s) + unlens_log_jacobian(e, g)


def component_sigma(s: float) -> float:
    """Per-component dispersion of the intrinsic distribution of scale ``s``."""
    r = (np.arange(4096) + 0.5) / 4096
    p = r * (1 - r**2) ** 2 * np.exp(-(r**2) / (2 * s**2))
    return float(np.sqrt(np.sum(p * r**2) / np.sum(p) / 2.0))


@dataclass(frozen=True)
class InterimPrior:
    """The prior ``pi(e)`` on shear-type ellipticity that a scene model's posterior draws were made under.

    Galaxy model v2 samples each source's ellipticity as a parameter with the
    Bernstein & Armstrong (2014) prior ``(1 - |e|^2)^2 exp(-|e|^2 / 2 s^2)``
    per unit (e1, e2) area, normalised on the unit disc
    (:class:`bayesblend.ellipticity.EtaPrior`), with ``s`` from the bundle's
    card; ``pi`` is that density, exactly (:func:`interim_prior_from_card`).
    The amortised method's draws come from an encoder trained on the
    simulator's population, which draws its ellipticities from the same form
    and scale.

    Attributes
    ----------
    s : float
        Scale of the form (dimensionless, > 0); :func:`component_sigma` gives
        its per-component dispersion.
    bundle : str
        Name of the model whose card it was read from (``""`` when made by hand).
    """

    s: float
    bundle: str = ""

    def __post_init__(self) -> None:
        if not (np.isfinite(self.s) and self.s > 0):
            raise BayesblendError(f"the interim prior's scale s must be a positive number, got {self.s}")

    def log_prob(self, e: jnp.ndarray) -> jnp.ndarray:
        """``log pi(e)`` per unit (e1, e2) area at complex ellipticities ``e`` (any shape).

        The scene model's own density (:func:`bayesblend.ellipticity.prior_log_density`);
        ``-inf`` where ``|e| >= 1``.
        """
        e = jnp.asarray(e)
        x = jnp.stack([jnp.real(e), jnp.imag(e)], axis=-1)
        return jnp.where(jnp.abs(e) < 1.0, prior_log_density(x, self.s), -jnp.inf)

    @property
    def sigma_e(self) -> float:
        """Per-component dispersion of ``pi`` (dimensionless)."""
        return component_sigma(self.s)


def interim_prior_from_card(card: dict) -> InterimPrior:
    """The interim ellipticity prior of a model: its card's ``ellipticity_prior``.

    Parameters
    ----------
    card : dict
        A bundle's model card (``PriorBundle.card``).

    Returns
    -------
    InterimPrior
        The Bernstein & Armstrong prior with the card's ``ellipticity_prior["s"]``.

    Raises
    ------
    BayesblendError
        In one line, when the card has no ``ellipticity_prior`` scale (no
        explicit ellipticity parameter, so no known interim prior) or a scale
        that is not a positive number.
    """
    name = card.get("name", "?")
    try:
        s = float(card["ellipticity_prior"]["s"])
    except (KeyError, TypeError, ValueError):
        raise BayesblendError(
            f"model card {name!r} has no ellipticity_prior scale s: the interim prior of its "
            "posterior ellipticities is unknown (a galaxy model v2 card records it)"
        ) from None
    if not (np.isfinite(s) and s > 0):
        raise BayesblendError(f"model card {name!r}: ellipticity_prior s must be a positive number, got {s}")
    return InterimPrior(s=s, bundle=str(name))
