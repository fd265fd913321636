"""Reconstruction benchmark of a prior bundle (issue 3; Arcelin et al. 2021 Figs. 5 and 6 in our terms).

Held-out sets, simulated with seeds not used in training (created when missing):
- isolated: ``data/lsst-isolated-test``, 5000 stamps, seed 2;
- blends: ``data/lsst-blends-test``, 5000 blends, seed 4.

Both use the same options as training (``--max-shift 0.5 --psf-jitter 0.05``).

For every stamp, the amortised reconstruction (:mod:`bayesblend.prior.reconstruct`)
gives the centred galaxy's image, with:
- the VAE encoder for isolated galaxies and the deblender encoder for blends;
- the flux per band from a linear fit of the decoded template to the noisy
  stamp.

Then, in the r band, on the noiseless PSF-convolved images:
- Delta|e| = |e|_out - |e|_target, with |e| from GalSim adaptive moments
  (shear-type) measured the same way on output and target;
- Delta mag_r = mag(sum out_r) - mag(sum target_r).

The script reports the median and the +-1 sigma / +-2 sigma percentiles in bins
of S/N (isolated), and in bins of S/N, Delta mag to the closest neighbour,
B_closest and B_tot (blends).

Run: ``.venv/bin/python benchmarks/bench_reconstruction.py --model models/lsst-v1``

Writes ``benchmarks/figures/recon_*.png`` and ``benchmarks/recon_metrics.json``,
and prints its Markdown tables for RESULTS.md (``benchmarks/recon_tables.py``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from recon_tables import main as print_tables  # noqa: E402  (benchmarks/, beside this script)

from bayesblend.evaluate import adaptive_ellipticity, binned_stats  # noqa: E402
from bayesblend.prior.bundle import load_bundle  # noqa: E402
from bayesblend.prior.reconstruct import reconstruct  # noqa: E402
from bayesblend.simulate.dataset import ShardDataset, simulate_dataset  # noqa: E402

HERE = Path(__file__).resolve().parent
SNR_EDGES = np.array([5, 10, 15, 20, 30, 50, 75, 100, 200, 500, 1e5])
BINS = {
    "snr": SNR_EDGES,
    "dmag_closest": np.array([-np.inf, -2, -1, 0, 1, 2, 3, 5, np.inf]),
    "b_closest": np.array([0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.0001]),
    "b_tot": np.array([0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.0001]),
}


HELD_OUT = 5000


def held_out(kind: str, seed: int) -> ShardDataset:
    """The held-out set of ``kind`` (5000 items), simulated once and reused."""
    path = Path("data") / f"lsst-{kind}-test"
    if not (path / "dataset.json").exists() or len(ShardDataset(path)) < HELD_OUT:
        simulate_dataset(
            kind, HELD_OUT, path, seed=seed, fmt="shards", shard_size=500, max_shift=0.5, psf_jitter=0.05
        )
    return ShardDataset(path)


def evaluate(bundle, ds: ShardDataset, network: str, n: int) -> dict:
    truth = ds.target_truth()
    idx = np.arange(min(n, len(ds)))
    truth = truth[idx]
    noisy = ds.load("noisy", idx)
    target = ds.load("target" if network == "deblender" else "noiseless", idx)
    psf = np.asarray(ds.psf(idx))
    offset = ds.offsets(truth, ds.stamp)
    t0 = time.perf_counter()
    rec = reconstruct(bundle, noisy, psf, offset, network=network)
    seconds = time.perf_counter() - t0
    r = bundle.bands.index("r")
    e_t = adaptive_ellipticity(target[:, r])
    e_o = adaptive_ellipticity(rec["image"][:, r])
    de = np.hypot(*e_o.T) - np.hypot(*e_t.T)
    with np.errstate(divide="ignore", invalid="ignore"):
        dmag = -2.5 * np.log10(rec["image"][:, r].sum((1, 2)) / target[:, r].sum((1, 2)))
    out = {"n": len(idx), "seconds": seconds, "per_stamp_ms": 1e3 * seconds / len(idx), "bins": {}}
    keys = ["snr"] + (["dmag_closest", "b_closest", "b_tot"] if network == "deblender" else [])
    for key in keys:
        x = np.asarray(truth[key], float)
        out["bins"][key] = {
            "e": binned_stats(x, de, BINS[key], key),
            "mag": binned_stats(x, dmag, BINS[key], key),
        }
    hi = np.asarray(truth["snr"]) > 10
    out["summary_snr_gt_10"] = {
        "median_de": float(np.nanmedian(de[hi])),
        "median_dmag_r": float(np.nanmedian(dmag[hi])),
        "n": int(hi.sum()),
        "hsm_failures": int(np.sum(~np.isfinite(de))),
    }
    out["summary_all"] = {"median_de": float(np.nanmedian(de)), "median_dmag_r": float(np.nanmedian(dmag))}
    return out


def boxplot(ax, table, key, col_label):
    x = np.arange(len(table))
    for i, row in enumerate(table):
        if row["n"] < 5:
            continue
        ax.plot([i, i], [row["p02"], row["p98"]], color="0.5", lw=1)
        ax.add_patch(
            plt.Rectangle((i - 0.3, row["p16"]), 0.6, row["p84"] - row["p16"], color="C0", alpha=0.5)
        )
        ax.plot([i - 0.3, i + 0.3], [row["median"]] * 2, color="k", lw=1.5)
    labels = [f"{lo:g}-{hi:g}" for lo, hi in zip(table[f"{key}_lo"], table[f"{key}_hi"], strict=True)]
    ax.set_xticks(x, labels, rotation=45, fontsize=6)
    ax.axhline(0, color="r", lw=0.7)
    ax.set_ylabel(col_label, fontsize=8)


def figure(result: dict, path: Path, title: str) -> None:
    keys = list(result["bins"])
    fig, axes = plt.subplots(len(keys), 2, figsize=(8, 2.4 * len(keys)), squeeze=False)
    for k, key in enumerate(keys):
        boxplot(axes[k, 0], result["bins"][key]["e"], key, "Δ|e|")
        boxplot(axes[k, 1], result["bins"][key]["mag"], key, "Δmag_r")
        axes[k, 0].set_xlabel(key, fontsize=8)
        axes[k, 1].set_xlabel(key, fontsize=8)
        axes[k, 0].set_ylim(-0.3, 0.3)
        axes[k, 1].set_ylim(-0.5, 0.5)
    fig.suptitle(title + " (box: ±1σ percentiles, whiskers ±2σ, line: median)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="models/lsst-v1")
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--skip-blends", action="store_true")
    args = p.parse_args()
    bundle = load_bundle(args.model)
    print(f"date {datetime.date.today()}, {os.cpu_count()} cores ({platform.machine()}), model {args.model}")
    results = {"isolated": evaluate(bundle, held_out("isolated", 2), "encoder", args.n)}
    if not args.skip_blends and "deblender" in bundle.params:
        results["blends"] = evaluate(bundle, held_out("blends", 4), "deblender", args.n)
    for kind, res in results.items():
        figure(res, HERE / "figures" / f"recon_{kind}.png", f"{args.model}: {kind} (held-out)")
    serial = {
        kind: {
            **{k: v for k, v in res.items() if k != "bins"},
            "bins": {
                key: {
                    q: [dict(zip(t.colnames, map(float, row), strict=True)) for row in t]
                    for q, t in d.items()
                }
                for key, d in res["bins"].items()
            },
        }
        for kind, res in results.items()
    }
    (HERE / "recon_metrics.json").write_text(json.dumps(serial, indent=1))
    print_tables()  # the Markdown tables for RESULTS.md, from the file just written


if __name__ == "__main__":
    main()
