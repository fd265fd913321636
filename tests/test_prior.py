import json
import shutil
import tomllib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bayesblend.errors import BayesblendError, BundleError
from bayesblend.prior.bundle import bundle_from_runs, load_bundle, save_bundle, update_card
from bayesblend.prior.flow import SNR_FOR_FLOW, brightened_observation, fit_flow, log_prob, sample
from bayesblend.prior.networks import Decoder, Encoder
from bayesblend.prior.train import TrainConfig, train
from bayesblend.simulate.dataset import simulate_dataset


def test_decoder_obeys_the_contract():
    dec = Decoder(bands=6, stamp=24, features=(8, 8, 8, 4))
    params = dec.init(jax.random.PRNGKey(0), jnp.zeros(4))
    z = jax.random.normal(jax.random.PRNGKey(1), (5, 4)) * 3
    out = dec.apply(params, z)
    assert out.shape == (5, 6, 24, 24) and out.dtype == jnp.float32
    assert float(out.min()) >= 0.0
    np.testing.assert_allclose(np.asarray(out.sum(axis=(-2, -1))), 1.0, atol=1e-5)


def test_encoder_shapes():
    enc = Encoder(latent_dim=7, features=(4, 8, 8))
    params = enc.init(jax.random.PRNGKey(0), jnp.zeros((6, 24, 24)))
    mean, log_sigma = enc.apply(params, jnp.ones((3, 6, 24, 24)))
    assert mean.shape == (3, 7) and log_sigma.shape == (3, 7)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "iso"
    simulate_dataset(
        "isolated",
        64,
        out,
        seed=3,
        fmt="shards",
        workers=1,
        shard_size=32,
        progress=False,
        stamp_size=24,
        mag_range=(20.0, 23.0),
    )
    return out


def _tiny_config(data, out, **kw):
    raw = tomllib.loads(open("configs/tiny-test.toml").read())
    raw.update(data=str(data), out=str(out), **kw)
    for k in ("decoder_features", "encoder_features"):
        raw[k] = tuple(raw[k])
    return TrainConfig(**raw)


def test_tiny_vae_lowers_its_loss_and_resumes_exactly(tiny_data, tmp_path):
    cfg = _tiny_config(tiny_data, tmp_path / "run", steps=40, checkpoint_every=5)
    first = train(cfg, progress=False, stop_at=20)
    assert first["step"] == 20
    second = train(cfg, progress=False)  # resumes from the step-20 checkpoint
    hist = second["history"]
    assert second["step"] == 40 and hist["step"] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert np.all(np.isfinite(hist["val_nll"]))
    assert hist["val_nll"][-1] < 0.7 * hist["val_nll"][0]
    # stopping and resuming takes the same steps as one run straight through
    straight = train(
        _tiny_config(tiny_data, tmp_path / "straight", steps=40, checkpoint_every=5), progress=False
    )
    np.testing.assert_allclose(straight["history"]["val_nll"], hist["val_nll"], rtol=1e-4)


def test_canonical_vae_then_pose_encoder_learn_and_the_teacher_stays_frozen(tiny_data, tmp_path):
    """Galaxy model v2's two training kinds on tiny data: both lower their held-out loss."""
    vae = train(
        _tiny_config(tiny_data, tmp_path / "canon", kind="canonical-vae", steps=60, checkpoint_every=20),
        progress=False,
    )
    hist = vae["history"]
    assert vae["decoder"].stamp == 64  # the canonical grid, not the 24-pixel stamps
    assert np.all(np.isfinite(hist["val_nll"])) and hist["val_nll"][-1] < 0.7 * hist["val_nll"][0]
    pose = train(
        _tiny_config(
            tiny_data,
            tmp_path / "pose",
            kind="pose-encoder",
            init_from=str(tmp_path / "canon"),
            teacher_features=(4, 8, 8),
            steps=60,
            checkpoint_every=20,
            learning_rate=1e-2,
        ),
        progress=False,
    )
    ph = pose["history"]
    # the pose part of -log q(theta_true | stamp) ("kl" in the history) falls as the encoder learns
    assert np.all(np.isfinite(ph["val_kl"])) and ph["val_kl"][-1] < 0.9 * ph["val_kl"][0]
    teacher = jax.tree_util.tree_leaves(pose["params"]["teacher"])
    original = jax.tree_util.tree_leaves(vae["params"]["encoder"])
    assert all(np.array_equal(a, b) for a, b in zip(teacher, original, strict=True))
    with pytest.raises(BayesblendError, match="init_from"):
        train(_tiny_config(tiny_data, tmp_path / "orphan", kind="pose-encoder", steps=2), progress=False)
    # the two runs make a v2 bundle: canonical decoder, pose encoder, checksums, frame in the card
    b = load_bundle(bundle_from_runs(tmp_path / "v2", tmp_path / "canon", tmp_path / "pose"))
    assert b.canonical_frame is not None and b.canonical_frame.size == 64 and b.stamp == 24
    m = np.asarray(b.decode(jnp.zeros((2, 4))))
    assert m.shape == (2, 6, 64, 64)
    np.testing.assert_allclose(m.sum(axis=(-2, -1)), 1.0, atol=1e-5)
    assert set(b.params) == {"decoder", "encoder", "pose_encoder"}
    for a, c in zip(
        jax.tree_util.tree_leaves(b.params["pose_encoder"]),
        jax.tree_util.tree_leaves(pose["params"]["encoder"]),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


def _small_bundle(tmp_path):
    arch = {
        "survey": "lsst",
        "bands": list("ugrizy"),
        "stamp": 24,
        "latent_dim": 4,
        "encoder_features": [4, 8, 8],
        "decoder_features": [8, 8, 8, 4],
    }
    enc = Encoder(latent_dim=4, features=(4, 8, 8))
    dec = Decoder(bands=6, stamp=24, features=(8, 8, 8, 4))
    params = {
        "decoder": dec.init(jax.random.PRNGKey(0), jnp.zeros(4)),
        "encoder": enc.init(jax.random.PRNGKey(1), jnp.zeros((6, 24, 24))),
    }
    return save_bundle(tmp_path / "b", {"architecture": arch}, params), params, dec


def test_bundle_round_trip_and_tamper_refused(tmp_path):
    path, params, dec = _small_bundle(tmp_path)
    b = load_bundle(path)
    z = jnp.ones((2, 4))
    np.testing.assert_array_equal(np.asarray(b.decode(z)), np.asarray(dec.apply(params["decoder"], z)))
    assert b.bands == tuple("ugrizy") and b.latent_dim == 4
    # one flipped byte in a weight file
    f = path / "decoder.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="SHA-256 does not match"):
        load_bundle(path)


def test_bundle_missing_and_incompatible(tmp_path):
    with pytest.raises(BundleError, match="no model bundle"):
        load_bundle(tmp_path / "nowhere")
    path, _, _ = _small_bundle(tmp_path)
    card = json.loads((path / "card.json").read_text())
    card["architecture"]["latent_dim"] = 5
    (path / "card.json").write_text(json.dumps(card))
    with pytest.raises(BundleError, match="shape"):
        load_bundle(path)
    shutil.copy(path / "card.json", tmp_path / "card.bak")
    (path / "encoder.safetensors").unlink()
    card["architecture"]["latent_dim"] = 4
    (path / "card.json").write_text(json.dumps(card))
    with pytest.raises(BundleError, match="missing"):
        load_bundle(path)


def test_flow_normalises_and_matches_its_data():
    rng = np.random.default_rng(0)
    cov = np.array([[1.0, 0.8], [0.8, 1.5]])
    z = rng.multivariate_normal([1.0, -0.5], cov, size=6000)
    flow, params, metrics = fit_flow(z, layers=4, hidden=32, steps=600, batch_size=256)
    # integrates to one on a grid
    g = np.linspace(-7, 7, 141)
    xx, yy = np.meshgrid(g, g)
    grid = jnp.asarray(np.stack([xx.ravel(), yy.ravel()], 1), dtype=jnp.float32)
    total = float(jnp.sum(jnp.exp(log_prob(flow, params, grid)))) * (g[1] - g[0]) ** 2
    assert total == pytest.approx(1.0, abs=0.03)
    # held-out likelihood close to the true Gaussian's entropy (per dim)
    entropy = 0.5 * np.log(np.linalg.det(2 * np.pi * np.e * cov)) / 2
    assert metrics["val_nll_per_dim"] == pytest.approx(entropy, abs=0.05)
    draws = np.asarray(sample(flow, params, jax.random.PRNGKey(2), 4000))
    np.testing.assert_allclose(draws.mean(0), [1.0, -0.5], atol=0.1)
    np.testing.assert_allclose(np.cov(draws.T), cov, atol=0.15)


def test_update_card_sets_nested_entries_and_keeps_the_rest(tmp_path):
    (tmp_path / "card.json").write_text(json.dumps({"name": "b", "table": {"map": 1, "svi": 2}}))
    card = update_card(tmp_path, "table.map", {"R": 0.5})
    assert card["table"] == {"map": {"R": 0.5}, "svi": 2} and card["name"] == "b"
    assert json.loads((tmp_path / "card.json").read_text()) == card
    assert update_card(tmp_path, "new.deep.key", 3)["new"] == {"deep": {"key": 3}}
    with pytest.raises(BundleError, match="'name' is not a table"):
        update_card(tmp_path, "name.x", 1)
    with pytest.raises(BundleError, match="no card.json"):
        update_card(tmp_path / "missing", "a", 1)


def test_brightened_observation_lifts_faint_galaxies_only():
    yy, xx = np.mgrid[:16, :16] - 7.5
    blob = np.exp(-(xx**2 + yy**2) / 8.0).astype(np.float32)
    clean = np.stack([np.stack([a * blob] * 2) for a in (1.0, 1e5)])  # (2 galaxies, 2 bands, y, x)
    sky = np.array([100.0, 400.0], np.float32)
    out = brightened_observation(clean, sky, 1, np.zeros_like(clean))  # noiseless: just the boost
    assert out.dtype == np.float32
    ref = clean[:, 1]
    snr = np.sqrt(np.sum(ref**2 / (ref + sky[1]), axis=(1, 2)))  # S/N before brightening
    assert snr[0] < SNR_FOR_FLOW < snr[1]
    np.testing.assert_allclose(out[0], clean[0] * SNR_FOR_FLOW / snr[0], rtol=1e-5)  # faint: boosted
    np.testing.assert_allclose(out[1], clean[1])  # bright already: unchanged
    np.testing.assert_allclose(out[0, 0] / out[0, 1], 1.0)  # one factor for all bands: colour kept
    noisy = brightened_observation(clean, sky, 1, np.ones_like(clean))  # noise of variance sky + signal
    np.testing.assert_allclose(noisy, out + np.sqrt(sky[:, None, None] + out), rtol=1e-6)
