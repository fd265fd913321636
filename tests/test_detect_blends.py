"""Detection, grouping into blends, cutouts, and the decoder's loop-friendly convolutions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bayesblend.blends import blend_region, group_sources
from bayesblend.detect import detect_sources, detection_snr_map, residual_sources
from bayesblend.errors import BayesblendError
from bayesblend.scene import Scene
from bayesblend.simulate.scenes import simulate_field, simulate_isolated
from bayesblend.survey import get_survey


def test_detection_finds_separated_galaxies_and_merges_duplicates():
    f = simulate_field(3, 0, shape=(96, 96), density=40.0, mag_range=(20.0, 23.0))
    det = detect_sources(f.scene)
    t = f.truth
    inside = (t["x"] > 3) & (t["x"] < 92) & (t["y"] > 3) & (t["y"] < 92)
    d = np.hypot(np.asarray(t["x"])[:, None] - det["x"][None], np.asarray(t["y"])[:, None] - det["y"][None])
    # every bright galaxy away from the edges has a detection within 2 pixels
    assert np.all(d[inside].min(axis=1) < 2.0)
    # no two detections closer than the merge radius
    dd = np.hypot(det["x"][:, None] - det["x"][None], det["y"][:, None] - det["y"][None])
    assert np.all(dd[np.triu_indices(len(det), 1)] >= 1.5)
    assert list(det["snr"]) == sorted(det["snr"], reverse=True)


def _point_sources(xy, snr, shape=(64, 64), seed=0):
    """An LSST scene of flat-SED point sources with given optimal S/N, and its noise-free S/N map."""
    sv = get_survey("lsst")
    psf = sv.psf_images(sv.band_names)
    var = np.array([sv.sky_counts(b) for b in sv.band_names])
    w = 1 / var
    # flat SED f per band: optimal S/N^2 = f^2 sum_b w_b sum(P_b^2)
    norm = np.sqrt(np.sum(w * np.sum(psf**2, axis=(1, 2))))
    image = np.zeros((len(var), *shape))
    c = psf.shape[1] // 2
    for (x, y), s in zip(xy, snr, strict=True):
        for b in range(len(var)):  # integer positions: a pasted PSF image is exact
            image[b, y - c : y + c + 1, x - c : x + c + 1] += s / norm * psf[b]
    noisy = image + np.random.default_rng(seed).normal(size=image.shape) * np.sqrt(var)[:, None, None]
    common = dict(bands=sv.band_names, magzero=np.full(6, 30.0), psf=psf)
    variance = np.broadcast_to(var[:, None, None], image.shape).copy()
    return Scene(image=noisy, variance=variance, **common), Scene(image=image, variance=variance, **common)


def test_detection_snr_map_is_the_point_source_snr():
    noisy, clean = _point_sources([(32, 32)], [12.0])
    m, _ = detection_snr_map(clean)
    # a flat-SED point source: the matched filter's peak is its optimal S/N (within the bands' PSF spread)
    assert m[32, 32] == pytest.approx(12.0, rel=0.05) and np.unravel_index(np.argmax(m), m.shape) == (32, 32)
    # and on noise alone the map has unit variance (read where the source is not)
    blank, _ = _point_sources([], [], shape=(128, 128))
    n, _ = detection_snr_map(blank)
    assert np.std(n[30:-30, 30:-30]) == pytest.approx(1.0, abs=0.1)


def test_faint_neighbour_on_a_bright_wing_is_detected():
    # S/N 100 and S/N 12, 12 pixels (2.4") apart: sep's 3-sigma segmentation (bayesblend's
    # detection before) gives one segment and misses the faint one, the PSF-matched peaks do not
    for seed in range(3):
        noisy, _ = _point_sources([(24, 32), (36, 32)], [100.0, 12.0], seed=seed)
        det = detect_sources(noisy)
        assert len(det) == 2
        assert np.hypot(det["x"][0] - 24, det["y"][0] - 32) < 0.5
        assert np.hypot(det["x"][1] - 36, det["y"][1] - 32) < 1.0
        assert det["snr"][1] == pytest.approx(12.0, abs=4.0)


def test_residual_of_a_fit_finds_the_neighbour_it_missed():
    # S/N 60 with an S/N 10 neighbour 5 pixels away, fitted as one source: the neighbour is in the
    # residual; fitted as both, nothing is; a bright source's misfit is dropped by the radius
    for seed in range(3):
        noisy, both = _point_sources([(30, 32), (35, 32)], [60.0, 10.0], seed=seed)
        bright = _point_sources([(30, 32)], [60.0])[1].image
        new = residual_sources(noisy, bright, np.array([30.0]), np.array([32.0]))
        assert len(new) == 1 and np.hypot(new["x"][0] - 35, new["y"][0] - 32) < 1.5
        assert len(residual_sources(noisy, both.image, np.array([30.0, 35.0]), np.array([32.0, 32.0]))) == 0
        misfit = 0.6 * both.image
        x, y = np.array([30.0, 35.0]), np.array([32.0, 32.0])
        assert len(residual_sources(noisy, misfit, x, y, radius=0.0)) >= 1
        assert len(residual_sources(noisy, misfit, x, y)) == 0
    with pytest.raises(BayesblendError, match="model shape"):
        residual_sources(noisy, bright[:3], x, y)


def test_close_pair_of_comparable_galaxies_is_split():
    # S/N 60 and 40, 7 pixels (1.4") apart: the PSF filter blurs them into one peak, the
    # segmentation of the unfiltered image splits them, and its source joins the peaks
    for seed in range(3):
        det = detect_sources(_point_sources([(28, 32), (35, 32)], [60.0, 40.0], seed=seed)[0])
        assert len(det) == 2
        d = np.hypot(np.asarray(det["x"])[:, None] - [28, 35], np.asarray(det["y"])[:, None] - 32)
        assert d.min(axis=0).max() < 1.5


def test_detection_on_pure_noise_is_empty():
    g = simulate_isolated(1, 0)
    sc = g.scene.select_bands(list(g.scene.bands))
    rng = np.random.default_rng(1)
    sc.image = (rng.normal(size=sc.image.shape) * np.sqrt(sc.variance)).astype(np.float32)
    assert len(detect_sources(sc)) == 0


def test_groups_link_neighbours_and_split_large_groups():
    x = np.array([0.0, 5.0, 10.0, 50.0, 100.0, 104.0])
    y = np.zeros(6)
    groups, split = group_sources(x, y, 6.0)
    assert [g.tolist() for g in groups] == [[0, 1, 2], [3], [4, 5]] and split == [False] * 3
    big, split = group_sources(np.arange(40.0), np.zeros(40), 1.5, max_sources=16)
    assert sorted(len(g) for g in big) == [10, 10, 10, 10] and np.concatenate(big).size == 40
    assert split == [True] * 4


def test_sources_in_one_footprint_are_one_blend_whatever_the_tiling(prior):
    from bayesblend.detect import footprint_pairs
    from bayesblend.plan import plan_scene
    from bayesblend.settings import InferenceConfig

    # a large bright galaxy at (40, 40), a neighbour on its light 22 pixels out (beyond the 16-pixel
    # linking length), and a source as far from it on blank sky
    noisy, _ = _point_sources([(62, 40), (40, 100)], [15.0, 15.0], shape=(128, 128))
    yy, xx = np.mgrid[:128, :128]
    blob = np.exp(-0.5 * ((xx - 40) ** 2 + (yy - 40) ** 2) / 9.0**2)
    noisy.image = noisy.image + 40.0 * np.sqrt(noisy.variance) * blob[None]
    x, y = np.array([40.0, 62.0, 40.0]), np.array([40.0, 40.0, 100.0])
    pairs = footprint_pairs(noisy, x, y, tile_size=None)
    assert pairs.tolist() == [[0, 1]]
    for size, overlap in ((48, 40), (70, 48)):
        np.testing.assert_array_equal(footprint_pairs(noisy, x, y, tile_size=size, overlap=overlap), pairs)
    # planned: the neighbour joins the galaxy's blend; the linking length alone leaves it apart
    plans = plan_scene(noisy, 0, x, y, prior, InferenceConfig())
    assert sorted(p.members.tolist() for p in plans) == [[0, 1], [2]]
    assert [g.tolist() for g in group_sources(x, y, 16.0)[0]] == [[0], [1], [2]]


def test_matching_skips_found_sources_without_a_position():
    from bayesblend.detect import match_sources

    x_found, y_found = [np.nan, 20.5, 10.2], [5.0, 5.0, 5.0]
    hit = match_sources(np.array([10.0, 20.0]), np.array([5.0, 5.0]), x_found, y_found, 1.5)
    assert hit.tolist() == [2, 1]


def test_blend_region_shape_is_a_fixed_multiple_and_covers_the_sources(galaxy_scene=None):
    x0, y0, h, w = blend_region(np.array([100.0, 120.0]), np.array([30.0, 34.0]), (256, 256), margin=40)
    assert h == w and h % 32 == 0  # square: one compiled shape for blends of any orientation
    assert x0 <= 100 - 40 and x0 + w >= 120 + 40 and y0 >= 0 and y0 + h >= 34 + 40
    # a scene smaller than the region is fitted whole (rounded up to 16 pixels, the overhang masked)
    assert blend_region(np.array([20.0]), np.array([24.0]), (48, 40), margin=40)[2:] == (48, 48)
    # a region near the edge keeps its size and is clipped inside the scene
    x0, y0, h, w = blend_region(np.array([2.0]), np.array([250.0]), (256, 256), margin=40)
    assert x0 == 0 and y0 + h == 256


def test_cutout_masks_pixels_outside_the_scene():
    g = simulate_isolated(1, 1)
    cut = g.scene.cutout(-8, 10, 64, 64)
    assert cut.image.shape == (6, 64, 64)
    assert cut.mask[:, :, :8].all() and not cut.mask[:, :38, 8:56].any()
    np.testing.assert_array_equal(cut.image[:, 0, 8:56], g.scene.image[:, 10, :])
    assert cut.mask[:, 38:, :].all() and (cut.image[:, 38:, :] == 0).all()


def test_loop_friendly_convolutions_match_flax():
    import flax.linen as nn

    from bayesblend.prior.networks import Conv, ConvTranspose

    x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 6, 8))
    for ours, theirs in (
        (ConvTranspose(5), nn.ConvTranspose(5, (3, 3), strides=(2, 2), padding="SAME")),
        (Conv(5), nn.Conv(5, (3, 3), padding="SAME")),
    ):
        p = theirs.init(jax.random.PRNGKey(1), x)
        np.testing.assert_allclose(ours.apply(p, x), theirs.apply(p, x), rtol=1e-5, atol=1e-5)

        def loss(m, x, p=p):
            return jnp.sum(jnp.sin(m.apply(p, x)))

        gx = jax.grad(loss, argnums=1)
        np.testing.assert_allclose(gx(ours, x), gx(theirs, x), rtol=1e-4, atol=1e-5)
        gp = jax.grad(lambda p, m: jnp.sum(jnp.sin(m.apply(p, x))))
        np.testing.assert_allclose(
            gp(p, ours)["params"]["kernel"], gp(p, theirs)["params"]["kernel"], rtol=1e-4, atol=1e-5
        )
