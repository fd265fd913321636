"""Speed of each inference method (issue 4, item 7): per-source wall time, gradient rate, FLOP fraction.

For blends of 1, 2 and 4 galaxies (``simulate_blend(31, i, n_range=(k, k),
mag_range=(20, 24.5))``, sources at their true positions) this measures:

- per-source wall time of ``deblend`` for each method, compilation excluded
  (each call is made twice; the second is timed), on a batch of ``--batch``
  blends run together under ``vmap`` (NUTS: ``--nuts-blends``, default one);
- likelihood-gradient evaluations per second, alone and inside a
  ``lax.fori_loop`` (where MAP, SVI and NUTS take them), and the achieved
  FLOP rate (XLA cost analysis of one gradient) as a fraction of a dense
  2048 x 2048 float32 matmul's rate measured in the same run;
- for NUTS, the smallest bulk ESS over flux_r, e1 and e2 per source (the
  median over sources is printed, with the smallest in brackets), the mean
  leapfrog steps per draw and the divergent fraction, and the wall time per
  source extrapolated to ESS_bulk = 400 (time x 400 / median ESS).

Run: ``.venv/bin/python benchmarks/bench_speed.py [--bundle lsst-v2] [--methods map,nuts] [--sizes 1,2,4]``
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

warnings.filterwarnings("ignore", category=FutureWarning)


def matmul_rate(n: int = 2048) -> float:
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(10):
        f(a).block_until_ready()
    return 2 * n**3 * 10 / (time.perf_counter() - t0)


def gradient_rate(prior, blend, rate_ref: float) -> dict:
    from bayesblend.methods import amortised_start, scene_potential
    from bayesblend.prior.bundle import Networks

    nets = Networks(prior, "flow")
    w = nets.weights()
    spec, data = blend.spec, blend.data
    _, _, start = jax.jit(lambda d: amortised_start(nets, w, spec, d, prior.stamp))(data)

    def pot(p, d, w):
        return scene_potential(nets, w, spec, d)(p)

    g = jax.jit(jax.value_and_grad(pot))
    flops = g.lower(start, data, w).compile().cost_analysis()
    flops = (flops[0] if isinstance(flops, list) else flops).get("flops", float("nan"))
    jax.block_until_ready(g(start, data, w))
    n = 50
    t0 = time.perf_counter()
    for _ in range(n):
        jax.block_until_ready(g(start, data, w))
    alone = n / (time.perf_counter() - t0)

    @jax.jit
    def loop(p, d, w):
        gr = jax.grad(pot)

        def body(i, p):
            return jax.tree_util.tree_map(lambda a, b: a - 1e-9 * b, p, gr(p, d, w))

        return jax.lax.fori_loop(0, n, body, p)

    jax.block_until_ready(loop(start, data, w))
    t0 = time.perf_counter()
    jax.block_until_ready(loop(start, data, w))
    looped = n / (time.perf_counter() - t0)
    return {"flops": flops, "alone": alone, "looped": looped, "fraction": flops * looped / rate_ref}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--methods", default="amortised,map,svi,nuts")
    p.add_argument("--sizes", default="1,2,4")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--nuts-warmup", type=int, default=150)
    p.add_argument("--nuts-draws", type=int, default=300)
    p.add_argument("--nuts-blends", type=int, default=1, help="blends NUTS runs together (at most --batch)")
    p.add_argument(
        "--bundle", default=None, help="prior bundle name or directory (default: the default model)"
    )
    p.add_argument("--set", action="append", default=[], help="inference setting name=value (every method)")
    args = p.parse_args()
    import arviz as az

    import bayesblend
    from bayesblend.infer import InferenceConfig, deblend, prepare_scene
    from bayesblend.simulate.scenes import simulate_blend

    prior = bayesblend.load_prior(args.bundle)
    common = InferenceConfig.parse_settings(args.set)
    ref = matmul_rate()
    print(
        f"bundle: {prior.card.get('name')}; machine: {platform.machine()}, "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s); "
        f"dense matmul {ref / 1e9:.1f} GFLOP/s\n"
    )
    print(
        "| sources | method | blends | s per source | grads/s alone | grads/s in loop | GFLOP per grad | "
        "FLOP fraction (loop) | NUTS ESS_bulk median (min); steps, divergences | NUTS s/source to ESS 400 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for k in [int(s) for s in args.sizes.split(",")]:
        sims = [simulate_blend(31, i, n_range=(k, k), mag_range=(20.0, 24.5)) for i in range(args.batch)]
        preps, _, _ = prepare_scene(
            sims[0].scene,
            np.asarray(sims[0].truth["x"]),
            np.asarray(sims[0].truth["y"]),
            prior,
            InferenceConfig(),
        )
        gr = gradient_rate(prior, preps[0], ref)
        for method in args.methods.split(","):
            use = sims[: args.nuts_blends] if method == "nuts" else sims
            settings = (
                {"num_warmup": args.nuts_warmup, "num_draws": args.nuts_draws} if method == "nuts" else {}
            )
            kw = dict(
                sources=[np.c_[s.truth["x"], s.truth["y"]] for s in use],
                method=method,
                prior=prior,
                batch_size=args.batch,
                **(common | settings),
            )
            deblend([s.scene for s in use], **kw)
            t0 = time.perf_counter()
            post = deblend([s.scene for s in use], **kw)
            per_source = (time.perf_counter() - t0) / post.n_sources
            ess_txt = to400 = "–"
            if method == "nuts":
                idata = post.to_inference_data()
                ds = idata.posterior
                sub = ds[["e1", "e2"]].assign(flux_r=ds["flux"].sel(band="r"))
                e = az.ess(sub, method="bulk")
                ess = np.min([e[v].values for v in ("flux_r", "e1", "e2")], axis=0)
                st = idata.sample_stats
                steps, div = float(st["n_steps"].mean()), float(st["diverging"].mean())
                ess_txt = f"{np.median(ess):.0f} ({np.min(ess):.0f}); {steps:.0f} steps/draw, {div:.1%} div."
                to400 = f"{per_source * 400 / np.median(ess):.0f}"
            print(
                f"| {k} | {method} | {len(use)} | {per_source:.2f} | "
                f"{gr['alone']:.0f} | {gr['looped']:.0f} | "
                f"{gr['flops'] / 1e9:.2f} | {gr['fraction']:.2f} | {ess_txt} | {to400} |",
                flush=True,
            )
    print(
        f"\ncommand: `.venv/bin/python benchmarks/bench_speed.py --bundle {args.bundle} "
        f"--methods {args.methods} --sizes {args.sizes}` settings {common or 'default'}"
    )


if __name__ == "__main__":
    main()
