"""Figures: colour composites of scenes with source markers.

matplotlib runs with the non-interactive Agg backend; every figure is written
atomically (temporary file, then rename).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from astropy.table import Table  # noqa: E402
from astropy.visualization import make_lupton_rgb  # noqa: E402

from bayesblend.detect import match_sources  # noqa: E402
from bayesblend.io import atomic_path  # noqa: E402
from bayesblend.model import pixel_variance  # noqa: E402
from bayesblend.scene import Scene  # noqa: E402

if TYPE_CHECKING:  # types only: the posterior layer sits above this module
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from bayesblend.posterior import Posterior


def composite(scene: Scene, bands: Sequence[str] = ("i", "r", "g"), q: float = 8.0) -> np.ndarray:
    """An RGB composite (``make_lupton_rgb``) of three bands, red to blue, scaled to the noise.

    Each band is divided by its robust noise level (median absolute deviation)
    so that the stretch is the same for any survey depth.

    Returns
    -------
    numpy.ndarray
        ``(y, x, 3)`` uint8 image.
    """
    planes = []
    for b in bands:
        img = scene.image[scene.band_index(b)].astype(np.float64)
        sigma = 1.4826 * np.median(np.abs(img - np.median(img)))
        planes.append(img / max(sigma, 1e-12))
    return make_lupton_rgb(*planes, minimum=-1.0, stretch=6.0, Q=q)


def draw_scene(
    ax: Axes,
    scene: Scene,
    truth: Table,
    bands: Sequence[str] = ("i", "r", "g"),
    marker_size: float = 70,
    linewidth: float = 0.9,
) -> None:
    """Draw the composite of ``scene`` on ``ax`` with the truth positions circled.

    Parameters
    ----------
    ax : matplotlib.axes.Axes
        Where to draw.
    scene : Scene
        The scene to show (:func:`composite` of ``bands``).
    truth : astropy.table.Table
        Sources to circle, with ``x``, ``y`` in pixels (0-based).
    bands : sequence of str
        Three bands, red to blue.
    marker_size : float
        Circle area, points^2.
    linewidth : float
        Circle line width, points.
    """
    ax.imshow(composite(scene, bands), origin="lower", interpolation="nearest")
    ax.scatter(
        truth["x"], truth["y"], s=marker_size, facecolors="none", edgecolors="cyan", linewidths=linewidth
    )


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Write ``fig`` atomically (format from the suffix, PNG by default) and close it."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path


def plot_scene_truth(
    scene: Scene,
    truth: Table,
    path: str | os.PathLike,
    bands: Sequence[str] = ("i", "r", "g"),
    title: str | None = None,
    detected: Table | None = None,
) -> Path:
    """Write a composite of ``scene`` with truth positions (and optional detections) marked.

    Truth sources are circles labelled with their r magnitude; detections (a
    table with ``x``, ``y``) are crosses.
    """
    fig, ax = plt.subplots(figsize=(4.2, 4.2), dpi=120)
    draw_scene(ax, scene, truth, bands, marker_size=90, linewidth=1.0)
    magcol = "mag_r" if "mag_r" in truth.colnames else None
    if magcol:
        for row in truth:
            ax.annotate(
                f"{row[magcol]:.1f}",
                (row["x"], row["y"]),
                xytext=(5, 5),
                textcoords="offset points",
                color="cyan",
                fontsize=7,
            )
    if detected is not None and len(detected):
        ax.scatter(detected["x"], detected["y"], marker="+", s=60, color="orange", linewidths=1.0)
    ax.set_xlabel("x [pixel]")
    ax.set_ylabel("y [pixel]")
    ax.set_title(title or f"{'/'.join(bands)} composite, truth circles", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_blend(
    posterior: Posterior, blend_id: int, path: str | os.PathLike, truth: Table | None = None
) -> Path:
    """The deblending figure of one blend.

    Rows 1-3, one column per band: the data, the model at the point estimate
    (MAP; the amortised start for ``amortised``) and the residual in units of
    the noise. Row 4: a gri composite with detected (+) and fitted (x)
    positions, the posterior of (e1, e2) per source and the posterior of the
    r-band magnitude per source (with the truth when ``truth`` is given,
    matched by position).
    """
    b = posterior.blends[blend_id]
    bands = posterior.bands
    nb = len(bands)
    data = np.where(np.asarray(b.data["valid"]), np.asarray(b.data["image"]), np.nan)
    model = posterior.model_image(blend_id)
    resid = (data - model) / np.sqrt(np.asarray(pixel_variance(b.spec, b.data, model)))
    ncol = max(nb, 3)
    fig, axes = plt.subplots(4, ncol, figsize=(1.9 * ncol, 8.2), dpi=110, squeeze=False)
    for j, band in enumerate(bands):
        lo, hi = np.nanpercentile(data[j], [1, 99.7])
        for row, (img, cmap, lim) in enumerate(
            [(data[j], "gray_r", (lo, hi)), (model[j], "gray_r", (lo, hi)), (resid[j], "RdBu_r", (-5, 5))]
        ):
            ax = axes[row, j]
            ax.imshow(img, origin="lower", cmap=cmap, vmin=lim[0], vmax=lim[1], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(band, fontsize=9)
        if j == 0:
            for row, label in enumerate(["data", "model", "residual / sigma"]):
                axes[row, 0].set_ylabel(label, fontsize=8)
    for j in range(nb, ncol):
        for row in range(3):
            axes[row, j].axis("off")
    sel = np.flatnonzero(np.asarray(posterior.sources["blend_id"]) == blend_id)
    cat = posterior.catalog()[sel]
    ox, oy = b.origin
    ax = axes[3, 0]
    comp_bands = [x for x in ("i", "r", "g") if x in bands] or list(bands[:3])
    ax.imshow(composite(b.scene, comp_bands), origin="lower", interpolation="nearest")
    ax.scatter(
        cat["x_det"] - ox,
        cat["y_det"] - oy,
        marker="+",
        s=60,
        color="orange",
        linewidths=1.0,
        label="detected",
    )
    ax.scatter(cat["x"] - ox, cat["y"] - oy, marker="x", s=40, color="cyan", linewidths=1.0, label="fitted")
    for i, row in enumerate(cat):
        ax.annotate(
            str(i),
            (row["x"] - ox, row["y"] - oy),
            xytext=(4, 4),
            textcoords="offset points",
            color="white",
            fontsize=7,
        )
    ax.legend(fontsize=6, loc="lower right")
    ax.set_xticks([])
    ax.set_yticks([])
    colors = plt.cm.tab10(np.arange(len(sel)) % 10)
    ax = axes[3, 1]
    sb = posterior.shape_band
    ib = bands.index(sb)
    tmatch = _match_truth(cat, truth)
    for i, s in enumerate(sel):
        e1 = posterior.draws["e1"][:, :, s].ravel()
        e2 = posterior.draws["e2"][:, :, s].ravel()
        ax.scatter(e1, e2, s=2, alpha=0.3, color=colors[i])
        if tmatch is not None and tmatch[i] >= 0 and "e1" in truth.colnames:
            ax.scatter(
                truth["e1"][tmatch[i]],
                truth["e2"][tmatch[i]],
                marker="*",
                s=80,
                color=colors[i],
                edgecolors="k",
                linewidths=0.5,
            )
    ax.set_xlabel("e1", fontsize=8)
    ax.set_ylabel("e2", fontsize=8)
    ax.set_title("posterior e (star: truth)", fontsize=8)
    ax.tick_params(labelsize=6)
    ax = axes[3, 2]
    for i, s in enumerate(sel):
        m = posterior.draws["mag"][:, :, s, ib].ravel()
        ax.hist(m, bins=30, histtype="step", color=colors[i], density=True, label=str(i))
        if tmatch is not None and tmatch[i] >= 0 and f"mag_{sb}" in truth.colnames:
            ax.axvline(truth[f"mag_{sb}"][tmatch[i]], color=colors[i], ls="--", lw=0.8)
    ax.set_xlabel(f"mag_{sb}", fontsize=8)
    ax.set_title("posterior magnitude (dashed: truth)", fontsize=8)
    ax.tick_params(labelsize=6)
    ax.legend(fontsize=6)
    for j in range(3, ncol):
        axes[3, j].axis("off")
    label = int(posterior.blend_ids[blend_id])
    fig.suptitle(f"blend {label}: {len(sel)} source(s), method {posterior.method}", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_blends(
    posterior: Posterior,
    directory: str | os.PathLike,
    truths: Sequence[Table | None] | None = None,
    only: Sequence[int] | None = None,
) -> Path:
    """Write :func:`plot_blend` for every blend (or those ``only`` indexes) as ``directory/blend_NNNN.png``.

    ``NNNN`` is the blend's catalogue ``blend_id``. ``truths``, when given,
    holds one truth table (or None) per scene, in the scene order of the
    posterior. Returns the directory.
    """
    directory = Path(directory)
    scene_of = np.asarray(posterior.sources["scene"])
    blend_of = np.asarray(posterior.sources["blend_id"])
    for i in range(posterior.n_blends) if only is None else only:
        truth = None if truths is None else truths[int(scene_of[blend_of == i][0])]
        plot_blend(posterior, i, directory / f"blend_{int(posterior.blend_ids[i]):04d}.png", truth=truth)
    return directory


def _match_truth(cat: Table, truth: Table | None, radius: float = 2.0) -> np.ndarray | None:
    """Row of ``truth`` matched to each catalogue row within ``radius`` pixels (-1: none).

    The one-to-one matching of the benchmarks (:func:`bayesblend.detect.match_sources`).
    """
    if truth is None or len(truth) == 0:
        return None
    hit = match_sources(truth["x"], truth["y"], cat["x"], cat["y"], radius)
    rows = np.full(len(cat), -1)
    rows[hit[hit >= 0]] = np.flatnonzero(hit >= 0)
    return rows
