"""A PSF that varies over the image: interpolation, the scene file's PSFGRID tables, and each blend
fitted with the PSF at its own position."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from bayesblend.errors import BayesblendError, SceneFormatError
from bayesblend.forward import fft_size, psf_spectrum
from bayesblend.infer import InferenceConfig, prepare_scene
from bayesblend.io import read_scene, write_scene
from bayesblend.psf import PSFGrid
from bayesblend.scene import Scene
from bayesblend.survey import get_survey

BANDS = ("u", "g", "r", "i", "z", "y")


def _psfs(fwhm: float) -> np.ndarray:
    sv = get_survey("lsst")
    return np.stack([sv.psf_image(b, fwhm=fwhm) for b in BANDS])


@pytest.fixture(scope="module")
def sharp_and_wide():
    return _psfs(0.6), _psfs(1.1)


def test_grid_interpolates_linearly_and_takes_the_nearest_beyond(sharp_and_wide):
    a, b = sharp_and_wide
    # a square: the left side sharp, the right side wide
    g = PSFGrid([0, 0, 100, 100], [0, 100, 0, 100], np.stack([a, a, b, b], axis=1))
    assert np.allclose(g.at(0, 0), a, atol=1e-7) and np.allclose(g.at(100, 50), b, atol=1e-7)
    mid = g.at(25, 60)  # a quarter of the way across: 3/4 sharp, 1/4 wide, then unit sum
    want = 0.75 * a + 0.25 * b
    assert np.allclose(mid, want / want.sum(axis=(1, 2), keepdims=True), atol=1e-6)
    assert np.allclose(g.at(-40, 50), a, atol=1e-7) and np.allclose(g.at(180, -5), b, atol=1e-7)
    assert np.allclose(PSFGrid([5], [5], a[:, None]).at(90, 90), a, atol=1e-7)  # one position
    assert np.allclose(g.shifted(-10, 0).at(90, 0), b, atol=1e-7)
    assert g.select([2]).at(0, 0).shape == (1, *a.shape[1:])
    with pytest.raises(BayesblendError, match="lists a position twice"):
        PSFGrid([0, 0], [1, 1], np.stack([a, b], axis=1))
    with pytest.raises(BayesblendError, match="must be"):
        PSFGrid([0, 1], [1, 1], a)
    with pytest.raises(BayesblendError, match="odd side"):
        PSFGrid([0], [0], a[:, None, :-1, :-1])


def _two_psf_scene(sharp_and_wide) -> Scene:
    """48 x 192 pixels: the left third sharp, the right third wide, noise only."""
    a, b = sharp_and_wide
    sv = get_survey("lsst")
    rng = np.random.default_rng(3)
    var = np.array([sv.sky_counts(band) for band in BANDS])[:, None, None] * np.ones((6, 48, 192))
    grid = PSFGrid(
        [0, 0, 63, 63, 128, 128, 191, 191], [0, 47] * 4, np.stack([a, a, a, a, b, b, b, b], axis=1)
    )
    return Scene(
        image=rng.normal(size=var.shape) * np.sqrt(var),
        bands=BANDS,
        magzero=[sv.band(band).magzero for band in BANDS],
        variance=var,
        psf_grid=grid,
        name="two-psf.fits",
    )


def test_each_blend_is_fitted_with_the_psf_at_its_position(sharp_and_wide, prior):
    a, b = sharp_and_wide
    scene = _two_psf_scene(sharp_and_wide)
    preps, _, _ = prepare_scene(
        scene, np.array([20.0, 96.0, 170.0]), np.array([24.0, 24.0, 24.0]), prior, InferenceConfig()
    )
    assert len(preps) == 3
    n = fft_size(prior.stamp)
    # the middle blend sits where the PSF changes: it gets the PSF at its cutout's centre
    x0, y0 = preps[1].origin
    h, w = preps[1].spec.shape
    middle = scene.psf_grid.at(x0 + (w - 1) / 2, y0 + (h - 1) / 2)
    assert not np.allclose(middle, a, atol=1e-3) and not np.allclose(middle, b, atol=1e-3)
    for prep, want in zip(preps, (a, middle, b), strict=True):
        assert np.allclose(np.asarray(prep.data["psf_ft"]), np.asarray(psf_spectrum(want, n)), atol=1e-5)


def test_psf_grid_round_trips_through_the_scene_file(sharp_and_wide, tmp_path):
    scene = _two_psf_scene(sharp_and_wide)
    path = write_scene(tmp_path / "s.fits", scene)
    back = read_scene(path)
    assert np.array_equal(back.psf_grid.x, scene.psf_grid.x)
    assert np.allclose(back.psf_grid.images, scene.psf_grid.images)
    assert np.allclose(back.psf_images(), scene.psf_images())
    # a grid for some bands only is one line naming them
    with fits.open(path) as hdul:
        del hdul["PSFGRID_Z"]
        hdul.writeto(tmp_path / "partial.fits")
    with pytest.raises(SceneFormatError, match=r"PSFGRID given for some bands but not \['z'\]"):
        read_scene(tmp_path / "partial.fits")
