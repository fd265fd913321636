"""The additive shear bias c, galaxy by galaxy: where the c2 of RESULTS.md "Shear bias" comes from.

For each shear-bias run directory given, over the usable galaxies (the shear
catalogue's rule, :func:`bayesblend.shear.bias._usable`):

- the mean over the ten variants of ``e - e_true`` per galaxy (posterior
  medians against the lensed truth). The rotated twins and the +-g pairs
  cancel the multiplicative part, so this is the galaxy's additive offset;
  its mean and standard error over galaxies, and its median;
- the slope and intercept of that offset on ``sin 2 theta`` (e2) and
  ``cos 2 theta`` (e1) of the direction to the dominant neighbour (largest
  true r flux over squared distance, from the fitted positions): a neighbour's
  light leaking into a galaxy's shape shows as a slope; the twins are rotated
  shapes in the same layout, so such leakage does not cancel between them.

With ``--twins N``, a direct test of the fit's rotation
equivariance instead: the first N isolated galaxies of the shear harness's
seed-5 set (max_shift 0.5, psf_jitter 0.05, no shear) are drawn *without noise*,
as is and rotated by 90 degrees, and fitted by MAP at their true positions. A
rotation-equivariant fit gives ``e(rotated) = -e(as is)`` exactly (the true
ellipticities, which the fitted ellipticity parameter estimates, do), so
``(e(as is) + e(rotated)) / 2`` per galaxy is the offset the fit alone adds
(decoder, priors, Fourier shift), free of the noise scatter that dominates the
per-run offsets above. Printed by true S/N, for the galaxies resolved (R2 >=
``RESOLUTION_MIN``, 0.3) in both fits. ``--noise`` adds each item's noise
field (the same one to both twins, as in the harness), and ``--seed`` picks
galaxies and noise independent of the harness runs' (the seed-5 runs of every
kind share their items' noise fields, so their offsets are not independent).

Run::

    .venv/bin/python benchmarks/additive_bias.py benchmarks/shear/isolated-map-sm2-s5 \
        benchmarks/shear/blends-map-sm2-s5 benchmarks/shear/blends-map-sm2-s6
    .venv/bin/python benchmarks/additive_bias.py --twins 160            # noiseless, seed 5
    .venv/bin/python benchmarks/additive_bias.py --twins 240 --seed 7 --noise
"""

from __future__ import annotations

import warnings

import numpy as np

from bayesblend.catalog import RESOLUTION_MIN
from bayesblend.shear.bias import _usable
from bayesblend.shear.harness import load_items


def neighbour_angle(r: dict) -> np.ndarray:
    """Position angle (radians) of each galaxy's dominant neighbour in its scene; NaN when alone."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        x, y = np.nanmean(r["x"], axis=0), np.nanmean(r["y"], axis=0)
    flux, items = r["true_flux_r"][0], np.asarray(r["item"]).reshape(-1, x.size)[0]
    out = np.full(x.shape, np.nan)
    for item in np.unique(items):
        idx = np.where((items == item) & np.isfinite(x))[0]
        for g in idx:
            others = idx[idx != g]
            if others.size == 0:
                continue
            d2 = (x[others] - x[g]) ** 2 + (y[others] - y[g]) ** 2
            j = others[np.argmax(flux[others] / np.maximum(d2, 1.0))]
            out[g] = np.arctan2(y[j] - y[g], x[j] - x[g])
    return out


def report(run: str) -> None:
    r = load_items(run)
    use = _usable(r)
    theta = neighbour_angle(r)
    print(f"{run}: {use.sum()} usable galaxies")
    for comp, trig in (("e1", np.cos), ("e2", np.sin)):
        off = np.mean(r[comp] - r[f"true_{comp}"], axis=0)[use]
        line = (
            f"  {comp}: mean offset {off.mean():+.4f} +- {off.std(ddof=1) / np.sqrt(off.size):.4f}, "
            f"median {np.median(off):+.4f}"
        )
        t = theta[use]
        has = np.isfinite(t)
        if has.sum() > 5:
            slope, icept = np.polyfit(trig(2 * t[has]), off[has], 1)
            line += f"; on the dominant neighbour's {trig.__name__} 2theta ({has.sum()}): slope {slope:+.4f}"
            line += f", intercept {icept:+.4f}"
        print(line)


def twins(n: int, seed: int = 5, noise: bool = False, chunk: int = 16) -> None:
    """Fit the first ``n`` isolated galaxies and their 90-degree twins; print the offsets.

    ``noise=True`` adds the item's noise field (the same one to both twins, as the harness does).
    """
    import bayesblend
    from bayesblend.infer import deblend
    from bayesblend.simulate.scenes import simulate_isolated

    prior = bayesblend.load_prior()
    e = np.full((2, n, 2), np.nan)  # (rotation, galaxy, component)
    target = np.full((2, n, 2), np.nan)
    res = np.full((2, n), np.nan)
    snr = np.full(n, np.nan)
    for start in range(0, n, chunk):
        idx = range(start, min(n, start + chunk))
        for rot in (0, 1):
            sims = [
                simulate_isolated(seed, i, max_shift=0.5, psf_jitter=0.05, noise=noise, rotate=bool(rot))
                for i in idx
            ]
            post = deblend(
                [s.scene for s in sims],
                sources=[np.c_[s.truth["x"], s.truth["y"]] for s in sims],
                method="map",
                prior=prior,
                seed=start,
                num_draws=64,
            )
            cat = post.catalog()
            rows = np.asarray(cat["scene"])
            for k, i in enumerate(idx):
                j = np.flatnonzero(rows == k)[0]
                e[rot, i] = float(cat["e1"][j]), float(cat["e2"][j])
                res[rot, i] = float(cat["resolution"][j])
                target[rot, i] = float(sims[k].truth["e1"][0]), float(sims[k].truth["e2"][0])
                snr[i] = float(sims[k].truth["snr"][0])
        print(f"fitted {min(n, start + chunk)} of {n}", flush=True)
    off = e.mean(axis=0)  # (galaxy, component)
    tgt = target.mean(axis=0)
    ok = np.all(np.isfinite(e), axis=(0, 2)) & np.all(res >= RESOLUTION_MIN, axis=0)
    what = "noisy" if noise else "noiseless"
    print(f"{what} twins, seed {seed}: {ok.sum()} of {n} galaxies resolved in both fits")
    big = np.abs(tgt[ok]).max(axis=0)
    print(f"  true ellipticities' own offset, largest (should be ~0): e1 {big[0]:.1e}, e2 {big[1]:.1e}")
    print("| true S/N | galaxies | e1 offset, mean ± s.e. (median) | e2 offset, mean ± s.e. (median) |")
    print("|---|---|---|---|")
    for lo, hi in ((0, 10), (10, 30), (30, np.inf), (0, np.inf)):
        sel = ok & (snr >= lo) & (snr < hi)
        if sel.sum() < 2:
            continue
        cells = [
            f"{off[sel, c].mean():+.4f} ± {off[sel, c].std(ddof=1) / np.sqrt(sel.sum()):.4f} "
            f"({np.median(off[sel, c]):+.4f})"
            for c in (0, 1)
        ]
        label = f"{lo:g}–{hi:g}" if np.isfinite(hi) else (f"> {lo:g}" if lo else "all")
        print(f"| {label} | {sel.sum()} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="*", help="shear-bias run directories")
    p.add_argument("--twins", type=int, default=0, help="fit this many isolated galaxies and their twins")
    p.add_argument("--seed", type=int, default=5, help="with --twins: the simulation seed")
    p.add_argument("--noise", action="store_true", help="with --twins: add the noise field")
    args = p.parse_args()
    if args.twins:
        twins(args.twins, args.seed, args.noise)
    for run in args.runs:
        report(run)
