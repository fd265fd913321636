"""Settings of the inference methods: :class:`InferenceConfig` and the method names.

One frozen, hashable dataclass, so that each distinct configuration is
compiled once. The scene model's own defaults (prior widths, model error)
come from :mod:`bayesblend.model`; the settings that change fitted shapes
(:meth:`InferenceConfig.scene_model_settings`) go to catalogue headers and
shear-bias run records.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bayesblend.errors import BayesblendError
from bayesblend.model import LOG_FLUX_SIGMA, POSITION_SIGMA

#: The inference methods, fastest first.
METHODS = ("amortised", "map", "svi", "nuts")


def check_method(method: str) -> None:
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
        Adapt the (dense, Laplace-initialised) mass matrix during warm-up
        (default; False keeps the Laplace covariance and tunes the step size only).
    init_spread : float
        Chains start at MAP plus this many Laplace standard deviations of scatter.
    map_steps : int
        Levenberg-Marquardt iterations of MAP, at most (each one Gauss-Newton
        precision, one gradient and four trial points).
    map_damping : float
        Initial Levenberg-Marquardt damping, relative to the diagonal of the
        Gauss-Newton precision (dimensionless).
    map_tolerance : float
        MAP stops early once two iterations in a row lower ``-log p`` by less
        than this (natural log units).
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
        Sources closer than this (pixels) are fitted together as one blend, as
        are those in one footprint of the scene's light
        (:func:`bayesblend.detect.footprint_pairs`).
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
    model_error : float or None
        Fractional misfit of the galaxy model (dimensionless): ``(alpha_b *
        data)**2`` is added to every pixel's variance in band b. None (the
        default) takes ``alpha_b`` per band from the bundle's card (measured
        on held-out galaxies: :attr:`~bayesblend.prior.bundle.PriorBundle.misfit`;
        :data:`~bayesblend.model.MODEL_ERROR` for a card without it); a
        number sets one value for every band; 0 is the survey's noise alone.
    """

    num_chains: int = 2
    num_draws: int = 300
    num_warmup: int = 150
    max_tree_depth: int = 6
    target_accept: float = 0.8
    adapt_mass_matrix: bool = True
    init_spread: float = 0.5
    map_steps: int = 20
    map_damping: float = 10.0
    map_tolerance: float = 0.01
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
    model_error: float | None = None

    def __post_init__(self) -> None:
        positive = (
            "num_chains",
            "num_draws",
            "max_tree_depth",
            "map_steps",
            "map_damping",
            "map_tolerance",
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
        model_error = 0.0 if self.model_error is None else self.model_error
        if min(self.num_warmup, self.region_margin, self.linking_length, model_error) < 0:
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
            kind = float if getattr(defaults, name) is None else type(getattr(defaults, name))
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

    def scene_model_settings(self) -> dict:
        """The scene-model settings that change fitted shapes: ``flux_prior`` and ``model_error``.

        A shear responsivity measured under one set of them does not hold
        under another; they go to catalogue headers
        (:data:`bayesblend.catalog.SCENE_HEADER`), shear-bias run
        configurations and the card's responsivity entries.

        Returns
        -------
        dict
            ``{"flux_prior": str, "model_error": float or "card"}`` ("card":
            the bundle's measured misfit, which the catalogue header's
            ``BUNDLE`` names).
        """
        model_error = "card" if self.model_error is None else float(self.model_error)
        return {"flux_prior": str(self.flux_prior), "model_error": model_error}
