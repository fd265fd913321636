"""Figures: colour composites of scenes with source markers.

matplotlib runs with the non-interactive Agg backend; every figure is written
atomically (temporary file, then rename).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from astropy.table import Table  # noqa: E402
from astropy.visualization import make_lupton_rgb  # noqa: E402

from bayesblend.io import atomic_path  # noqa: E402
from bayesblend.scene import Scene  # noqa: E402


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
    ax,
    scene: Scene,
    truth: Table,
    bands: Sequence[str] = ("i", "r", "g"),
    marker_size: float = 70,
    linewidth: float = 0.9,
) -> None:
    """Draw the composite of ``scene`` on ``ax`` with the truth positions circled."""
    ax.imshow(composite(scene, bands), origin="lower", interpolation="nearest")
    ax.scatter(
        truth["x"], truth["y"], s=marker_size, facecolors="none", edgecolors="cyan", linewidths=linewidth
    )


def save_figure(fig, path: str | os.PathLike) -> Path:
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
