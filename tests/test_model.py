import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.stats import norm
from numpyro.infer.util import log_density

from bayesblend.forward import anchor_and_offset, difference_kernel, fft_size, render_scene, render_source
from bayesblend.model import SceneSpec, scene_model

S = 16


def blob_decoder(z):
    """A toy decoder: elliptical Gaussian blobs whose widths depend on z, unit sum per band."""
    yy, xx = jnp.mgrid[:S, :S] - (S - 1) / 2
    sx = 1.5 + jax.nn.softplus(z[..., 0])[..., None, None]
    sy = 1.5 + jax.nn.softplus(z[..., 1])[..., None, None]
    img = jnp.exp(-0.5 * ((xx / sx) ** 2 + (yy / sy) ** 2))
    img = img / img.sum(axis=(-2, -1), keepdims=True)
    return jnp.stack([img, img], axis=-3)  # two bands


def _data(lsst, has_variance):
    rng = np.random.default_rng(0)
    h, w = 20, 24
    psf = np.stack([lsst.psf_image("g", 11), lsst.psf_image("r", 11)])
    anchor, offset0 = anchor_and_offset(np.array([5.0, 18.3, 0.0]), np.array([4.2, 15.0, 0.0]), S)
    valid = np.ones((2, h, w), bool)
    valid[1, 3:6, 10:14] = False
    return {
        "image": jnp.asarray(rng.normal(50, 10, (2, h, w)), jnp.float32),
        "variance": jnp.asarray(rng.uniform(80, 120, (2, h, w)), jnp.float32),
        "valid": jnp.asarray(valid),
        "sky": jnp.asarray([100.0, 120.0]),
        "kernel": difference_kernel(psf, lsst.model_psf_image(11), fft_size(S)),
        "anchor": jnp.asarray(anchor),
        "offset0": jnp.asarray(offset0),
        "log_flux0": jnp.log(jnp.asarray([[800.0, 900.0], [400.0, 500.0], [1.0, 1.0]])),
        "source_valid": jnp.asarray([True, True, False]),
    }


@pytest.mark.parametrize("has_variance,model_error", [(True, 0.0), (False, 0.0), (True, 0.05)])
def test_numpyro_log_density_equals_hand_written(lsst, has_variance, model_error):
    data = _data(lsst, has_variance)
    spec = SceneSpec(
        shape=(20, 24), n_sources=3, latent_dim=2, has_variance=has_variance, model_error=model_error
    )
    rng = np.random.default_rng(1)
    params = {
        "u": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
        "log_flux": data["log_flux0"] + 0.3,
        "offset": data["offset0"] + 0.2,
    }
    lp, _ = log_density(scene_model, (spec, data, blob_decoder), {}, params)
    # by hand: priors of all sources (the padded one's too), Gaussian likelihood of unmasked pixels
    real = np.asarray(data["source_valid"])
    prior = (
        norm.logpdf(params["u"], 0.0, 1.0).sum()
        + norm.logpdf(params["log_flux"], data["log_flux0"], 2.0).sum()
        + norm.logpdf(params["offset"], data["offset0"], 0.5).sum()
    )
    flux = jnp.exp(params["log_flux"]) * real[:, None]
    mean = render_scene(
        blob_decoder(params["u"]), flux, params["offset"], data["anchor"], data["kernel"], (20, 24)
    )
    var = data["variance"] if has_variance else data["sky"][:, None, None] + jnp.clip(mean, 0, None)
    var = var + (model_error * jnp.clip(data["image"], 0, None)) ** 2
    ll = jnp.where(data["valid"], norm.logpdf(data["image"], mean, jnp.sqrt(var)), 0.0).sum()
    assert float(lp) == pytest.approx(float(prior + ll), rel=1e-5)
    # the masked pixels do not count, and the padded source adds nothing to the scene
    data2 = dict(data, image=data["image"].at[1, 4, 11].set(1e6))
    assert float(log_density(scene_model, (spec, data2, blob_decoder), {}, params)[0]) == pytest.approx(
        float(lp)
    )
    bright = dict(params, log_flux=params["log_flux"].at[2].set(20.0))
    lp_bright = float(log_density(scene_model, (spec, data, blob_decoder), {}, bright)[0])
    prior_change = float(
        norm.logpdf(20.0, data["log_flux0"][2], 2.0).sum()
        - norm.logpdf(params["log_flux"][2], data["log_flux0"][2], 2.0).sum()
    )
    assert lp_bright - float(lp) == pytest.approx(prior_change, rel=1e-4)


def test_pasting_matches_direct_rendering_and_clips_at_edges(lsst):
    psf = np.stack([lsst.psf_image("g", 11), lsst.psf_image("r", 11)])
    kernel = difference_kernel(psf, lsst.model_psf_image(11), fft_size(S))
    z = jnp.asarray([[0.1, -0.3], [0.5, 0.2]])
    morph = blob_decoder(z)
    flux = jnp.asarray([[1000.0, 2000.0], [500.0, 300.0]])
    anchor, offset = anchor_and_offset(np.array([10.3, -3.0]), np.array([12.6, 6.0]), S)
    scene = render_scene(morph, flux, jnp.asarray(offset), jnp.asarray(anchor), kernel, (30, 40))
    ref = np.zeros((2, 30, 40), np.float32)
    for k in range(2):  # paste by hand, clipping at the canvas edges
        st = np.asarray(render_source(morph[k], flux[k], jnp.asarray(offset[k]), kernel))
        x0, y0 = anchor[k]
        ys, xs, ye, xe = max(y0, 0), max(x0, 0), min(y0 + S, 30), min(x0 + S, 40)
        ref[:, ys:ye, xs:xe] += st[:, ys - y0 : ye - y0, xs - x0 : xe - x0]
    assert anchor[1][0] < 0  # source 1 straddles the left edge
    np.testing.assert_allclose(np.asarray(scene), ref, rtol=1e-5, atol=1e-3)
    assert float(scene.sum()) < float(flux.sum())  # the source across the edge lost light


def test_sources_are_placed_by_their_light_centroid(lsst):
    """A morphology whose light sits off its stamp centre is moved so the light lands at the position."""
    from bayesblend.forward import light_centroid

    psf = np.stack([lsst.psf_image("g", 11), lsst.psf_image("r", 11)])
    kernel = difference_kernel(psf, lsst.model_psf_image(11), fft_size(S))
    yy, xx = np.mgrid[:S, :S] - (S - 1) / 2

    def blob(dx, dy):
        img = np.exp(-0.5 * ((xx - dx) ** 2 + (yy - dy) ** 2) / 1.2**2)
        return jnp.asarray(np.stack([img, 2 * img])[None] / img.sum(), dtype=jnp.float32)

    centred = blob(0.0, 0.0)
    np.testing.assert_allclose(np.asarray(light_centroid(centred)), 0.0, atol=1e-5)
    moved = blob(-3.0, 2.0)  # light 3 px left of and 2 px below the stamp centre
    np.testing.assert_allclose(np.asarray(light_centroid(moved))[0], [-3.0, 2.0], atol=1e-3)
    assert np.all(np.asarray(light_centroid(jnp.zeros((2, 2, S, S)))) == 0.0)  # empty: no shift, no NaN
    # a faint one-sided outer wing (10 % of the light, 9 px out) moves the plain first moment over 0.5 px, but
    # not the windowed centroid: the position is the core's
    wing = centred + 0.1 * blob(9.0, 0.0)
    plain = float(jnp.sum(jnp.clip(wing, 0).sum(1)[0] * xx) / jnp.sum(wing))
    assert plain > 0.5
    np.testing.assert_allclose(np.asarray(light_centroid(wing))[0], [0.0, 0.0], atol=0.1)
    flux = jnp.asarray([[1000.0, 2000.0]])
    anchor, offset = anchor_and_offset(np.array([12.3]), np.array([9.6]), S)
    args = (flux, jnp.asarray(offset), jnp.asarray(anchor), kernel, (24, 28))
    np.testing.assert_allclose(
        np.asarray(render_scene(moved, *args)), np.asarray(render_scene(centred, *args)), atol=2e-2
    )
