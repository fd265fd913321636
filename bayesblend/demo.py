"""``make demo``: simulate a few LSST blends and deblend them with the shipped prior.

Writes to ``out/`` (or ``--out``): the simulated scenes ``blend_*.fits`` and
their truth ``truth.fits``, a figure of the blends ``blends.png``, and the
deblending outputs in ``out/deblended/``: ``catalog.fits``, ``posterior.nc``
(ArviZ) and ``figures/blend_*.png`` (data, model, residuals, posteriors of e
and magnitude per source). NUTS runs with a short configuration (2 chains,
100 warm-up steps, 150 draws): the demo takes about 25 minutes on 2 CPU cores
with galaxy model v2 (benchmarks/RESULTS.md, "make demo").
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bayesblend.io import write_scene, write_table  # noqa: E402
from bayesblend.plots import draw_scene, plot_blends, save_figure  # noqa: E402
from bayesblend.simulate.scenes import simulate_blend, stack_truth  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit code."""
    p = argparse.ArgumentParser(prog="python -m bayesblend.demo")
    p.add_argument("--out", default="out")
    p.add_argument("--n", type=int, default=3)
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--method", default="nuts", choices=["amortised", "map", "svi", "nuts"])
    p.add_argument("--draws", type=int, default=150)
    p.add_argument("--warmup", type=int, default=100)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    blends, tables = [], []
    for index in range(args.n):  # blends of 2-3 galaxies, target brighter than r = 24
        r = simulate_blend(args.seed, index, n_range=(2, 3), mag_range=(19.0, 24.5))
        blends.append(r)
        name = f"blend_{index}.fits"
        r.truth["file"] = name  # as `bayesblend simulate` writes it: `deblend --truth` reads it
        tables.append(r.truth)
        write_scene(out / name, r.scene)
    truth = stack_truth(tables)
    write_table(out / "truth.fits", truth)
    cols = min(3, len(blends))
    rows = int(np.ceil(len(blends) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.3 * rows), dpi=110, squeeze=False)
    for ax, r in zip(axes.ravel(), blends, strict=False):
        t = r.truth
        draw_scene(ax, r.scene, t)
        ax.set_title(
            f"blend {t['blend_id'][0]}: {len(t)} galaxies, target r={t['mag_r'][0]:.1f}\n"
            f"S/N={t['snr'][0]:.0f}, B_tot={t['b_tot'][0]:.2f}",
            fontsize=7,
        )
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes.ravel()[len(blends) :]:
        ax.axis("off")
    fig.suptitle("Simulated LSST 10-year blends (gri composite; circles: truth)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, out / "blends.png")
    print(f"demo: {len(blends)} simulated blends -> {out}/blend_*.fits, truth -> {out}/truth.fits")

    from bayesblend.infer import deblend

    t0 = time.perf_counter()
    post = deblend(
        [r.scene for r in blends],
        method=args.method,
        seed=args.seed,
        progress=True,
        num_draws=args.draws,
        num_warmup=args.warmup,
    )
    dt = time.perf_counter() - t0
    dest = out / "deblended"
    post.write_catalog(dest / "catalog.fits")
    post.to_netcdf(dest / "posterior.nc")
    plot_blends(post, dest / "figures", tables)
    cat = post.catalog()
    print(f"demo: {args.method} on {post.n_sources} detected sources in {post.n_blends} blends, {dt:.0f} s")
    print("demo: source  x      y      mag_r (+-)        e1 (+-)        e2 (+-)       r_hat  ess   flags")
    for row in cat:
        print(
            f"demo: {row['id']:4d}  {row['x']:5.1f}  {row['y']:5.1f}"
            f"  {row['mag_r']:6.2f} ({row['mag_r_std']:.2f})"
            f"  {row['e1']:+.3f} ({row['e1_std']:.3f})  {row['e2']:+.3f} ({row['e2_std']:.3f})"
            f"  {row['r_hat_max']:.3f}  {row['ess_bulk_min']:4.0f}  {row['flags']}"
        )
    print(f"demo: figure of the blends -> {out / 'blends.png'}")
    print(f"demo: catalogue -> {dest / 'catalog.fits'}; posterior (ArviZ) -> {dest / 'posterior.nc'}")
    print(f"demo: per-blend figures -> {dest / 'figures'}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
