"""The posterior catalogue: its columns, units, flags and header.

One row per source (README "File formats"). Central values are posterior medians,
``_std`` columns posterior standard deviations and ``_p16``/``_p84`` the
central 68 % interval. Ellipticities are shear-type, ``g = (a - b)/(a + b)``,
with +e2 along +45 degrees counter-clockwise from +x (GalSim's ``g1, g2``):
the posterior of the scene model's ellipticity parameter, the galaxy's
intrinsic (pre-PSF) shape. ``size`` is the posterior of its half-light radius
(arcsec, in the band of header keyword ``SHAPEBND``, the band the canonical
morphology's size is defined in); ``resolution`` compares it with the survey
PSF of FWHM ``SHAPEPSF`` (arcsec) in that band (:func:`bayesblend.measure.resolution`,
with the half-light radius turned into the sigma of a Gaussian of the same
half-light radius). Convergence columns (``r_hat_max``,
``ess_bulk_min``, over every band's flux, e1, e2 and size) are filled for
NUTS only (NaN otherwise): the other methods
give independent draws from an approximation, which those statistics do not
test.
"""

from __future__ import annotations

from collections.abc import Sequence

import astropy.units as u
import numpy as np
from astropy.table import Table
from scipy.ndimage import minimum_filter

#: Flag bits of the ``flags`` column.
FLAGS = {
    "EDGE": 1,  # detected centre within 3 pixels of the scene edge (light lost off the image)
    "MASKED_CENTRE": 2,  # a masked or non-finite pixel within 2 pixels of the centre, in some band
    "SPLIT_BLEND": 4,  # the source's linked group exceeded the largest padded size and was split
    "NOT_CONVERGED": 8,  # NUTS: r_hat_max > 1.05
    "LOW_ESS": 16,  # NUTS: ess_bulk_min < 100
    "DIVERGENT": 32,  # NUTS: divergent transitions in the source's blend
    "LOW_SNR": 64,  # posterior flux_r median / std < 5
    "MOVED": 128,  # fitted centre more than 2 pixels from the detection
    "UNRESOLVED": 256,  # resolution factor < 0.3: the shape is mostly the prior's (no shear use)
    "BLENDED": 512,  # blendedness > 0.9: a neighbour's light dominates the source's pixels
}
#: Thresholds behind the flags.
R_HAT_MAX = 1.05
ESS_MIN = 100.0
SNR_MIN = 5.0
MOVED_PIXELS = 2.0
EDGE_PIXELS = 3.0
#: Above it a source's fitted flux is often a neighbour's residual: on 200 held-out blends (MAP,
#: benchmarks/RESULTS.md) 17 of the 27 galaxies with true blendedness > 0.9 were off by more than 100 %.
BLENDEDNESS_MAX = 0.9
#: The HSC first-year shear catalogue's cut (Mandelbaum et al. 2018, PASJ 70, S25).
RESOLUTION_MIN = 0.3

#: Header keywords of the scene-model settings that change fitted shapes
#: (:meth:`bayesblend.settings.InferenceConfig.scene_model_settings`).
SCENE_HEADER = {"flux_prior": "FLUXPRIR", "model_error": "MODELERR"}

ELLIPTICITY_CONVENTION = "shear-type g=(a-b)/(a+b); +e2 along +45 deg CCW from +x (GalSim g1,g2)"
#: The e2 sign convention, written to every catalogue header (``E2SIGN``).
E2SIGN = "+e2 along +45 deg counter-clockwise from +x"


def columns(bands: Sequence[str]) -> list[tuple[str, type, u.UnitBase | None, str]]:
    """``(name, dtype, unit, description)`` of every catalogue column, in order."""
    cols: list[tuple[str, type, u.UnitBase | None, str]] = [
        ("id", np.int64, None, "source id, unique in the catalogue"),
        ("blend_id", np.int64, None, "id of the blend the source was fitted in"),
        ("scene", np.int64, None, "index of the scene (input order)"),
        ("file", str, None, "the scene's file name (empty for a scene built in Python)"),
        ("x", np.float64, u.pix, "posterior median x, 0-based, centre of first pixel at 0"),
        ("y", np.float64, u.pix, "posterior median y"),
        ("x_det", np.float64, u.pix, "detected (prior) x"),
        ("y_det", np.float64, u.pix, "detected (prior) y"),
        ("ra", np.float64, u.deg, "right ascension (NaN without a WCS)"),
        ("dec", np.float64, u.deg, "declination (NaN without a WCS)"),
    ]
    # Fluxes are electrons over the full exposure (README "File formats"); the FITS standard has no
    # "electron" unit for table columns, so they carry its "ct" (counts).
    for b in bands:
        cols += [
            (f"flux_{b}", np.float64, u.ct, f"posterior median flux in {b}"),
            (f"flux_{b}_std", np.float64, u.ct, f"posterior std of flux in {b}"),
            (f"flux_{b}_p16", np.float64, u.ct, f"16th percentile of flux in {b}"),
            (f"flux_{b}_p84", np.float64, u.ct, f"84th percentile of flux in {b}"),
            (f"mag_{b}", np.float64, u.mag, f"posterior median AB magnitude in {b}"),
            (f"mag_{b}_std", np.float64, u.mag, f"posterior std of the magnitude in {b}"),
        ]
    cols += [
        ("e1", np.float64, None, "posterior median shear-type ellipticity e1"),
        ("e2", np.float64, None, "posterior median shear-type ellipticity e2"),
        ("e1_std", np.float64, None, "posterior std of e1"),
        ("e2_std", np.float64, None, "posterior std of e2"),
        ("e1_e2_cov", np.float64, None, "posterior covariance of e1 and e2"),
        ("size", np.float64, u.arcsec, "posterior median half-light radius (intrinsic, before the PSF)"),
        ("size_std", np.float64, u.arcsec, "posterior std of size"),
        ("resolution", np.float64, None, "s^2/(s^2+sigma^2), s = size/1.1774, sigma of SHAPEPSF"),
        ("blendedness", np.float64, None, "1 - <I,I>/<I,I_total> of the fitted model, shape band"),
        ("r_hat_max", np.float64, None, "largest split r-hat over the flux per band, e1, e2 and size (NUTS)"),
        ("ess_bulk_min", np.float64, None, "smallest bulk ESS over the flux per band, e1, e2, size (NUTS)"),
        ("n_divergent", np.int64, None, "divergent transitions in the source's blend (NUTS)"),
        ("flags", np.int64, None, "bitmask: header keyword FLAG_<bit> names each bit"),
    ]
    return cols


def make_table(values: dict[str, np.ndarray], bands: Sequence[str], meta: dict) -> Table:
    """A catalogue with every column of :func:`columns` (missing values: NaN/0) and ``meta``.

    ``values`` maps column names to arrays of one length (possibly zero).
    """
    n = len(next(iter(values.values()))) if values else 0
    t = Table()
    for name, dtype, unit, desc in columns(bands):
        fill = "" if dtype is str else np.nan if np.issubdtype(dtype, np.floating) else 0
        col = np.asarray(values.get(name, np.full(n, fill)), dtype=dtype)
        if col.shape != (n,):
            raise ValueError(f"catalogue column {name} has shape {col.shape}, expected ({n},)")
        t[name] = col
        t[name].description = desc
        if unit is not None:
            t[name].unit = unit
    t.meta.update(header(bands, meta))
    return t


def header(bands: Sequence[str], meta: dict) -> dict:
    """FITS-ready header keywords: provenance, conventions and the flag bits."""
    h = {
        "BANDS": ",".join(bands),
        "ELLCONV": ELLIPTICITY_CONVENTION,
        "E2SIGN": E2SIGN,
        "SIZEDEF": "half-light radius of the intrinsic (pre-PSF) profile, arcsec",
        "MAGSYS": "AB, mag = MAGZERO - 2.5 log10(flux)",
    }
    for name, bit in FLAGS.items():
        h[f"FLAG_{bit}"] = name
    h.update({k: v for k, v in meta.items()})
    return h


def empty(bands: Sequence[str], meta: dict) -> Table:
    """A catalogue with no rows and the full schema (no sources were found)."""
    return make_table({}, bands, meta)


# ------------------------------------------------------------------ the flag policy


def near_edge(x: np.ndarray, y: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Whether each position (scene pixels, 0-based) is within :data:`EDGE_PIXELS` of the scene's edge.

    ``shape`` is the scene's ``(ny, nx)``; the input of flag ``EDGE``.
    """
    ny, nx = shape
    x, y, e = np.asarray(x, float), np.asarray(y, float), EDGE_PIXELS
    return (x < e) | (y < e) | (x > nx - 1 - e) | (y > ny - 1 - e)


def masked_centre(valid: np.ndarray, x: np.ndarray, y: np.ndarray, half: int = 2) -> np.ndarray:
    """Whether any band has a masked pixel within ``half`` pixels of each position (or it is outside).

    ``valid`` ``(band, y, x)`` bool; ``x``, ``y`` ``(source,)`` pixels. The
    ``(2 half + 1)``-square minimum filter of the all-band valid map, read at
    the rounded positions: the input of flag ``MASKED_CENTRE``.
    """
    ok = minimum_filter(valid.all(axis=0), size=2 * half + 1, mode="constant", cval=True)
    xi = np.rint(np.asarray(x, float)).astype(int)
    yi = np.rint(np.asarray(y, float)).astype(int)
    inside = (xi >= 0) & (yi >= 0) & (xi < ok.shape[1]) & (yi < ok.shape[0])
    return ~inside | ~ok[np.clip(yi, 0, ok.shape[0] - 1), np.clip(xi, 0, ok.shape[1] - 1)]


def flag_sources(values: dict[str, np.ndarray], sources: Table, shape_band: str) -> np.ndarray:
    """The ``flags`` column (bits of :data:`FLAGS`) from a catalogue's summary values.

    Parameters
    ----------
    values : dict of numpy.ndarray
        Per-source columns of :func:`columns`: ``x``, ``y``, ``x_det``,
        ``y_det`` (pixels), ``flux_{shape_band}`` and its ``_std``
        (electrons), ``resolution``, ``blendedness``, ``r_hat_max``,
        ``ess_bulk_min`` (NaN when not NUTS) and ``n_divergent``.
    sources : astropy.table.Table
        The Posterior's source table: boolean ``edge``, ``masked`` and ``split``.
    shape_band : str
        The band whose S/N sets ``LOW_SNR``.

    Returns
    -------
    numpy.ndarray
        ``(source,)`` int64 bit mask.
    """
    flags = np.zeros(len(sources), np.int64)

    def flag(name: str, where: np.ndarray) -> None:
        nonlocal flags
        flags |= np.where(np.asarray(where, bool), FLAGS[name], 0)

    flag("EDGE", sources["edge"])
    flag("MASKED_CENTRE", sources["masked"])
    flag("SPLIT_BLEND", sources["split"])
    flag("NOT_CONVERGED", values["r_hat_max"] > R_HAT_MAX)
    flag("LOW_ESS", values["ess_bulk_min"] < ESS_MIN)
    flag("DIVERGENT", values["n_divergent"] > 0)
    snr = values[f"flux_{shape_band}"] / np.maximum(values[f"flux_{shape_band}_std"], 1e-30)
    flag("LOW_SNR", snr < SNR_MIN)
    flag("MOVED", np.hypot(values["x"] - values["x_det"], values["y"] - values["y_det"]) > MOVED_PIXELS)
    flag("UNRESOLVED", ~(values["resolution"] >= RESOLUTION_MIN))
    flag("BLENDED", values["blendedness"] > BLENDEDNESS_MAX)
    return flags
