"""Isolated stamps, blends, fields and shear twins: layouts and their rendering.

Every simulated item is reproducible from ``(seed, index)``: its layout comes
from the stream ``[seed, index, 0]``, its noise from ``[seed, index, 1]`` and any
PSF jitter from ``[seed, index, 2]``, so sharding and the number of worker
processes never change the data, and shear twins share galaxies and noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from astropy.table import Table, vstack

from bayesblend.errors import BayesblendError
from bayesblend.simulate.population import MAG_MAX, MAG_MIN, draw_catalog, number_density
from bayesblend.simulate.render import RenderedScene, render_scene
from bayesblend.survey import Survey, get_survey

LAYOUT, NOISE, PSF = 0, 1, 2
#: The shear-bias design of Arcelin et al. sect. 4.3 (with |g| = 0.02 here) and rotated twins.
SHEAR_DESIGN = ((0.0, 0.0), (1.0, 0.0), (-1.0, 0.0), (0.0, 1.0), (0.0, -1.0))


def item_rng(seed: int, index: int, stream: int) -> np.random.Generator:
    """The random generator of one item's stream (layout, noise or PSF)."""
    return np.random.default_rng([int(seed), int(index), int(stream)])


def _survey(survey: Survey | str) -> Survey:
    return survey if isinstance(survey, Survey) else get_survey(survey)


def check_stamp(survey: Survey, stamp_size: int, max_shift: float = 0.0) -> None:
    """Refuse stamps too small for the PSF (side < 4 x the widest PSF FWHM) or shifts off the stamp."""
    widest = max(b.psf_fwhm for b in survey.bands)
    need = int(np.ceil(4 * widest / survey.pixel_scale))
    if int(stamp_size) < need:
        raise BayesblendError(
            f"stamp of {stamp_size} pixels ({stamp_size * survey.pixel_scale:.2f} arcsec) is smaller "
            f"than 4 x the widest PSF FWHM ({widest} arcsec): use at least {need} pixels"
        )
    if not 0 <= max_shift < stamp_size / 4:
        raise BayesblendError(f"max_shift must be in [0, stamp_size/4), got {max_shift} pixels")


def psf_fwhm_draw(
    survey: Survey, bands: Sequence[str], jitter: float, rng: np.random.Generator
) -> np.ndarray:
    """PSF FWHM per band: the median, times ``exp(jitter * N(0, 1))`` when ``jitter > 0``.

    Parameters
    ----------
    survey : Survey
    bands : sequence of str
        Bands, in the order of the result.
    jitter : float
        Log-normal scatter of the FWHM (>= 0; 0 gives the survey's medians).
    rng : numpy.random.Generator
        The item's PSF stream.

    Returns
    -------
    numpy.ndarray
        ``(band,)`` FWHM, arcsec.
    """
    base = np.array([survey.band(b).psf_fwhm for b in bands])
    if jitter < 0:
        raise BayesblendError(f"psf_jitter must be >= 0, got {jitter}")
    return base * np.exp(jitter * rng.standard_normal(base.size)) if jitter > 0 else base


def isolated_layout(
    rng: np.random.Generator,
    stamp_size: int,
    max_shift: float = 0.0,
    mag_range: tuple[float, float] = (MAG_MIN, MAG_MAX),
    family: str = "bulge+disk",
) -> Table:
    """One galaxy at the stamp centre, optionally shifted uniformly by up to ``max_shift`` pixels."""
    t = draw_catalog(rng, 1, *mag_range, family=family)
    c = (stamp_size - 1) / 2.0
    t["x"] = c + rng.uniform(-max_shift, max_shift, 1)
    t["y"] = c + rng.uniform(-max_shift, max_shift, 1)
    return t


def blend_layout(
    rng: np.random.Generator,
    stamp_size: int,
    pixel_scale: float,
    n_range: tuple[int, int] = (1, 4),
    annulus: tuple[float, float] = (0.325, 2.0),
    max_shift: float = 0.0,
    mag_range: tuple[float, float] = (MAG_MIN, MAG_MAX),
    family: str = "bulge+disk",
) -> Table:
    """A blend as in Arcelin et al. sect. 2.1.3: brightest galaxy centred, others in an annulus.

    The number of galaxies is uniform in ``n_range``; the brightest (in r) is the
    target at the centre (shifted by up to ``max_shift`` pixels); the others are
    uniform in area in the annulus ``annulus`` (arcsec) around it. Row 0 is the
    target (``is_target``).
    """
    lo, hi = int(n_range[0]), int(n_range[1])
    if not 1 <= lo <= hi:
        raise BayesblendError(f"number of galaxies per blend must satisfy 1 <= min <= max, got {n_range}")
    r_in, r_out = float(annulus[0]), float(annulus[1])
    if not 0 <= r_in < r_out:
        raise BayesblendError(f"annulus must satisfy 0 <= inner < outer arcsec, got {annulus}")
    n = int(rng.integers(lo, hi + 1))
    t = draw_catalog(rng, n, *mag_range, family=family)
    t = t[np.argsort(np.asarray(t["mag_r_ref"]))]
    c = (stamp_size - 1) / 2.0
    r = np.sqrt(rng.uniform(r_in**2, r_out**2, n)) / pixel_scale
    phi = rng.uniform(0, 2 * np.pi, n)
    shift = rng.uniform(-max_shift, max_shift, 2)
    x = c + shift[0] + r * np.cos(phi)
    y = c + shift[1] + r * np.sin(phi)
    x[0], y[0] = c + shift[0], c + shift[1]
    t["x"], t["y"] = x, y
    t["is_target"] = np.arange(n) == 0
    return t


def field_layout(
    rng: np.random.Generator,
    shape: tuple[int, int],
    pixel_scale: float,
    density: float | None = None,
    mag_range: tuple[float, float] = (MAG_MIN, MAG_MAX),
) -> Table:
    """Galaxies at uniform random positions; their number is Poisson at ``density`` per arcmin^2.

    The default density is the population's number counts in ``mag_range``
    (about 200 / arcmin^2 down to r = 27.5).
    """
    dens = number_density(mag_range[1], mag_range[0]) if density is None else float(density)
    if dens < 0:
        raise BayesblendError(f"density must be >= 0 galaxies/arcmin^2, got {density}")
    area = shape[0] * shape[1] * (pixel_scale / 60.0) ** 2
    n = int(rng.poisson(dens * area))
    t = draw_catalog(rng, n, *mag_range)
    t["x"] = rng.uniform(-0.5, shape[1] - 0.5, n)
    t["y"] = rng.uniform(-0.5, shape[0] - 0.5, n)
    return t


def simulate_isolated(
    seed: int,
    index: int = 0,
    survey: Survey | str = "lsst",
    stamp_size: int = 48,
    max_shift: float = 0.0,
    psf_jitter: float = 0.0,
    bands: Sequence[str] | None = None,
    shear: tuple[float, float] = (0.0, 0.0),
    rotate: bool = False,
    noise: bool = True,
    mag_range: tuple[float, float] = (MAG_MIN, MAG_MAX),
    family: str = "bulge+disk",
    canonical: bool = False,
) -> RenderedScene:
    """An isolated galaxy stamp: its noisy and noiseless observed images and its truth.

    ``family`` picks the population (:func:`bayesblend.simulate.population.draw_catalog`);
    ``canonical=True`` also draws the galaxy's canonical morphology (``RenderedScene.canonical``).
    """
    s = _survey(survey)
    check_stamp(s, stamp_size, max_shift)
    bands = s.band_names if bands is None else s.check_bands(bands)
    layout = isolated_layout(item_rng(seed, index, LAYOUT), stamp_size, max_shift, mag_range, family)
    fwhm = psf_fwhm_draw(s, bands, psf_jitter, item_rng(seed, index, PSF))
    out = render_scene(
        s,
        layout,
        (stamp_size, stamp_size),
        [int(seed), int(index), NOISE] if noise else None,
        bands=bands,
        shear=shear,
        rotate=rotate,
        psf_fwhm=fwhm,
        canonical_for=[0] if canonical else (),
    )
    out.truth["blend_id"] = np.full(len(out.truth), index, dtype=np.int64)
    _add_psf_columns(out.truth, bands, fwhm)
    return out


def simulate_blend(
    seed: int,
    index: int = 0,
    survey: Survey | str = "lsst",
    stamp_size: int = 48,
    n_range: tuple[int, int] = (1, 4),
    annulus: tuple[float, float] = (0.325, 2.0),
    max_shift: float = 0.0,
    psf_jitter: float = 0.0,
    bands: Sequence[str] | None = None,
    shear: tuple[float, float] = (0.0, 0.0),
    rotate: bool = False,
    noise: bool = True,
    mag_range: tuple[float, float] = (MAG_MIN, MAG_MAX),
    family: str = "bulge+disk",
    canonical: bool = False,
) -> RenderedScene:
    """A blend stamp with each member's noiseless image (``RenderedScene.sources``) and its truth.

    Row 0 is the target. ``family`` and ``canonical`` (the target's canonical
    morphology) as in :func:`simulate_isolated`.
    """
    s = _survey(survey)
    check_stamp(s, stamp_size, max_shift)
    bands = s.band_names if bands is None else s.check_bands(bands)
    layout = blend_layout(
        item_rng(seed, index, LAYOUT),
        stamp_size,
        s.pixel_scale,
        n_range,
        annulus,
        max_shift,
        mag_range,
        family,
    )
    fwhm = psf_fwhm_draw(s, bands, psf_jitter, item_rng(seed, index, PSF))
    out = render_scene(
        s,
        layout,
        (stamp_size, stamp_size),
        [int(seed), int(index), NOISE] if noise else None,
        bands=bands,
        shear=shear,
        rotate=rotate,
        psf_fwhm=fwhm,
        keep_sources=True,
        canonical_for=[0] if canonical else (),
    )
    out.truth["is_target"] = np.asarray(layout["is_target"])
    out.truth["blend_id"] = np.full(len(out.truth), index, dtype=np.int64)
    _add_psf_columns(out.truth, bands, fwhm)
    return out


def simulate_field(
    seed: int,
    index: int = 0,
    survey: Survey | str = "lsst",
    shape: tuple[int, int] = (256, 256),
    density: float | None = None,
    psf_jitter: float = 0.0,
    bands: Sequence[str] | None = None,
    shear: tuple[float, float] = (0.0, 0.0),
    rotate: bool = False,
    noise: bool = True,
    mag_range: tuple[float, float] = (MAG_MIN, MAG_MAX),
) -> RenderedScene:
    """A larger scene with galaxies at a given density (galaxies / arcmin^2)."""
    s = _survey(survey)
    check_stamp(s, min(shape))
    bands = s.band_names if bands is None else s.check_bands(bands)
    layout = field_layout(item_rng(seed, index, LAYOUT), shape, s.pixel_scale, density, mag_range)
    fwhm = psf_fwhm_draw(s, bands, psf_jitter, item_rng(seed, index, PSF))
    out = render_scene(
        s,
        layout,
        shape,
        [int(seed), int(index), NOISE] if noise else None,
        bands=bands,
        shear=shear,
        rotate=rotate,
        psf_fwhm=fwhm,
    )
    out.truth["blend_id"] = np.full(len(out.truth), index, dtype=np.int64)
    _add_psf_columns(out.truth, bands, fwhm)
    return out


def shear_twins(
    kind: str,
    seed: int,
    index: int = 0,
    shear: float = 0.02,
    **options: Any,
) -> list[RenderedScene]:
    """The same galaxies and noise under g = (0,0), (+-g, 0), (0, +-g), each also rotated by 90 degrees.

    Parameters
    ----------
    kind : {"isolated", "blends"}
        What each scene is.
    seed, index : int
        Item identity (shared by all variants).
    shear : float
        Amplitude of the applied shear components.
    **options
        Passed to :func:`simulate_isolated` or :func:`simulate_blend`.

    Returns
    -------
    list of RenderedScene
        Ten scenes; their truth tables carry ``shear_g1``, ``shear_g2``, ``rotated``.
    """
    makers = {"isolated": simulate_isolated, "blends": simulate_blend}
    if kind not in makers:
        raise BayesblendError(f"shear twins are made of 'isolated' or 'blends', not {kind!r}")
    if not 0 < shear < 1:
        raise BayesblendError(f"shear amplitude must be in (0, 1), got {shear}")
    out = []
    for rotate in (False, True):
        for s1, s2 in SHEAR_DESIGN:
            out.append(makers[kind](seed, index, shear=(s1 * shear, s2 * shear), rotate=rotate, **options))
    return out


def _add_psf_columns(truth: Table, bands: Sequence[str], fwhm: np.ndarray) -> None:
    for b, f in zip(bands, fwhm, strict=True):
        truth[f"psf_fwhm_{b}"] = np.full(len(truth), float(f))
        truth[f"psf_fwhm_{b}"].unit = "arcsec"


def stack_truth(tables: Sequence[Table]) -> Table:
    """Concatenate per-scene truth tables (keeping metadata of the first)."""
    tables = [t for t in tables if len(t)]
    if not tables:
        return Table()
    return vstack(tables, metadata_conflicts="silent")
