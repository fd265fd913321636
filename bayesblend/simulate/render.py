"""GalSim rendering of a layout of galaxies into a noisy multi-band scene with truth.

A *layout* is a population table (:func:`bayesblend.simulate.population.draw_catalog`)
with pixel positions ``x``, ``y`` (0-based, centre of the first pixel at 0) of
the unlensed, unrotated scene. :func:`render_scene` draws it for one survey
under an optional constant shear and 90-degree rotation, adds Poisson noise
from a given seed, and measures the truth (S/N, blendedness...). Rendering the
same layout with the same noise seed under different shears and rotations gives
the shear-bias test sets.

Lensing convention: a reduced shear ``g`` maps a source of intrinsic
shear-type ellipticity ``e_s`` to ``e = (e_s + g) / (1 + conj(g) e_s)``
(complex notation, Seitz & Schneider 1997), and maps positions relative to the
scene's shear centre with GalSim's (area-preserving) shear matrix, the same
transform GalSim applies to the profiles. A 90-degree rotation maps
``e -> -e`` and ``(dx, dy) -> (-dy, dx)``.

Each source is drawn with GalSim (bulge, disk and knots separately, because
their fractions change with band; :mod:`bayesblend.simulate.galaxy`) in every
band convolved with that band's PSF and the pixel. On request the *canonical
morphology* of the galaxy model is drawn too: the galaxy round, PSF-free,
dilated to the canonical half-light radius (:mod:`bayesblend.canonical`), with
its true pose in the truth table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import galsim
import numpy as np
from astropy.table import Table
from astropy.wcs import WCS

from bayesblend.canonical import DEFAULT_FRAME, CanonicalFrame
from bayesblend.ellipticity import lens
from bayesblend.errors import BayesblendError
from bayesblend.scene import Scene
from bayesblend.simulate.galaxy import canonical_image, circularised_hlr, components, weights
from bayesblend.simulate.population import band_fluxes
from bayesblend.simulate.truth import blendedness, snr
from bayesblend.survey import Survey, poisson_variance

#: Canvases up to this side are drawn whole for every source (exact truncation).
FULL_CANVAS_MAX = 96
#: Sky position of the centre of simulated scenes (COSMOS field), degrees.
DEFAULT_SKY_CENTRE = (150.1, 2.2)


@dataclass
class RenderedScene:
    """A simulated scene with its truth.

    Attributes
    ----------
    scene : Scene
        Noisy image with variance (sky + signal), PSF images, WCS, magzero.
    noiseless : numpy.ndarray
        ``(band, y, x)`` noiseless image, electrons.
    truth : astropy.table.Table
        One row per source (see :func:`render_scene`).
    sources : numpy.ndarray or None
        ``(source, band, y, x)`` each source's noiseless image alone.
    canonical : numpy.ndarray or None
        ``(source, band, size, size)`` canonical morphology of the requested
        sources (:func:`bayesblend.simulate.galaxy.canonical_image`).
    """

    scene: Scene
    noiseless: np.ndarray
    truth: Table
    sources: np.ndarray | None = None
    canonical: np.ndarray | None = None


def lensed_ellipticity(e1: np.ndarray, e2: np.ndarray, g1: float, g2: float) -> np.ndarray:
    """Shear-type ellipticity after a reduced shear ``(g1, g2)``; returns ``(n, 2)``."""
    out = lens(np.asarray(e1) + 1j * np.asarray(e2), complex(g1, g2))
    return np.stack([out.real, out.imag], axis=-1)


def make_wcs(shape: tuple[int, int], pixel_scale: float, centre: tuple[float, float]) -> WCS:
    """A TAN WCS with ``centre`` (ra, dec in degrees) at the middle of the image, north up, east left."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = list(centre)
    w.wcs.crpix = [(shape[1] - 1) / 2 + 1, (shape[0] - 1) / 2 + 1]
    w.wcs.cdelt = [-pixel_scale / 3600.0, pixel_scale / 3600.0]
    w.wcs.cunit = ["deg", "deg"]
    return w


def _stamp_bounds(
    x: float, y: float, radius_px: float, shape: tuple[int, int]
) -> tuple[int, int, int, int] | None:
    ny, nx = shape
    if max(shape) <= FULL_CANVAS_MAX:
        return 0, nx, 0, ny
    half = int(np.clip(np.ceil(radius_px), 24, 256))
    x0, x1 = max(int(np.floor(x)) - half, 0), min(int(np.floor(x)) + half + 1, nx)
    y0, y1 = max(int(np.floor(y)) - half, 0), min(int(np.floor(y)) + half + 1, ny)
    if x0 >= x1 or y0 >= y1:
        return None
    return x0, x1, y0, y1


def _draw(obj: galsim.GSObject, bounds: tuple[int, int, int, int], x: float, y: float, scale: float):
    x0, x1, y0, y1 = bounds
    img = galsim.ImageF(galsim.BoundsI(x0, x1 - 1, y0, y1 - 1), scale=scale)
    obj.drawImage(image=img, center=galsim.PositionD(x, y))
    return img.array


def render_scene(
    survey: Survey,
    layout: Table,
    shape: tuple[int, int],
    noise_seed: int | Sequence[int] | None,
    bands: Sequence[str] | None = None,
    shear: tuple[float, float] = (0.0, 0.0),
    rotate: bool = False,
    shear_centre: tuple[float, float] | None = None,
    psf_fwhm: Sequence[float] | None = None,
    keep_sources: bool = False,
    canonical_for: Sequence[int] = (),
    frame: CanonicalFrame = DEFAULT_FRAME,
    psf_size: int = 41,
    sky_centre: tuple[float, float] = DEFAULT_SKY_CENTRE,
    reference_band: str = "r",
) -> RenderedScene:
    """Render a layout of galaxies into a noisy scene with its truth table.

    Parameters
    ----------
    survey : Survey
        Survey whose pixel grid, PSFs, zeropoints and sky are used.
    layout : astropy.table.Table
        Population columns plus ``x``, ``y`` (pixels, unlensed positions).
        If it has ``flux_<b>`` for every band drawn (electrons), those fluxes
        are used instead of the SEDs, with the r-band ``bulge_frac`` in all bands.
    shape : (int, int)
        ``(ny, nx)`` of the scene, pixels.
    noise_seed : int, sequence of int or None
        Seed of the Poisson noise; None gives a noiseless ``scene.image``.
    bands : sequence of str, optional
        Bands to draw (default: all the survey's, in order).
    shear : (float, float)
        Constant reduced shear ``(g1, g2)`` applied to shapes and positions.
    rotate : bool
        Rotate the scene by 90 degrees about the shear centre before shearing.
    shear_centre : (float, float), optional
        ``(x, y)`` pixel about which positions are rotated and sheared
        (default: the middle of the scene).
    psf_fwhm : sequence of float, optional
        PSF FWHM per band, arcsec (default: each band's median).
    keep_sources : bool
        Return each source's noiseless image in ``RenderedScene.sources``.
    canonical_for : sequence of int
        Rows whose canonical morphology is returned (in ``frame``).
    frame : CanonicalFrame
        Canonical grid of ``canonical_for``.
    psf_size : int
        Side of the PSF images stored with the scene (odd), pixels.
    sky_centre : (float, float)
        RA, Dec (deg) of the middle of the scene for its WCS.
    reference_band : str
        Band of S/N and blendedness (the paper's r; else the first band).

    Returns
    -------
    RenderedScene
        Truth columns: ``id``, ``x``, ``y``, ``ra``, ``dec``, ``flux_<b>``,
        ``mag_<b>``, ``frac_in_image_<b>`` (fraction of the flux falling in the
        image: stamp truncation), ``e1_int``, ``e2_int`` (intrinsic, after any
        rotation), ``e1``, ``e2`` (lensed), ``hlr`` (circularised, unlensed,
        arcsec), ``disk_hlr``, ``bulge_hlr``, ``bulge_frac``, ``redshift``,
        ``sed_disk``, ``snr`` (paper eq. 7), ``b_closest``, ``b_tot``
        (eqs. 1, 3), ``closest_id``, ``dmag_closest`` (mag of the closest
        neighbour minus this one's, reference band), ``shear_g1``,
        ``shear_g2``, ``rotated``, and the v2 population's ``bulge_n``,
        ``knot_frac``, ``n_knots`` where the layout has them. The true pose
        of the galaxy model is ``(e1, e2)``, ``hlr`` (the reference band's:
        the canonical morphology's dilation), ``flux_<b>`` and ``x``, ``y``.
    """
    bands = survey.band_names if bands is None else survey.check_bands(bands)
    ny, nx = (int(shape[0]), int(shape[1]))
    if ny < 1 or nx < 1:
        raise BayesblendError(f"scene shape must be positive, got {shape}")
    g1, g2 = float(shear[0]), float(shear[1])
    if g1 * g1 + g2 * g2 >= 1.0:
        raise BayesblendError(f"reduced shear must have |g| < 1, got ({g1}, {g2})")
    idx = [survey.band_index(b) for b in bands]
    fwhm = [survey.band(b).psf_fwhm for b in bands] if psf_fwhm is None else list(psf_fwhm)
    if len(fwhm) != len(bands):
        raise BayesblendError(f"psf_fwhm needs one value per band ({len(bands)}), got {len(fwhm)}")
    psfs = [survey.psf_object(b, f) for b, f in zip(bands, fwhm, strict=True)]
    scale = survey.pixel_scale
    n = len(layout)

    if n and all(f"flux_{b}" in layout.colnames for b in bands):
        # Explicit fluxes (electrons) override the SEDs; B/T is then the r-band one in every band.
        flux = np.stack([np.asarray(layout[f"flux_{b}"], dtype=float) for b in bands], axis=1)
        bt = np.repeat(np.asarray(layout["bulge_frac"], dtype=float)[:, None], len(bands), axis=1)
    elif n:
        flux_all, bt_all = band_fluxes(survey, layout)
        flux, bt = flux_all[:, idx], bt_all[:, idx]
    else:
        flux = bt = np.zeros((0, len(bands)))
    if n and not np.all(np.isfinite(flux) & (flux >= 0)):
        bad = [b for k, b in enumerate(bands) if not np.all(np.isfinite(flux[:, k]) & (flux[:, k] >= 0))]
        raise BayesblendError(f"negative or non-finite source flux in band(s) {', '.join(bad)}")
    if n and not np.all((np.asarray(layout["bulge_frac"]) >= 0) & (np.asarray(layout["bulge_frac"]) <= 1)):
        raise BayesblendError("bulge_frac must be within [0, 1]")
    for col in ("disk_hlr", "bulge_hlr"):
        if n and not np.all(np.asarray(layout[col]) > 0):
            raise BayesblendError(f"{col} must be positive (arcsec)")

    cx, cy = ((nx - 1) / 2.0, (ny - 1) / 2.0) if shear_centre is None else shear_centre
    dx = np.asarray(layout["x"], dtype=float) - cx if n else np.zeros(0)
    dy = np.asarray(layout["y"], dtype=float) - cy if n else np.zeros(0)
    e1i = np.asarray(layout["e1_int"], dtype=float) if n else np.zeros(0)
    e2i = np.asarray(layout["e2_int"], dtype=float) if n else np.zeros(0)
    if rotate:
        dx, dy = -dy, dx
        e1i, e2i = -e1i, -e2i
    mat = galsim.Shear(g1=g1, g2=g2).getMatrix()
    xs = cx + mat[0, 0] * dx + mat[0, 1] * dy
    ys = cy + mat[1, 0] * dx + mat[1, 1] * dy
    e_obs = lensed_ellipticity(e1i, e2i, g1, g2) if n else np.zeros((0, 2))

    noiseless = np.zeros((len(bands), ny, nx), dtype=np.float64)
    sources = np.zeros((n, len(bands), ny, nx), dtype=np.float32) if keep_sources else None
    ref = bands.index(reference_band) if reference_band in bands else 0
    bulge_n = np.asarray(layout["bulge_n"], float) if n and "bulge_n" in layout.colnames else np.full(n, 4.0)
    hlr = (
        circularised_hlr(layout["bulge_frac"], layout["bulge_hlr"], layout["disk_hlr"], bulge_n) if n else []
    )
    canon_rows = list(canonical_for)
    canonical = np.zeros((len(canon_rows), len(bands), frame.size, frame.size), dtype=np.float32)
    for j, i in enumerate(canon_rows):
        canonical[j] = canonical_image(layout[i], bt[i], float(hlr[i]), frame)
    ref_stamps: list[tuple[tuple[int, int, int, int], np.ndarray] | None] = []
    in_image = np.zeros((n, len(bands)))
    for i in range(n):
        row = layout[i]
        shape_i = galsim.Shear(g1=e1i[i], g2=e2i[i])
        w_i = weights(row, bt[i])
        comps = [(k, c.shear(shape_i).shear(g1=g1, g2=g2)) for k, c in components(row).items()]
        # box half-width: the Kolmogorov wings and de Vaucouleurs bulges need room (< 0.3 % lost)
        radius = (8 * max(row["disk_hlr"], row["bulge_hlr"]) + 5 * max(fwhm)) / scale
        bounds = _stamp_bounds(xs[i], ys[i], radius, (ny, nx))
        if bounds is None:
            ref_stamps.append(None)
            continue
        x0, x1, y0, y1 = bounds
        stamp = np.zeros((len(bands), y1 - y0, x1 - x0))
        for b, psf in enumerate(psfs):
            for kind, comp in comps:
                w = w_i[kind][b]
                if w > 0:
                    arr = _draw(galsim.Convolve(comp, psf), bounds, xs[i], ys[i], scale)
                    stamp[b] += flux[i, b] * w * arr
        noiseless[:, y0:y1, x0:x1] += stamp
        in_image[i] = stamp.sum(axis=(1, 2)) / np.where(flux[i] > 0, flux[i], 1.0)
        ref_stamps.append((bounds, stamp[ref]))
        if sources is not None:
            sources[i, :, y0:y1, x0:x1] = stamp

    sky = survey.sky_level(bands)
    variance = poisson_variance(noiseless, sky).astype(np.float32)
    if noise_seed is None:
        image = noiseless.astype(np.float32)
    else:
        rng = np.random.default_rng(noise_seed)
        lam = poisson_variance(noiseless, sky)  # Poisson: mean = variance
        image = (rng.poisson(lam) - sky[:, None, None]).astype(np.float32)
    psf_images = survey.psf_images(bands, psf_size, fwhm)
    wcs = make_wcs((ny, nx), scale, sky_centre)
    scene = Scene(
        image=image,
        bands=bands,
        magzero=survey.magzero[idx],
        survey=survey.name,
        pixel_scale=scale,
        psf=psf_images,
        variance=variance,
        mask=None,
        wcs=wcs,
        meta={"SHEAR1": g1, "SHEAR2": g2, "ROTATED": bool(rotate)},
    )

    truth = Table()
    truth["id"] = np.arange(n, dtype=np.int64)
    truth["x"], truth["y"] = xs, ys
    if n:
        ra, dec = wcs.wcs_pix2world(xs, ys, 0)
    else:
        ra = dec = np.zeros(0)
    truth["ra"], truth["dec"] = ra, dec
    for b, name in enumerate(bands):
        truth[f"flux_{name}"] = flux[:, b]
        truth[f"mag_{name}"] = survey.counts_to_mag(flux[:, b], name)
        truth[f"frac_in_image_{name}"] = in_image[:, b]
    truth["e1_int"], truth["e2_int"] = e1i, e2i
    truth["e1"], truth["e2"] = e_obs[:, 0], e_obs[:, 1]
    for col in ("disk_hlr", "bulge_hlr", "bulge_frac", "redshift", "sed_disk"):
        truth[col] = np.asarray(layout[col]) if n else np.zeros(0)
    for col in ("bulge_n", "knot_frac", "n_knots"):
        if n and col in layout.colnames:
            truth[col] = np.asarray(layout[col])
    truth["hlr"] = np.asarray(hlr, dtype=float)
    truth["snr"] = np.array([np.nan if s is None else snr(s[1], sky[ref]) for s in ref_stamps])
    mags_ref = np.asarray(truth[f"mag_{bands[ref]}"])
    b_closest, b_tot, closest = blendedness(ref_stamps, noiseless[ref], xs, ys)
    truth["b_closest"], truth["b_tot"], truth["closest_id"] = b_closest, b_tot, closest
    truth["dmag_closest"] = np.where(closest >= 0, mags_ref[np.maximum(closest, 0)] - mags_ref, np.nan)
    truth["shear_g1"] = np.full(n, g1)
    truth["shear_g2"] = np.full(n, g2)
    truth["rotated"] = np.full(n, bool(rotate))
    for col in ("x", "y"):
        truth[col].unit = "pix"
    truth["ra"].unit = truth["dec"].unit = "deg"
    for col in ("hlr", "disk_hlr", "bulge_hlr"):
        truth[col].unit = "arcsec"
    for name in bands:
        truth[f"flux_{name}"].unit = "ct"  # electrons over the full exposure
        truth[f"mag_{name}"].unit = "mag"
    truth.meta["BANDREF"] = bands[ref]
    truth.meta["FLUXUNIT"] = "electron"
    truth.meta["ELLIPCON"] = "shear-type g=(a-b)/(a+b); +e2 at +45 deg CCW from +x"
    return RenderedScene(
        scene=scene,
        noiseless=noiseless.astype(np.float32),
        truth=truth,
        sources=sources,
        canonical=canonical if canon_rows else None,
    )
