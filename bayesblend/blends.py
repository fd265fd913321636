"""Blends: grouping sources into blends and preparing each for the scene model.

A scene (a simulated stamp or a survey field) holds sources; sources whose
light overlaps must be fitted together. :func:`group_sources` links sources
closer than a linking length (friends of friends), and those that share a
footprint (:func:`bayesblend.detect.footprint_pairs`), into blends of at most
``PAD_SIZES[-1]`` sources, :func:`blend_region` gives each blend a square cutout
whose side is a multiple of :data:`REGION_MULTIPLE`, and :func:`prepare_blend` turns a cutout and its sources
into the static :class:`~bayesblend.model.SceneSpec` and the arrays of
:func:`~bayesblend.model.scene_model`. Sources are padded to a few fixed counts
(:data:`PAD_SIZES`) and cutouts to squares of a multiple of :data:`REGION_MULTIPLE`
pixels, so blends of similar size share one compilation and run together
under ``vmap``. On a 2048 x 2048 LSST field (3563 blends) square sides in
steps of 32 give 9 compiled shapes for 7 % more pixels than the tightest
rectangles in steps of 16, which give 35 (each a compilation of about 20 s
per worker): RESULTS "Whole images".
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from bayesblend.errors import BadPixelWarning, BayesblendError, BundleError, MaskedBlendError
from bayesblend.forward import anchor_and_offset, fft_size, psf_spectrum
from bayesblend.model import LOG_FLUX_SIGMA, MODEL_ERROR, POSITION_SIGMA, SceneSpec
from bayesblend.prior.bundle import PriorBundle
from bayesblend.scene import Scene
from bayesblend.survey import flux_to_mag, get_survey

#: Padded source counts: a blend of k sources is padded to the smallest size >= k.
PAD_SIZES = (1, 2, 4, 8, 16)
#: Blend cutouts are squares whose side is a multiple of this many pixels.
REGION_MULTIPLE = 32
#: A cutout never exceeds the scene rounded up to a multiple of this many pixels (a stamp-sized scene
#: is fitted whole).
SCENE_MULTIPLE = 16


def padded_count(k: int) -> int:
    """The padded source count for ``k`` sources."""
    for p in PAD_SIZES:
        if k <= p:
            return p
    raise BayesblendError(f"blends of more than {PAD_SIZES[-1]} sources are not supported (got {k})")


def group_sources(
    x: np.ndarray,
    y: np.ndarray,
    linking_length: float,
    max_sources: int = PAD_SIZES[-1],
    pairs: np.ndarray | None = None,
) -> tuple[list[np.ndarray], list[bool]]:
    """Friends-of-friends groups of sources closer than ``linking_length`` pixels, or paired.

    ``pairs`` (``(n, 2)`` source indices) links more sources: those whose
    light shares a footprint (:func:`bayesblend.detect.footprint_pairs`). The
    linking length alone misses the neighbours of a large galaxy that sit in
    its light farther out; footprints alone miss the faint sources, most of
    the detections at survey depth, whose pixels are below the footprints'
    threshold. On a 2048 x 2048 LSST field (6 243 sources) the footprints
    join the 3 588 blends of a 16-pixel linking length into 3 528, and no
    more sources end in split blends (RESULTS "Whole images").

    A group larger than ``max_sources`` is split in two along its longer axis
    (at the median) until every part fits: the parts are then fitted
    separately, an approximation the catalogue flags (``SPLIT_BLEND``).

    Returns
    -------
    groups : list of numpy.ndarray
        Source indices per group, sorted by their smallest index.
    split : list of bool
        Per group, whether it is a part of a larger linked group that was split.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    n = len(x)
    if n == 0:
        return [], []
    links = cKDTree(np.c_[x, y]).query_pairs(linking_length, output_type="ndarray")
    if pairs is not None and len(pairs):
        links = np.concatenate([links.reshape(-1, 2), np.asarray(pairs, int).reshape(-1, 2)])
    graph = coo_matrix((np.ones(len(links)), (links[:, 0], links[:, 1])), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    groups: list[tuple[np.ndarray, bool]] = []

    def split(idx: np.ndarray, was_split: bool) -> None:
        if len(idx) <= max_sources:
            groups.append((np.sort(idx), was_split))
            return
        coord = x[idx] if np.ptp(x[idx]) >= np.ptp(y[idx]) else y[idx]
        order = idx[np.argsort(coord, kind="stable")]
        half = len(order) // 2
        split(order[:half], True)
        split(order[half:], True)

    for lab in np.unique(label):
        split(np.flatnonzero(label == lab), False)
    groups.sort(key=lambda g: int(g[0].min()))
    return [g for g, _ in groups], [s for _, s in groups]


#: Largest relative difference between a scene's pixel scale and the prior's.
PIXEL_SCALE_TOLERANCE = 0.01


def check_scene(scene: Scene, bundle: PriorBundle) -> None:
    """A one-line error if the prior cannot fit ``scene``: bands it lacks, or another pixel scale.

    The decoder draws galaxies on its training pixel grid (``architecture.pixel_scale``
    of the model card, arcsec); a scene sampled otherwise would be fitted with
    galaxies of the wrong size.
    """
    missing = [b for b in bundle.bands if b not in scene.bands]
    if missing:
        raise BayesblendError(f"scene lacks band(s) {', '.join(missing)} that the prior needs")
    scale = float(bundle.card["architecture"]["pixel_scale"])
    if abs(scene.pixel_scale / scale - 1.0) > PIXEL_SCALE_TOLERANCE:
        raise BayesblendError(
            f"scene pixel scale {scene.pixel_scale:g} arcsec differs from the prior's {scale:g} arcsec "
            "(resample the scene, or use a prior trained at its scale)"
        )


def blend_region(
    x: np.ndarray, y: np.ndarray, scene_shape: tuple[int, int], margin: int, multiple: int = REGION_MULTIPLE
) -> tuple[int, int, int, int]:
    """Cutout ``(x0, y0, height, width)`` holding the sources plus ``margin`` pixels around them.

    A square whose side is the longer extent rounded up to a multiple of
    ``multiple``, except that neither side exceeds the scene's rounded up to
    :data:`SCENE_MULTIPLE`; the box is centred on the sources and kept inside
    the scene where it fits (a box larger than the scene overhangs it and the
    overhang is masked).
    """
    ny, nx = scene_shape
    lo_x, hi_x, lo_y, hi_y = float(np.min(x)), float(np.max(x)), float(np.min(y)), float(np.max(y))
    extent = max(hi_x - lo_x, hi_y - lo_y) + 1 + 2 * margin
    need = int(np.ceil(extent / multiple) * multiple)

    def axis(lo: float, hi: float, size: int) -> tuple[int, int]:
        side = min(need, int(np.ceil(size / SCENE_MULTIPLE) * SCENE_MULTIPLE))
        start = int(np.floor((lo + hi) / 2 - (side - 1) / 2))
        start = min(max(start, 0), max(size - side, 0)) if side <= size else (size - side) // 2
        return start, side

    x0, w = axis(lo_x, hi_x, nx)
    y0, h = axis(lo_y, hi_y, ny)
    return x0, y0, h, w


@dataclass
class PreparedBlend:
    """A blend ready for the scene model: static spec, arrays, and what is needed to report.

    Attributes
    ----------
    spec : SceneSpec
    data : dict of jax.Array
        The arrays of :func:`bayesblend.model.scene_model`.
    n_real : int
        Number of real (unpadded) sources.
    x, y : numpy.ndarray
        Detected positions of the real sources in the blend's frame, pixels.
    bands : tuple of str
    magzero : numpy.ndarray
    scene : Scene
        The blend's cutout (bands in the prior's order).
    origin : (int, int)
        ``(x0, y0)`` of the cutout in the parent scene, pixels.
    """

    spec: SceneSpec
    data: dict
    n_real: int
    x: np.ndarray
    y: np.ndarray
    bands: tuple[str, ...]
    magzero: np.ndarray
    scene: Scene
    origin: tuple[int, int] = (0, 0)


def bad_pixels(scene: Scene) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixels of ``scene`` that cannot carry weight, three bool arrays ``(band, H, W)``.

    Returns
    -------
    bad_value : numpy.ndarray
        A non-finite pixel value.
    bad_variance : numpy.ndarray
        A non-finite or non-positive variance (all False without a variance plane).
    masked : numpy.ndarray
        The scene's own mask (all False without one).
    """
    bad_value = ~np.isfinite(np.asarray(scene.image))
    masked = np.zeros(bad_value.shape, bool) if scene.mask is None else np.asarray(scene.mask, bool)
    if scene.variance is None:
        return bad_value, np.zeros_like(bad_value), masked
    var = np.asarray(scene.variance)
    return bad_value, ~(np.isfinite(var) & (var > 0)), masked


def warn_bad_pixels(
    bad_value: np.ndarray, bad_variance: np.ndarray, masked: np.ndarray, where: str = "", stacklevel: int = 3
) -> None:
    """One warning per kind of bad pixel (:func:`bad_pixels`) that is not masked already, with its count.

    ``where`` (e.g. ``"blend_3.fits: "``) prefixes the message.
    """
    n_value = int(np.sum(bad_value & ~masked))  # a band masked whole on reading was reported there
    if n_value:
        warnings.warn(f"{where}{n_value} non-finite pixels masked", BadPixelWarning, stacklevel=stacklevel)
    n_new = int(np.sum(bad_variance & ~bad_value & ~masked))  # not already masked for another reason
    if n_new:
        warnings.warn(
            f"{where}{n_new} pixels with a non-finite or non-positive variance masked",
            BadPixelWarning,
            stacklevel=stacklevel,
        )


def prepare_blend(
    scene: Scene,
    x: Sequence[float],
    y: Sequence[float],
    bundle: PriorBundle,
    log_flux_sigma: float = LOG_FLUX_SIGMA,
    position_sigma: float = POSITION_SIGMA,
    model_error: float | Sequence[float] | None = None,
    origin: tuple[int, int] = (0, 0),
    warn: bool = True,
) -> PreparedBlend:
    """Arrays of the scene model for sources at ``(x, y)`` in ``scene`` (bands in the bundle's order).

    ``model_error`` is the fractional misfit per band (:func:`model_error_of`:
    None takes the bundle's measured one).

    Bad pixels (a non-finite value, or a non-finite or non-positive variance)
    are masked, with a warning unless ``warn`` is False (a caller that cuts
    many blends from one scene warns once for the whole scene:
    :func:`warn_bad_pixels`); a missing PSF is
    replaced by the survey's default PSF with a warning; missing bands are an error.
    """
    check_scene(scene, bundle)
    sc = scene.select_bands(bundle.bands)
    survey = get_survey(bundle.survey)
    image = np.asarray(sc.image, dtype=np.float32)
    bad_value, bad_variance, masked = bad_pixels(sc)
    if warn:
        warn_bad_pixels(bad_value, bad_variance, masked)
    valid = ~bad_value & ~bad_variance & ~masked
    if not valid.any():
        raise MaskedBlendError("every pixel of the blend is masked")
    image = np.where(valid, image, 0.0).astype(np.float32)
    psf = sc.psf_images(bundle.survey, warn=True)
    sky = survey.sky_level(bundle.bands).astype(np.float32)
    x, y = np.atleast_1d(np.asarray(x, float)), np.atleast_1d(np.asarray(y, float))
    k = len(x)
    if k == 0:
        raise BayesblendError("no sources to deblend")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise BayesblendError("source positions must be finite numbers")
    n = padded_count(k)
    anchor, offset0 = anchor_and_offset(x, y, bundle.stamp)
    # detection flux estimate: a 5x5 box sum over the PSF's fraction in the box, floored at 3 sigma
    c = psf.shape[-1] // 2
    frac = psf[:, c - 2 : c + 3, c - 2 : c + 3].sum(axis=(1, 2))
    ny, nx = image.shape[1:]
    padded_image = np.pad(image, ((0, 0), (2, 2), (2, 2)))
    xi = np.clip(np.round(x).astype(int), 0, nx - 1) + 2
    yi = np.clip(np.round(y).astype(int), 0, ny - 1) + 2
    box = sum(padded_image[:, yi + dy, xi + dx] for dy in range(-2, 3) for dx in range(-2, 3))
    flux0 = box.T / frac
    floor = 3 * np.sqrt(sky * 25) / frac
    log_flux0 = np.log(np.maximum(flux0, floor))
    pad = n - k

    def padded(a, fill):
        return np.concatenate([a, np.repeat(fill[None], pad, 0)]) if pad else a

    variance = sc.variance if sc.variance is not None else np.ones_like(image)
    data = {
        "image": jnp.asarray(image),
        "variance": jnp.asarray(np.where(valid, variance, 1.0), dtype=jnp.float32),
        "valid": jnp.asarray(valid),
        "sky": jnp.asarray(sky),
        "anchor": jnp.asarray(padded(anchor, np.array([-bundle.stamp, -bundle.stamp], np.int32))),
        "offset0": jnp.asarray(padded(offset0, np.zeros(2, np.float32))),
        "log_flux0": jnp.asarray(padded(log_flux0, np.zeros(len(bundle.bands))), dtype=jnp.float32),
        "source_valid": jnp.asarray(np.arange(n) < k),
    }
    priors = pose_priors(bundle)
    data["psf_ft"] = psf_spectrum(psf, fft_size(bundle.stamp))
    mag = flux_to_mag(np.exp(log_flux0), np.asarray(sc.magzero)[None])
    ref = bundle.bands.index(priors["size_band"])
    log_hlr0 = priors["ln_hlr_at_r23"] + priors["slope_per_mag"] * (mag[:, ref] - 23.0)
    data["log_hlr0"] = jnp.asarray(padded(log_hlr0, np.zeros((), np.float64)), dtype=jnp.float32)
    spec = blend_spec(
        bundle, (ny, nx), k, sc.variance is not None, log_flux_sigma, position_sigma, model_error
    )
    return PreparedBlend(spec, data, k, x, y, tuple(bundle.bands), np.asarray(sc.magzero), sc, origin)


def blend_spec(
    bundle: PriorBundle,
    shape: tuple[int, int],
    n_sources: int,
    has_variance: bool,
    log_flux_sigma: float = LOG_FLUX_SIGMA,
    position_sigma: float = POSITION_SIGMA,
    model_error: float | Sequence[float] | None = None,
) -> SceneSpec:
    """The static spec of a blend of ``n_sources`` in a cutout of ``shape``: what one compilation serves.

    Known before the cutout is made, so that a run can batch blends by it first.
    """
    priors = pose_priors(bundle)
    return SceneSpec(
        shape=tuple(int(v) for v in shape),
        n_sources=padded_count(n_sources),
        latent_dim=bundle.latent_dim,
        stamp=bundle.stamp,
        pixel_scale=float(bundle.card["architecture"]["pixel_scale"]),
        hlr_pixels=bundle.canonical_frame.hlr_pixels,
        ellipticity_scale=priors["ellipticity_scale"],
        log_flux_sigma=log_flux_sigma,
        log_hlr_sigma=priors["log_hlr_sigma"],
        position_sigma=position_sigma,
        has_variance=bool(has_variance),
        model_error=model_error_of(bundle, model_error),
    )


def model_error_of(bundle: PriorBundle, model_error: float | Sequence[float] | None) -> tuple[float, ...]:
    """The fractional misfit per band a fit uses: ``model_error``, or the bundle's when None.

    A number serves every band; None gives the card's measured misfit
    (:attr:`~bayesblend.prior.bundle.PriorBundle.misfit`), or
    :data:`~bayesblend.model.MODEL_ERROR` in every band for a card without one.
    """
    if model_error is None:
        return bundle.misfit or (MODEL_ERROR,) * len(bundle.bands)
    values = np.atleast_1d(np.asarray(model_error, float))
    if values.size == 1:
        values = np.repeat(values, len(bundle.bands))
    if values.size != len(bundle.bands) or not (values >= 0).all():
        raise BayesblendError(f"model_error needs one value >= 0 or one per band, got {model_error!r}")
    return tuple(float(v) for v in values)


def pose_priors(bundle: PriorBundle) -> dict:
    """The pose priors a bundle's card records (ellipticity scale, size-magnitude relation).

    Raises
    ------
    BundleError
        When the card lacks ``ellipticity_prior`` or ``size_prior``.
    """
    card = bundle.card
    try:
        size = card["size_prior"]
        return {
            "ellipticity_scale": float(card["ellipticity_prior"]["s"]),
            "ln_hlr_at_r23": float(size["ln_hlr_at_r23"]),
            "slope_per_mag": float(size["slope_per_mag"]),
            "log_hlr_sigma": float(size["sigma"]),
            "size_band": bundle.size_band,
        }
    except (KeyError, TypeError) as exc:
        raise BundleError(f"{bundle.path}: card.json lacks the pose priors ({exc})") from None
