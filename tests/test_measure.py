import jax.numpy as jnp
import numpy as np

from bayesblend.measure import FWHM_TO_SIGMA, blendedness, resolution


def test_resolution_factor():
    sig_psf = 4.0 * FWHM_TO_SIGMA
    np.testing.assert_allclose(resolution(np.array([0.0, sig_psf, 1e3]), 4.0), [0.0, 0.5, 1.0], atol=1e-5)


def test_blendedness_of_separate_overlapping_and_empty_sources():
    a = np.zeros((3, 10, 10), np.float32)
    a[0, 2:4, 2:4] = 1.0  # alone
    a[1, 6:9, 6:9] = 1.0  # under a fainter neighbour on one of its nine pixels
    a[2, 8, 8] = 0.5
    out = np.asarray(blendedness(jnp.asarray(a)))
    assert out[0] == 0.0
    # source 1: <I1,I1> = 9, <I1,I_total> = 9 + 0.5; source 2: 0.25 / (0.25 + 0.5)
    np.testing.assert_allclose(out[1:], [1 - 9 / 9.5, 1 - 0.25 / 0.75], rtol=1e-6)
    assert float(blendedness(jnp.zeros((2, 4, 4)))[0]) == 0.0  # no light: 0, not NaN
