"""NUTS's view of one blend's posterior: step size, leapfrog steps, and each parameter's width and ESS.

For the blend ``simulate_blend(31, 0, n_range=(k, k), mag_range=...)`` (bench_speed's set) at the
true positions: MAP and its Laplace covariance as ``deblend`` makes them, then two NUTS chains
from Laplace draws with that covariance as the initial dense inverse mass matrix, adapted
in warm-up or not (``--adapt``), or with the latent block rescaled to unit width
(``--unit-latent``). Prints the final step size, leapfrog steps per draw, acceptance and
divergences, and per flattened parameter (sorted keys: eta, log_flux, log_hlr, offset, u) the
mass matrix's standard deviation, the posterior's, their ratio, bulk ESS and r-hat.

Run::

    .venv/bin/python benchmarks/nuts_geometry.py --sources 1 --mag-range 20,21 [--adapt] [--unit-latent]
"""

from __future__ import annotations

import argparse
import time
import warnings

warnings.filterwarnings("ignore")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sources", type=int, default=1)
    p.add_argument("--mag-range", default="20,24.5")
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--draws", type=int, default=150)
    p.add_argument("--adapt", action="store_true", help="adapt the dense mass matrix in warm-up")
    p.add_argument("--unit-latent", action="store_true", help="rescale the latent block to unit sd")
    args = p.parse_args()
    import arviz as az
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.flatten_util import ravel_pytree
    from numpyro.infer.hmc import hmc
    from one_blend import map_start, one_blend  # benchmarks/ is the script's directory

    from bayesblend.methods import scene_potential

    k = args.sources
    lo, hi = (float(v) for v in args.mag_range.split(","))
    b = one_blend(31, k, (lo, hi))
    sim, spec, nets, w = b.sim, b.spec, b.nets, b.w
    data, flat, cov, root, point = map_start(b)
    _, unravel = ravel_pytree(point)
    potential = scene_potential(nets, w, spec, data)
    if args.unit_latent:
        sd = jnp.sqrt(jnp.diag(cov))
        nu = spec.n_sources * spec.latent_dim  # u is last in ravel order (sorted keys)
        scale = jnp.ones_like(sd).at[-nu:].set(1.0 / sd[-nu:])
        cov = cov * scale[:, None] * scale[None, :]
    init_kernel, sample_kernel = hmc(potential_fn=lambda f: potential(unravel(f)), algo="NUTS")
    total = args.warmup + args.draws

    def chain(start, key):
        state = init_kernel(
            start,
            num_warmup=args.warmup,
            inverse_mass_matrix=cov,
            dense_mass=True,
            adapt_mass_matrix=args.adapt,
            target_accept_prob=0.8,
            max_tree_depth=args.depth,
            find_heuristic_step_size=True,
            rng_key=key,
        )

        def step(s, _):
            s = sample_kernel(s)
            return s, (s.z, s.num_steps, s.accept_prob, s.adapt_state.step_size, s.diverging)

        return jax.lax.scan(step, state, None, length=total)[1]

    key = jax.random.PRNGKey(1)
    starts = flat + 0.5 * jax.random.normal(key, (2, flat.shape[0])) @ root.T
    t0 = time.perf_counter()
    run = jax.jit(jax.vmap(chain))
    z, steps, acc, size, div = jax.block_until_ready(run(starts, jax.random.split(key, 2)))
    wall = time.perf_counter() - t0
    z, keep = np.asarray(z), slice(args.warmup, total)
    print(
        f"{k} source(s), true r {np.round(np.asarray(sim.truth['mag_r']), 2).tolist()}; adapt={args.adapt}, "
        f"unit latent={args.unit_latent}, depth {args.depth}, warm-up {args.warmup}, draws {args.draws}; "
        f"{wall:.0f} s with compilation"
    )
    print(
        f"per chain: step size {np.asarray(size)[:, -1].round(3).tolist()}, "
        f"steps/draw {np.asarray(steps)[:, keep].mean(1).round(1).tolist()}, "
        f"acceptance {np.asarray(acc)[:, keep].mean(1).round(2).tolist()}, "
        f"divergences {int(np.asarray(div)[:, keep].sum())}"
    )
    draws = z[:, keep]
    names = [f"{name}{i}" for name, v in sorted(point.items()) for i in range(int(np.prod(v.shape)))]
    ds = az.convert_to_dataset(draws)
    ess = np.asarray(next(iter(az.ess(ds, method="bulk").data_vars.values())))
    rhat = np.asarray(next(iter(az.rhat(ds).data_vars.values())))
    mass_sd = np.sqrt(np.diag(np.asarray(cov)))
    post_sd = draws.reshape(-1, draws.shape[-1]).std(0)
    print("| parameter | mass-matrix sd | posterior sd | ratio | ESS bulk | r-hat |")
    print("|---|---|---|---|---|---|")
    for row in zip(names, mass_sd, post_sd, ess, rhat, strict=True):
        n, a, b, e, r = row
        print(f"| {n} | {a:.4f} | {b:.4f} | {b / a:.2f} | {e:.0f} | {r:.3f} |")


if __name__ == "__main__":
    main()
