"""Simulation-based calibration of every method (issue 23, item 4): rank histograms and coverage.

For ``--n`` items: the layout of a simulator blend of ``k`` galaxies
(``simulate_blend(SEED, i, n_range=(k, k))``: cutout, PSF, sky, positions),
every parameter drawn from the scene model's prior (:func:`bayesblend.sbc.draw_from_prior`:
flux prior centred on r = ``--mag`` with a flat AB spectrum, ln-flux width
``--log-flux-sigma``), data rendered by the model with its noise, and the
method run on them (``flux_prior="detection"`` keeps the prior's centre,
``model_error=0``: the model is exact). Per source and quantity (flux_r, e1,
e2, size) the rank of the truth among the draws (thinned by ``--thin``) and
whether the 68 / 95 % intervals hold it.

Output in ``--out``: ``rows.jsonl`` (one line per item and method, so a rerun
resumes), ``summary.json`` (per method, source count and quantity: chi-square
p-value of rank uniformity in 10 bins, coverage at ten levels) and ``sbc.png`` (rank
histograms and coverage against nominal level).

Run::

    .venv/bin/python benchmarks/sbc.py --methods map,svi --n 200 --sources 1,2 --out benchmarks/sbc/lsst-v2
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np

warnings.filterwarnings("ignore", category=FutureWarning)

SEED = 77  # layouts: simulate_blend(SEED, i), not the held-out benchmark set
LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.68, 0.8, 0.9, 0.95)


def run_items(args, bundle, method: str, items: list[int], k: int, out: Path) -> None:
    import jax

    from bayesblend import sbc
    from bayesblend.infer import InferenceConfig, fit_blends, prepare_scene
    from bayesblend.prior.bundle import Networks
    from bayesblend.simulate.scenes import simulate_blend

    nets = Networks(bundle, "flow")
    exact = dict(flux_prior="detection", model_error=0.0, log_flux_sigma=args.log_flux_sigma)
    cfg = InferenceConfig(**exact).replace(**InferenceConfig.parse_settings(args.set))
    blends, truths = [], []
    for i in items:
        sim = simulate_blend(SEED, i, n_range=(k, k))
        x, y = np.asarray(sim.truth["x"]), np.asarray(sim.truth["y"])
        preps, _, _ = prepare_scene(sim.scene, x, y, bundle, cfg)
        if len(preps) != 1 or preps[0].n_real != k:
            continue  # the sources were grouped otherwise: not a k-source blend
        zp = np.asarray(preps[0].magzero, float)
        log_flux0 = 0.4 * np.log(10.0) * (zp - args.mag)  # flat AB spectrum at r = --mag
        key = jax.random.fold_in(jax.random.PRNGKey(args.seed), 1000 * k + i)
        b, t = sbc.draw_from_prior(nets, preps[0], key, log_flux0, args.log_flux_sigma)
        blends.append((i, b))
        truths.append(t)
    if not blends:
        return
    t0 = time.perf_counter()
    results = fit_blends(bundle, [b for _, b in blends], method, "flow", args.seed, cfg)
    per_item = (time.perf_counter() - t0) / len(blends)
    bands = list(bundle.bands)
    with open(out / "rows.jsonl", "a") as fh:
        for (i, _), t, r in zip(blends, truths, results, strict=True):
            q = sbc.quantities(r["draws"], bands)
            row = {"method": method, "item": i, "k": k, "seconds": per_item}
            row["snr"] = t["snr"].tolist()
            for name in sbc.QUANTITIES:
                d = q[name][:: args.thin]
                row[name] = {
                    "rank": sbc.ranks(d, t[name]).tolist(),
                    "n_draws": int(d.shape[0]),
                    "inside": {str(lv): [bool(v) for v in _inside(d, t[name], lv)] for lv in LEVELS},
                }
            fh.write(json.dumps(row) + "\n")


def _inside(d: np.ndarray, truth: np.ndarray, level: float) -> np.ndarray:
    lo, hi = np.percentile(d, [50 * (1 - level), 50 * (1 + level)], axis=0)
    return (truth >= lo) & (truth <= hi)


def summarise(out: Path) -> dict:
    from bayesblend import sbc

    rows = [json.loads(x) for x in (out / "rows.jsonl").read_text().splitlines() if x.strip()]
    summary: dict = {}
    groups = sorted({(r["method"], r["k"]) for r in rows})
    for method, k in groups:
        mine = [r for r in rows if r["method"] == method and r["k"] == k]
        s: dict = {"items": len(mine), "sources": sum(r["k"] for r in mine)}
        s["seconds_per_blend"] = float(np.mean([r["seconds"] for r in mine]))
        for name in sbc.QUANTITIES:
            ranks = np.concatenate([r[name]["rank"] for r in mine])
            n_draws = mine[0][name]["n_draws"]
            chi2, p = sbc.rank_uniformity(ranks, n_draws) if ranks.size >= 20 else (np.nan, np.nan)
            cov = {
                str(lv): float(np.mean(np.concatenate([r[name]["inside"][str(lv)] for r in mine])))
                for lv in LEVELS
            }
            hist, _ = np.histogram(ranks, bins=np.linspace(0, n_draws + 1, 11))
            s[name] = {"chi2": chi2, "p": p, "coverage": cov, "hist": hist.tolist(), "n_draws": n_draws}
        summary[f"{method}, {k} source(s)"] = s
    return summary


def figure(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bayesblend import sbc

    methods = list(summary)
    fig, axes = plt.subplots(len(methods), 5, figsize=(13, 2.4 * len(methods)), squeeze=False)
    for m, method in enumerate(methods):
        s = summary[method]
        for j, name in enumerate(sbc.QUANTITIES):
            ax = axes[m, j]
            h = np.asarray(s[name]["hist"])
            ax.bar(np.arange(10), h, width=1.0, color="C0", alpha=0.7)
            ax.axhline(h.sum() / 10, color="k", lw=0.8)
            ax.set_title(f"{method}: {name} (p={s[name]['p']:.2g})", fontsize=8)
            ax.set_xticks([])
        ax = axes[m, 4]
        for j, name in enumerate(sbc.QUANTITIES):
            c = s[name]["coverage"]
            ax.plot([float(x) for x in c], list(c.values()), "o-", ms=3, label=name, color=f"C{j}")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set_title(f"{method}: coverage vs nominal", fontsize=8)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--methods", default="map")
    p.add_argument("--n", type=int, default=100, help="items per source count")
    p.add_argument("--sources", default="1,2", help="source counts (padded sizes: 1, 2, 4)")
    p.add_argument("--mag", type=float, default=23.0, help="r magnitude of the flux prior's centre")
    p.add_argument("--log-flux-sigma", type=float, default=1.0)
    p.add_argument("--thin", type=int, default=1)
    p.add_argument("--chunk", type=int, default=8, help="items fitted per call (rows written after each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bundle", default=None)
    p.add_argument("--set", action="append", default=[], help="inference setting name=value")
    p.add_argument("--out", default="benchmarks/sbc/lsst-v2")
    p.add_argument("--report", action="store_true", help="only summarise the rows already made")
    args = p.parse_args()
    import bayesblend

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.report:
        bundle = bayesblend.load_prior(args.bundle)
        done = set()
        if (out / "rows.jsonl").exists():
            for x in (out / "rows.jsonl").read_text().splitlines():
                if x.strip():
                    r = json.loads(x)
                    done.add((r["method"], r["k"], r["item"]))
        for method in args.methods.split(","):
            for k in [int(s) for s in args.sources.split(",")]:
                todo = [i for i in range(args.n) if (method, k, i) not in done]
                for j in range(0, len(todo), args.chunk):
                    run_items(args, bundle, method, todo[j : j + args.chunk], k, out)
                    print(f"{method} k={k}: {min(j + args.chunk, len(todo))}/{len(todo)}", flush=True)
    summary = summarise(out)
    given = {k: v for k, v in vars(args).items() if k != "report" and v not in (None, [])}
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in given.items())
    summary["command"] = f"benchmarks/sbc.py {flags}"
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(out / "summary.json")
    figure({k: v for k, v in summary.items() if k != "command"}, out / "sbc.png")
    for method, s in summary.items():
        if method == "command":
            continue
        print(f"{method}: {s['items']} blends, {s['sources']} sources, {s['seconds_per_blend']:.1f} s/blend")
        for name in ("flux_r", "e1", "e2", "size"):
            c = s[name]["coverage"]
            print(f"  {name:7s} p={s[name]['p']:.3g}  coverage 68% {c['0.68']:.2f}  95% {c['0.95']:.2f}")


if __name__ == "__main__":
    main()
