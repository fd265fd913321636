"""Where the shear response goes: the diagnostics quoted in RESULTS.md "Shear bias".

    .venv/bin/python benchmarks/shear_diagnostics.py benchmarks/shear/blends-map-rc-s5

1. per-galaxy response (e(+g) - e(-g)) / 2g of the posterior medians, by true S/N, and the
   mean e2 at zero shear, from a shear-bias run directory;
2. the mean ellipticity of the latent prior pushed through the decoder, by PSF-corrected size
   (both latent priors, 8192 draws);
3. the fraction of noiseless isolated targets (held-out seed 2, 600 stamps) whose PSF-corrected
   moments give no valid shape (NaN or |e| >= 1), and the mean measured e by size;
4. the VAE's reconstructions of the same 600 galaxies brightened to S/N 100 (encoder mean,
   decoded): mean e2 and the slope of reconstructed on true e, by true size.

2-4 are measured twice: at the model PSF (the shape definition before reconvolution) and after
reconvolving to the survey PSF (:func:`bayesblend.measure.shape_setup`, the current one).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bayesblend.measure import ShapeSetup, derive_shapes, shape_setup
from bayesblend.prior.bundle import Networks, load_bundle
from bayesblend.shear_bias import _usable, load_items
from bayesblend.simulate.scenes import simulate_isolated

SIZE_BINS = ((0, 1), (1, 2), (2, np.inf))  # PSF-corrected size, pixels


def _valid(e1, e2):
    return np.isfinite(e1) & np.isfinite(e2) & (np.hypot(e1, e2) < 1)


def _setups(bundle) -> dict[str, ShapeSetup]:
    now = shape_setup(bundle)
    return {"model PSF": dataclasses.replace(now, shape_psf_fwhm=0.0), f'{now.shape_psf_fwhm_arcsec}"': now}


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
    u = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (8192, bundle.latent_dim)), np.float32)
    for name, setup in _setups(bundle).items():
        for lp in ("flow", "normal"):
            _, e1, e2, size = derive_shapes(Networks(bundle, lp), u, setup)
            ok = _valid(e1, e2)
            print(
                f"   {name}, {lp}: valid {ok.mean():.1%}; "
                f"mean e1 {e1[ok].mean():+.3f}, e2 {e2[ok].mean():+.3f}"
            )
            for lo, hi in SIZE_BINS:
                s = ok & (size >= lo) & (size < hi)
                if s.any():
                    print(
                        f"      size {lo}-{hi} px: n={s.sum():>4}  "
                        f"mean e1 {e1[s].mean():+.3f}  e2 {e2[s].mean():+.3f}"
                    )


def targets_and_reconstructions(bundle, n: int = 600) -> None:
    from bayesblend.prior.flow import brightened_observation

    sims = [simulate_isolated(2, i, max_shift=0.5, psf_jitter=0.05, noise=False) for i in range(n)]
    r = bundle.bands.index("r")
    morph = jnp.asarray(np.stack([t.morphology[0, r] for t in sims]), jnp.float32)
    clean = np.stack([t.noiseless for t in sims]).astype(np.float32)
    sky = np.stack([np.median(t.scene.variance, axis=(1, 2)) for t in sims]).astype(np.float32)
    normal = np.random.default_rng(0).standard_normal(clean.shape)
    noisy = brightened_observation(clean, sky, r, normal)
    mean, _ = bundle.encode(jnp.asarray(noisy), jnp.sqrt(jnp.asarray(sky[0])))
    recon = bundle.decode(mean)[:, r]
    for name, setup in _setups(bundle).items():
        t, d = setup.measure(morph), setup.measure(recon)
        t1, t2, ts, d1, d2 = (np.asarray(x) for x in (t["e1"], t["e2"], t["size"], d["e1"], d["e2"]))
        ok_t = _valid(t1, t2)
        ok = ok_t & _valid(d1, d2)
        print(
            f"3-4. {name}: noiseless isolated targets (seed 2, {n}): "
            f"no valid shape for {1 - ok_t.mean():.1%}; "
            f"reconstructions of the S/N-100 stamps: no valid shape for {1 - _valid(d1, d2).mean():.1%}"
        )
        for lo, hi in SIZE_BINS:
            m = ok & (ts >= lo) & (ts < hi)
            if m.sum() < 10:
                continue
            s1 = np.sum(d1[m] * t1[m]) / np.sum(t1[m] ** 2)
            s2 = np.sum(d2[m] * t2[m]) / np.sum(t2[m] ** 2)
            print(
                f"      size {lo}-{hi} px: n={m.sum():>4}  targets mean e2 {t2[m].mean():+.3f}  "
                f"reconstructions mean e2 {d2[m].mean():+.3f}, slope on truth e1 {s1:.2f} e2 {s2:.2f}"
            )


if __name__ == "__main__":
    bundle = load_bundle()
    response_by_snr(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/shear/blends-map-rc-s5")
    prior_by_size(bundle)
    targets_and_reconstructions(bundle)
