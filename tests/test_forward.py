import jax.numpy as jnp
import numpy as np
import pytest

from bayesblend.forward import difference_kernel, fft_size, render_source
from bayesblend.simulate.render import render_scene
from tests.conftest import make_layout


def test_forward_model_matches_galsim_with_a_shift(lsst):
    kw = dict(bulge_frac=0.3, disk_hlr=0.6, bulge_hlr=0.3, e1=0.2, e2=-0.1, mag_r=21.0)
    centred = render_scene(lsst, make_layout(23.5, 23.5, **kw), (48, 48), None, morphology_for=[0])
    offset = np.array([0.7, -0.4])
    observed = render_scene(lsst, make_layout(23.5 + offset[0], 23.5 + offset[1], **kw), (48, 48), None)
    kernel = difference_kernel(observed.scene.psf, lsst.model_psf_image(41), fft_size(48))
    flux = jnp.asarray(observed.noiseless.sum(axis=(1, 2)))
    pred = np.asarray(render_source(jnp.asarray(centred.morphology[0]), flux, jnp.asarray(offset), kernel))
    truth = observed.noiseless
    peak = truth.max(axis=(1, 2))
    assert np.all(np.abs(pred - truth).max(axis=(1, 2)) < 3e-3 * peak)
    # the kernel and the shift conserve flux; the centroid lands on the shifted position
    np.testing.assert_allclose(pred.sum(axis=(1, 2)), flux, rtol=3e-3)
    yy, xx = np.mgrid[:48, :48]
    for b in range(6):
        assert (pred[b] * xx).sum() / pred[b].sum() == pytest.approx(23.5 + offset[0], abs=0.02)
        assert (pred[b] * yy).sum() / pred[b].sum() == pytest.approx(23.5 + offset[1], abs=0.02)


def test_identical_psfs_give_the_identity_kernel(lsst):
    rng = np.random.default_rng(0)
    morph = rng.uniform(size=(2, 16, 16)).astype(np.float32)
    psf = np.stack([lsst.model_psf_image(11)] * 2)
    kernel = difference_kernel(psf, lsst.model_psf_image(11), fft_size(16))
    out = render_source(jnp.asarray(morph), jnp.array([2.0, 3.0]), jnp.zeros(2), kernel)
    np.testing.assert_allclose(np.asarray(out), morph * np.array([2.0, 3.0])[:, None, None], atol=1e-5)
