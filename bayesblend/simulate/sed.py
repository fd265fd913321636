"""Colours of galaxy components from GalSim's CWW templates through survey bandpasses.

Each bulge and disk carries a Coleman, Wu & Weedman (1980) template, as
extended by Bolzonella et al. (2000) and shipped with GalSim
(``CWW_{E,Sbc,Scd,Im}_ext.sed``), redshifted and integrated through the
survey's bandpasses (GalSim's LSST curves; top-hats for Euclid, see
:mod:`bayesblend.survey`). Colours relative to the r band (or the survey's
reference band) are tabulated once on a redshift grid and interpolated; the
integral is vectorised over redshift with numpy because calling GalSim's
``calculateMagnitude`` per galaxy would dominate the simulation time.
"""

from __future__ import annotations

import functools

import galsim
import numpy as np

from bayesblend.survey import Survey, get_survey

#: Template names, in the order used for integer SED codes in truth tables.
TEMPLATES = ("E", "Sbc", "Scd", "Im")
Z_GRID = np.linspace(0.0, 4.0, 161)


@functools.cache
def _template(name: str) -> galsim.SED:
    return galsim.SED(f"CWW_{name}_ext.sed", wave_type="Ang", flux_type="flambda")


#: The population's magnitudes are defined in this band (LSST r, as in the paper's cut).
REFERENCE = ("lsst", "r")


@functools.cache
def magnitude_table(survey: Survey) -> np.ndarray:
    """AB magnitudes of each template (arbitrary common normalisation) per band.

    The normalisation is the same for a template in every survey, so that
    differences between surveys' tables are true colours.

    Returns
    -------
    numpy.ndarray
        Shape ``(template, z, band)``, AB mag, on :data:`Z_GRID`.
    """
    out = np.zeros((len(TEMPLATES), Z_GRID.size, len(survey.bands)))
    for t, name in enumerate(TEMPLATES):
        sed = _template(name)
        mags = []
        for band in survey.band_names:
            bp = survey.bandpass(band)
            wave = np.linspace(bp.blue_limit, bp.red_limit, 400)  # nm
            thr = bp(wave)
            # photons/nm at observed wavelength: rest-frame density at wave/(1+z);
            # redshift dimming is a common factor that cancels in colours.
            rest = wave[None, :] / (1.0 + Z_GRID[:, None])
            lo, hi = sed.blue_limit, sed.red_limit
            dens = np.where((rest >= lo) & (rest <= hi), sed(np.clip(rest, lo, hi)), 0.0)
            photons = np.trapezoid(dens * thr[None, :], wave, axis=1)
            mags.append(-2.5 * np.log10(np.maximum(photons, 1e-300)) + bp.zeropoint)
        out[t] = np.stack(mags, axis=1)
    return out


def colours(survey: Survey, template: np.ndarray, redshift: np.ndarray) -> np.ndarray:
    """Colours ``m_b - m_r(LSST)`` for integer template codes at given redshifts.

    Parameters
    ----------
    survey : Survey
    template : numpy.ndarray of int
        Index into :data:`TEMPLATES`, shape ``(n,)``.
    redshift : numpy.ndarray
        Shape ``(n,)``, in [0, 4].

    Returns
    -------
    numpy.ndarray
        ``(n, band)`` AB colours.
    """
    ref_survey = get_survey(REFERENCE[0])
    ref = magnitude_table(ref_survey)[..., ref_survey.band_index(REFERENCE[1])]
    table = magnitude_table(survey) - ref[..., None]
    zi = np.clip(np.asarray(redshift, dtype=float), Z_GRID[0], Z_GRID[-1])
    pos = np.interp(zi, Z_GRID, np.arange(Z_GRID.size))
    i0 = np.clip(np.floor(pos).astype(int), 0, Z_GRID.size - 2)
    w = (pos - i0)[:, None]
    t = np.asarray(template, dtype=int)
    return (1 - w) * table[t, i0] + w * table[t, i0 + 1]
