"""Per-chain NUTS diagnostics on chosen held-out blends: why a blend's chains mix or do not (issue 4).

For each blend: divergences, mean leapfrog steps and acceptance rate per
chain, the mean and spread of the log density per chain, and each source's
r_hat and bulk ESS (minimum over flux_r, e1, e2), as the catalogue reports
them. Acceptance well above the target with every trajectory at the depth
cap means the step size is small against the posterior's extent: the chains
diffuse instead of travelling. Chains whose log densities differ by more than
their spreads sit in different modes.

Run::

    .venv/bin/python benchmarks/nuts_chains.py --blends 7,10 [--set max_tree_depth=8 ...]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import bayesblend
from bayesblend.infer import InferenceConfig, deblend
from bayesblend.simulate.scenes import simulate_blend

SEED = 4  # the held-out blend set of bench_deblend.py
SIM = dict(max_shift=0.5, psf_jitter=0.05)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--blends", default="7,10", help="indices in the held-out blend set")
    p.add_argument("--set", action="append", default=[], help="inference setting name=value")
    args = p.parse_args()
    settings = InferenceConfig.parse_settings(args.set)
    sims = [simulate_blend(SEED, int(i), **SIM) for i in args.blends.split(",")]
    t0 = time.perf_counter()
    post = deblend(
        [s.scene for s in sims],
        sources=[np.c_[s.truth["x"], s.truth["y"]] for s in sims],
        method="nuts",
        prior=bayesblend.load_prior(),
        seed=11,
        progress=False,
        **settings,
    )
    wall = time.perf_counter() - t0
    cat = post.catalog()
    print(f"settings {settings or 'default'}; {len(cat)} sources; {wall:.0f} s with compilation")
    for b in range(post.n_blends):
        st = {k: np.asarray(v)[..., b] for k, v in post.stats.items()}  # (chain, draw)
        rows = cat[np.asarray(cat["blend_id"]) == b]
        print(
            f"blend {args.blends.split(',')[b]}: per chain divergences {st['diverging'].sum(1).tolist()}, "
            f"steps/draw {st['n_steps'].mean(1).round(0).tolist()}, "
            f"acceptance {st['acceptance_rate'].mean(1).round(2).tolist()}, "
            f"log density {st['lp'].mean(1).round(1).tolist()} ± {st['lp'].std(1).round(1).tolist()}; "
            f"r_hat {np.round(rows['r_hat_max'], 2).tolist()}, ESS {np.round(rows['ess_bulk_min']).tolist()}"
        )


if __name__ == "__main__":
    main()
