"""Tiles: a large image cut into overlapping tiles whose cores partition it.

Detection works on whole-image arrays (a float64 detection image, its
PSF-filtered S/N map, sep's segmentation), several times the image's own size
in memory. On a survey image of thousands of pixels a side it runs tile by
tile instead: each tile is a core of at most ``tile_size`` pixels a side plus
``overlap`` pixels of context on every side (clipped at the image's edge),
and a source found in a tile is kept only when its position lies in that
tile's core. The cores partition the image, so a source near a tile edge is
kept exactly once; the overlap is wider than what detection looks at around
a pixel (the PSF filter's half-width, a galaxy's segment), so a core sees
what the whole image would show it. Pairs straddling two cores are merged
afterwards (:func:`bayesblend.detect.merge_close` over the whole list).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from astropy.table import Table, vstack

from bayesblend.errors import BayesblendError

#: Default core side of a detection tile, pixels: a 6-band 1024 x 1024 tile's detection arrays take
#: about 0.3 GB.
TILE_SIZE = 1024
#: Default context around a tile's core, pixels: beyond the PSF filter's half-width (about 12 pixels
#: for LSST) and the segments of all but the largest galaxies.
OVERLAP = 64


@dataclass(frozen=True)
class Tile:
    """One tile: the region processed and its core, in image pixels (half-open ranges).

    Attributes
    ----------
    x0, x1, y0, y1 : int
        The region processed (core plus overlap, inside the image).
    core : tuple of int
        ``(cx0, cx1, cy0, cy1)``: the pixels whose sources this tile reports.
    shape : tuple of int
        ``(ny, nx)`` of the whole image (a core on its edge owns what lies beyond it).
    """

    x0: int
    x1: int
    y0: int
    y1: int
    core: tuple[int, int, int, int]
    shape: tuple[int, int]

    @property
    def height(self) -> int:
        """Rows of the processed region."""
        return self.y1 - self.y0

    @property
    def width(self) -> int:
        """Columns of the processed region."""
        return self.x1 - self.x0

    def owns(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Whether each position (image pixels, 0-based) lies in this tile's core.

        Pixel ``i`` covers ``[i - 0.5, i + 0.5)``; a core on the image's edge
        also owns positions beyond it, so every position belongs to one tile.
        """
        cx0, cx1, cy0, cy1 = self.core
        ny, nx = self.shape
        x, y = np.asarray(x, float), np.asarray(y, float)
        lo_x = -np.inf if cx0 == 0 else cx0 - 0.5
        hi_x = np.inf if cx1 == nx else cx1 - 0.5
        lo_y = -np.inf if cy0 == 0 else cy0 - 0.5
        hi_y = np.inf if cy1 == ny else cy1 - 0.5
        return (x >= lo_x) & (x < hi_x) & (y >= lo_y) & (y < hi_y)


def tile_grid(
    shape: tuple[int, int], tile_size: int | None = TILE_SIZE, overlap: int = OVERLAP
) -> list[Tile]:
    """Tiles covering an image of ``shape = (ny, nx)``; one tile when it fits in ``tile_size``.

    Cores are as equal as the image allows, at most ``tile_size`` pixels a
    side; ``tile_size=None`` gives one tile whatever the size.
    """
    ny, nx = (int(s) for s in shape)
    if tile_size is not None and tile_size < 1:
        raise BayesblendError(f"tile size must be a positive number of pixels, got {tile_size}")
    if overlap < 0:
        raise BayesblendError(f"tile overlap must be >= 0 pixels, got {overlap}")

    def cuts(n: int) -> np.ndarray:
        k = 1 if tile_size is None else max(1, -(-n // tile_size))
        return np.round(np.linspace(0, n, k + 1)).astype(int)

    ys, xs = cuts(ny), cuts(nx)
    tiles = []
    for cy0, cy1 in zip(ys[:-1], ys[1:], strict=True):
        for cx0, cx1 in zip(xs[:-1], xs[1:], strict=True):
            tiles.append(
                Tile(
                    x0=max(int(cx0) - overlap, 0),
                    x1=min(int(cx1) + overlap, nx),
                    y0=max(int(cy0) - overlap, 0),
                    y1=min(int(cy1) + overlap, ny),
                    core=(int(cx0), int(cx1), int(cy0), int(cy1)),
                    shape=(ny, nx),
                )
            )
    return tiles


def over_tiles(tiles: list[Tile], find: Callable[[Tile], Table]) -> Table:
    """Sources found tile by tile, in image pixels, each kept by the tile whose core holds it.

    ``find(tile)`` returns a table with ``x``, ``y`` in the tile's region's
    pixels (first pixel of the region at 0) and any other columns; the
    results are shifted to image pixels and stacked.
    """
    parts = []
    for tile in tiles:
        t = find(tile)
        if not len(t):
            continue
        t["x"] = np.asarray(t["x"], float) + tile.x0
        t["y"] = np.asarray(t["y"], float) + tile.y0
        parts.append(t[tile.owns(t["x"], t["y"])])
    parts = [p for p in parts if len(p)]
    if not parts:
        return find_empty()
    return vstack(parts) if len(parts) > 1 else parts[0]


def find_empty() -> Table:
    """An empty source table (``x``, ``y``, ``snr``)."""
    return Table({"x": np.zeros(0), "y": np.zeros(0), "snr": np.zeros(0)})
