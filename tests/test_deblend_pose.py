"""The inference layer on a galaxy model v2 bundle (explicit pose): every method runs and reports its draws.

The bundle here has untrained networks (small and quick): these tests check the plumbing of
galaxy model v2 through blends, methods, the Posterior and the catalogue; recovery of known
inputs is tested on the shipped model.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bayesblend.ellipticity import to_ellipticity
from bayesblend.errors import BundleError
from bayesblend.infer import deblend
from bayesblend.model import PoseSceneSpec
from bayesblend.prior.amortised import PoseLayout
from bayesblend.prior.bundle import load_bundle, save_bundle
from bayesblend.prior.networks import Decoder, Encoder
from bayesblend.simulate.scenes import simulate_blend

FAST = dict(num_draws=20, num_warmup=10, num_chains=2, map_steps=30, svi_steps=10, max_tree_depth=3)


@pytest.fixture(scope="module")
def v2_bundle(tmp_path_factory):
    arch = {
        "survey": "lsst",
        "bands": list("ugrizy"),
        "stamp": 48,
        "latent_dim": 3,
        "encoder_features": [4, 8, 8],
        "decoder_features": [8, 8, 8, 4],
        "pose_encoder_features": [4, 8, 8],
        "pixel_scale": 0.2,
        "canonical_frame": {"size": 64, "hlr_pixels": 4.0, "reference_band": "r"},
    }
    layout = PoseLayout(3, 6)
    params = {
        "decoder": Decoder(bands=6, stamp=64, features=(8, 8, 8, 4)).init(
            jax.random.PRNGKey(0), jnp.zeros(3)
        ),
        "encoder": Encoder(latent_dim=3, features=(4, 8, 8)).init(
            jax.random.PRNGKey(1), jnp.zeros((6, 64, 64))
        ),
        "pose_encoder": Encoder(latent_dim=layout.size, features=(4, 8, 8)).init(
            jax.random.PRNGKey(2), jnp.zeros((6, 48, 48))
        ),
    }
    card = {
        "architecture": arch,
        "default_latent_prior": "normal",
        "ellipticity_prior": {"s": 0.3},
        "size_prior": {"ln_hlr_at_r23": -0.8, "slope_per_mag": -0.25, "sigma": 0.8, "band": "r"},
    }
    return load_bundle(save_bundle(tmp_path_factory.mktemp("v2") / "b", card, params))


@pytest.fixture(scope="module")
def pair():
    return simulate_blend(21, 19, n_range=(2, 3), mag_range=(20.0, 24.0))


@pytest.mark.parametrize("method", ["amortised", "map", "svi", "nuts"])
def test_every_method_gives_pose_draws_and_a_catalogue_of_them(v2_bundle, pair, method):
    t = pair.truth
    post = deblend(pair.scene, sources=np.c_[t["x"], t["y"]], method=method, prior=v2_bundle, **FAST)
    assert isinstance(post.blends[0].spec, PoseSceneSpec)
    d = post.draws
    chains = 2 if method == "nuts" else 1
    assert d["eta"].shape == (chains, 20, 2, 2) and d["log_hlr"].shape == (chains, 20, 2)
    # e and size are the parameters' draws, not measurements on images
    e = np.asarray(to_ellipticity(jnp.asarray(d["eta"])))
    np.testing.assert_allclose(d["e1"], e[..., 0], atol=1e-6)
    np.testing.assert_allclose(d["size"], np.exp(d["log_hlr"]), rtol=1e-6)
    c = post.catalog()
    assert len(c) == 2
    np.testing.assert_allclose(c["e1"], np.median(d["e1"], axis=(0, 1)), atol=1e-6)
    np.testing.assert_allclose(c["size"], np.median(d["size"], axis=(0, 1)), rtol=1e-6)
    # positions are profile centres: the stamp anchor plus the offset parameter
    b = post.blends[0]
    x = np.asarray(b.data["anchor"])[:2, 0] + 23.5 + np.median(d["offset"][..., 0], axis=(0, 1))
    np.testing.assert_allclose(c["x"], x, atol=1e-4)
    model = post.model_image(0)
    assert model.shape == b.data["image"].shape and np.all(np.isfinite(model))
    if method != "amortised":
        trace = post.traces[0]["map_trace"]
        assert trace[-1] < trace[0]  # MAP lowered -log p from the amortised start
    idata = post.to_inference_data()
    assert idata.posterior["eta"].dims == ("chain", "draw", "source", "component")


def test_pose_bundle_without_its_priors_is_refused(v2_bundle, pair, tmp_path):
    card = {k: v for k, v in v2_bundle.card.items() if k not in ("size_prior", "files", "format")}
    b = load_bundle(save_bundle(tmp_path / "b", card, v2_bundle.params))
    t = pair.truth
    with pytest.raises(BundleError, match="pose priors"):
        deblend(pair.scene, sources=np.c_[t["x"], t["y"]], method="map", prior=b, **FAST)
