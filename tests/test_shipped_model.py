"""The shipped prior models/lsst-v2: loads by default, obeys the contract, and its encoder reads galaxies."""

import jax
import numpy as np

from bayesblend.evaluate import adaptive_ellipticity
from bayesblend.infer import deblend
from bayesblend.simulate.scenes import simulate_blend, simulate_isolated

# Tolerances on medians over 16 bright galaxies (r 20-23), for the amortised posterior (the pose
# encoder alone, no optimisation). Measured with models/lsst-v2 (stage 2): isolated median |de| 0.043
# and |dmag_r| 0.041; the centred galaxy of a blend 0.14 and 0.07. An ellipticity drawn from the prior,
# ignoring the data, is off by a median 0.43.
ISO_E_TOL, ISO_MAG_TOL = 0.07, 0.07
BLEND_E_TOL, BLEND_MAG_TOL = 0.2, 0.12


def test_default_prior_is_lsst_v2_and_draws_round_unit_sum_canonical_morphologies(prior):
    from bayesblend.canonical import CanonicalFrame
    from bayesblend.prior.flow import sample

    assert prior.card["name"] == "lsst-v2" and prior.bands == tuple("ugrizy") and prior.stamp == 48
    assert {"decoder", "encoder", "pose_encoder", "flow"} <= set(prior.params)
    assert prior.canonical_frame == CanonicalFrame() and prior.latent_dim == 8
    z = sample(prior.flow, prior.params["flow"], jax.random.PRNGKey(0), 32)
    m = np.asarray(prior.decode(z))
    assert m.shape == (32, 6, 64, 64) and m.min() >= 0
    np.testing.assert_allclose(m.sum(axis=(-2, -1)), 1.0, atol=1e-5)
    lp = np.asarray(prior.latent_log_prob(z))
    assert lp.shape == (32,) and np.all(np.isfinite(lp))
    # pose lives outside the latent code: every decoded galaxy is round
    e = adaptive_ellipticity(m[:, prior.bands.index("r")])
    assert np.nanmax(np.hypot(*e.T)) < 0.02


def _amortised_errors(prior, sims):
    """Median |e - e_true| and |mag_r - mag_r,true| of the first (centred) galaxy of each scene."""
    post = deblend(
        [s.scene for s in sims],
        sources=[np.c_[s.truth["x"], s.truth["y"]] for s in sims],
        method="amortised",
        prior=prior,
        num_draws=20,
    )
    c = post.catalog()
    first = np.array([np.flatnonzero(c["scene"] == i)[0] for i in range(len(sims))])
    t = [s.truth[0] for s in sims]
    de = np.hypot(c["e1"][first] - [r["e1"] for r in t], c["e2"][first] - [r["e2"] for r in t])
    dmag = c["mag_r"][first] - np.array([r["mag_r"] for r in t])
    return np.median(de), np.median(np.abs(dmag))


def test_the_pose_encoder_reads_bright_isolated_galaxies(prior):
    sims = [simulate_isolated(77, i, mag_range=(20.0, 23.0), max_shift=0.5) for i in range(16)]
    de, dmag = _amortised_errors(prior, sims)
    assert de < ISO_E_TOL and dmag < ISO_MAG_TOL


def test_the_pose_encoder_reads_the_centred_galaxy_of_blends(prior):
    sims = [simulate_blend(77, i, mag_range=(20.0, 23.5), n_range=(2, 3)) for i in range(16)]
    de, dmag = _amortised_errors(prior, sims)
    assert de < BLEND_E_TOL and dmag < BLEND_MAG_TOL
