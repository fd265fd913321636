"""Detection: peaks of the PSF-matched multi-band detection image, and segments.

The detection image is the inverse-variance weighted sum of the bands,
scaled to unit noise: ``D = sum_b I_b / s_b^2 / sqrt(sum_b 1 / s_b^2)``, with
``s_b^2`` the sky variance per pixel (the variance plane's median when the
scene has one). For sources of any colour it is at least as deep as the best
single band. It is then filtered with the PSF (the bands' PSFs averaged with
the same weights: the matched filter for a point source) and divided by the
filtered noise, giving a map of point-source S/N. Sources are the local
maxima of that map above ``threshold`` (``photutils.detection.find_peaks``,
centred by a quadratic fit). The filter blurs close pairs of comparable
galaxies into one peak, which sep's segmentation of the unfiltered image
(SExtractor's thresholding and multi-threshold deblending) splits, so its
sources that no peak is near are added. Sources closer than
``merge_radius`` pixels are merged, keeping the higher S/N.

An image larger than ``tile_size`` pixels a side is detected tile by tile
(:mod:`bayesblend.tiles`), each tile with context around its core, and each
source kept by the tile whose core holds it; the bands' noise levels and the
filter's PSF are the whole image's (with a PSF that varies over the image,
the one at its centre: the matched filter only needs to be near the PSF),
so the sources found do not depend on how the image is cut.

Why peaks first: blends are what this tool is for, and in them a faint
galaxy's light sits on a brighter neighbour's wing, where it is a peak but
rarely a segment of its own. On the held-out blends the segmentation alone,
bayesblend's detector before, found 19 % of the galaxies (10 % at S/N
10-20); peaks and segments find 42 % (55 %) with 0.13 spurious detections
per blend (``benchmarks/detection_check.py``, RESULTS "Detection"). The
LSST pipelines detect the same way (PSF-smoothed image, then peaks).

:func:`residual_sources` looks for the galaxies a fit missed: the same
peaks, on the noise-whitened residual of the fitted model
(``deblend(redetect=True)``, the default, runs it after a pilot MAP fit).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import sep
from astropy.table import Table, vstack
from astropy.utils.exceptions import AstropyWarning
from photutils.centroids import centroid_quadratic
from photutils.detection import find_peaks
from scipy import signal
from scipy.spatial import cKDTree

from bayesblend.errors import BayesblendError
from bayesblend.scene import Scene
from bayesblend.survey import get_survey, poisson_variance
from bayesblend.tiles import OVERLAP, TILE_SIZE, Tile, over_tiles, tile_grid

#: Default detection threshold: point-source S/N of a peak of the PSF-filtered detection image.
THRESHOLD = 4.0
#: Default merging radius of peaks, pixels.
MERGE_RADIUS = 1.5
#: Threshold (sigma) of the segmentation whose sources are added to the peaks.
SEGMENT_THRESHOLD = 3.0
#: A segmentation source farther than this (pixels) from every peak is a source of its own.
SEGMENT_RADIUS = 2.0
#: Threshold (sigma per pixel of the unfiltered detection image) of the footprints that tie sources
#: into one blend (:func:`footprint_pairs`).
FOOTPRINT_THRESHOLD = SEGMENT_THRESHOLD
#: Residual peaks closer than this (pixels) to a fitted source are its misfit, not a new source.
RESIDUAL_RADIUS = 3.0
#: What a run that detects records about the detector (shear-bias run keys).
DETECTOR = {
    "algorithm": "psf-matched peaks + sep segments",
    "threshold": THRESHOLD,
    "merge_radius": MERGE_RADIUS,
    "segment_threshold": SEGMENT_THRESHOLD,
    "segment_radius": SEGMENT_RADIUS,
    # deblend(redetect=True), the default: a MAP pilot fit, and its residual's peaks
    "residual": {"pilot": "map", "threshold": THRESHOLD, "radius": RESIDUAL_RADIUS},
}


def detection_image(scene: Scene, survey: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Unit-noise detection image ``(y, x)`` and its bad-pixel mask."""
    det, bad, _ = _detection_image(scene, survey)
    return det, bad


def _detection_image(
    scene: Scene, survey: str | None, sky: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Detection image, bad-pixel mask, and the bands' weights ``1 / s_b^2``.

    ``sky`` (the bands' sky variance, :func:`sky_variance`) is measured on
    ``scene`` when not given; a tile takes its whole image's.
    """
    bad = _bad_pixels(scene)
    if sky is None:
        sky = sky_variance(scene, survey, bad)
    det, no_weight = _unit_noise_sum(np.asarray(scene.image, np.float64), sky[:, None, None], bad)
    return det, no_weight, 1.0 / sky


def _bad_pixels(scene: Scene) -> np.ndarray:
    """Per-band bad pixels (non-finite or masked) ``(band, y, x)``."""
    bad = ~np.isfinite(scene.image)
    if scene.mask is not None:
        bad |= scene.mask
    return bad


def sky_variance(scene: Scene, survey: str | None = None, bad: np.ndarray | None = None) -> np.ndarray:
    """Sky variance per pixel of each band ``(band,)``, electrons^2.

    The variance plane's median over good pixels (``bad``: non-finite or
    masked, by default) when the scene has one, else the survey's sky level.
    A band with no usable pixel gets 1 (it carries no weight).
    """
    sv = get_survey(survey or scene.survey)
    bad = _bad_pixels(scene) if bad is None else bad
    empty = bad.all(axis=(1, 2))  # a band with no usable pixel has no weight: its noise level is moot
    if empty.all():
        raise BayesblendError("cannot build a detection image: no band has a finite, unmasked pixel")
    if scene.variance is not None:
        var = np.array(
            [1.0 if e else np.median(v[~b]) for e, v, b in zip(empty, scene.variance, bad, strict=True)]
        )
    else:
        var = np.array([sv.sky_counts(b) if b in sv.band_names else np.nan for b in scene.bands])
    var = np.where(empty, 1.0, var)
    if not np.all(np.isfinite(var) & (var > 0)):
        raise BayesblendError("cannot build a detection image: unknown noise level in some band")
    return var


def _unit_noise_sum(image: np.ndarray, var: np.ndarray, bad: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bands ``(band, y, x)`` summed with inverse-variance weights and scaled to unit noise, ``(y, x)``.

    ``var`` broadcasts against ``image``; pixels that are ``bad`` get no
    weight. Also returns where no band has weight.
    """
    weight = np.where(bad, 0.0, 1.0 / np.where(bad, 1.0, var))
    norm = np.sqrt(np.sum(weight, axis=0))
    det = np.sum(np.where(bad, 0.0, image) * weight, axis=0) / np.where(norm > 0, norm, 1.0)
    return det, norm == 0


def detection_psf(scene: Scene, band_weight: np.ndarray, survey: str | None = None) -> np.ndarray:
    """The detection image's PSF: the bands' PSF images averaged with ``band_weight`` (unit sum).

    The scene's own PSF images when it has them, else the survey's.
    """
    psf = np.asarray(scene.psf_images(survey), np.float64)
    k = np.tensordot(np.asarray(band_weight, float), psf, axes=1)
    return k / k.sum()


def detection_snr_map(scene: Scene, survey: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Point-source S/N map ``(y, x)``: the detection image filtered with its PSF, over the filtered noise.

    Returns the map and the bad-pixel mask. On pure noise the map has unit
    variance away from masked pixels.
    """
    det, bad, w = _detection_image(scene, survey)
    return _snr_map(det, detection_psf(scene, w, survey)), bad


def _snr_map(det: np.ndarray, psf: np.ndarray) -> np.ndarray:
    """The unit-noise image ``det`` filtered with ``psf``, over the filtered noise."""
    return signal.fftconvolve(det, psf[::-1, ::-1], mode="same") / np.sqrt(np.sum(psf**2))


def segment_sources(scene: Scene, survey: str | None = None, threshold: float = SEGMENT_THRESHOLD) -> Table:
    """Sources of sep's segmentation of the (unfiltered) detection image.

    SExtractor's algorithm: connected pixels above ``threshold`` sigma (at
    least 5), split by multi-threshold deblending (contrast 0.001). Returns
    ``x``, ``y`` (pixels) and ``snr`` (sum of the segment over the square
    root of its area), sorted by decreasing S/N.
    """
    return _segments(*detection_image(scene, survey), threshold)


def _sep_extract(det: np.ndarray, bad: np.ndarray, threshold: float, **options):
    """sep's extraction (at least 5 pixels above ``threshold``) of a unit-noise detection image."""
    try:
        return sep.extract(np.ascontiguousarray(det), threshold, err=1.0, mask=bad, minarea=5, **options)
    except Exception as exc:  # sep raises a bare Exception on pathological images
        raise BayesblendError(f"detection failed: {exc}") from None


def _segments(det: np.ndarray, bad: np.ndarray, threshold: float) -> Table:
    """:func:`segment_sources` on a unit-noise detection image and its bad-pixel mask."""
    o = _sep_extract(det, bad, threshold, deblend_cont=0.001)
    t = Table(
        {"x": o["x"], "y": o["y"], "snr": o["flux"] / np.sqrt(np.maximum(o["npix"], 1))}, dtype=[float] * 3
    )
    t.sort("snr", reverse=True)
    return t


def footprint_pairs(
    scene: Scene,
    x: np.ndarray,
    y: np.ndarray,
    survey: str | None = None,
    tile_size: int | None = TILE_SIZE,
    overlap: int = OVERLAP,
) -> np.ndarray:
    """Pairs of the sources at ``(x, y)`` that lie in one footprint: ``(n_pairs, 2)`` indices.

    A footprint is a connected region of at least 5 pixels of the detection
    image above :data:`FOOTPRINT_THRESHOLD` sigma, before any deblending
    (sep's segmentation with multi-threshold deblending off): what the LSST
    pipelines call a parent footprint, the light of sources that overlap.
    Sources whose pixel lies in the same footprint are chained in index order
    (enough to make them one connected group, :func:`bayesblend.blends.group_sources`);
    a source outside every footprint is in no pair.

    Read tile by tile like :func:`detect_sources`: every tile pairs the
    sources of its whole region (core and ``overlap``), and the pairs of all
    tiles are joined. Cutting can only split a footprint, never join two, so
    the pairs are those of the whole image whenever each footprint that holds
    two sources fits in some tile's region (``overlap`` 64 pixels: all but
    the largest galaxies).
    """
    x, y = np.round(np.asarray(x, float)).astype(int), np.round(np.asarray(y, float)).astype(int)
    sky = sky_variance(scene, survey)
    pairs = [np.zeros((0, 2), int)]
    for tile in tile_grid(scene.shape, tile_size, overlap):
        idx = np.flatnonzero((x >= tile.x0) & (x < tile.x1) & (y >= tile.y0) & (y < tile.y1))
        if len(idx) < 2:
            continue
        det, bad, _ = _detection_image(_tile_scene(scene, tile), survey, sky)
        _, seg = _sep_extract(det, bad, FOOTPRINT_THRESHOLD, deblend_cont=1.0, segmentation_map=True)
        label = seg[y[idx] - tile.y0, x[idx] - tile.x0]
        idx, label = idx[label > 0], label[label > 0]
        order = np.argsort(label, kind="stable")  # idx stays increasing within a footprint
        idx, label = idx[order], label[order]
        same = label[1:] == label[:-1]
        pairs.append(np.c_[idx[:-1][same], idx[1:][same]])
    return np.unique(np.concatenate(pairs), axis=0)


def merge_close(sources: Table, radius: float) -> Table:
    """Sources with every one closer than ``radius`` pixels to a higher-S/N one removed.

    Greedy, highest ``snr`` first: a source is removed by a kept one only.
    Returns the kept rows sorted by decreasing S/N.
    """
    t = sources.copy()
    t.sort("snr", reverse=True)
    keep = np.ones(len(t), bool)
    if len(t) < 2 or radius <= 0:
        return t
    xy = np.c_[np.asarray(t["x"], float), np.asarray(t["y"], float)]
    pairs = cKDTree(xy).query_pairs(radius, output_type="ndarray")  # (i, j), i < j: i is brighter
    if len(pairs):
        pairs = pairs[np.hypot(*(xy[pairs[:, 0]] - xy[pairs[:, 1]]).T) < radius]  # strictly closer
        # by the brighter one's rank: whether it is kept is settled before its own pairs are read
        for i, j in pairs[np.argsort(pairs[:, 0], kind="stable")]:
            if keep[i]:
                keep[j] = False
    return t[keep]


def _peaks(snr: np.ndarray, bad: np.ndarray, threshold: float) -> Table:
    """Local maxima of an S/N map above ``threshold``: ``x``, ``y`` (quadratic centroid) and ``snr``."""
    with warnings.catch_warnings():
        # an empty table says "nothing found"; a failed quadratic centroid falls back to the peak pixel below
        warnings.simplefilter("ignore", AstropyWarning)
        peaks = find_peaks(
            np.where(bad, 0.0, snr), threshold, box_size=3, mask=bad, centroid_func=centroid_quadratic
        )
    if peaks is None:
        x = y = s = np.zeros(0)
    else:
        x, y = np.asarray(peaks["x_centroid"], float), np.asarray(peaks["y_centroid"], float)
        s = np.asarray(peaks["peak_value"], float)
        # the quadratic fit can fail or leave the 3x3 box on a ridge: keep the peak pixel then
        off = ~np.isfinite(x) | ~np.isfinite(y)
        off |= np.abs(x - peaks["x_peak"]) > 1
        off |= np.abs(y - peaks["y_peak"]) > 1
        x = np.where(off, peaks["x_peak"], x)
        y = np.where(off, peaks["y_peak"], y)
    return Table({"x": x, "y": y, "snr": s})


def detect_sources(
    scene: Scene,
    survey: str | None = None,
    threshold: float = THRESHOLD,
    merge_radius: float = MERGE_RADIUS,
    tile_size: int | None = TILE_SIZE,
    overlap: int = OVERLAP,
) -> Table:
    """Detect sources on a scene.

    Parameters
    ----------
    scene : Scene
    survey : str, optional
        Survey giving the sky level and PSF when the scene has no variance plane or PSF.
    threshold : float
        Detection threshold: the smallest point-source S/N of a peak of the
        PSF-filtered detection image.
    merge_radius : float
        Sources closer than this (pixels) are merged, keeping the higher S/N.
    tile_size : int or None
        Largest core side of a detection tile, pixels (None: the whole image at once).
    overlap : int
        Context around each tile's core, pixels.

    Returns
    -------
    astropy.table.Table
        ``x``, ``y`` (pixels, 0-based) and ``snr`` (point-source S/N at the
        peak); sorted by decreasing S/N. No rows when nothing is found.
    """
    sky = sky_variance(scene, survey)  # of the whole image: each tile's weights and filter are the same
    kernel = detection_psf(scene, 1.0 / sky, survey)

    def find(tile: Tile) -> Table:
        sub = _tile_scene(scene, tile)
        det, bad, _ = _detection_image(sub, survey, sky)  # shared by the peaks and the segments
        t = _peaks(_snr_map(det, kernel), bad, threshold)
        # close pairs of comparable galaxies, which the PSF filter blurs into one peak, are often split
        # by the segmentation of the unfiltered image: add its sources that no peak is near
        seg = _segments(det, bad, SEGMENT_THRESHOLD)
        if len(seg) and len(t):
            d, _ = cKDTree(np.c_[t["x"], t["y"]]).query(np.c_[seg["x"], seg["y"]])
            seg = seg[d > SEGMENT_RADIUS]
        return vstack([t, seg]) if len(seg) else t

    t = merge_close(over_tiles(tile_grid(scene.shape, tile_size, overlap), find), merge_radius)
    t["x"].unit = t["y"].unit = "pix"
    return t


def _tile_scene(scene: Scene, tile: Tile) -> Scene:
    """The scene restricted to a tile's region (the scene itself when the tile covers it)."""
    if (tile.height, tile.width) == scene.shape:
        return scene
    return scene.cutout(tile.x0, tile.y0, tile.height, tile.width)


def match_sources(
    x_true: np.ndarray, y_true: np.ndarray, x_found: np.ndarray, y_found: np.ndarray, radius: float
) -> np.ndarray:
    """One-to-one matching of true galaxies to found (detected or fitted) sources.

    Closest pairs are matched first; each found source is used at most once.

    Parameters
    ----------
    x_true, y_true : array ``(n_true,)``
        True positions (pixels).
    x_found, y_found : array ``(n_found,)``
        Found positions (pixels).
    radius : float
        Largest matching distance (pixels).

    Returns
    -------
    numpy.ndarray ``(n_true,)`` of int
        Index of each true galaxy's match among the found sources, -1 for none.
    """
    x_true, y_true = np.asarray(x_true, float), np.asarray(y_true, float)
    out = np.full(len(x_true), -1)
    if len(x_found) == 0:
        return out
    d = np.hypot(
        x_true[:, None] - np.asarray(x_found, float)[None], y_true[:, None] - np.asarray(y_found, float)[None]
    )
    d = np.where(np.isnan(d), np.inf, d)  # a source without a position (a masked catalogue row) matches none
    taken = np.zeros(d.shape[1], bool)
    for i in np.argsort(d.min(axis=1)):  # a handful of galaxies per blend
        cand = np.where(taken, np.inf, d[i])
        j = int(np.argmin(cand))
        if cand[j] <= radius:
            out[i] = j
            taken[j] = True
    return out


def residual_sources(
    scene: Scene,
    model: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    model_error: float | Sequence[float] = 0.0,
    survey: str | None = None,
    threshold: float = THRESHOLD,
    radius: float = RESIDUAL_RADIUS,
    tile_size: int | None = TILE_SIZE,
    overlap: int = OVERLAP,
) -> Table:
    """Sources a fit missed: peaks of the PSF-filtered residual ``scene - model``.

    A galaxy that detection missed on a neighbour's wing leaves its light in
    the residual once the neighbour is fitted. Each band's residual is divided
    by its pixels' noise (the variance plane, else sky plus the model's
    Poisson term, plus ``(model_error * model)**2``: the scene model's
    model-error term, with the smooth fitted model in place of the noisy data
    the likelihood uses, so a bright galaxy's core misfit is not a detection), the
    bands are combined as in :func:`detection_image` and filtered with the
    PSF. Peaks above ``threshold`` closer than ``radius`` pixels to a fitted
    source at ``(x, y)`` are that source's misfit and are dropped.

    Parameters
    ----------
    scene : Scene
    model : numpy.ndarray ``(band, y, x)``
        The fitted model of the scene in its bands, electrons.
    x, y : numpy.ndarray
        Positions of the fitted sources, pixels.
    model_error : float or sequence of float
        Fractional model error of the fit (dimensionless), one value or one per band.
    survey : str, optional
        Survey giving the sky level and PSF when the scene has none.
    threshold : float
        Smallest point-source S/N of a residual peak.
    radius : float
        Exclusion radius around the fitted sources, pixels.
    tile_size, overlap : int
        Tiles of a large image, as in :func:`detect_sources`.

    Returns
    -------
    astropy.table.Table
        ``x``, ``y``, ``snr`` of the new sources, decreasing S/N.
    """
    model = np.asarray(model, np.float64)
    if model.shape != tuple(scene.image.shape):
        raise BayesblendError(
            f"model shape {model.shape} differs from the scene's {tuple(scene.image.shape)}"
        )
    sky = sky_variance(scene, survey)
    kernel = detection_psf(scene, 1.0 / sky, survey)
    error = np.reshape(np.asarray(model_error, np.float64), (-1, 1, 1))

    def find(tile: Tile) -> Table:
        sub = _tile_scene(scene, tile)
        m = model[:, tile.y0 : tile.y1, tile.x0 : tile.x1]
        var = np.asarray(sub.variance, np.float64) if sub.variance is not None else poisson_variance(m, sky)
        var = var + (error * m) ** 2
        det, no_weight = _unit_noise_sum(
            np.asarray(sub.image, np.float64) - m, var, _bad_pixels(sub) | ~(var > 0)
        )
        return _peaks(_snr_map(det, kernel), no_weight, threshold)

    t = over_tiles(tile_grid(scene.shape, tile_size, overlap), find)
    if len(t) and len(x):
        d, _ = cKDTree(np.c_[np.asarray(x, float), np.asarray(y, float)]).query(np.c_[t["x"], t["y"]])
        t = t[d > radius]
    t = merge_close(t, MERGE_RADIUS)
    t["x"].unit = t["y"].unit = "pix"
    return t
