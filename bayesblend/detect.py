"""Detection: sources found on a multi-band detection image with sep.

The detection image is the inverse-variance weighted sum of the bands,
scaled to unit noise: ``D = sum_b I_b / s_b^2 / sqrt(sum_b 1 / s_b^2)``, with
``s_b^2`` the sky variance per pixel (the variance plane's median when the
scene has one). For sources of any colour it is at least as deep as the best
single band. ``sep.extract`` (the SExtractor algorithm: threshold, then
multi-threshold deblending of the peaks) finds the sources; peaks closer than
``merge_radius`` pixels are merged (sep splits some bright, clumpy galaxies
in two), keeping the brighter. Masked and non-finite pixels are masked for sep.
sep is used rather than photutils because it is the SExtractor code the
survey pipelines compare against, and it is fast.
"""

from __future__ import annotations

import numpy as np
import sep
from astropy.table import Table

from bayesblend.errors import BayesblendError
from bayesblend.scene import Scene
from bayesblend.survey import get_survey


def detection_image(scene: Scene, survey: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Unit-noise detection image ``(y, x)`` and its bad-pixel mask."""
    sv = get_survey(survey or scene.survey)
    image = np.asarray(scene.image, np.float64)
    bad = ~np.isfinite(image)
    if scene.mask is not None:
        bad |= scene.mask
    if scene.variance is not None:
        var = np.array([np.nanmedian(np.where(bad[i], np.nan, v)) for i, v in enumerate(scene.variance)])
    else:
        var = np.array([sv.sky_counts(b) if b in sv.band_names else np.nan for b in scene.bands])
    if not np.all(np.isfinite(var) & (var > 0)):
        raise BayesblendError("cannot build a detection image: unknown noise level in some band")
    weight = np.where(bad, 0.0, 1.0 / var[:, None, None])
    norm = np.sqrt(np.sum(weight, axis=0))
    det = np.sum(np.where(bad, 0.0, image) * weight, axis=0) / np.where(norm > 0, norm, 1.0)
    return det.astype(np.float64), norm == 0


def detect_sources(
    scene: Scene,
    survey: str | None = None,
    threshold: float = 3.0,
    min_area: int = 5,
    deblend_cont: float = 0.001,
    merge_radius: float = 1.5,
) -> Table:
    """Detect sources on a scene.

    Parameters
    ----------
    scene : Scene
    survey : str, optional
        Survey giving the sky level when the scene has no variance plane.
    threshold : float
        Detection threshold, in noise sigma of the detection image.
    min_area : int
        Minimum connected pixels above threshold.
    deblend_cont : float
        sep's minimum contrast for splitting a detection into peaks.
    merge_radius : float
        Peaks closer than this (pixels) are merged.

    Returns
    -------
    astropy.table.Table
        ``x``, ``y`` (pixels, 0-based), ``snr`` (detection S/N, sum over the
        segment of D over the square root of its area), ``npix``; sorted by
        decreasing S/N. No rows when nothing is found.
    """
    det, bad = detection_image(scene, survey)
    try:
        objs = sep.extract(
            np.ascontiguousarray(det),
            threshold,
            err=1.0,
            mask=bad,
            minarea=min_area,
            deblend_cont=deblend_cont,
            clean=True,
        )
    except Exception as exc:  # sep raises a bare Exception on pathological images
        raise BayesblendError(f"detection failed: {exc}") from None
    t = Table(
        {
            "x": np.asarray(objs["x"], float),
            "y": np.asarray(objs["y"], float),
            "snr": np.asarray(objs["flux"], float) / np.sqrt(np.maximum(objs["npix"], 1)),
            "npix": np.asarray(objs["npix"], int),
        }
    )
    t.sort("snr", reverse=True)
    keep = np.ones(len(t), bool)
    for i in range(len(t)):  # greedy merging, brightest first (a handful of peaks per scene)
        if not keep[i]:
            continue
        d = np.hypot(t["x"] - t["x"][i], t["y"] - t["y"][i])
        close = (d < merge_radius) & (np.arange(len(t)) > i)
        keep &= ~close
    t = t[keep]
    t["x"].unit = t["y"].unit = "pix"
    return t
