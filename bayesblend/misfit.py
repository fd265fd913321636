"""The galaxy model's misfit: a per-band fractional error added to each pixel's variance.

No decoder reproduces a real galaxy exactly. Where its best fit misses the
galaxy by more than the noise (the cores of bright galaxies), a likelihood
of the survey's noise alone is too sure of itself: intervals too narrow,
and the neighbours' fluxes pulled to soak up the residual. The scene model
therefore adds ``(alpha_b * intensity)^2`` to every pixel's variance in band
``b`` (:func:`bayesblend.model.pixel_variance`), with ``alpha_b`` the
bundle's measured fractional misfit (the card's ``misfit``, measured by
``scripts/measure_misfit.py`` on held-out galaxies: :func:`fit_misfit`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: Columns of the per-band bin rows of :func:`fit_misfit`.
BIN_COLUMNS = ("lo", "hi", "pixels", "alpha", "gamma")
#: Bin edges of the model's intensity over the sky's noise, per pixel.
SNR_EDGES = (3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, np.inf)


def fit_misfit(
    model: Sequence[np.ndarray], truth: Sequence[np.ndarray], sky: np.ndarray, bands: Sequence[str]
) -> dict:
    """Fractional misfit per band from best-fit models against noiseless truths.

    Parameters
    ----------
    model, truth : sequence of numpy.ndarray
        Per band, the fitted model and the noiseless true image at the same
        pixels (flattened over galaxies), electrons.
    sky : numpy.ndarray
        ``(band,)`` sky level per pixel, electrons (its square root is the
        noise the intensity bins are in units of).
    bands : sequence of str

    Returns
    -------
    dict
        ``alpha``: per band, ``sqrt(sum(r^2) / sum(m^2))`` over pixels
        brighter than 3 sky sigma (dimensionless; r = truth - model), the
        scene model's term; ``gamma``: the same residual over the survey's
        noise, ``sqrt(sum(r^2) / sum(sky + m))``; ``bins``: per band, rows
        of :data:`BIN_COLUMNS` in the intensity bins :data:`SNR_EDGES` (sky
        sigma); ``form``: the variance term alpha enters.
    """
    if not (len(model) == len(truth) == len(bands) == len(sky)):
        raise ValueError("model, truth, sky and bands need one entry per band")
    alpha, gamma, bins = {}, {}, {}
    for b, m, t, s in zip(bands, model, truth, np.asarray(sky, float), strict=True):
        m, t = np.asarray(m, float), np.asarray(t, float)
        level = m / np.sqrt(s)
        r2 = (t - m) ** 2
        noise = s + np.maximum(m, 0.0)  # the survey's variance of each pixel
        bright = level > SNR_EDGES[0]
        alpha[b] = float(np.sqrt(r2[bright].sum() / max((m[bright] ** 2).sum(), 1e-30)))
        gamma[b] = float(np.sqrt(r2[bright].sum() / max(noise[bright].sum(), 1e-30)))
        rows = []
        for lo, hi in zip(SNR_EDGES[:-1], SNR_EDGES[1:], strict=True):
            sel = (level > lo) & (level <= hi)
            if sel.sum():
                a = float(np.sqrt(r2[sel].sum() / (m[sel] ** 2).sum()))
                rows.append([lo, hi, int(sel.sum()), a, float(np.sqrt(r2[sel].sum() / noise[sel].sum()))])
        bins[b] = rows
    return {
        "alpha": alpha,
        "gamma": gamma,
        "bins": bins,
        "bin_columns": list(BIN_COLUMNS),
        "form": "variance += (alpha_b * intensity)^2 per pixel",
    }
