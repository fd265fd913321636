"""Shear estimators: lensing algebra, ensemble and hierarchical recovery of known shears, twins."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bayesblend.catalog import FLAGS, make_table
from bayesblend.ellipticity import lens, unlens
from bayesblend.errors import BayesblendError
from bayesblend.shear import (
    EXCLUDE_FLAGS,
    InterimPrior,
    ResponsivityTable,
    component_sigma,
    ensemble_shear,
    hierarchical_mode,
    hierarchical_shear,
    interim_prior_from_card,
    intrinsic_log_density,
    responsivity_from_card,
    responsivity_table,
    shear_catalog,
    sheared_log_density,
    unlens_log_jacobian,
    usable_shapes,
)
from bayesblend.simulate.population import SIGMA_E, draw_ellipticities, ellipticity_scale
from bayesblend.simulate.render import lensed_ellipticity


def _intrinsic(n, seed):
    e = draw_ellipticities(np.random.default_rng(seed), n, SIGMA_E)
    return e[:, 0] + 1j * e[:, 1]


#: The scale of the simulator's population and of the lsst-v2 card's ellipticity prior.
S_POP = ellipticity_scale(SIGMA_E)


def _ba_log_density(e: np.ndarray, s: float) -> np.ndarray:
    """Bernstein & Armstrong log density per unit area at complex ``e``, normalised on the disc analytically.

    ``int (1 - |e|^2)^2 exp(-|e|^2 / 2 s^2) dA = pi (1/a - 2/a^2 + 2/a^3 - 2 exp(-a)/a^3)``
    with ``a = 1 / 2 s^2``.
    """
    a = 1.0 / (2.0 * s**2)
    norm = np.pi * (1 / a - 2 / a**2 + 2 / a**3 - 2 * np.exp(-a) / a**3)
    r2 = np.abs(e) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(r2 < 1, 2 * np.log(1 - r2) - a * r2 - np.log(norm), -np.inf)


def test_lens_and_unlens_are_inverse_with_known_values():
    e = _intrinsic(500, 0)
    g = 0.03 - 0.02j
    lensed = np.asarray(lens(jnp.asarray(e, jnp.complex64), g))
    np.testing.assert_allclose(np.asarray(unlens(jnp.asarray(lensed), g)), e, atol=1e-6)
    assert np.all(np.abs(lensed) < 1)
    assert lens(0j, g) == pytest.approx(g)  # a round source takes the shear's ellipticity
    # aligned shears add like velocities: tanh(a) (+) tanh(b) = tanh(a + b)
    assert lens(np.tanh(0.3) + 0j, np.tanh(0.2) + 0j) == pytest.approx(np.tanh(0.5))
    # the simulator's truth goes through the same formula, in float64
    sim = lensed_ellipticity(e.real, e.imag, g.real, g.imag)
    assert sim.dtype == np.float64
    np.testing.assert_allclose(sim @ np.array([1, 1j]), lens(e, g), rtol=0, atol=1e-14)


def test_unlens_jacobian_matches_the_numerical_determinant():
    g = 0.05 + 0.03j

    def real_map(v):
        out = unlens(v[0] + 1j * v[1], g)
        return jnp.stack([jnp.real(out), jnp.imag(out)])

    for e in (0.0 + 0.0j, 0.3 - 0.4j, -0.7 + 0.1j, 0.05 + 0.9j):
        jac = jax.jacfwd(real_map)(jnp.array([e.real, e.imag], jnp.float32))
        numeric = np.log(abs(np.linalg.det(np.asarray(jac, float))))
        assert float(unlens_log_jacobian(jnp.complex64(e), g)) == pytest.approx(numeric, abs=1e-4)


@pytest.mark.parametrize("g", [0.0 + 0.0j, 0.1 - 0.05j])
def test_sheared_density_is_normalised_on_the_unit_disc(g):
    t = np.linspace(-1, 1, 801)
    x, y = np.meshgrid(t, t)
    inside = np.hypot(x, y) < 1
    e = jnp.asarray((x + 1j * y)[inside], jnp.complex64)
    cell = (t[1] - t[0]) ** 2
    total = float(jnp.sum(jnp.exp(sheared_log_density(e, g, 0.3)))) * cell
    assert total == pytest.approx(1.0, abs=0.01)
    assert float(intrinsic_log_density(jnp.complex64(1.2), 0.3)) == -np.inf


def test_component_sigma_matches_the_population():
    s = ellipticity_scale(SIGMA_E)
    assert component_sigma(s) == pytest.approx(SIGMA_E, rel=1e-3)


@pytest.mark.parametrize("noise", [0.0, 0.15])
def test_ensemble_recovers_a_known_shear(noise):
    n = 20000
    g = 0.03 - 0.02j
    e = np.asarray(lens(jnp.asarray(_intrinsic(n, 1), jnp.complex64), g))
    rng = np.random.default_rng(2)
    e = e + noise * (rng.normal(size=n) + 1j * rng.normal(size=n))
    est = ensemble_shear(e.real, e.imag)
    expected_err = np.sqrt(SIGMA_E**2 + noise**2) / np.sqrt(n)
    assert est.g1_err == pytest.approx(expected_err, rel=0.15)
    assert abs(est.g1 - g.real) < 4 * est.g1_err
    assert abs(est.g2 - g.imag) < 4 * est.g2_err
    assert est.n == n


def test_responsivity_undoes_a_shrunk_response():
    n = 20000
    g = 0.04 + 0.0j
    e = 0.5 * np.asarray(lens(jnp.asarray(_intrinsic(n, 3), jnp.complex64), g))
    raw = ensemble_shear(e.real, e.imag)
    cal = ensemble_shear(e.real, e.imag, responsivity=0.5)
    assert raw.g1 == pytest.approx(0.5 * cal.g1)
    assert abs(raw.g1 - g.real) > 5 * raw.g1_err  # uncalibrated: biased
    assert abs(cal.g1 - g.real) < 4 * cal.g1_err


def _two_kinds(n_sharp, n_broad, g, seed):
    """Rotated-twin galaxies whose shapes respond fully (posterior e std 0.03) or at 0.3 (std 0.15)."""
    es = jnp.asarray(_intrinsic(n_sharp + n_broad, seed), jnp.complex64)
    resp = np.r_[np.ones(n_sharp), np.full(n_broad, 0.3)]
    std = np.r_[np.full(n_sharp, 0.03), np.full(n_broad, 0.15)]
    e = np.concatenate([resp * np.asarray(lens(es, g)), resp * np.asarray(lens(-es, g))])
    return e, np.r_[std, std], np.r_[resp, resp]


def test_responsivity_table_follows_a_population_the_single_r_does_not():
    from bayesblend.shear import shape_weight

    # calibrate on half sharp, half broad shapes: the responses are known per galaxy
    _, std, resp = _two_kinds(300, 300, 0.02, 5)
    w = shape_weight(std, std)
    table = responsivity_table(resp, std, w, np.arange(resp.size) % 30, n_bins=2)
    assert table.R == pytest.approx((1.0, 0.3)) and table.n == (600, 600)
    assert table.edges[0] == pytest.approx(0.09)  # between the two dispersions
    single = float(np.sum(w * resp) / np.sum(w))  # what one R calibrated on this mix is
    # apply both to a field of mostly sharp shapes (a brighter population)
    g = 0.03 - 0.01j
    e, std, _ = _two_kinds(900, 100, g, 6)
    w = shape_weight(std, std)
    R_gal = table(std, std)
    np.testing.assert_allclose(np.unique(R_gal), [0.3, 1.0])
    binned = ensemble_shear(e.real, e.imag, w, R_gal)
    one = ensemble_shear(e.real, e.imag, w, single)
    assert abs(binned.g1 - g.real) < 1e-3 and abs(binned.g2 - g.imag) < 1e-3  # twins: no shape noise
    assert one.g1 / g.real - 1 > 0.2  # one R measured on a fainter mix over-corrects a brighter field
    # the table round-trips through the card's dict and refuses nonsense
    assert ResponsivityTable.from_dict(table.to_dict()) == table
    with pytest.raises(BayesblendError, match="positive"):
        ResponsivityTable((0.1,), (1.0, 0.0), (0.0, 0.0), (1, 1))
    with pytest.raises(BayesblendError, match="at least 15 galaxies"):
        responsivity_table(resp[:10], std[:10], w[:10], np.arange(10))
    # a bin whose galaxies do not respond on average cannot divide anything
    _, std, resp = _two_kinds(300, 300, 0.02, 5)
    w = shape_weight(std, std)
    with pytest.raises(BayesblendError, match=r"positive numbers, got \(1\.0, -0\.(2|19)"):
        responsivity_table(np.where(resp < 1, -0.2, 1.0), std, w, np.arange(std.size) % 30, n_bins=2)


def test_rotated_twins_cancel_the_intrinsic_term():
    n = 200
    g = 0.02 + 0.02j
    es = jnp.asarray(_intrinsic(n, 4), jnp.complex64)
    single = np.asarray(lens(es, g))
    twins = np.concatenate([single, np.asarray(lens(-es, g))])
    one = ensemble_shear(single.real, single.imag)
    both = ensemble_shear(twins.real, twins.imag)
    # shape noise ~0.26/sqrt(200) = 0.018 per set; twins leave only O(g e^2) terms
    assert one.g1_err > 0.01
    assert abs(both.g1 - g.real) < 1.5e-3 and abs(both.g2 - g.imag) < 1.5e-3


def test_ensemble_groups_stay_together_and_bad_input_is_named():
    e1 = np.array([0.1, 0.1, -0.1, -0.1, 0.2, 0.0])
    est = ensemble_shear(e1, np.zeros(6), groups=np.array([0, 0, 1, 1, 2, 2]))
    assert est.details["n_blocks"] == 3
    with pytest.raises(BayesblendError, match="at least 2 usable"):
        ensemble_shear([np.nan, 0.1], [0.0, 0.0])
    with pytest.raises(BayesblendError, match="responsivity"):
        ensemble_shear(e1, e1, responsivity=0.0)


def test_interim_prior_is_the_bernstein_armstrong_prior_of_the_card():
    for sc in (0.2, S_POP, 0.6):
        ip = interim_prior_from_card({"name": "m", "ellipticity_prior": {"s": sc}})
        assert ip.s == pytest.approx(sc) and ip.bundle == "m"
        e = np.array([0.0, 0.3 - 0.2j, -0.7 + 0.1j, 0.05 + 0.95j, 0.999, 1.0, 1.2j, -0.8 - 0.8j])
        got = np.asarray(ip.log_prob(jnp.asarray(e, jnp.complex64)), float)
        want = _ba_log_density(e, sc)
        inside = np.abs(e) < 1
        np.testing.assert_allclose(got[inside], want[inside], atol=1e-3)  # normalised, not just shaped
        assert np.all(np.isneginf(got[~inside]))
        # a density on the disc: it integrates to 1 per unit (e1, e2) area
        t = np.linspace(-1, 1, 801)
        x, y = np.meshgrid(t, t)
        grid = (x + 1j * y)[np.hypot(x, y) < 1]
        dens = np.exp(np.asarray(ip.log_prob(jnp.asarray(grid, jnp.complex64)), float))
        assert dens.sum() * (t[1] - t[0]) ** 2 == pytest.approx(1.0, abs=0.01)
    assert InterimPrior(S_POP).sigma_e == pytest.approx(SIGMA_E, rel=1e-3)


def test_interim_prior_is_the_scene_models_prior_on_e(prior):
    """The shipped bundle's interim prior is the EtaPrior the scene model samples, seen in e."""
    from bayesblend.blends import pose_priors
    from bayesblend.ellipticity import EtaPrior, log_jacobian, to_ellipticity

    ip = interim_prior_from_card(prior.card)
    assert ip.s == pytest.approx(pose_priors(prior)["ellipticity_scale"]) and ip.bundle == prior.card["name"]
    assert ip.s == pytest.approx(S_POP, rel=1e-6)  # and the simulator's population
    eta = jnp.asarray(np.random.default_rng(0).normal(0, 0.6, (50, 2)), jnp.float32)
    e = to_ellipticity(eta)
    # p_eta(eta) = pi(e(eta)) |de/deta|
    from_eta = EtaPrior(ip.s).log_prob(eta) - log_jacobian(eta)
    np.testing.assert_allclose(ip.log_prob(e[:, 0] + 1j * e[:, 1]), from_eta, atol=1e-4)


@pytest.mark.parametrize(
    ("card", "match"),
    [
        ({"name": "old"}, "'old' has no ellipticity_prior scale s"),
        ({"name": "x", "ellipticity_prior": {"form": "BA"}}, "no ellipticity_prior scale s"),
        ({"name": "x", "ellipticity_prior": {"s": "wide"}}, "no ellipticity_prior scale s"),
        ({"name": "x", "ellipticity_prior": {"s": -0.3}}, "must be a positive number, got -0.3"),
    ],
)
def test_a_card_without_a_usable_ellipticity_prior_is_a_one_line_error(card, match):
    with pytest.raises(BayesblendError, match=match) as info:
        interim_prior_from_card(card)
    assert "\n" not in str(info.value)


def _posterior_draws(n, draws, g, sigma_noise, seed, s=S_POP):
    """Per-source posterior draws of e under the interim prior BA(s) and a Gaussian likelihood.

    Each source's true e is the population's (BA(S_POP)) lensed by ``g``, measured with Gaussian
    noise ``sigma_noise`` per component; its posterior ``∝ BA(e; s) N(obs; e, sigma_noise)`` is
    sampled by importance resampling of proposals from the likelihood (weights: the prior).
    """
    rng = np.random.default_rng(seed)
    e = np.asarray(lens(jnp.asarray(_intrinsic(n, seed), jnp.complex64), g))
    obs = e + sigma_noise * (rng.normal(size=n) + 1j * rng.normal(size=n))
    m = 16 * draws
    cand = obs[:, None] + sigma_noise * (rng.normal(size=(n, m)) + 1j * rng.normal(size=(n, m)))
    logw = _ba_log_density(cand, s)
    w = np.exp(logw - logw.max(axis=1, keepdims=True))
    cdf = np.cumsum(w / w.sum(axis=1, keepdims=True), axis=1)
    rows = np.arange(n)[:, None]
    pick = np.searchsorted((cdf + rows).ravel(), (rng.random((n, draws)) + rows).ravel()).reshape(n, draws)
    d = cand.ravel()[np.minimum(pick, n * m - 1)]
    return d.real, d.imag


def test_hierarchical_mode_recovers_a_known_shear():
    g = 0.04 - 0.03j
    e1, e2 = _posterior_draws(4000, 32, g, 0.05, 5)
    interim = InterimPrior(S_POP)
    g1, g2, s = hierarchical_mode(e1, e2, interim)
    err = SIGMA_E / np.sqrt(4000)
    assert abs(g1 - g.real) < 4 * err and abs(g2 - g.imag) < 4 * err
    assert component_sigma(float(s)) == pytest.approx(SIGMA_E, abs=0.02)
    # the jackknife form: leading axes of source weights give one fit each
    w = np.ones((2, 4000), np.float32)
    w[1, :2000] = 0
    both = hierarchical_mode(e1, e2, interim, w)
    assert both.shape == (2, 3)
    np.testing.assert_allclose(both[0], [g1, g2, s], atol=1e-4)


def test_hierarchical_nuts_recovers_a_known_shear_with_diagnostics():
    g = -0.05 + 0.02j
    e1, e2 = _posterior_draws(1500, 24, g, 0.08, 6)
    est = hierarchical_shear(e1, e2, InterimPrior(S_POP), num_warmup=150, num_samples=200, seed=1)
    assert abs(est.g1 - g.real) < 4 * est.g1_err
    assert abs(est.g2 - g.imag) < 4 * est.g2_err
    assert 0.5 * SIGMA_E / np.sqrt(1500) < est.g1_err < 3 * SIGMA_E / np.sqrt(1500)
    assert est.details["importance_ess"].shape == (1500,)
    assert np.all(est.details["importance_ess"] <= 24 + 1e-3)
    assert est.details["interim_s"] == pytest.approx(S_POP)
    assert max(est.details["r_hat"].values()) < 1.1


def test_dividing_by_the_interim_prior_undoes_its_pull():
    """Broad likelihoods: the prior shrinks each posterior towards round; reweighting by 1/pi removes it."""
    g = 0.08 + 0.0j
    e1, e2 = _posterior_draws(4000, 64, g, 0.25, 8)
    naive = ensemble_shear(e1.mean(1), e2.mean(1))  # posterior means: shrunk towards e = 0
    assert naive.g1 < 0.8 * g.real and abs(naive.g1 - g.real) > 4 * naive.g1_err
    g1, g2, s = hierarchical_mode(e1, e2, InterimPrior(S_POP))
    err = np.sqrt(SIGMA_E**2 + 0.25**2) / np.sqrt(4000)
    assert abs(g1 - g.real) < 4 * err and abs(g2 - g.imag) < 4 * err
    assert component_sigma(float(s)) == pytest.approx(SIGMA_E, abs=0.03)
    # the same draws divided by another prior than the one they were made under: the population is wrong
    _, _, s_wrong = hierarchical_mode(e1, e2, InterimPrior(0.6))
    assert abs(component_sigma(float(s_wrong)) - SIGMA_E) > 0.05


def test_shear_catalog_columns_weights_and_header():
    n = 7
    vals = {
        "id": np.arange(n),
        "blend_id": np.arange(n),
        "e1": np.array([0.1, 0.2, np.nan, 0.0, -0.1, 0.9, 0.1]),
        "e2": np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.0]),
        "e1_std": np.full(n, 0.1),
        "e2_std": np.full(n, 0.1),
        "resolution": np.array([0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.1]),
        "flags": np.array([0, FLAGS["EDGE"], 0, FLAGS["LOW_SNR"], 0, 0, FLAGS["UNRESOLVED"]]),
    }
    cat = make_table(vals, ["r"], {"METHOD": "map", "SHAPEPSF": 0.81})
    sc = shear_catalog(cat, responsivity=0.8, source="test")
    for c in ("e1", "e2", "weight", "responsivity", "flags", "ra", "dec"):
        assert c in sc.colnames
    w = np.asarray(sc["weight"])
    assert w[1] == 0 and w[2] == 0  # edge; no shape
    assert w[5] == 0 and w[6] == 0  # |e| >= 1; unresolved
    assert w[0] == pytest.approx(1 / (0.26**2 + 0.01)) and w[3] > 0
    assert "45" in sc.meta["E2SIGN"] and sc.meta["RESPSRC"] == "test" and sc.meta["SHAPEPSF"] == 0.81
    assert "resolution" in sc.colnames
    assert np.all(sc["responsivity"] == 0.8)
    table = ResponsivityTable((0.12,), (0.9, 0.2), (0.05, 0.05), (10, 10))
    vals["e1_std"] = np.array([0.05, 0.05, 0.05, 0.2, 0.2, 0.2, np.nan])
    sc = shear_catalog(make_table(vals, ["r"], {}), responsivity=table)
    np.testing.assert_allclose(sc["responsivity"], [0.9, 0.9, 0.9, 0.2, 0.2, 0.2, 0.2])
    assert "per source" in sc["responsivity"].description and "R_table" not in sc.meta
    assert ResponsivityTable.from_dict(json.loads(sc.meta["RESPBINS"])) == table


def test_card_responsivity_entries():
    card = {"shear_responsivity": {"map": {"R": 0.5, "command": "c"}}}
    assert responsivity_from_card(card, "map") == (0.5, "c")
    with pytest.warns(UserWarning, match="no shear responsivity for method 'svi'.*R = 1"):
        assert responsivity_from_card(card, "svi") == (1.0, "none")
    # binned: the entry's table when it has one, its single R when not
    assert responsivity_from_card(card, "map", binned=True) == (0.5, "c")
    table = ResponsivityTable((0.1,), (0.8, 0.3), (0.1, 0.1), (5, 5))
    card["shear_responsivity"]["map"]["R_table"] = table.to_dict()
    assert responsivity_from_card(card, "map", binned=True) == (table, "c")
    assert responsivity_from_card(card, "map") == (0.5, "c")


def test_shipped_bundle_has_no_responsivity_so_r_is_one(prior):
    with pytest.warns(UserWarning, match="no shear responsivity for method 'map': using R = 1"):
        assert responsivity_from_card(prior.card, "map", binned=True) == (1.0, "none")


def test_card_responsivity_must_match_the_scene_model():
    """An R measured under one flux prior / model error does not calibrate another's shapes."""
    from bayesblend.infer import InferenceConfig

    made = InferenceConfig().scene_model_settings()
    assert made == {"flux_prior": "amortised", "model_error": "card"}  # the bundle's measured misfit
    entry = {"R": 0.5, "scene_model": made, "command": "c"}
    card = {"shear_responsivity": {"map": entry}}
    assert responsivity_from_card(card, "map", made) == (0.5, "c")
    other = InferenceConfig(flux_prior="detection").scene_model_settings()
    with pytest.warns(
        UserWarning, match="with flux_prior=amortised; these shapes were made with flux_prior=detection"
    ):
        assert responsivity_from_card(card, "map", other) == (1.0, "none")
    old = {k: v for k, v in made.items() if k != "model_error"}  # a catalogue from before the header keys
    with pytest.warns(UserWarning, match="model_error=unrecorded"):
        assert responsivity_from_card(card, "map", old) == (1.0, "none")


def test_usable_shapes_rule():
    e1 = np.array([0.1, np.nan, 0.8, 0.1, 0.1, 0.1])
    e2 = np.array([0.0, 0.0, 0.7, 0.0, 0.0, 0.0])
    flags = np.array([0, 0, 0, FLAGS["UNRESOLVED"], FLAGS["LOW_SNR"], FLAGS["BLENDED"]])
    # a neighbour-dominated (BLENDED) source is left out; a merely faint (LOW_SNR) one is kept
    np.testing.assert_array_equal(usable_shapes(e1, e2, flags), [True, False, False, False, True, False])
    relaxed = usable_shapes(e1, e2, flags, EXCLUDE_FLAGS & ~FLAGS["UNRESOLVED"])
    np.testing.assert_array_equal(relaxed, [True, False, False, True, True, False])


def test_jackknife_is_undefined_when_one_block_holds_all_the_weight():
    import warnings

    from bayesblend.shear import jackknife, weighted_mean_replicates

    x = np.array([0.1, 0.3, 0.5, 0.7])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no division warning either
        full, reps = weighted_mean_replicates(x, np.array([1.0, 1.0, 0.0, 0.0]), np.array([0, 0, 1, 1]))
    assert full == pytest.approx(0.2) and np.isnan(jackknife(full, reps))
    full, reps = weighted_mean_replicates(x, np.ones(4), np.array([0, 0, 1, 1]))
    # leave-one-block-out means 0.6 and 0.2 around 0.4: error sqrt(1/2 * 2 * 0.2^2) = 0.2
    assert full == pytest.approx(0.4) and jackknife(full, reps) == pytest.approx(0.2)
