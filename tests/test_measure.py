import galsim
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bayesblend.measure import adaptive_moments, batched_morphology_shape, morphology_shape, shape_from_cov
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
    batch = batched_morphology_shape(jnp.stack([jnp.asarray(img)] * 3), 0.25 / 0.2, 40)
    assert batch["e1"].shape == (3,)
    assert jax.jit(lambda x: morphology_shape(x, 1.25)["e1"])(jnp.asarray(img)).shape == ()
