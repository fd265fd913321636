import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bayesblend import ellipticity as E
from bayesblend.simulate.population import draw_ellipticities, ellipticity_scale


def test_map_is_inside_the_disk_invertible_and_smooth_at_zero():
    rng = np.random.default_rng(0)
    eta = jnp.asarray(rng.normal(scale=2.0, size=(500, 2)), jnp.float32)
    e = E.to_ellipticity(eta)
    assert float(jnp.max(jnp.sum(e**2, -1))) < 1.0
    back = E.to_eta(e[jnp.sum(e**2, -1) < 0.99])
    np.testing.assert_allclose(back, eta[jnp.sum(e**2, -1) < 0.99], rtol=2e-3, atol=2e-4)
    # orientation is kept
    np.testing.assert_allclose(jnp.arctan2(e[:, 1], e[:, 0]), jnp.arctan2(eta[:, 1], eta[:, 0]), atol=1e-5)
    g = jax.jacfwd(lambda x: E.to_ellipticity(x))(jnp.zeros(2))
    np.testing.assert_allclose(g, np.eye(2), atol=1e-6)
    assert np.all(np.isfinite(jax.grad(lambda x: E.eta_prior_log_density(x, 0.3))(jnp.zeros(2))))


def test_log_jacobian_matches_the_determinant():
    for eta in ([0.3, -0.4], [1.5, 0.2], [1e-4, 2e-4], [-2.5, 1.0]):
        x = jnp.asarray(eta, jnp.float32)
        det = jnp.linalg.det(jax.jacfwd(E.to_ellipticity)(x))
        assert float(E.log_jacobian(x)) == pytest.approx(float(jnp.log(det)), abs=2e-4)


def test_prior_is_normalised_and_matches_the_simulator():
    s = ellipticity_scale()
    # normalised on the disk (midpoint rule on a polar grid)
    r = (np.arange(400) + 0.5) / 400
    phi = (np.arange(64) + 0.5) / 64 * 2 * np.pi
    rr, pp = np.meshgrid(r, phi)
    e = np.stack([rr * np.cos(pp), rr * np.sin(pp)], -1)
    dens = np.exp(np.asarray(E.prior_log_density(jnp.asarray(e), s)))
    assert np.sum(dens * rr) * (1 / 400) * (2 * np.pi / 64) == pytest.approx(1.0, rel=2e-3)
    # the simulator's draws have the prior's |e| distribution: compare the mean |e|
    draws = draw_ellipticities(np.random.default_rng(1), 40000)
    mean_prior = np.sum(dens * rr * rr) / np.sum(dens * rr)
    assert np.mean(np.hypot(draws[:, 0], draws[:, 1])) == pytest.approx(mean_prior, abs=3e-3)


def test_eta_prior_distribution_samples_what_it_scores():
    s = ellipticity_scale()
    d = E.EtaPrior(s, batch_shape=(3,))
    eta = d.sample(jax.random.PRNGKey(0), (20000,))
    assert eta.shape == (20000, 3, 2) and d.log_prob(eta).shape == (20000, 3)
    e = np.asarray(E.to_ellipticity(eta)).reshape(-1, 2)
    sim = draw_ellipticities(np.random.default_rng(2), 60000)
    # the same |e| distribution as the simulator (quantiles) and no preferred orientation
    q = [0.1, 0.5, 0.9]
    np.testing.assert_allclose(np.quantile(np.hypot(*e.T), q), np.quantile(np.hypot(*sim.T), q), atol=6e-3)
    assert abs(np.mean(e[:, 0])) < 5e-3 and abs(np.mean(e[:, 1])) < 5e-3
    # log_prob is the eta density of the prior, Jacobian included
    x = jnp.asarray([[0.2, -0.7]])
    np.testing.assert_allclose(E.EtaPrior(s).log_prob(x[0]), E.eta_prior_log_density(x[0], s), rtol=1e-6)
