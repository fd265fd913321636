"""One simulated blend at its true positions and its MAP start, shared by the NUTS investigations.

``nuts_geometry.py``, ``nuts_levers.py`` and ``gradient_breakdown.py`` study the blend
``simulate_blend(seed, 0, n_range=(k, k), mag_range=...)`` prepared as ``deblend`` prepares it.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np

import bayesblend
from bayesblend.infer import InferenceConfig, prepare_scene
from bayesblend.methods import amortised_start, scene_potential
from bayesblend.optimum import map_laplace
from bayesblend.prior.bundle import Networks, PriorBundle
from bayesblend.simulate.scenes import simulate_blend


@dataclass
class OneBlend:
    """The bundle, the simulation, its prepared blend, the flow-prior networks and their weights."""

    prior: PriorBundle
    sim: object
    blend: object
    nets: Networks
    w: dict
    cfg: InferenceConfig

    @property
    def spec(self):
        return self.blend.spec


def one_blend(seed: int, k: int, mag_range: tuple[float, float]) -> OneBlend:
    """Blend 0 of ``k`` galaxies of ``simulate_blend(seed, ...)``, prepared at the true positions."""
    prior = bayesblend.load_prior()
    sim = simulate_blend(seed, 0, n_range=(k, k), mag_range=mag_range)
    cfg = InferenceConfig()
    x, y = np.asarray(sim.truth["x"]), np.asarray(sim.truth["y"])
    blend = prepare_scene(sim.scene, x, y, prior, cfg)[0][0]
    nets = Networks(prior, "flow")
    return OneBlend(prior, sim, blend, nets, nets.weights(), cfg)


def amortised(b: OneBlend) -> tuple[dict, dict]:
    """The amortised start, and the blend's data with the flux prior centred on it (as ``deblend``)."""
    _, _, start = jax.jit(lambda w, d: amortised_start(b.nets, w, b.spec, d, b.prior.stamp))(
        b.w, b.blend.data
    )
    return dict(b.blend.data, log_flux0=start["log_flux"]), start


def map_start(b: OneBlend):
    """MAP and its Laplace approximation from the amortised start: ``data, flat, cov, root, point``."""
    data, start = amortised(b)

    @jax.jit
    def laplace(w, data, start):
        pot = scene_potential(b.nets, w, b.spec, data)
        flat, unravel, cov, root, _ = map_laplace(b.nets, w, b.spec, data, pot, start, b.cfg)
        return flat, cov, root, unravel(flat)

    flat, cov, root, point = laplace(b.w, data, start)
    return data, flat, cov, root, point
