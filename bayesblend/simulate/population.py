"""A CatSim-like galaxy population, drawn offline.

Each galaxy is a de Vaucouleurs bulge plus an exponential disk sharing one
centre, orientation and intrinsic shear-type ellipticity, each with its own
SED, so that the bulge-to-total ratio and hence the morphology change with
band (a colour gradient). Magnitudes are AB in LSST r (the paper's cut at
r < 27.5); other bands follow from the SEDs (:mod:`bayesblend.simulate.sed`).

Distributions and their sources
-------------------------------
- Number counts: LSST Science Book (LSST Science Collaboration 2009, eq. 3.7),
  ``N(<i) = 46 x 10^{0.31 (i - 25)}`` galaxies/arcmin^2, applied to r with an
  assumed typical ``r - i = 0.4``; magnitudes follow ``dN/dm`` between
  ``mag_min`` and ``mag_max``.
- Redshift given magnitude: LSST Science Book eq. 3.8,
  ``p(z) ~ z^2 exp(-z / z0)`` with ``z0 = 0.0417 i - 0.744`` (floored at 0.05
  for bright galaxies, where the fit is not valid), truncated to z < 4.
- Disk size given magnitude: CFHTLenS / lensfit prior, Miller et al. 2013
  (MNRAS 429, 2858, sect. 3.2): median scale length
  ``ln(r_d / arcsec) = -1.145 - 0.269 (i - 23)`` and
  ``p(r) ~ r exp(-(r / a)^{4/3})``; half-light radius ``1.678 r_d``.
- Bulge size: a fraction U(0.3, 0.7) of the disk half-light radius (bulges
  are more compact than their disks, as in CatSim); pure bulges take 0.6.
- Bulge-to-total flux in r: 30 % pure disks, 10 % pure bulges, 60 % with
  B/T ~ Beta(1.5, 3), so most galaxies are disk-dominated as in the SDSS
  bulge+disk decompositions of Simard et al. 2011 (ApJS 196, 11).
- Intrinsic ellipticity: ``p(|e|) ~ |e| (1 - |e|^2)^2 exp(-|e|^2 / 2 s^2)``
  (Bernstein & Armstrong 2014, MNRAS 438, 1880), with ``s`` solved so that
  the per-component dispersion is ``sigma_e = 0.26`` (the value used by
  LSST DESC forecasts); uniform orientation.
- SEDs: bulges take the CWW elliptical template; disks take Sbc, Scd or Im
  with probabilities 0.45, 0.40, 0.15.
- Bulge profile: a Sersic index spread instead of de Vaucouleurs alone, so the
  prior learns profile shape: bulges of two-component galaxies take
  n ~ U(1, 4), spanning pseudo-bulges (n < 2) to classical bulges (n ~ 4) as
  in the bulge-disk decompositions of Fisher & Drory (2008, AJ 136, 773); pure
  bulges (ellipticals) n ~ U(2.5, 5), around de Vaucouleurs with the spread of
  the Sersic fits of Caon, Capaccioli & D'Onofrio (1993, MNRAS 265, 1013).
  Every Sersic component is truncated at 8 of its half-light radii
  (:data:`bayesblend.simulate.galaxy.TRUNCATION`).
- Star-forming knots: disks with the star-forming templates (Scd, Im) carry
  GalSim ``RandomKnots`` with probability 0.5: 5-30 point-like knots
  distributed as the disk's own light, holding a fraction U(0.1, 0.3) of the
  disk's flux. Knots as a component of star-forming disks that shares the
  disk's size and takes part of its light follow the cosmoDC2 extragalactic
  catalogue (Korytov et al. 2019, ApJS 245, 26); the numbers here are this
  project's choice, made so that a visible minority of galaxies is
  irregular and the flux in knots stays a minor part of a disk's, and not a
  measurement.

``draw_catalog(family="sersic")`` draws instead a single-Sersic population
(n ~ U(0.5, 4), the disk size prior, any of the four templates, no knots):
a family the prior is not trained on, for out-of-distribution tests.
"""

from __future__ import annotations

import functools

import numpy as np
from astropy.table import Table

from bayesblend.ellipticity import prior_log_density
from bayesblend.errors import BayesblendError
from bayesblend.simulate.sed import TEMPLATES, colours
from bayesblend.survey import Survey

COUNTS_SLOPE = 0.31
COUNTS_NORM = 46.0  # galaxies / arcmin^2 brighter than i = 25
R_MINUS_I = 0.4
SIGMA_E = 0.26
MAG_MAX = 27.5
MAG_MIN = 18.0
HLR_MIN, HLR_MAX = 0.05, 3.0  # arcsec
DISK_TEMPLATE_P = {"Sbc": 0.45, "Scd": 0.40, "Im": 0.15}


def number_density(mag_max: float = MAG_MAX, mag_min: float = MAG_MIN) -> float:
    """Galaxies per arcmin^2 with ``mag_min < r < mag_max`` (LSST Science Book eq. 3.7)."""

    def n_lt(m: float) -> float:
        return COUNTS_NORM * 10 ** (COUNTS_SLOPE * (m - R_MINUS_I - 25.0))

    return n_lt(mag_max) - n_lt(mag_min)


def draw_magnitudes(rng: np.random.Generator, n: int, mag_min: float, mag_max: float) -> np.ndarray:
    """r-band AB magnitudes from ``dN/dm ~ 10^{0.31 m}`` by inverse transform."""
    if not mag_min < mag_max:
        raise BayesblendError(f"need mag_min < mag_max, got {mag_min} and {mag_max}")
    k = COUNTS_SLOPE * np.log(10.0)
    a, b = np.exp(k * mag_min), np.exp(k * mag_max)
    return np.log(a + rng.uniform(size=n) * (b - a)) / k


def draw_redshifts(rng: np.random.Generator, mag_i: np.ndarray) -> np.ndarray:
    """Redshifts from ``p(z | i) ~ z^2 exp(-z/z0)``: a Gamma(3, z0) truncated at z < 4."""
    z0 = np.maximum(0.0417 * mag_i - 0.744, 0.05)
    z = rng.gamma(3.0, z0)
    bad = z >= 3.99
    while np.any(bad):
        z[bad] = rng.gamma(3.0, z0[bad])
        bad = z >= 3.99
    return z


def draw_disk_hlr(rng: np.random.Generator, mag_i: np.ndarray) -> np.ndarray:
    """Disk half-light radii (arcsec) from the Miller et al. (2013) size prior.

    With ``u = (r/a)^{4/3}``, ``p(r) ~ r exp(-(r/a)^{4/3})`` becomes
    ``u ~ Gamma(1.5)``; ``a`` is set so the median equals the relation.
    """
    rd_median = np.exp(-1.145 - 0.269 * (mag_i - 23.0))
    alpha = 4.0 / 3.0
    u_median = 1.1829869  # median of Gamma(1.5, 1)
    a = rd_median / u_median ** (1.0 / alpha)
    rd = a * rng.gamma(1.5, 1.0, size=mag_i.shape) ** (1.0 / alpha)
    return np.clip(1.678 * rd, HLR_MIN, HLR_MAX)


@functools.lru_cache(maxsize=1)
def ellipticity_scale(sigma_e: float = SIGMA_E) -> float:
    """The ``s`` of the Bernstein & Armstrong form giving per-component dispersion ``sigma_e``."""
    e = np.linspace(0.0, 1.0, 20001)[1:-1]

    def comp_sigma(s: float) -> float:
        # |e| density: the prior per unit area times the ring's circumference
        p = e * np.exp(np.asarray(prior_log_density(np.stack([e, 0 * e], -1), s)))
        return float(np.sqrt(np.trapezoid(p * e**2, e) / np.trapezoid(p, e) / 2.0))

    lo, hi = 0.01, 5.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if comp_sigma(mid) < sigma_e else (lo, mid)
    return 0.5 * (lo + hi)


def draw_ellipticities(rng: np.random.Generator, n: int, sigma_e: float = SIGMA_E) -> np.ndarray:
    """Intrinsic shear-type ellipticities ``(n, 2)`` by rejection sampling."""
    s = ellipticity_scale(sigma_e)
    out = np.empty(0)
    # Envelope: p(e) <= e exp(-e^2/2s^2) (Rayleigh); accept with (1 - e^2)^2.
    while out.size < n:
        e = s * np.sqrt(-2.0 * np.log(rng.uniform(size=2 * n)))
        keep = (e < 1.0) & (rng.uniform(size=e.size) < (1.0 - np.minimum(e, 1.0) ** 2) ** 2)
        out = np.concatenate([out, e[keep]])
    mod = out[:n]
    beta = rng.uniform(0.0, np.pi, size=n)  # orientation of the major axis
    return np.stack([mod * np.cos(2 * beta), mod * np.sin(2 * beta)], axis=1)


#: Galaxy families of :func:`draw_catalog`.
FAMILIES = ("bulge+disk", "sersic")
#: Probability that a star-forming disk (Scd or Im) carries knots.
KNOT_PROBABILITY = 0.5
#: Range of the fraction of a disk's flux in its knots.
KNOT_FRACTION = (0.1, 0.3)
#: Range of the number of knots.
KNOT_NUMBER = (5, 30)


def draw_catalog(
    rng: np.random.Generator,
    n: int,
    mag_min: float = MAG_MIN,
    mag_max: float = MAG_MAX,
    sigma_e: float = SIGMA_E,
    family: str = "bulge+disk",
) -> Table:
    """Draw ``n`` galaxies of the population (survey-independent properties).

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of randomness.
    n : int
        Number of galaxies.
    mag_min, mag_max : float
        r-band AB magnitude range.
    sigma_e : float
        Per-component intrinsic ellipticity dispersion.

    family : str
        ``"bulge+disk"`` (the training population, with knots) or ``"sersic"``
        (one Sersic component per galaxy, stored as a pure bulge).

    Returns
    -------
    astropy.table.Table
        Columns ``mag_r_ref`` (LSST r, AB), ``redshift``, ``bulge_frac`` (r-band
        B/T), ``disk_hlr`` and ``bulge_hlr`` (arcsec), ``e1_int``, ``e2_int``,
        ``sed_bulge``, ``sed_disk`` (indices into ``TEMPLATES``), ``bulge_n``
        (Sersic index), ``knot_frac`` (fraction of the disk's flux in knots),
        ``n_knots`` and ``knot_seed`` (the knots' positions).
    """
    if n < 0:
        raise BayesblendError(f"number of galaxies must be >= 0, got {n}")
    if family not in FAMILIES:
        raise BayesblendError(f"unknown galaxy family {family!r}; choose from {', '.join(FAMILIES)}")
    mag = draw_magnitudes(rng, n, mag_min, mag_max)
    mag_i = mag - R_MINUS_I
    z = draw_redshifts(rng, mag_i)
    disk_hlr = draw_disk_hlr(rng, mag_i)
    kind = rng.choice(3, size=n, p=[0.3, 0.1, 0.6])  # 0 pure disk, 1 pure bulge, 2 both
    bt = np.where(kind == 0, 0.0, np.where(kind == 1, 1.0, rng.beta(1.5, 3.0, size=n)))
    bulge_hlr = np.where(kind == 1, 0.6, rng.uniform(0.3, 0.7, size=n)) * disk_hlr
    bulge_hlr = np.clip(bulge_hlr, HLR_MIN, HLR_MAX)
    e = draw_ellipticities(rng, n, sigma_e)
    names = list(DISK_TEMPLATE_P)
    disk_sed = rng.choice(len(names), size=n, p=list(DISK_TEMPLATE_P.values()))
    disk_sed = np.array([TEMPLATES.index(names[k]) for k in disk_sed], dtype=np.int16)
    t = Table()
    t["mag_r_ref"] = mag.astype(np.float64)
    t["redshift"] = z
    t["bulge_frac"] = bt
    t["disk_hlr"] = disk_hlr
    t["bulge_hlr"] = bulge_hlr
    t["e1_int"] = e[:, 0]
    t["e2_int"] = e[:, 1]
    t["sed_bulge"] = np.full(n, TEMPLATES.index("E"), dtype=np.int16)
    t["sed_disk"] = disk_sed
    # drawn after the bulge + disk columns, so those stay as they were for a seed
    t["bulge_n"] = np.where(kind == 1, rng.uniform(2.5, 5.0, n), rng.uniform(1.0, 4.0, n))
    star_forming = np.isin(disk_sed, [TEMPLATES.index("Scd"), TEMPLATES.index("Im")]) & (bt < 1)
    knotty = star_forming & (rng.uniform(size=n) < KNOT_PROBABILITY)
    t["knot_frac"] = np.where(knotty, rng.uniform(*KNOT_FRACTION, n), 0.0)
    t["n_knots"] = np.where(knotty, rng.integers(KNOT_NUMBER[0], KNOT_NUMBER[1] + 1, n), 0).astype(np.int16)
    t["knot_seed"] = rng.integers(1, 2**31 - 1, n).astype(np.int64)
    if family == "sersic":
        # one component: the disk size prior, any template, no knots
        t["bulge_frac"] = np.ones(n)
        t["bulge_hlr"] = disk_hlr
        t["bulge_n"] = rng.uniform(0.5, 4.0, n)
        t["sed_bulge"] = rng.integers(0, len(TEMPLATES), n).astype(np.int16)
        t["knot_frac"] = np.zeros(n)
        t["n_knots"] = np.zeros(n, dtype=np.int16)
    t["disk_hlr"].unit = t["bulge_hlr"].unit = "arcsec"
    t["mag_r_ref"].unit = "mag"
    return t


def band_fluxes(survey: Survey, catalog: Table) -> tuple[np.ndarray, np.ndarray]:
    """Total flux and bulge fraction per band for a population catalogue.

    Returns
    -------
    flux : numpy.ndarray
        ``(n, band)`` electrons over the full exposure.
    bulge_frac : numpy.ndarray
        ``(n, band)`` bulge-to-total flux ratio per band.
    """
    z = np.asarray(catalog["redshift"])
    m_r = np.asarray(catalog["mag_r_ref"])
    bt_r = np.asarray(catalog["bulge_frac"])
    with np.errstate(divide="ignore"):
        m_bulge = m_r - 2.5 * np.log10(bt_r)  # inf for pure disks
        m_disk = m_r - 2.5 * np.log10(1.0 - bt_r)
    c_b = colours(survey, np.asarray(catalog["sed_bulge"]), z)
    c_d = colours(survey, np.asarray(catalog["sed_disk"]), z)
    magzero = survey.magzero[None, :]
    f_b = np.where(np.isfinite(m_bulge)[:, None], 10 ** (-0.4 * (m_bulge[:, None] + c_b - magzero)), 0.0)
    f_d = np.where(np.isfinite(m_disk)[:, None], 10 ** (-0.4 * (m_disk[:, None] + c_d - magzero)), 0.0)
    flux = f_b + f_d
    return flux, f_b / flux
