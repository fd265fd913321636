"""The shear-bias harness and the shear commands."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from bayesblend.catalog import FLAGS, RESOLUTION_MIN, make_table
from bayesblend.cli import main
from bayesblend.detect import match_sources
from bayesblend.errors import BayesblendError
from bayesblend.infer import InferenceConfig
from bayesblend.io import write_table
from bayesblend.shear.bias import _biases, format_summary, summarise
from bayesblend.shear.harness import (
    HarnessConfig,
    load_items,
    run,
    run_item,
)


def test_match_is_one_to_one_within_the_radius():
    xt, yt = np.array([10.0, 11.0, 40.0]), np.array([10.0, 10.0, 40.0])
    xf, yf = np.array([10.2, 30.0]), np.array([10.1, 30.0])
    j = match_sources(xt, yt, xf, yf, 2.0)
    assert list(j) == [0, -1, -1]  # the second true galaxy may not take the same source
    assert list(match_sources(xt, yt, xf[:0], yf[:0], 2.0)) == [-1, -1, -1]


def test_biases_recover_a_known_linear_response():
    g, m1, m2, c1, c2 = 0.02, -0.03, 0.01, 2e-3, -1e-3
    design = np.array([(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)], float) * g
    g_hat = np.stack([(1 + m1) * design[:, 0] + c1, (1 + m2) * design[:, 1] + c2], axis=1)
    reps = np.stack([g_hat + 1e-4 * k for k in range(4)])
    out = _biases(g_hat, reps, g)
    assert out["m1"] == pytest.approx(m1, abs=1e-9) and out["m2"] == pytest.approx(m2, abs=1e-9)
    assert out["c1"] == pytest.approx(c1) and out["c2"] == pytest.approx(c2)
    assert out["m"] == pytest.approx(0.5 * (m1 + m2), abs=1e-9)
    assert out["m1_err"] == pytest.approx(0.0, abs=1e-9)  # shifts common to +g and -g cancel in m
    assert out["c1_err"] > 0


def test_alpha_recovers_a_known_slope_with_a_jackknife_error():
    from bayesblend.shear.bias import _alpha

    rng = np.random.default_rng(0)
    e_in = rng.normal(0.0, 0.3, 400)
    blocks = np.arange(400) % 20
    a, err = _alpha(0.9 * e_in, e_in, blocks)
    assert a == pytest.approx(-0.1, abs=1e-12) and err == pytest.approx(0.0, abs=1e-12)
    a, err = _alpha(0.9 * e_in + rng.normal(0.0, 0.05, 400), e_in, blocks)
    # slope error of least squares through the origin: 0.05 / sqrt(sum e_in^2) = 0.008
    assert abs(a + 0.1) < 0.03 and 0.004 < err < 0.016


def test_galaxy_responses_recover_known_per_galaxy_responses():
    from bayesblend.shear.bias import galaxy_responses
    from bayesblend.simulate.scenes import SHEAR_DESIGN

    g, resp = 0.02, np.array([1.0, 0.5, 0.2, 0.8])
    rng = np.random.default_rng(1)
    e_int = rng.normal(0, 0.2, (2, 4))
    design = np.array(SHEAR_DESIGN, float) * g  # (shear, 2) in units of g
    e = np.concatenate(
        [resp * (e_int[:, None] + design.T[:, :, None]), resp * (-e_int[:, None] + design.T[:, :, None])],
        axis=1,
    )
    std = np.tile(np.array([0.02, 0.05, 0.1, 0.2]), (10, 1))
    r = {"e1": e[0], "e2": e[1], "e1_std": std, "e2_std": std}
    out = galaxy_responses(r, g)
    np.testing.assert_allclose(out["response"], resp, atol=1e-12)
    np.testing.assert_allclose(out["e_sigma"], std[0])


def test_harness_end_to_end_on_isolated_galaxies(tmp_path, prior):
    cfg = HarnessConfig(kind="isolated", seed=11, method="amortised", draws=16)
    assert run(cfg, 2, tmp_path, prior, progress=False) == 2
    assert run(cfg, 2, tmp_path, prior, progress=False) == 0  # resumes: nothing left
    r = load_items(tmp_path)
    assert r["e1"].shape == (10, 2) and r["e1_draws"].shape == (10, 2, 16)
    assert r["matched"].all()
    # the twins' truth: rotated variants have minus the intrinsic ellipticity of the unrotated ones
    np.testing.assert_allclose(r["true_e1_int"][5], -r["true_e1_int"][0], atol=1e-12)
    assert np.all(r["true_hlr"] > 0) and not any(k.startswith("target_") for k in r)
    # the size column is the fitted half-light radius (arcsec): within a factor 3 of the true one
    assert np.all(np.abs(np.log(r["size"] / r["true_hlr"])) < np.log(3.0))
    assert r["resolution"].shape == (10, 2) and np.all((r["resolution"] > 0) & (r["resolution"] < 1))
    unresolved = (r["flags"] & FLAGS["UNRESOLVED"]) > 0
    np.testing.assert_array_equal(unresolved, r["resolution"] < RESOLUTION_MIN)
    recorded = json.loads((tmp_path / "config.json").read_text())
    assert recorded["bundle"] == prior.card["name"] and "shape_psf_fwhm" not in recorded
    assert recorded["inference"]["model_error"] == InferenceConfig().model_error  # defaults recorded too
    flagged = summarise(tmp_path, estimators=("truth",))
    assert flagged["n_used"] == int((~unresolved).all(axis=0).sum())
    res = summarise(tmp_path, estimators=("truth", "ensemble", "ensemble_targets"), min_resolution=0.0)
    assert res["n_items"] == 2 and res["n_galaxies"] == 2 and res["n_used"] == 2
    t = res["estimators"]["truth"]
    assert abs(t["c1"]) < 1e-12 and abs(t["c2"]) < 1e-12  # rotated twins cancel at zero shear
    assert abs(t["m1"]) < 0.1 and abs(t["m2"]) < 0.1
    assert np.isfinite(res["estimators"]["ensemble"]["m1"])
    # isolated: every galaxy is a target, so the targets' ensemble is the ensemble
    assert res["estimators"]["ensemble_targets"]["m1"] == pytest.approx(res["estimators"]["ensemble"]["m1"])
    assert np.isfinite(res["alpha"]["alpha1"]) and res["alpha"]["n"] == 2
    assert "ensemble" in format_summary(res) and "deblended vs true e" in format_summary(res)
    with pytest.raises(BayesblendError, match="another configuration"):
        run(
            HarnessConfig(kind="isolated", seed=12, method="amortised", draws=16),
            1,
            tmp_path,
            prior,
            progress=False,
        )
    with pytest.raises(BayesblendError, match="another configuration"):  # an inference setting differs
        run(replace(cfg, settings={"model_error": 0.0}), 1, tmp_path, prior, progress=False)


def test_cli_report_refuses_a_run_with_no_usable_galaxy_or_of_another_bundle(tmp_path, prior, capsys):
    cfg = HarnessConfig(kind="isolated", seed=11, method="amortised", draws=16)
    run(cfg, 1, tmp_path, prior, progress=False)  # item 0: its galaxy is unresolved
    argv = ["shear-bias", "--report", "--n", "1", "--out", str(tmp_path), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith(f"bayesblend: error: {tmp_path}: none of its 1 galaxies is usable") and "\n" not in err
    )
    made = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(made | {"bundle": "another-model"}))
    assert main(argv[:-1] + ["--calibrate", "--quiet"]) == 2
    assert "made with bundle 'another-model'" in capsys.readouterr().err


def test_cli_calibrate_stores_the_runs_own_method_and_a_command_that_reruns(tmp_path, monkeypatch, capsys):
    import bayesblend.shear as shear

    resp, std = np.array([1.0, 0.8, 0.3, 0.2]), np.array([0.02, 0.04, 0.12, 0.2])
    _fake_run(tmp_path / "a", 5, 10, resp, std)  # made with MAP
    _fake_run(tmp_path / "b", 6, 10, resp, std)
    stored = []
    monkeypatch.setattr(
        shear,
        "store_responsivity",
        lambda path, method, e, res, command: (
            stored.append((method, command, res)) or {"R": 1.0, "R_err": 0.0}
        ),
    )
    # --method says nuts, but the runs are MAP: R is stored for the runs' own method
    argv = ["shear-bias", "--report", "--n", "10", "--out", str(tmp_path / "a"), "--method", "nuts"]
    argv += ["--pool", str(tmp_path / "b"), "--bins", "2", "--quiet", "--calibrate"]
    assert main(argv) == 0
    ((method, command, res),) = stored
    assert method == "map" and "for method map" in capsys.readouterr().out
    assert res["n_items"] == 20 and res["responsivity_table"]["n"] == [40, 40]
    # the stored command is one the CLI accepts and that makes the same table
    words = command.split()[1:]
    assert words[words.index("--seed") + 1] == "5" and {"--report", "--pool", "--calibrate"} <= set(words)
    assert main(words) == 0 and stored[1][2]["responsivity_table"] == res["responsivity_table"]


def test_harness_config_errors():
    with pytest.raises(BayesblendError, match="'blends' or 'isolated'"):
        HarnessConfig(kind="field")
    with pytest.raises(BayesblendError, match="shear amplitude"):
        HarnessConfig(shear=0.5)


def _catalog(tmp_path, n=40, seed=0):
    rng = np.random.default_rng(seed)
    vals = {
        "id": np.arange(n),
        "blend_id": np.arange(n) // 2,
        "e1": rng.normal(0.02, 0.2, n),
        "e2": rng.normal(0.0, 0.2, n),
        "e1_std": np.full(n, 0.05),
        "e2_std": np.full(n, 0.05),
        "flags": np.zeros(n, int),
    }
    path = tmp_path / "catalog.fits"
    write_table(path, make_table(vals, ["r"], {"BUNDLE": "lsst-v2", "METHOD": "map"}))
    return path


def test_cli_shear_prints_the_field_shear_and_writes_the_shear_catalogue(tmp_path, capsys):
    path = _catalog(tmp_path)
    assert main(["shear", str(path), "--out", str(tmp_path / "shear.fits")]) == 0
    out = capsys.readouterr().out
    assert "g1 =" in out and "ensemble" in out and "R =" in out
    from bayesblend.io import read_table

    sc = read_table(tmp_path / "shear.fits")
    assert len(sc) == 40 and "weight" in sc.colnames and "responsivity" in sc.colnames


def test_cli_shear_bad_input_is_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.fits"
    from astropy.table import Table

    write_table(bad, Table({"x": [1.0, 2.0]}))
    assert main(["shear", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bayesblend: error:") and "e1" in err and "\n" not in err
    path = _catalog(tmp_path)
    assert main(["shear", str(path), "--posterior", str(tmp_path / "missing.nc")]) == 2
    assert "no such posterior" in capsys.readouterr().err
    (tmp_path / "blocked").write_text("a file, not a directory")
    assert main(["shear", str(path), "--out", str(tmp_path / "blocked" / "shear.fits")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("bayesblend: error:") and "blocked" in errors[0]


def test_cli_shear_with_a_posterior_runs_the_hierarchical_estimator(tmp_path, capsys, prior):
    from bayesblend.infer import deblend
    from bayesblend.simulate.scenes import simulate_blend

    sims = [simulate_blend(4, i, max_shift=0.5) for i in range(3)]
    post = deblend(
        [s.scene for s in sims],
        sources=[np.c_[s.truth["x"], s.truth["y"]] for s in sims],
        method="amortised",
        prior=prior,
        num_draws=32,
    )
    post.write_catalog(tmp_path / "catalog.fits")
    post.to_netcdf(tmp_path / "posterior.nc")
    code = main(["shear", str(tmp_path / "catalog.fits"), "--posterior", str(tmp_path / "posterior.nc")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "hierarchical" in out and "importance ESS" in out


def _posterior_nc(path, e1, e2):
    """A posterior.nc of e1, e2 draws ``(source, draw)`` only (one chain), for ``posterior_ellipticities``."""
    import xarray as xr

    dims = ("chain", "draw", "source")
    ds = xr.Dataset({"e1": (dims, e1.T[None]), "e2": (dims, e2.T[None])})
    ds.to_netcdf(path, group="posterior", engine="h5netcdf")
    return path


def test_cli_shear_hierarchical_needs_the_cards_ellipticity_prior(tmp_path, capsys, monkeypatch):
    import types

    import bayesblend.prior.bundle

    cat = _catalog(tmp_path)
    rng = np.random.default_rng(1)
    nc = _posterior_nc(tmp_path / "posterior.nc", rng.normal(0, 0.2, (40, 16)), rng.normal(0, 0.2, (40, 16)))
    assert main(["shear", str(cat), "--posterior", str(nc)]) == 0  # lsst-v2: its card has the prior
    assert "hierarchical" in capsys.readouterr().out
    no_prior = types.SimpleNamespace(card={"name": "no-pose"}, path=tmp_path)
    monkeypatch.setattr(bayesblend.prior.bundle, "load_bundle", lambda name=None: no_prior)
    assert main(["shear", str(cat), "--posterior", str(nc)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1
    assert err[0].startswith("bayesblend: error: model card 'no-pose' has no ellipticity_prior")


def test_field_shear_recovers_a_known_shear_and_the_cli_writes_json(tmp_path, capsys):
    """Draws scattered tightly around lensed intrinsic shapes: the hierarchical estimate is exact up to
    shape noise, so the known shear lies within its error; the JSON has the default estimator first."""
    from bayesblend.ellipticity import lens
    from bayesblend.shear import field_shear
    from bayesblend.simulate.population import draw_ellipticities

    n, g = 600, 0.06 - 0.04j
    rng = np.random.default_rng(3)
    es = draw_ellipticities(rng, n, 0.26)
    e = lens(es[:, 0] + 1j * es[:, 1], g)
    e1 = e.real[:, None] + rng.normal(0, 1e-3, (n, 24))
    e2 = e.imag[:, None] + rng.normal(0, 1e-3, (n, 24))
    vals = {
        "id": np.arange(n),
        "blend_id": np.arange(n),
        "e1": e1.mean(1),
        "e2": e2.mean(1),
        "e1_std": e1.std(1),
        "e2_std": e2.std(1),
        "flags": np.zeros(n, int),
    }
    cat = tmp_path / "run" / "catalog.fits"
    write_table(cat, make_table(vals, ["r"], {"BUNDLE": "lsst-v2", "METHOD": "nuts"}))
    _posterior_nc(tmp_path / "run" / "posterior.nc", e1, e2)  # found beside the catalogue
    res = field_shear(cat)
    assert list(res.estimates) == ["hierarchical", "ensemble"]
    h = res.default
    assert abs(h.g1 - g.real) < 3 * h.g1_err and abs(h.g2 - g.imag) < 3 * h.g2_err
    assert 0.005 < h.g1_err < 0.03 and h.n == n
    assert main(["shear", str(cat), "--json", str(tmp_path / "g.json")]) == 0
    out = capsys.readouterr().out
    assert out.index("hierarchical") < out.index("ensemble")
    got = json.loads((tmp_path / "g.json").read_text())
    assert list(got) == ["hierarchical", "ensemble"]
    assert set(got["hierarchical"]) == {"g1", "g2", "g1_err", "g2_err", "n"}
    assert got["hierarchical"]["g1"] == pytest.approx(h.g1, abs=3 * h.g1_err)
    assert not list(tmp_path.glob(".g.json.*"))  # written atomically: no temporary file left
    assert main(["shear", str(cat), "--no-posterior", "--json", str(tmp_path / "e.json")]) == 0
    assert list(json.loads((tmp_path / "e.json").read_text())) == ["ensemble"]
    assert "no hierarchical estimate" in capsys.readouterr().err


def test_harness_item_with_nothing_detected(prior, monkeypatch):
    # a detector that finds nothing in any variant: the detection table's columns, no rows
    import bayesblend.detect

    real = bayesblend.detect.detect_sources
    monkeypatch.setattr(bayesblend.detect, "detect_sources", lambda sc, **kw: real(sc)[:0])
    r = run_item(0, HarnessConfig(kind="blends", seed=5, detect=True, method="amortised", draws=8), prior)
    assert r["e1"].shape == (10, 3) and not r["matched"].any()
    assert np.isnan(r["e1"]).all() and r["e1_draws"].shape[:2] == (10, 3)


def _fake_run(out, seed, n_items, response, e_std, shear=0.02, targets=False):
    """A run directory of harness items whose galaxies respond to shear by ``response`` (per galaxy).

    Each item holds ``len(response)`` galaxies with intrinsic shapes from ``seed``;
    ``e = response * (e_int + g)`` in every variant, the twins' ``e_int`` rotated;
    ``targets``: every galaxy is a blend target.
    """
    from bayesblend.simulate.scenes import SHEAR_DESIGN

    rng = np.random.default_rng(seed)
    (out / "items").mkdir(parents=True)
    cfg = {"kind": "blends", "seed": seed, "shear": shear, "method": "map", "detect": False}
    (out / "config.json").write_text(
        json.dumps(cfg | {"draws": 4, "latent_prior": "flow", "bundle": "lsst-v2"})
    )
    n = len(response)
    design = np.array(SHEAR_DESIGN, float).T[:, :, None] * shear  # (2, shear, 1)
    for item in range(n_items):
        e_int = rng.normal(0.0, 0.2, (2, 1, n))
        true = np.concatenate([e_int + design, -e_int + design], axis=1)  # (2, variant, galaxy)
        e = response * true
        std = np.broadcast_to(e_std, (10, n))
        full = lambda a: np.broadcast_to(a, (10, n)).copy()  # noqa: E731
        np.savez(
            out / "items" / f"item_{item:05d}.npz",
            e1=e[0],
            e2=e[1],
            e1_std=std,
            e2_std=std,
            matched=full(True),
            flags=full(0),
            true_e1=true[0],
            true_e2=true[1],
            true_snr=full(50.0),
            is_target=full(targets),
            e1_draws=np.repeat(e[0][..., None], 4, axis=-1),
            e2_draws=np.repeat(e[1][..., None], 4, axis=-1),
        )


def test_runs_of_other_seeds_pool_into_one_summary(tmp_path):
    from bayesblend.shear import shape_weight
    from bayesblend.shear.harness import pooled_config

    resp, std = np.array([1.0, 0.8, 0.3, 0.2]), np.array([0.02, 0.04, 0.12, 0.2])
    _fake_run(tmp_path / "a", 5, 12, resp, std)
    _fake_run(tmp_path / "b", 6, 8, resp, std)
    one = summarise(tmp_path / "a", estimators=("ensemble",), n_bins=2)
    both = summarise([tmp_path / "a", tmp_path / "b"], estimators=("ensemble",), n_bins=2)
    assert both["config"]["seed"] == [5, 6] and "seeds 5, 6" in format_summary(both)
    # item numbers repeat between the runs, their galaxies do not: 20 items, 80 galaxies
    assert (one["n_items"], one["n_used"]) == (12, 48) and (both["n_items"], both["n_used"]) == (20, 80)
    # twins cancel the intrinsic shapes: m is the weighted mean response, in one run or both
    w = shape_weight(std, std)
    assert both["estimators"]["ensemble"]["m"] == pytest.approx(np.sum(w * resp) / np.sum(w) - 1, abs=1e-9)
    # the galaxies sigma_m = 0.01 needs: from the jackknife error (sigma_m ∝ n^-1/2) and from the
    # per-galaxy response scatter (each galaxy's response is one of resp, 20 times over)
    ens = both["estimators"]["ensemble"]
    assert ens["galaxies_for_sigma_m"] == int(np.ceil(80 * (ens["m_err"] / 0.01) ** 2))
    rs = both["response_scatter"]
    spread = np.repeat(resp, 20)
    assert rs["mean"] == pytest.approx(spread.mean()) and rs["sd"] == pytest.approx(spread.std(ddof=1))
    assert rs["galaxies_for_sigma_m"] == int(np.ceil((spread.std(ddof=1) / spread.mean() / 0.01) ** 2))
    assert "galaxies for sigma_m = 0.01" in format_summary(both)
    table = both["responsivity_table"]
    assert table["n"] == [40, 40] and table["R"][0] > table["R"][1]
    assert both["responsivity_table_problem"] is None
    _fake_run(tmp_path / "c", 5, 2, resp, std)
    with pytest.raises(BayesblendError, match="different seeds"):
        pooled_config([tmp_path / "a", tmp_path / "c"])
    _fake_run(tmp_path / "d", 7, 2, resp, std, shear=0.01)
    with pytest.raises(BayesblendError, match="differs in shear"):
        pooled_config([tmp_path / "a", tmp_path / "d"])


def test_a_table_that_cannot_be_built_is_said_and_not_stored(tmp_path, monkeypatch, capsys):
    import bayesblend.shear as shear

    std = np.array([0.02, 0.04, 0.12, 0.2])
    _fake_run(tmp_path / "few", 5, 2, np.array([1.0, 0.8, 0.3, 0.2]), std)  # 8 galaxies: too few
    small = summarise(tmp_path / "few", estimators=("ensemble",))
    assert (
        small["responsivity_table"] is None
        and "needs at least 15 galaxies" in small["responsivity_table_problem"]
    )
    _fake_run(tmp_path / "bad", 5, 10, np.array([1.0, 0.8, -0.3, -0.2]), std)  # the faint half anti-responds
    res = summarise(tmp_path / "bad", estimators=("ensemble",), n_bins=2)
    assert res["responsivity_table"] is None and "positive" in res["responsivity_table_problem"]
    assert "no responsivity table" in format_summary(res)
    stored = []
    monkeypatch.setattr(shear, "store_responsivity", lambda *a: stored.append(a) or {"R": 1.0, "R_err": 0.0})
    argv = ["shear-bias", "--report", "--n", "10", "--out", str(tmp_path / "bad"), "--bins", "2", "--quiet"]
    assert main(argv + ["--calibrate"]) == 2 and stored == []
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("bayesblend: error: nothing stored: no responsivity table (responsivities must be")
    # too few galaxies: storing R alone would drop the card's table, so nothing is stored either
    few = ["shear-bias", "--report", "--n", "2", "--out", str(tmp_path / "few"), "--quiet", "--calibrate"]
    assert main(few) == 2 and stored == []
    assert capsys.readouterr().err.strip().endswith("run more items or pass fewer --bins")
    pool = ["--pool", str(tmp_path / "few")]
    assert main(argv + pool) == 2 and "need different seeds" in capsys.readouterr().err  # both are seed 5
    assert main([a for a in argv if a != "--report"] + pool) == 2
    assert "--pool summarises runs already made" in capsys.readouterr().err


def test_targets_ensemble_and_alpha_against_the_true_ellipticity(tmp_path):
    """Targets that keep 0.9 of their true e (intrinsic and shear alike): m = alpha = -0.1, exactly."""
    std = np.array([0.02, 0.04, 0.12, 0.2])
    _fake_run(tmp_path / "t", 5, 6, np.full(4, 0.9), std, targets=True)
    res = summarise(tmp_path / "t", estimators=("truth", "ensemble_targets"))
    assert set(res["estimators"]) == {"truth", "ensemble_targets"}
    assert res["estimators"]["ensemble_targets"]["m"] == pytest.approx(-0.1, abs=1e-9)
    assert res["estimators"]["truth"]["m"] == pytest.approx(0.0, abs=1e-9)
    a = res["alpha"]
    assert a["alpha1"] == pytest.approx(-0.1, abs=1e-9) and a["alpha2"] == pytest.approx(-0.1, abs=1e-9)
    assert a["n"] == 24
    _fake_run(tmp_path / "n", 5, 6, np.full(4, 0.9), std)  # no targets: neither is defined
    res = summarise(tmp_path / "n", estimators=("truth", "ensemble_targets"))
    assert "alpha" not in res and set(res["estimators"]) == {"truth"}


def test_posterior_parts_are_matched_to_the_catalogue_by_id(tmp_path):
    import xarray as xr

    from bayesblend.shear.catalog import posterior_ellipticities

    def part(path, ids, e1):
        dims = ("chain", "draw", "source")
        ds = xr.Dataset(
            {"e1": (dims, e1.T[None]), "e2": (dims, -e1.T[None])}, coords={"source": np.asarray(ids)}
        )
        ds.to_netcdf(path, group="posterior", engine="h5netcdf")

    d = tmp_path / "posterior"
    d.mkdir()
    # a run's parts hold sources in batch order, not in id order; the value of each draw is its id
    part(d / "part-00000.nc", [3, 1], np.array([[3.0, 3.0], [1.0, 1.0]]))
    part(d / "part-00001.nc", [0, 2], np.array([[0.0, 0.0], [2.0, 2.0]]))
    e1, e2, _ = posterior_ellipticities(d, np.array([0, 1, 2, 3]))
    assert e1[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0] and e2[:, 1].tolist() == [0.0, -1.0, -2.0, -3.0]
    with pytest.raises(BayesblendError, match="no draws of catalogue source id 7"):
        posterior_ellipticities(d, np.array([0, 7]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BayesblendError, match="no posterior parts"):
        posterior_ellipticities(tmp_path / "empty")
