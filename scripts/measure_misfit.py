"""Measure a bundle's misfit: how far its best fits fall from held-out galaxies, per band and intensity.

Held-out isolated galaxies of the training population (``simulate_isolated(SEED, i)``,
r in ``--mag-range``, never seen in training: another seed) are fitted with MAP
at their true positions under the survey's noise alone (``model_error=0``).
The residual of the MAP model against the *noiseless* image is the model's
own error (the pixel noise is not in it). Per band, pixels are binned by the
model's intensity over the sky's noise; in each bin the mean squared
residual over the mean squared model is the squared fractional misfit
``alpha^2`` (:func:`bayesblend.misfit.fit_misfit`). The per-band ``alpha`` is
what the scene model adds to each pixel's variance, ``(alpha_b * model)^2``.

``--write`` records the result in the bundle's card (``misfit``) with this
command; otherwise it prints it. The fits take about 2 s per galaxy.

Run::

    .venv/bin/python scripts/measure_misfit.py --bundle models/lsst-v2 --n 300 --write
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

import numpy as np

SEED = 606  # held out: not the training seeds, not bench_pose's 505


def residuals(bundle, index: int, mag_range, min_snr: float) -> dict | None:
    """MAP model and noiseless image of held-out galaxy ``index`` per valid pixel, by band (None: faint)."""
    from bayesblend import deblend
    from bayesblend.simulate.scenes import simulate_isolated

    r = simulate_isolated(SEED, index, mag_range=mag_range, max_shift=0.5, psf_jitter=0.05)
    t = r.truth[0]
    if t["snr"] < min_snr:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        post = deblend(
            r.scene,
            sources=np.array([[t["x"], t["y"]]]),
            method="map",
            prior=bundle,
            seed=index,
            model_error=0.0,
            num_draws=1,
        )
    b = post.blends[0]
    model = post.model_image(0)
    x0, y0 = b.origin
    h, w = model.shape[-2:]
    ny, nx = r.noiseless.shape[-2:]
    truth = np.zeros_like(model)
    ya, yb, xa, xb = max(y0, 0), min(y0 + h, ny), max(x0, 0), min(x0 + w, nx)
    truth[:, ya - y0 : yb - y0, xa - x0 : xb - x0] = r.noiseless[:, ya:yb, xa:xb]
    valid = np.asarray(b.data["valid"])
    return {
        "model": [model[j][valid[j]] for j in range(len(model))],
        "truth": [truth[j][valid[j]] for j in range(len(model))],
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bundle", default=None)
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--mag-range", default="18,23.5")
    p.add_argument("--min-snr", type=float, default=20.0)
    p.add_argument("--write", action="store_true", help="record the misfit in the bundle's card")
    args = p.parse_args()
    import bayesblend
    from bayesblend.misfit import fit_misfit
    from bayesblend.prior.bundle import update_card
    from bayesblend.survey import get_survey

    bundle = bayesblend.load_prior(args.bundle)
    lo, hi = (float(v) for v in args.mag_range.split(","))
    bands = list(bundle.bands)
    sky = np.asarray(get_survey(bundle.survey).sky_level(bands), float)
    model = [[] for _ in bands]
    truth = [[] for _ in bands]
    used, t0 = 0, time.perf_counter()
    for i in range(args.n):
        r = residuals(bundle, i, (lo, hi), args.min_snr)
        if r is None:
            continue
        used += 1
        for j in range(len(bands)):
            model[j].append(r["model"][j])
            truth[j].append(r["truth"][j])
        if used % 25 == 0:
            print(f"{used} galaxies, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    model = [np.concatenate(m) for m in model]
    truth = [np.concatenate(t) for t in truth]
    result = fit_misfit(model, truth, sky, bands)
    result["measured_on"] = (
        f"{used} held-out isolated galaxies, simulate_isolated({SEED}, i), r {lo}-{hi}, "
        f"S/N >= {args.min_snr}, MAP under the survey's noise, residual against the noiseless image"
    )
    cmd = f"scripts/measure_misfit.py --bundle {args.bundle} --n {args.n} --mag-range {args.mag_range}"
    result["command"] = f"{cmd} --min-snr {args.min_snr}"
    print(json.dumps(result, indent=1))
    if args.write:
        update_card(bundle.path, "misfit", result)
        print(f"recorded in {bundle.path / 'card.json'}")


if __name__ == "__main__":
    main()
