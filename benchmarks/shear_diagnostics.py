"""Where the shear response goes: the diagnostics quoted in RESULTS.md "Shear bias".

    .venv/bin/python benchmarks/shear_diagnostics.py benchmarks/shear/blends-map-s5

1. per-galaxy response (e(+g) - e(-g)) / 2g of the posterior medians, by true S/N, and the
   mean e2 at zero shear, from a shear-bias run directory;
2. the mean ellipticity of the latent prior pushed through the decoder, by PSF-corrected size
   (both latent priors, 8192 draws);
3. the fraction of noiseless isolated targets (held-out seed 2, 600 stamps) whose PSF-corrected
   moments give no valid shape (NaN or |e| >= 1), and the mean measured e by size.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bayesblend.measure import batched_morphology_shape
from bayesblend.posterior import derive_shapes
from bayesblend.prior.bundle import Networks, load_bundle
from bayesblend.shear_bias import _usable, load_items
from bayesblend.simulate.scenes import simulate_isolated


def response_by_snr(run: str) -> None:
    r = load_items(run)
    use = _usable(r)
    g = float(json.loads((Path(run) / "config.json").read_text())["shear"])
    r1 = (r["e1"][1] - r["e1"][2] + r["e1"][6] - r["e1"][7]) / (4 * g)
    r2 = (r["e2"][3] - r["e2"][4] + r["e2"][8] - r["e2"][9]) / (4 * g)
    snr = r["true_snr"][0]
    print(f"1. response of posterior medians, {run} ({use.sum()} galaxies)")
    for lo, hi in ((0, 10), (10, 30), (30, 100), (100, np.inf)):
        s = use & (snr >= lo) & (snr < hi)
        print(
            f"   true S/N {lo:>3}-{hi:<4}: n={s.sum():>3}  R1 median {np.median(r1[s]):+.3f}  "
            f"R2 median {np.median(r2[s]):+.3f}  e1_std median {np.median(r['e1_std'][0][s]):.3f}  "
            f"mean e2 at g=0 {np.mean(r['e2'][0][s]):+.3f}"
        )


def prior_by_size(bundle) -> None:
    print("2. latent prior through the decoder: mean e by PSF-corrected size (r band, 8192 draws)")
    arch = bundle.card["architecture"]
    psf = float(arch["model_psf_fwhm"]) / float(arch["pixel_scale"])
    u = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (8192, bundle.latent_dim)), np.float32)
    for lp in ("flow", "normal"):
        _, e1, e2, size = derive_shapes(Networks(bundle, lp), u, bundle.bands.index("r"), psf)
        ok = np.isfinite(e1) & np.isfinite(e2) & (np.hypot(e1, e2) < 1)
        print(f"   {lp}: valid {ok.mean():.1%}; mean e1 {e1[ok].mean():+.3f}, e2 {e2[ok].mean():+.3f}")
        for lo, hi in ((0, 1), (1, 2), (2, np.inf)):
            s = ok & (size >= lo) & (size < hi)
            if s.any():
                print(
                    f"      size {lo}-{hi} px: n={s.sum():>4}  "
                    f"mean e1 {e1[s].mean():+.3f}  e2 {e2[s].mean():+.3f}"
                )


def noiseless_targets(bundle, n: int = 600) -> None:
    arch = bundle.card["architecture"]
    psf = float(arch["model_psf_fwhm"]) / float(arch["pixel_scale"])
    morph = np.stack([simulate_isolated(2, i, max_shift=0.5, noise=False).morphology[0, 2] for i in range(n)])
    s = batched_morphology_shape(jnp.asarray(morph, jnp.float32), psf, 40)
    e1, e2, size = (np.asarray(s[k]) for k in ("e1", "e2", "size"))
    ok = np.isfinite(e1) & np.isfinite(e2) & (np.hypot(e1, e2) < 1)
    print(f"3. noiseless isolated targets (seed 2, {n}): no valid shape for {1 - ok.mean():.1%}")
    for lo, hi in ((0, 1), (1, 2), (2, np.inf)):
        m = ok & (size >= lo) & (size < hi)
        print(f"      size {lo}-{hi} px: n={m.sum():>4}  mean e1 {e1[m].mean():+.3f}  e2 {e2[m].mean():+.3f}")


if __name__ == "__main__":
    bundle = load_bundle()
    response_by_snr(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/shear/blends-map-s5")
    prior_by_size(bundle)
    noiseless_targets(bundle)
