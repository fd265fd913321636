"""How Gaussian is the posterior around MAP? The Laplace approximation against the scene model (issue 4).

For the 2-source blends of ``bench_speed.py`` (``simulate_blend(31, i,
n_range=(2, 2), mag_range=(20, 24.5))``, sources at their true positions) this
fits MAP as ``deblend`` does, then, in the coordinates MAP and NUTS use
(the flow's base draws ``u``, log fluxes, offsets) and whitened by the
Laplace covariance (the Gauss-Newton precision's inverse):

- ``H/GN``: the true Hessian of the potential (finite differences of its
  gradient, step 0.01) over the Gauss-Newton precision along random whitened
  directions; 1 where the posterior is Gaussian with the Laplace covariance;
- ``dU``: the median rise of the potential (nats) over 300 Laplace draws;
  ``d / 2`` for a Gaussian of ``d`` dimensions;
- ``IS ESS``: the effective sample fraction of the 300 Laplace draws
  importance-weighted to the posterior, ``(sum w)^2 / (N sum w^2)``; 1 for
  a perfect approximation.

Run: ``.venv/bin/python benchmarks/laplace_check.py [--n 8]``
"""

from __future__ import annotations

import argparse
import warnings

import jax
import jax.numpy as jnp
import numpy as np

warnings.filterwarnings("ignore", category=FutureWarning)


def check_blend(nets, w, prior, cfg, spec, data, rng, n_draws: int) -> tuple[int, list, np.ndarray, float]:
    """``(d, H/GN ratios, potential rises of the Laplace draws, IS ESS fraction)`` of one blend."""
    from jax.flatten_util import ravel_pytree

    from bayesblend.methods import amortised_start, scene_potential
    from bayesblend.optimum import map_laplace

    def fit(data):
        _, _, start = amortised_start(nets, w, spec, data, prior.stamp)
        data = dict(data, log_flux0=start["log_flux"])
        potential = scene_potential(nets, w, spec, data)
        flat, unravel, _, root, _ = map_laplace(nets, w, spec, data, potential, start, cfg)
        return data, unravel(flat), flat, root

    data, point, flat, root = jax.jit(fit)(data)
    _, unravel = ravel_pytree(point)
    potential = scene_potential(nets, w, spec, data)
    pot = jax.jit(jax.vmap(lambda f: potential(unravel(f))))
    grad = jax.jit(jax.grad(lambda f: potential(unravel(f))))
    d = flat.shape[0]
    ratios = []
    for _ in range(8):
        xi = rng.normal(size=d)
        v = jnp.asarray(np.asarray(root) @ xi, jnp.float32)
        h = 0.01
        hv = float((grad(flat + h * v) - grad(flat - h * v)) @ v) / (2 * h)
        ratios.append(hv / float(xi @ xi))
    xi = rng.normal(size=(n_draws, d)).astype(np.float32)
    du = np.asarray(pot(flat[None] + jnp.asarray(xi) @ root.T), np.float64) - float(pot(flat[None])[0])
    logw = -du + 0.5 * np.sum(xi.astype(np.float64) ** 2, axis=1)
    logw = logw[np.isfinite(logw)]
    wts = np.exp(logw - logw.max())
    return d, ratios, du, float(wts.sum() ** 2 / (n_draws * np.sum(wts**2)))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=8, help="blends")
    p.add_argument("--draws", type=int, default=300)
    args = p.parse_args()

    import bayesblend
    from bayesblend.infer import InferenceConfig, prepare_scene
    from bayesblend.prior.bundle import Networks
    from bayesblend.simulate.scenes import simulate_blend

    prior = bayesblend.load_prior()
    cfg = InferenceConfig()
    nets = Networks(prior, "flow")
    w = nets.weights()
    rng = np.random.default_rng(0)
    print("| blend | d | H/GN median (range) | dU median (Gaussian: d/2) | IS ESS fraction |")
    print("|---|---|---|---|---|")
    fractions = []
    for i in range(args.n):
        sim = simulate_blend(31, i, n_range=(2, 2), mag_range=(20.0, 24.5))
        t = sim.truth
        preps, _, _ = prepare_scene(sim.scene, np.asarray(t["x"]), np.asarray(t["y"]), prior, cfg)
        d, ratios, du, frac = check_blend(nets, w, prior, cfg, preps[0].spec, preps[0].data, rng, args.draws)
        fractions.append(frac)
        print(
            f"| {i} | {d} | {np.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) | "
            f"{np.median(du):.0f} ({d / 2:.0f}) | {frac:.3f} |",
            flush=True,
        )
    print(f"\nmedian IS ESS fraction {np.median(fractions):.3f}")
    print("command: `.venv/bin/python benchmarks/laplace_check.py`")


if __name__ == "__main__":
    main()
