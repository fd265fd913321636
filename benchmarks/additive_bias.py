"""The additive shear bias c, galaxy by galaxy: where the c2 of RESULTS.md "Shear bias" comes from.

For each shear-bias run directory given, over the usable galaxies (the shear
catalogue's rule, :func:`bayesblend.shear_bias._usable`):

- the mean over the ten variants of ``e - e_true`` per galaxy (posterior
  medians against the lensed truth). The rotated twins and the +-g pairs
  cancel the multiplicative part, so this is the galaxy's additive offset;
  its mean and standard error over galaxies, and its median;
- the slope and intercept of that offset on ``sin 2 theta`` (e2) and
  ``cos 2 theta`` (e1) of the direction to the dominant neighbour (largest
  true r flux over squared distance, from the fitted positions): a neighbour's
  light leaking into a galaxy's shape shows as a slope; the twins are rotated
  shapes in the same layout, so such leakage does not cancel between them.

Run::

    .venv/bin/python benchmarks/additive_bias.py benchmarks/shear/isolated-map-sm2-s5 \
        benchmarks/shear/blends-map-sm2-s5 benchmarks/shear/blends-map-sm2-s6
"""

from __future__ import annotations

import sys
import warnings

import numpy as np

from bayesblend.shear_bias import _usable, load_items


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


if __name__ == "__main__":
    for run in sys.argv[1:]:
        report(run)
