"""Preparing blends for the scene model: padding, and bad input handled with clear messages."""

import numpy as np
import pytest

from bayesblend.blends import PAD_SIZES, padded_count, prepare_blend
from bayesblend.errors import BayesblendError
from bayesblend.simulate.scenes import simulate_blend


@pytest.fixture(scope="module")
def blend():
    return simulate_blend(31, 2, n_range=(3, 3))


def test_padding_to_fixed_source_counts():
    assert [padded_count(k) for k in (1, 2, 3, 5, 9)] == [1, 2, 4, 8, 16]
    with pytest.raises(BayesblendError, match="more than"):
        padded_count(PAD_SIZES[-1] + 1)


def test_prepared_blend_shapes_and_padding(prior, blend):
    t = blend.truth
    prep = prepare_blend(blend.scene, t["x"], t["y"], prior)
    assert prep.spec.n_sources == 4 and prep.n_real == 3
    assert prep.data["image"].shape == (6, 48, 48)
    np.testing.assert_array_equal(np.asarray(prep.data["source_valid"]), [True, True, True, False])
    # detection flux estimates are within a factor of a few of the truth for the target
    est = np.exp(np.asarray(prep.data["log_flux0"])[0, 2])
    assert 0.2 < est / t["flux_r"][0] < 5


def test_missing_band_nan_pixels_missing_psf_and_fully_masked(prior, blend):
    t = blend.truth
    with pytest.raises(BayesblendError, match="lacks band"):
        prepare_blend(blend.scene.select_bands(["g", "r", "i"]), t["x"], t["y"], prior)
    scene = blend.scene.select_bands(list("ugrizy"))
    scene.image = scene.image.copy()
    scene.image[2, 10, 10] = np.nan
    with pytest.warns(UserWarning, match="non-finite pixels masked"):
        prep = prepare_blend(scene, t["x"], t["y"], prior)
    assert not bool(prep.data["valid"][2, 10, 10]) and np.isfinite(np.asarray(prep.data["image"])).all()
    scene.image[2, 10, 10] = 0.0
    scene.variance = scene.variance.copy()
    scene.variance[1, 5, 7] = 0.0
    with pytest.warns(UserWarning, match="1 pixels with a non-finite or non-positive variance masked"):
        prep = prepare_blend(scene, t["x"], t["y"], prior)
    assert not bool(prep.data["valid"][1, 5, 7]) and int((~np.asarray(prep.data["valid"])).sum()) == 1
    scene.variance[1, 5, 7] = 1.0
    scene.psf = None
    with pytest.warns(UserWarning, match="default PSF"):
        prepare_blend(scene, t["x"], t["y"], prior)
    scene.mask = np.ones(scene.image.shape, bool)
    with pytest.raises(BayesblendError, match="every pixel of the blend is masked"):
        prepare_blend(scene, t["x"], t["y"], prior)
    with pytest.raises(BayesblendError, match="no sources"):
        prepare_blend(blend.scene, [], [], prior)


def test_common_draws_share_random_numbers_across_scenes_and_only_then(prior, blend):
    """Two copies of one scene: with common draws the k-th blends draw alike, so their draws are
    identical; without, each blend has its own key and the draws differ."""
    from bayesblend.infer import deblend

    xy = np.c_[blend.truth["x"], blend.truth["y"]]
    kw = dict(sources=[xy, xy], method="amortised", prior=prior, num_draws=16)
    same = deblend([blend.scene, blend.scene], common_draws=True, **kw)
    own = deblend([blend.scene, blend.scene], **kw)
    n = len(xy)
    e1 = same.draws["e1"]  # (chain, draw, source): the second scene's sources follow the first's
    np.testing.assert_array_equal(e1[..., :n], e1[..., n:])
    d1 = own.draws["e1"]
    assert not np.allclose(d1[..., :n], d1[..., n:])
