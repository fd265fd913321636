"""How far Levenberg-Marquardt MAP is from converged after its iterations (issue 23 items 5 and accuracy).

Two readings:

``--pilot DIR``: the potential traces of a run's pilot checkpoints (``pilot/pilot-NNNNN.npz`` of
:func:`bayesblend.runs.deblend_files`, kept until the run ends), by number of sources in the blend: the
gain of the first iterations, the gain of the last five (what a longer run would still have found, at
least), and the iteration after which less than 0.5 nat was left.

``--isolated I,J,..``: bright isolated galaxies (``simulate_isolated(5, i, stamp_size=64,
mag_range=(18, 20.5))``), optimised step by step as :func:`bayesblend.optimum.levenberg_marquardt` does,
with the Gauss-Newton precision (``--hessian gn``) or the exact Hessian of the potential
(``--hessian exact``): per iteration the gain, the gain the quadratic model predicted, the damping,
and the Newton decrement ``g^T H^-1 g / 2`` (the gain a full Newton step would predict; NaN where H
is not positive definite).

Run::

    .venv/bin/python benchmarks/map_convergence.py --pilot data/field2048-run-w2/pilot
    .venv/bin/python benchmarks/map_convergence.py --isolated 2,4,5 --iterations 25 --hessian gn
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np


def pilot_traces(pilot: Path) -> None:
    """Per blend size: the gain of the first and of the last five iterations, in nats."""
    sizes, traces = [], []
    for f in sorted(pilot.glob("pilot-*.npz")):
        z = np.load(f)
        j = 0
        while f"{j}/map_trace" in z.files:
            sizes.append(z[f"{j}/x"].size)
            traces.append(z[f"{j}/map_trace"])
            j += 1
    n, t = np.array(sizes), np.array(traces)
    last = t[:, -6] - t[:, -1]
    left = t - t[:, -1:]
    within = np.argmax(left < 0.5, axis=1) + 1  # iterations until less than 0.5 nat was left
    print(f"{len(n)} blends, {t.shape[1]} iterations each")
    print(
        "sources  blends  gain_it1  gain_last5: median  p90   >1nat  >10nat  >100nat   its_to_0.5nat: median"
    )
    for k in np.unique(n):
        s = n == k
        print(
            f"{k:7d} {s.sum():7d} {np.median(t[s, 0] - t[s, 1]):9.1f}"
            f" {np.median(last[s]):17.2f} {np.percentile(last[s], 90):6.1f}"
            f" {np.mean(last[s] > 1):6.2f} {np.mean(last[s] > 10):7.2f} {np.mean(last[s] > 100):8.2f}"
            f" {np.median(within[s]):21.0f}"
        )


def isolated(items: list[int], iterations: int, hessian: str) -> None:
    """Levenberg-Marquardt step by step on bright isolated galaxies, with its diagnostics."""
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    from bayesblend.infer import blends_of_scenes
    from bayesblend.methods import amortised_start, scene_potential
    from bayesblend.optimum import LM_FACTORS, gauss_newton_precision
    from bayesblend.prior.bundle import Networks, load_bundle
    from bayesblend.settings import InferenceConfig
    from bayesblend.simulate.scenes import simulate_isolated

    bundle = load_bundle()
    nets = Networks(bundle, bundle.check_latent_prior(None))
    w = nets.weights()
    cfg = InferenceConfig()
    for i in items:
        g = simulate_isolated(5, i, stamp_size=64, mag_range=(18.0, 20.5))
        xy = (np.asarray(g.truth["x"]), np.asarray(g.truth["y"]))
        (prep,), _ = blends_of_scenes([g.scene], [xy], bundle, cfg)
        spec, data = prep.spec, {k: jnp.asarray(v) for k, v in prep.data.items()}
        _, _, start = amortised_start(nets, w, spec, data, bundle.stamp)
        data = dict(data, log_flux0=start["log_flux"])  # flux_prior="amortised", the default
        pot = scene_potential(nets, w, spec, data)
        flat, unravel = ravel_pytree(start)
        f_pot = jax.jit(lambda f, pot=pot, unravel=unravel: pot(unravel(f)))
        f_grad = jax.jit(jax.grad(f_pot))
        if hessian == "exact":
            f_h = jax.jit(jax.hessian(f_pot))
        else:
            f_h = jax.jit(
                lambda f, spec=spec, data=data, unravel=unravel: gauss_newton_precision(
                    nets, w, spec, data, f, unravel
                )
            )
        lam, value = cfg.map_damping, float(f_pot(flat))
        print(
            f"galaxy {i}: true flux_r {float(g.truth['flux_r'][0]):.3g}; potential at the start {value:.1f}"
        )
        for it in range(iterations):
            grad = np.asarray(f_grad(flat), np.float64)
            h = np.asarray(f_h(flat), np.float64)
            h = 0.5 * (h + h.T)
            d = np.abs(np.diagonal(h))
            trials = []
            for fac in LM_FACTORS:
                step = np.linalg.solve(h + lam * fac * np.diag(d), grad)
                trials.append((float(f_pot(flat - jnp.asarray(step, flat.dtype))), fac, step))
            val, fac, step = min(trials, key=lambda a: a[0])
            predicted = grad @ step - 0.5 * step @ h @ step
            eig = np.linalg.eigvalsh(h)
            decrement = 0.5 * grad @ np.linalg.solve(h, grad) if eig[0] > 0 else np.nan
            gain = max(value - val, 0.0)
            if val < value:
                flat, value, lam = flat - jnp.asarray(step, flat.dtype), val, lam * fac
            else:
                lam *= 1000.0
            lam = float(np.clip(lam, 1e-6, 1e6))
            print(
                f"  it {it:2d} potential {value:.1f} gain {gain:8.2f} predicted {predicted:8.2f}"
                f" damping {lam:.0e} Newton decrement {decrement:9.2f}"
                f" eigenvalues {eig[0]:.2e}..{eig[-1]:.2e}"
            )
        p = unravel(flat)
        ratio = float(np.exp(p["log_flux"][0, 2]) / g.truth["flux_r"][0])
        print(f"  flux_r / true {ratio:.3f}; u {np.round(p['u'][0], 2)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pilot", type=Path, help="a run's pilot/ directory")
    p.add_argument("--isolated", help="comma-separated item indices of bright isolated galaxies")
    p.add_argument("--iterations", type=int, default=25)
    p.add_argument("--hessian", choices=("gn", "exact"), default="gn")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    if args.pilot:
        pilot_traces(args.pilot)
    if args.isolated:
        isolated([int(a) for a in args.isolated.split(",")], args.iterations, args.hessian)


if __name__ == "__main__":
    main()
