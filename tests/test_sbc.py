"""Simulation-based calibration machinery: ranks, the uniformity test, coverage, and prior-drawn blends."""

import jax
import numpy as np
import pytest

from bayesblend import sbc
from bayesblend.errors import BayesblendError


def _conjugate(rng, n_items, n_draws, width):
    """Truth ~ N(0, 1), datum ~ N(truth, 0.5): exact posterior N(0.8 x, 0.2); ``width`` scales its sd."""
    truth = rng.normal(size=n_items)
    x = truth + 0.5 * rng.normal(size=n_items)
    mean, sd = 0.8 * x, np.sqrt(0.2)
    draws = mean[None] + width * sd * rng.normal(size=(n_draws, n_items))
    return draws, truth


def test_ranks_of_an_exact_posterior_are_uniform_and_of_a_narrow_one_are_not():
    rng = np.random.default_rng(3)
    draws, truth = _conjugate(rng, 2000, 99, 1.0)
    r = sbc.ranks(draws, truth)
    assert r.min() >= 0 and r.max() <= 99
    _, p = sbc.rank_uniformity(r, 99)
    assert p > 0.01
    assert sbc.coverage(draws, truth, 0.68) == pytest.approx(0.68, abs=0.035)
    narrow, truth = _conjugate(rng, 2000, 99, 0.5)
    _, p = sbc.rank_uniformity(sbc.ranks(narrow, truth), 99)
    assert p < 1e-6  # ranks pile at both ends
    assert sbc.coverage(narrow, truth, 0.68) < 0.45
    assert sbc.ranks(draws, truth, thin=3).max() <= 33  # thinned: 33 draws kept
    with pytest.raises(BayesblendError, match="too few"):
        sbc.rank_uniformity(r[:5], 99)


def test_prior_drawn_blend_has_the_model_noise_and_its_truth(prior):
    from bayesblend.blends import prepare_blend
    from bayesblend.forward import paste_stamps
    from bayesblend.model import source_stamps
    from bayesblend.prior.bundle import Networks
    from bayesblend.simulate.scenes import simulate_blend

    sim = simulate_blend(77, 0, n_range=(2, 2))
    layout = prepare_blend(sim.scene, np.asarray(sim.truth["x"]), np.asarray(sim.truth["y"]), prior)
    nets = Networks(prior, "flow")
    zp = np.asarray(layout.magzero, float)
    b, t = sbc.draw_from_prior(nets, layout, jax.random.PRNGKey(0), 0.4 * np.log(10) * (zp - 22.0), 0.5)
    assert b.spec.model_error == (0.0,) and b.spec.log_flux_sigma == 0.5 and b.spec.has_variance
    assert t["eta"].shape == (2, 2) and t["flux_r"].shape == (2,) and (t["snr"] > 0).all()
    w = nets.weights()
    stamps = source_stamps(b.spec, b.data, lambda z: nets.decode(w, z), nets.to_latent(w), t)
    mean = np.asarray(paste_stamps(stamps, b.data["anchor"], b.spec.shape))
    pull = (np.asarray(b.data["image"]) - mean) / np.sqrt(np.asarray(b.data["variance"]))
    assert abs(pull.mean()) < 0.02 and pull.std() == pytest.approx(1.0, abs=0.02)  # the model's own noise
    sky = np.asarray(b.data["sky"])[:, None, None]
    np.testing.assert_allclose(np.asarray(b.data["variance"]), sky + np.maximum(mean, 0), rtol=1e-4)
    padded = prepare_blend(sim.scene, [20.0, 26.0, 30.0], [24.0, 24.0, 20.0], prior)  # 3 sources padded to 4
    with pytest.raises(BayesblendError, match="without padded sources"):
        sbc.draw_from_prior(nets, padded, jax.random.PRNGKey(0), np.zeros(6), 1.0)


def test_quantities_of_draws_follow_the_parameters():
    draws = {
        "eta": np.zeros((2, 3, 1, 2)),
        "log_flux": np.log(np.full((2, 3, 1, 6), 50.0)),
        "log_hlr": np.log(np.full((2, 3, 1), 0.4)),
    }
    draws["eta"][..., 0] = np.arctanh(0.3)
    q = sbc.quantities(draws, list("ugrizy"))
    assert q["flux_r"].shape == (6, 1)
    np.testing.assert_allclose(q["e1"], 0.3, rtol=1e-5)
    np.testing.assert_allclose(q["size"], 0.4, rtol=1e-6)
    np.testing.assert_allclose(q["flux_r"], 50.0, rtol=1e-5)
