"""MAP prototype check (issue 4, in progress): amortised start vs MAP on a few simulated blends.

For blends of 2-3 galaxies (seed 21, r < 24), prints per blend the wall time of
``map_fit`` (compilation included: the jit is not yet cached per scene spec),
the negative log posterior before and after, and the fractional r-band flux
error of every source for the amortised start and for MAP (truth: the flux
falling in the stamp).

Run: ``.venv/bin/python benchmarks/bench_map_prototype.py [--n 6]``
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

import bayesblend
from bayesblend.infer import amortised_init, map_fit, prepare_blend
from bayesblend.simulate.scenes import simulate_blend


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=6)
    args = p.parse_args()
    prior = bayesblend.load_prior()
    print("| blend | sources | MAP s | -log p start → end | amortised ΔF/F (r) | MAP ΔF/F (r) |")
    print("|---|---|---|---|---|---|")
    for i in range(args.n):
        t = simulate_blend(21, i, n_range=(2, 3), mag_range=(20.0, 24.0))
        truth, scene = t.truth, t.scene
        prep = prepare_blend(scene, np.asarray(truth["x"]), np.asarray(truth["y"]), prior)
        init = amortised_init(prior, prep, "flow")
        t0 = time.perf_counter()
        params, trace = map_fit(prior, prep, init, "flow")
        jax.block_until_ready(params)
        dt = time.perf_counter() - t0
        true_r = np.asarray(truth["flux_r"]) * np.asarray(truth["frac_in_image_r"])
        k = prep.n_real
        amort = np.exp(np.asarray(init["log_flux"])[:k, 2]) / true_r - 1
        fit = np.exp(np.asarray(params["log_flux"])[:k, 2]) / true_r - 1
        print(
            f"| {i} | {k} | {dt:.1f} | {float(trace[0]):.0f} → {float(trace[-1]):.0f} | "
            f"{np.array2string(amort, precision=3)} | {np.array2string(fit, precision=3)} |"
        )


if __name__ == "__main__":
    main()
