"""``make demo``: simulate a few LSST blends and draw them with their truth.

Writes ``<out>/blend_<k>.fits`` (scene FITS), ``<out>/truth.fits`` and
``<out>/blends.png`` (gri composites with truth markers), then prints where they are.
Later stages of the pipeline (deblending with the shipped model) extend this demo.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bayesblend.io import write_scene, write_table  # noqa: E402
from bayesblend.plots import draw_scene, save_figure  # noqa: E402
from bayesblend.simulate.scenes import simulate_blend, stack_truth  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit code."""
    p = argparse.ArgumentParser(prog="python -m bayesblend.demo")
    p.add_argument("--out", default="out")
    p.add_argument("--n", type=int, default=6)
    p.add_argument("--seed", type=int, default=2026)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    blends, tables = [], []
    index = 0
    while len(blends) < args.n:  # show blends of 2-4 galaxies
        r = simulate_blend(args.seed, index, n_range=(2, 4), stamp_size=64)
        index += 1
        blends.append(r)
        tables.append(r.truth)
        write_scene(out / f"blend_{len(blends) - 1}.fits", r.scene)
    truth = stack_truth(tables)
    write_table(out / "truth.fits", truth)
    cols = 3
    rows = int(np.ceil(len(blends) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.3 * rows), dpi=110, squeeze=False)
    for ax, r in zip(axes.ravel(), blends, strict=False):
        t = r.truth
        draw_scene(ax, r.scene, t)
        ax.scatter(t["x"][0], t["y"][0], s=70, marker="+", color="yellow", linewidths=0.9)
        ax.set_title(
            f"blend {t['blend_id'][0]}: {len(t)} galaxies, target r={t['mag_r'][0]:.1f}\n"
            f"S/N={t['snr'][0]:.0f}, B_tot={t['b_tot'][0]:.2f}",
            fontsize=7,
        )
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes.ravel()[len(blends) :]:
        ax.axis("off")
    fig.suptitle("Simulated LSST 10-year blends (gri composite; circles: truth, +: target)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, out / "blends.png")
    print(f"demo: {len(blends)} simulated blends -> {out}/blend_*.fits, truth -> {out}/truth.fits")
    print(f"demo: figure -> {out / 'blends.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
