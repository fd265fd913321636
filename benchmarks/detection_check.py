"""Detection completeness and purity on the held-out blends (issue 4, item 4).

Runs ``bayesblend.detect.detect_sources`` with its defaults (peaks of the
PSF-filtered multi-band detection image above point-source S/N 4, plus the
sources of sep's segmentation no peak is near; within 1.5 pixels merged),
and with the ``--thresholds`` given, on the first ``--n`` blends of the
held-out blend set (the same blends as ``bench_deblend.py``), matches true
galaxies to detections one-to-one within ``--radius`` pixels (``detect.match_sources``,
as the shear-bias harness does) and prints:

- completeness (fraction of true galaxies matched) per bin of true S/N
  (paper eq. 7, r band) and per bin of true total blendedness (eq. 3);
- the median distance of the matched detections from the truth;
- spurious detections (matched to no galaxy) per blend, and how many blends
  came out with exactly their number of galaxies.

The baseline is what bayesblend used before: sep's segmentation alone
(``detect.segment_sources``: SExtractor's algorithm on the same unit-noise
detection image, 3 sigma, 5 pixels, deblending contrast 0.001), sources
within 1.5 pixels merged.

Run::

    .venv/bin/python benchmarks/detection_check.py --n 200 --thresholds 3,5
"""

from __future__ import annotations

import argparse

import numpy as np
from astropy.table import Table

SNR_EDGES = (0.0, 5.0, 10.0, 20.0, 50.0, 1e9)
BLEND_EDGES = (0.0, 0.1, 0.5, 0.9, 1.01)  # the last bin includes 1


def _table(name: str, values: np.ndarray, found: np.ndarray, edges: tuple[float, ...]) -> None:
    print(f"| {name} | galaxies | detected | completeness |\n|---|---|---|---|")
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        m = (values >= lo) & (values < hi)
        if m.any():
            label = f"≥ {lo:g}" if hi > 1e8 else f"{lo:g}–{min(hi, 1.0) if edges is BLEND_EDGES else hi:g}"
            print(f"| {label} | {m.sum()} | {found[m].sum()} | {found[m].mean():.2f} |")
    print()


def sep_baseline(scene) -> Table:
    """The sep detection bayesblend used before (see the module docstring): ``x``, ``y``."""
    from bayesblend.detect import MERGE_RADIUS, merge_close, segment_sources

    return merge_close(segment_sources(scene), MERGE_RADIUS)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=200, help="number of held-out blends")
    p.add_argument("--radius", type=float, default=2.0, help="matching radius (pixels)")
    p.add_argument(
        "--thresholds",
        default="",
        help="comma-separated detection thresholds (sigma) to compare; default: the default",
    )
    args = p.parse_args()

    from bayesblend.detect import detect_sources, match_sources
    from bayesblend.simulate.scenes import simulate_blend

    # the held-out blend set of bench_deblend.py (seed 4)
    sim = dict(max_shift=0.5, psf_jitter=0.05)
    sims = [simulate_blend(4, i, **sim) for i in range(args.n)]
    settings = [{}] + [{"threshold": float(v)} for v in args.thresholds.split(",") if v] + ["sep"]
    for kw in settings:
        find = sep_baseline if kw == "sep" else (lambda sc, kw=kw: detect_sources(sc, **kw))
        name = (
            "sep baseline (3 sigma segments)"
            if kw == "sep"
            else f"detect_sources({', '.join(f'{k}={v:g}' for k, v in kw.items()) or 'defaults'})"
        )
        snr, btot, found, dist = [], [], [], []
        spurious, exact = [], 0
        for s in sims:
            t, det = s.truth, find(s.scene)
            j = match_sources(t["x"], t["y"], det["x"], det["y"], args.radius)
            ok = j >= 0
            snr.append(np.asarray(t["snr"], float))
            btot.append(np.asarray(t["b_tot"], float))
            found.append(ok)
            dx = np.asarray(det["x"])[j[ok]] - t["x"][ok]
            dist.append(np.hypot(dx, np.asarray(det["y"])[j[ok]] - t["y"][ok]))
            spurious.append(len(det) - ok.sum())
            exact += len(det) == len(t)
        snr, btot, found, dist = map(np.concatenate, (snr, btot, found, dist))
        spurious = np.asarray(spurious)
        print(
            f"## {name}: "
            f"{args.n} blends, {len(found)} galaxies, matched within {args.radius:g} px\n\n"
            f"completeness {found.mean():.3f} ({found.sum()} of {len(found)}); median offset of matches "
            f"{np.median(dist):.2f} px (90th percentile {np.percentile(dist, 90):.2f}); spurious detections "
            f"{spurious.sum()} ({spurious.mean():.2f} per blend); blends with as many detections as "
            f"galaxies: {exact} of {args.n}\n"
        )
        _table("true S/N", snr, found, SNR_EDGES)
        _table("true blendedness", btot, found, BLEND_EDGES)


if __name__ == "__main__":
    main()
