import galsim
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bayesblend.measure import (
    FWHM_TO_SIGMA,
    adaptive_moments,
    batched_morphology_shape,
    morphology_shape,
    reconvolve,
    resolution,
    shape_from_cov,
)
from bayesblend.simulate.render import render_scene
from tests.conftest import make_layout


@pytest.mark.parametrize(
    "kw",
    [
        dict(e1=0.3, e2=-0.15, disk_hlr=0.8),
        dict(e1=-0.1, e2=0.4, disk_hlr=0.4, bulge_frac=0.5, bulge_hlr=0.2),
        dict(e1=0.05, e2=0.0, disk_hlr=0.3),
    ],
)
def test_jax_adaptive_moments_match_galsim(lsst, kw):
    lay = make_layout(23.7, 23.2, flux=1e5, bands=("r",), **kw)
    m = render_scene(lsst, lay, (48, 48), None, bands=("r",), morphology_for=[0]).morphology[0, 0]
    ref = galsim.hsm.FindAdaptiveMom(
        galsim.Image(m.astype(np.float64), scale=lsst.pixel_scale, xmin=0, ymin=0)
    )
    mom = adaptive_moments(jnp.asarray(m))
    e1, e2, size = shape_from_cov(mom["cov"])
    assert float(e1) == pytest.approx(ref.observed_shape.g1, abs=5e-4)
    assert float(e2) == pytest.approx(ref.observed_shape.g2, abs=5e-4)
    assert float(size) == pytest.approx(ref.moments_sigma, rel=2e-3)
    assert float(mom["x"]) == pytest.approx(ref.moments_centroid.x, abs=1e-2)
    assert float(mom["y"]) == pytest.approx(ref.moments_centroid.y, abs=1e-2)


def test_psf_correction_and_vmap_on_a_sheared_gaussian():
    # an elliptical Gaussian convolved with the Gaussian model PSF: the correction is exact
    g = galsim.Gaussian(sigma=0.5).shear(g1=0.2, g2=-0.1)
    psf = galsim.Gaussian(fwhm=0.25)
    img = galsim.Convolve(g, psf).drawImage(nx=48, ny=48, scale=0.2, method="no_pixel").array
    out = morphology_shape(jnp.asarray(img), 0.25 / 0.2)
    assert float(out["e1"]) == pytest.approx(0.2, abs=2e-3)
    assert float(out["e2"]) == pytest.approx(-0.1, abs=2e-3)
    batch = batched_morphology_shape(jnp.stack([jnp.asarray(img)] * 3), 0.25 / 0.2, iterations=40)
    assert batch["e1"].shape == (3,)
    assert jax.jit(lambda x: morphology_shape(x, 1.25)["e1"])(jnp.asarray(img)).shape == ()


def test_reconvolution_keeps_flux_adds_the_gaussian_and_leaves_gaussian_shapes_exact():
    g = galsim.Gaussian(sigma=0.4).shear(g1=-0.15, g2=0.25)
    img = galsim.Convolve(g, galsim.Gaussian(fwhm=0.25)).drawImage(nx=48, ny=48, scale=0.2, method="no_pixel")
    m = jnp.asarray(img.array, jnp.float32)
    wide = reconvolve(m, 4.0)
    assert float(wide.sum()) == pytest.approx(float(m.sum()), rel=1e-5)  # unit-flux kernel
    cov_in = np.asarray(adaptive_moments(m)["cov"])
    cov_out = np.asarray(adaptive_moments(wide)["cov"])
    # Gaussian * Gaussian: the covariances add
    np.testing.assert_allclose(cov_out - cov_in, (4.0 * FWHM_TO_SIGMA) ** 2 * np.eye(2), atol=2e-3)
    assert reconvolve(m, 0.0) is m
    for fwhm in (0.0, 2.0, 4.05):
        out = morphology_shape(m, 0.25 / 0.2, fwhm)
        assert float(out["e1"]) == pytest.approx(-0.15, abs=3e-3)
        assert float(out["e2"]) == pytest.approx(0.25, abs=3e-3)
        assert float(out["size"]) == pytest.approx(0.4 / 0.2, rel=5e-3)  # det^(1/4) is shear-invariant


def test_reconvolution_makes_a_point_like_source_measurable():
    # a source smaller than a pixel: at the model PSF the corrected covariance can be
    # non-positive (no valid shape); after reconvolution the moments are well conditioned
    tiny = galsim.Convolve(galsim.Gaussian(sigma=0.02).shear(g1=0.3), galsim.Gaussian(fwhm=0.25))
    m = jnp.asarray(tiny.drawImage(nx=48, ny=48, scale=0.2).array, jnp.float32)
    out = morphology_shape(m, 0.25 / 0.2, 4.05)
    assert np.isfinite(float(out["e1"])) and abs(float(out["e1"])) < 1


def test_resolution_factor():
    sig_psf = 4.0 * FWHM_TO_SIGMA
    np.testing.assert_allclose(resolution(np.array([0.0, sig_psf, 1e3]), 4.0), [0.0, 0.5, 1.0], atol=1e-5)
