"""Shapes and magnitudes of isolated galaxies through the whole pipeline, for any bundle (v1 and v2 measured).

The figures of issue 22, measured on the same items for every bundle: isolated galaxies simulated
with ``simulate_isolated`` (``--family bulge+disk``, the training population, or ``sersic``, a
population no prior was trained on), deblended with ``bayesblend.deblend`` at the true positions
(MAP by default), and compared with the truth:

- per bin of true half-light radius (< 0.2", 0.2-0.4", > 0.4"): the slope of the catalogue's
  ``e`` on the true ``e`` (both components, least squares with intercept), median ``|e - e_true|``
  and median ``mag_r - mag_r,true`` (total magnitudes);
- per S/N bin (the paper's Fig. 5 bins), median ``|e| - |e_true|`` and median Delta mag_r.

``--min-snr 100`` keeps the bright galaxies of the first figure; ``--min-snr 10`` the second.
Per-galaxy rows go to ``benchmarks/pose/<label>.jsonl`` (a rerun resumes after the last row), the
summary to ``benchmarks/pose/<label>.json``.

Run: ``.venv/bin/python benchmarks/bench_pose.py --bundle lsst-v2 --n 300 --min-snr 100``
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HLR_BINS = ((0.0, 0.2), (0.2, 0.4), (0.4, np.inf))
SNR_BINS = ((10, 20), (20, 50), (50, 100), (100, 300), (300, np.inf))
SEED = 505  # scenes are simulate_isolated(SEED, i): the same items for every bundle


def rows_for(
    bundle, family: str, index: int, min_snr: float, mag_range, method: str, settings: dict | None = None
) -> dict | None:
    """Deblend item ``index`` and return its row (None when below ``min_snr``)."""
    from bayesblend import deblend
    from bayesblend.simulate.scenes import simulate_isolated

    r = simulate_isolated(SEED, index, mag_range=mag_range, max_shift=0.5, psf_jitter=0.05, family=family)
    t = r.truth[0]
    if t["snr"] < min_snr:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        post = deblend(
            r.scene,
            sources=np.array([[t["x"], t["y"]]]),
            method=method,
            prior=bundle,
            seed=index,
            **(settings or {}),
        )
    c = post.catalog()[0]
    return {
        "index": index,
        "snr": float(t["snr"]),
        "hlr": float(t["hlr"]),
        "e1_true": float(t["e1"]),
        "e2_true": float(t["e2"]),
        "mag_r_true": float(t["mag_r"]),
        "e1": float(c["e1"]),
        "e2": float(c["e2"]),
        "e1_std": float(c["e1_std"]),
        "e2_std": float(c["e2_std"]),
        "mag_r": float(c["mag_r"]),
        "flux_r": float(c["flux_r"]),
        "flux_r_std": float(c["flux_r_std"]),
        "flux_r_true": float(t["flux_r"]),
    }


def summarise(rows: list[dict]) -> dict:
    """The issue's figures from per-galaxy rows."""
    a = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    e_true = np.stack([a["e1_true"], a["e2_true"]], 1)
    e = np.stack([a["e1"], a["e2"]], 1)
    dmag = a["mag_r"] - a["mag_r_true"]
    dabs = np.hypot(*e.T) - np.hypot(*e_true.T)
    out: dict = {"n": len(rows), "by_hlr": {}, "by_snr": {}}
    for lo, hi in HLR_BINS:
        m = (a["hlr"] >= lo) & (a["hlr"] < hi) & np.isfinite(e).all(1)
        if m.sum() < 3:
            continue
        out["by_hlr"][f"{lo}-{hi}"] = {
            "n": int(m.sum()),
            "slope_e": float(np.polyfit(e_true[m].ravel(), e[m].ravel(), 1)[0]),
            "median_abs_de": float(np.median(np.hypot(*(e[m] - e_true[m]).T))),
            "median_dmag_r": float(np.median(dmag[m])),
        }
    for lo, hi in SNR_BINS:
        m = (a["snr"] >= lo) & (a["snr"] < hi) & np.isfinite(dabs)
        if m.sum() < 3:
            continue
        out["by_snr"][f"{lo}-{hi}"] = {
            "n": int(m.sum()),
            "median_d_abs_e": float(np.median(dabs[m])),
            "median_dmag_r": float(np.median(dmag[m])),
        }
    ok = np.isfinite(e).all(1)
    out["all"] = {
        "slope_e": float(np.polyfit(e_true[ok].ravel(), e[ok].ravel(), 1)[0]),
        "median_d_abs_e": float(np.median(dabs[ok])),
        "median_dmag_r": float(np.median(dmag)),
        "e1_coverage_68": float(np.mean(np.abs(a["e1"] - a["e1_true"]) < a["e1_std"])),
        "e2_coverage_68": float(np.mean(np.abs(a["e2"] - a["e2_true"]) < a["e2_std"])),
        "flux_r_coverage_68": float(np.mean(np.abs(a["flux_r"] - a["flux_r_true"]) < a["flux_r_std"])),
    }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", default="lsst-v2")
    p.add_argument("--family", default="bulge+disk", choices=["bulge+disk", "sersic"])
    p.add_argument("--n", type=int, default=300, help="galaxies kept (above --min-snr)")
    p.add_argument("--min-snr", type=float, default=100.0)
    p.add_argument("--mag-range", default="18,22.5", help="r-band range drawn, e.g. 18,25")
    p.add_argument("--method", default="map")
    p.add_argument("--label", default=None, help="file name (default <bundle>-<family>-snr<min>)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (rows kept) after this long")
    p.add_argument("--set", action="append", default=[], help="inference setting name=value")
    args = p.parse_args()
    from bayesblend.prior.bundle import load_bundle
    from bayesblend.settings import InferenceConfig

    settings = InferenceConfig.parse_settings(args.set)

    bundle = load_bundle(args.bundle)
    mag_range = tuple(float(v) for v in args.mag_range.split(","))
    label = args.label or f"{bundle.card.get('name', args.bundle)}-{args.family}-snr{args.min_snr:g}"
    out = ROOT / "benchmarks" / "pose"
    out.mkdir(parents=True, exist_ok=True)
    rows_file = out / f"{label}.jsonl"
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()] if rows_file.exists() else []
    index = rows[-1]["index"] + 1 if rows else 0  # items below --min-snr are drawn again and skipped
    t0 = time.time()
    kept = list(rows)
    while len(kept) < args.n:
        if args.max_minutes is not None and time.time() - t0 > 60 * args.max_minutes:
            break
        row = rows_for(bundle, args.family, index, args.min_snr, mag_range, args.method, settings)
        index += 1
        if row is None:
            continue
        kept.append(row)
        with rows_file.open("a") as f:
            f.write(json.dumps(row) + "\n")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    summary = summarise(kept) | {
        "bundle": str(bundle.card.get("name", args.bundle)),
        "family": args.family,
        "method": args.method,
        "min_snr": args.min_snr,
        "mag_range": list(mag_range),
        "command": f"benchmarks/bench_pose.py --bundle {args.bundle} --family {args.family} --n {args.n} "
        f"--min-snr {args.min_snr:g} --mag-range {args.mag_range} --method {args.method}"
        + "".join(f" --set {kv}" for kv in args.set),
        "commit": commit.stdout.strip(),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, CPU",
    }
    (out / f"{label}.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
