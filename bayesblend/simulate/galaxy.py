"""One simulated galaxy as GalSim profiles: its components, its band weights, its canonical image.

A population row (:func:`bayesblend.simulate.population.draw_catalog`)
describes a galaxy as up to three components sharing one centre: a Sersic
bulge (index ``bulge_n``, truncated at :data:`TRUNCATION` half-light radii when n > 1), an
exponential disk, and point-like star-forming knots (GalSim ``RandomKnots``,
distributed as the disk's light). The scene renderer shears and lenses these
round profiles and convolves them with each band's PSF; the canonical image is
the same galaxy left round, dilated to the canonical half-light radius and
drawn PSF-free (:mod:`bayesblend.canonical`): the training target of the
galaxy model's VAE, which learns everything but the pose.
"""

from __future__ import annotations

import functools

import galsim
import numpy as np
from scipy.special import gammainc, gammaincinv

from bayesblend.canonical import DEFAULT_FRAME, CanonicalFrame

#: Truncation radius of Sersic components, in units of their half-light radius.
TRUNCATION = 8.0
#: Sersic indices up to this one are not truncated: they hold less than 3e-5 of their light
#: beyond TRUNCATION, and GalSim's truncated-Sersic solver fails for some n < 1.
TRUNCATE_ABOVE_N = 1.0
#: GalSim settings for drawing the profiles (room for large FFTs of compact bulges).
GSPARAMS = galsim.GSParams(maximum_fft_size=8192)


@functools.lru_cache(maxsize=4096)
def _sersic_b(n: float, trunc: bool) -> float:
    """``b`` of ``I(r) ~ exp(-b (r / hlr)^(1/n))`` such that ``hlr`` is the (truncated) profile's."""
    b0 = float(gammaincinv(2 * n, 0.5))
    if not trunc:
        return b0
    lo, hi = 0.01 * b0, b0  # truncation lowers b at a fixed half-light radius
    tn = TRUNCATION ** (1.0 / n)
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if gammainc(2 * n, mid) < 0.5 * gammainc(2 * n, mid * tn):
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def enclosed_fraction(x: np.ndarray, n: np.ndarray | float, trunc: bool = True) -> np.ndarray:
    """Fraction of a round Sersic profile's light within ``x`` half-light radii.

    Parameters
    ----------
    x : array
        Radius over the half-light radius.
    n : array or float
        Sersic index (1 is the exponential disk).
    trunc : bool
        Truncated at :data:`TRUNCATION` half-light radii (GalSim's
        ``Sersic(..., trunc=...)`` with the half-light radius of the truncated
        profile) where ``n > TRUNCATE_ABOVE_N``, as the simulator draws
        bulges; False for disks.
    """
    x = np.asarray(x, dtype=float)
    n = np.broadcast_to(np.asarray(n, dtype=float), x.shape)
    out = np.empty(x.shape)
    for value in np.unique(n):
        sel = n == value
        cut = trunc and value > TRUNCATE_ABOVE_N
        b = _sersic_b(float(value), cut)
        frac = gammainc(2 * value, b * x[sel] ** (1.0 / value))
        if cut:
            frac = np.minimum(frac / gammainc(2 * value, b * TRUNCATION ** (1.0 / value)), 1.0)
        out[sel] = frac
    return out


def circularised_hlr(
    bulge_frac: np.ndarray,
    bulge_hlr: np.ndarray,
    disk_hlr: np.ndarray,
    bulge_n: np.ndarray | float = 4.0,
) -> np.ndarray:
    """Half-light radius (arcsec) of bulge + disk, solved from their enclosed-flux laws.

    The bulge is a Sersic profile of index ``bulge_n`` truncated at
    :data:`bayesblend.simulate.galaxy.TRUNCATION` half-light radii, the disk an
    exponential; knots follow the disk's light, so they count as disk. Exact
    for the unsheared profiles (shear preserves area, so this is the
    geometric-mean radius ``sqrt(a b)``).
    """
    bt = np.asarray(bulge_frac, dtype=float)
    rb, rd = np.asarray(bulge_hlr, dtype=float), np.asarray(disk_hlr, dtype=float)
    nb = np.broadcast_to(np.asarray(bulge_n, dtype=float), bt.shape)
    lo = np.minimum(rb, rd) * 0.5
    hi = np.maximum(rb, rd) * 2.0
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        frac = bt * enclosed_fraction(mid / rb, nb) + (1 - bt) * enclosed_fraction(mid / rd, 1.0, trunc=False)
        lo, hi = np.where(frac < 0.5, mid, lo), np.where(frac < 0.5, hi, mid)
    return 0.5 * (lo + hi)


def _get(row, name: str, default):
    return row[name] if name in row.colnames else default


def components(row) -> dict[str, galsim.GSObject]:
    """The galaxy's round, unit-flux components: ``bulge``, ``disk`` and ``knots`` where present.

    Rows without the v2 columns (``bulge_n``, ``knot_frac``...) get a de
    Vaucouleurs bulge and no knots.
    """
    bt = float(row["bulge_frac"])
    out: dict[str, galsim.GSObject] = {}
    if bt > 0:
        hlr = float(row["bulge_hlr"])
        n = float(_get(row, "bulge_n", 4.0))
        trunc = TRUNCATION * hlr if n > TRUNCATE_ABOVE_N else 0.0
        out["bulge"] = galsim.Sersic(n=n, half_light_radius=hlr, trunc=trunc, gsparams=GSPARAMS)
    if bt < 1:
        disk = galsim.Exponential(half_light_radius=float(row["disk_hlr"]), gsparams=GSPARAMS)
        out["disk"] = disk
        n_knots = int(_get(row, "n_knots", 0))
        if float(_get(row, "knot_frac", 0.0)) > 0 and n_knots > 0:
            rng = galsim.BaseDeviate(int(_get(row, "knot_seed", 1)))
            out["knots"] = galsim.RandomKnots(n_knots, profile=disk, rng=rng, gsparams=GSPARAMS)
    return out


def weights(row, bulge_frac: np.ndarray) -> dict[str, np.ndarray]:
    """Flux fraction of each component per band, given the band's bulge-to-total ratios ``(band,)``."""
    bt = np.asarray(bulge_frac, dtype=float)
    kf = float(_get(row, "knot_frac", 0.0)) if int(_get(row, "n_knots", 0)) > 0 else 0.0
    return {"bulge": bt, "disk": (1.0 - bt) * (1.0 - kf), "knots": (1.0 - bt) * kf}


def reference_hlr(row, bulge_frac_ref: float) -> float:
    """Half-light radius (arcsec) of the round galaxy in the reference band, knots counted as disk."""
    hlr = circularised_hlr(
        np.array([bulge_frac_ref]),
        np.array([float(row["bulge_hlr"])]),
        np.array([float(row["disk_hlr"])]),
        float(_get(row, "bulge_n", 4.0)),
    )
    return float(hlr[0])


#: Sub-samples per canonical pixel side for the profile's pixel integral.
SUBSAMPLE = 5
#: Side of the central block integrated exactly over each pixel (the cusps of Sersic cores).
CORE_PIXELS = 8


def _pixel_integrated(profile: galsim.GSObject, size: int) -> np.ndarray:
    """A smooth round profile integrated over unit pixels of a ``size``-grid centred at ``(size-1)/2``.

    GalSim's FFT drawing of a truncated n ~ 4 Sersic at this sampling needs
    an FFT of 80000^2 (its cusp has no useful maxk), and real-space
    integration of the whole grid costs 50 ms per component; so the grid is
    the mean of 5 x 5 point samples per pixel (errors of 1.7-7 % of the peak
    at the core of n = 4-5 profiles, 1e-3 for exponentials), with the central
    8 x 8 pixels integrated exactly (``method="real_space"``).
    """
    sub = profile.drawImage(
        nx=size * SUBSAMPLE, ny=size * SUBSAMPLE, scale=1.0 / SUBSAMPLE, method="no_pixel"
    )
    out = sub.array.reshape(size, SUBSAMPLE, size, SUBSAMPLE).sum(axis=(1, 3)).astype(np.float64)
    full = galsim.ImageD(size, size, scale=1.0)
    lo = size // 2 - CORE_PIXELS // 2
    core = full[galsim.BoundsI(lo + 1, lo + CORE_PIXELS, lo + 1, lo + CORE_PIXELS)]
    profile.drawImage(image=core, method="real_space", center=full.true_center)
    out[lo : lo + CORE_PIXELS, lo : lo + CORE_PIXELS] = core.array
    return out


def _deposit_points(points: np.ndarray, size: int) -> np.ndarray:
    """Unit total flux of point sources at ``points`` (canonical pixels from the centre), cloud-in-cell."""
    out = np.zeros((size, size))
    pos = points + (size - 1) / 2.0
    i0 = np.floor(pos).astype(int)
    f = pos - i0
    for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
        w = (f[:, 0] if dx else 1 - f[:, 0]) * (f[:, 1] if dy else 1 - f[:, 1])
        x, y = i0[:, 0] + dx, i0[:, 1] + dy
        ok = (x >= 0) & (x < size) & (y >= 0) & (y < size)
        np.add.at(out, (y[ok], x[ok]), w[ok] / len(points))
    return out


def canonical_image(
    row, bulge_frac: np.ndarray, hlr: float, frame: CanonicalFrame = DEFAULT_FRAME
) -> np.ndarray:
    """The galaxy's canonical morphology, ``(band, size, size)`` float32, unit sum per band.

    Parameters
    ----------
    row : astropy.table.Row
        Population row.
    bulge_frac : numpy.ndarray
        ``(band,)`` bulge-to-total flux ratio per band.
    hlr : float
        The galaxy's half-light radius in the reference band, arcsec
        (:func:`circularised_hlr`): it becomes ``frame.hlr_pixels``.
    frame : CanonicalFrame
        The canonical grid.

    Notes
    -----
    The bulge and the disk are integrated over each canonical pixel
    (:func:`_pixel_integrated`), which keeps compact cusps from aliasing;
    each knot's light is shared between its four nearest pixels
    (cloud-in-cell), a blur of one canonical pixel that the PSF of any
    galaxy smaller than about 1" dwarfs. The renderer then reads the samples
    as a quintic-interpolated profile, as a GalSim ``InterpolatedImage`` would.
    Light beyond the grid (``frame.extent`` half-light radii) is dropped
    before normalising.
    """
    w = weights(row, bulge_frac)
    scale = frame.hlr_pixels / hlr
    unit = {}
    for kind, comp in components(row).items():
        if kind == "knots":
            unit[kind] = _deposit_points(np.asarray(comp.points) * scale, frame.size)
        else:
            unit[kind] = _pixel_integrated(comp.dilate(scale).withFlux(1.0), frame.size)
    out = np.zeros((len(bulge_frac), frame.size, frame.size))
    for k, img in unit.items():
        out += w[k][:, None, None] * img[None]
    out = np.clip(out, 0.0, None)
    out /= np.maximum(out.sum(axis=(1, 2), keepdims=True), 1e-30)
    return out.astype(np.float32)
