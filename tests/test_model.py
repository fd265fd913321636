"""The scene model: its log density, pasting sources into a scene, recovery of a known pose."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numpyro.infer.util import log_density

from bayesblend import ellipticity as E
from bayesblend import forward
from bayesblend.canonical import DEFAULT_FRAME
from bayesblend.model import SceneSpec, scene_mean, scene_model
from bayesblend.simulate.population import ellipticity_scale
from bayesblend.simulate.scenes import simulate_isolated
from bayesblend.survey import get_survey

STAMP = 48
N_FFT = 2 * STAMP


def _spec(n_sources, **kw):
    return SceneSpec(
        shape=(STAMP, STAMP),
        n_sources=n_sources,
        latent_dim=1,
        stamp=STAMP,
        pixel_scale=0.2,
        hlr_pixels=DEFAULT_FRAME.hlr_pixels,
        ellipticity_scale=ellipticity_scale(),
        **kw,
    )


def _fixed_decoder(canonical):
    """A 'decoder' that returns the given canonical morphology whatever z (the pose machinery alone)."""
    canonical = jnp.asarray(canonical, jnp.float32)
    return lambda z: jnp.broadcast_to(canonical, z.shape[:1] + canonical.shape)


@pytest.fixture(scope="module")
def galaxy():
    # a bright isolated galaxy with its canonical morphology and true pose
    return simulate_isolated(5, 2, mag_range=(20.0, 20.5), max_shift=0.5, canonical=True)


def _data(r, n_sources, log_hlr0, valid=None):
    t = r.truth
    nb = r.scene.image.shape[0]
    image = jnp.asarray(r.scene.image[0] if r.scene.image.ndim == 4 else r.scene.image)
    flux = np.array([[t[f"flux_{b}"][0] for b in r.scene.bands]])
    pad = n_sources - 1
    return {
        "image": image,
        "variance": jnp.ones_like(image),
        "valid": jnp.ones(image.shape, bool) if valid is None else valid,
        "sky": jnp.asarray(get_survey("lsst").sky_level(r.scene.bands), jnp.float32),
        "psf_ft": forward.psf_spectrum(r.scene.psf[0] if r.scene.psf.ndim == 4 else r.scene.psf, N_FFT),
        "anchor": jnp.zeros((n_sources, 2), jnp.int32),
        "offset0": jnp.zeros((n_sources, 2)),
        "log_flux0": jnp.asarray(np.log(np.r_[flux, np.ones((pad, nb))]), jnp.float32),
        "log_hlr0": jnp.full((n_sources,), log_hlr0, jnp.float32),
        "source_valid": jnp.asarray([True] + [False] * pad),
    }


def test_log_density_is_the_sum_of_its_priors_and_the_masked_pixel_likelihood(galaxy):
    spec = _spec(2, has_variance=False, model_error=0.0)
    valid = np.ones(galaxy.scene.image.shape[-3:], bool)
    valid[:, :5, :] = False  # a masked strip
    data = _data(galaxy, 2, np.log(0.5), jnp.asarray(valid))
    decode = _fixed_decoder(galaxy.canonical[0])
    rng = np.random.default_rng(0)
    params = {
        "u": jnp.asarray(rng.normal(size=(2, 1)), jnp.float32),
        "eta": jnp.asarray(rng.normal(scale=0.3, size=(2, 2)), jnp.float32),
        "log_hlr": jnp.asarray([-0.5, 0.1], jnp.float32),
        "log_flux": data["log_flux0"] + 0.1,
        "offset": jnp.asarray([[0.3, -0.2], [1.0, 2.0]], jnp.float32),
    }
    got, _ = log_density(scene_model, (spec, data, decode), {}, params)

    def normal(x, mu, s):
        return np.sum(
            -0.5 * ((np.asarray(x) - np.asarray(mu)) / s) ** 2 - np.log(s) - 0.5 * np.log(2 * np.pi)
        )

    s = ellipticity_scale()
    expect = normal(params["u"], 0.0, 1.0)
    expect += float(np.sum(E.eta_prior_log_density(params["eta"], s)))
    expect += normal(params["log_hlr"], data["log_hlr0"], spec.log_hlr_sigma)
    expect += normal(params["log_flux"], data["log_flux0"], spec.log_flux_sigma)
    expect += normal(params["offset"], data["offset0"], spec.position_sigma)
    mean = np.asarray(scene_mean(spec, data, decode, None, params), np.float64)
    var = np.asarray(data["sky"])[:, None, None] + np.clip(mean, 0, None)
    img = np.asarray(data["image"], np.float64)
    lik = -0.5 * (img - mean) ** 2 / var - 0.5 * np.log(2 * np.pi * var)
    expect += lik[valid].sum()  # masked pixels carry no weight, each pixel counts once
    assert float(got) == pytest.approx(expect, rel=2e-6)
    # the padded source has zero flux: the scene is the real source's alone
    one = {k: v[:1] for k, v in params.items()}
    data1 = {
        k: (v[:1] if k in ("anchor", "offset0", "log_flux0", "log_hlr0", "source_valid") else v)
        for k, v in data.items()
    }
    alone = np.asarray(scene_mean(_spec(1), data1, decode, None, one))
    assert np.abs(mean - alone).max() < 1e-6 * mean.max()  # float32 FFT round-off of the peak


def test_map_with_the_true_morphology_recovers_the_pose(galaxy):
    """Fitting a GalSim-drawn galaxy with its own canonical image gives back e, size, flux and position."""
    t = galaxy.truth[0]
    spec = _spec(1, has_variance=False, model_error=0.0)
    data = _data(galaxy, 1, np.log(t["hlr"]) + 0.3)
    data["log_flux0"] = data["log_flux0"] + 0.2  # start 20 % off in flux, 35 % in size, round, centred
    decode = _fixed_decoder(galaxy.canonical[0])
    start = {
        "u": jnp.zeros((1, 1)),
        "eta": jnp.zeros((1, 2)),
        "log_hlr": data["log_hlr0"],
        "log_flux": data["log_flux0"],
        "offset": jnp.zeros((1, 2)),
    }

    def loss(p):
        return -log_density(scene_model, (spec, data, decode), {}, p)[0]

    opt = optax.adam(0.02)

    @jax.jit
    def step(p, s):
        g = jax.grad(loss)(p)
        upd, s = opt.update(g, s)
        return optax.apply_updates(p, upd), s

    p, s = start, opt.init(start)
    for _ in range(600):
        p, s = step(p, s)
    e = np.asarray(E.to_ellipticity(p["eta"]))[0]
    true_e = np.array([t["e1"], t["e2"]])
    assert np.hypot(*(true_e - e)) < 0.01, (e, true_e, t["snr"])
    assert np.exp(float(p["log_hlr"][0])) == pytest.approx(t["hlr"], rel=0.02)
    r = galaxy.scene.bands.index("r")
    # total flux (the stamp holds 99.6 % of it; the model crops the same way) within the 0.02 mag:
    # this large (1.2"), bulgy galaxy's core is what the 4-pixel canonical half-light radius resolves least
    assert np.exp(float(p["log_flux"][0, r])) == pytest.approx(t["flux_r"], rel=0.02)
    np.testing.assert_allclose(np.asarray(p["offset"][0]), [t["x"] - 23.5, t["y"] - 23.5], atol=0.03)


def test_pasting_places_stamps_at_their_anchors_and_clips_at_the_edges():
    rng = np.random.default_rng(3)
    s = 12
    stamps = rng.uniform(0.5, 1.0, (3, 2, s, s)).astype(np.float32)
    anchor, _ = forward.anchor_and_offset(np.array([10.3, -3.0, 30.0]), np.array([12.6, 6.0, 25.2]), s)
    scene = np.asarray(forward.paste_stamps(jnp.asarray(stamps), jnp.asarray(anchor), (30, 40)))
    ref = np.zeros((2, 30, 40), np.float32)
    for k in range(3):  # paste by hand, clipping at the canvas edges
        x0, y0 = anchor[k]
        ys, xs, ye, xe = max(y0, 0), max(x0, 0), min(y0 + s, 30), min(x0 + s, 40)
        ref[:, ys:ye, xs:xe] += stamps[k][:, ys - y0 : ye - y0, xs - x0 : xe - x0]
    assert anchor[1][0] < 0 and anchor[2][1] + s > 30  # sources across the left and the top edge
    np.testing.assert_allclose(scene, ref, rtol=1e-6)
    assert scene.sum() < stamps.sum()  # the sources across the edges lost light


def test_the_model_error_enters_each_band_s_variance_with_its_own_alpha():
    from bayesblend.model import pixel_variance

    data = {
        "image": jnp.full((2, 4, 4), 100.0),
        "variance": jnp.full((2, 4, 4), 10.0),
        "valid": jnp.ones((2, 4, 4), bool).at[1, 0, 0].set(False),
    }
    var = np.asarray(pixel_variance(_spec(1, model_error=(0.0, 0.1)), data, data["image"]))
    np.testing.assert_allclose(var[0], 10.0)  # alpha 0: the survey's noise alone
    np.testing.assert_allclose(var[1].ravel()[1:], 10.0 + (0.1 * 100.0) ** 2)
    assert var[1, 0, 0] == 1.0  # masked
    one = _spec(1, model_error=0.05)  # a number serves every band
    assert one.model_error == (0.05,)
    np.testing.assert_allclose(np.asarray(pixel_variance(one, data, data["image"]))[0], 10.0 + 25.0)
    assert hash(one) == hash(_spec(1, model_error=(0.05,)))  # hashable: one compilation per spec
