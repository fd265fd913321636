"""Tiles of a large image: cores partition it, and detection does not depend on how it is cut."""

import numpy as np
import pytest

from bayesblend.detect import detect_sources, merge_close, residual_sources
from bayesblend.errors import BayesblendError
from bayesblend.simulate.scenes import simulate_field
from bayesblend.tiles import tile_grid


def test_tile_cores_partition_the_image_and_edges_own_what_lies_beyond():
    tiles = tile_grid((100, 250), tile_size=64, overlap=10)
    assert len(tiles) == 2 * 4
    rng = np.random.default_rng(0)
    x, y = rng.uniform(-0.5, 249.5, 5000), rng.uniform(-0.5, 99.5, 5000)
    x[:4], y[:4] = [-0.6, 249.7, 63.5, 62.49], [-0.6, 99.7, 10.0, 10.0]  # beyond the edges; on a cut
    owners = np.sum([t.owns(x, y) for t in tiles], axis=0)
    assert np.all(owners == 1)
    for t in tiles:
        cx0, cx1, cy0, cy1 = t.core
        assert cx1 - cx0 <= 64 and cy1 - cy0 <= 64
        assert t.x0 == max(cx0 - 10, 0) and t.x1 == min(cx1 + 10, 250)
    assert len(tile_grid((100, 250), tile_size=None)) == 1
    with pytest.raises(BayesblendError, match="tile size"):
        tile_grid((10, 10), tile_size=0)


def test_merge_close_is_greedy_by_snr():
    from astropy.table import Table

    # 1 removes 2 (1.0 apart); 2 would have removed 3, but 2 is gone, so 3 stays
    t = Table({"x": [0.0, 1.0, 2.2], "y": [0.0, 0.0, 0.0], "snr": [10.0, 8.0, 5.0]})
    kept = merge_close(t, 1.5)
    assert list(kept["x"]) == [0.0, 2.2]


@pytest.fixture(scope="module")
def field():
    return simulate_field(7, 0, shape=(192, 160), density=120.0, mag_range=(20.0, 25.5))


def test_detection_is_the_same_whatever_the_tiling(field):
    whole = detect_sources(field.scene, tile_size=None)
    assert len(whole) > 20
    for size, overlap in ((64, 40), (100, 48)):
        tiled = detect_sources(field.scene, tile_size=size, overlap=overlap)
        assert len(tiled) == len(whole)  # no source lost or found twice at the tile edges
        d = np.hypot(whole["x"][:, None] - tiled["x"][None], whole["y"][:, None] - tiled["y"][None])
        assert np.all(d.min(axis=1) < 1e-3)
        assert np.allclose(np.sort(whole["snr"]), np.sort(tiled["snr"]), rtol=1e-6)


def test_residual_detection_is_the_same_whatever_the_tiling(field):
    # the residual of a model holding only the brighter half of the galaxies: the rest are found
    # once each, with tiles or without
    s = field.scene
    det = detect_sources(s, tile_size=None)
    bright = det[: len(det) // 2]
    model = simulate_field(7, 0, shape=(192, 160), density=120.0, mag_range=(20.0, 25.5), noise=False)
    faint = residual_sources(s, 0.5 * model.scene.image, bright["x"], bright["y"], tile_size=None)
    tiled = residual_sources(s, 0.5 * model.scene.image, bright["x"], bright["y"], tile_size=64, overlap=40)
    assert len(faint) > 3 and len(tiled) == len(faint)
    d = np.hypot(faint["x"][:, None] - tiled["x"][None], faint["y"][:, None] - tiled["y"][None])
    assert np.all(d.min(axis=1) < 1e-3)
