import functools
import json
import shutil
import tomllib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bayesblend.errors import BayesblendError, BundleError
from bayesblend.prior import flow as flow_module
from bayesblend.prior.amortised import PoseLayout
from bayesblend.prior.bundle import DEFAULT_MODEL, Networks, load_bundle, save_bundle, update_card
from bayesblend.prior.flow import fit_flow, log_prob, sample, train_flow_from_run
from bayesblend.prior.networks import Decoder, Encoder, scale_input
from bayesblend.prior.train import TrainConfig, bundle_from_runs, train
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


def test_tiny_canonical_vae_resumes_exactly(tiny_data, tmp_path):
    """A run stopped and resumed takes the steps of one run straight through (learning: the next test)."""
    cfg = _tiny_config(tiny_data, tmp_path / "run", steps=20, checkpoint_every=5)
    assert cfg.kind == "canonical-vae"
    first = train(cfg, progress=False, stop_at=10)
    assert first["step"] == 10
    second = train(cfg, progress=False)  # resumes from the step-10 checkpoint
    hist = second["history"]
    assert second["step"] == 20 and hist["step"] == [5, 10, 15, 20]
    assert np.all(np.isfinite(hist["val_nll"])) and hist["val_nll"][-1] < hist["val_nll"][0]
    straight = train(
        _tiny_config(tiny_data, tmp_path / "straight", steps=20, checkpoint_every=5), progress=False
    )
    np.testing.assert_allclose(straight["history"]["val_nll"], hist["val_nll"], rtol=1e-4)


def test_canonical_vae_then_pose_encoder_learn_and_the_teacher_stays_frozen(tiny_data, tmp_path, monkeypatch):
    """Galaxy model v2's training kinds and flow on tiny data, assembled into a bundle that loads."""
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
    # a later stage starts from the earlier stage's encoder (encoder_init), not from a fresh one
    stage2 = train(
        _tiny_config(
            tiny_data,
            tmp_path / "pose2",
            kind="pose-encoder",
            init_from=str(tmp_path / "canon"),
            encoder_init=str(tmp_path / "pose"),
            teacher_features=(4, 8, 8),
            steps=1,
            learning_rate=1e-9,
        ),
        progress=False,
    )
    before = jax.tree_util.tree_leaves(pose["params"]["encoder"])
    after = jax.tree_util.tree_leaves(stage2["params"]["encoder"])
    assert all(np.allclose(a, b, atol=1e-6) for a, b in zip(before, after, strict=True))
    with pytest.raises(BayesblendError, match="encoder_init starts a pose-encoder run"):
        cfg = _tiny_config(tiny_data, tmp_path / "c2", kind="canonical-vae", encoder_init="x")
        train(cfg, progress=False)
    # the flow is fitted to the canonical VAE's codes (a short fit here), never to a pose encoder's
    monkeypatch.setattr(flow_module, "fit_flow", functools.partial(fit_flow, layers=2, hidden=8, steps=20))
    canon_cfg = _tiny_config(tiny_data, tmp_path / "canon", kind="canonical-vae")
    assert train_flow_from_run(canon_cfg, progress=False) == tmp_path / "canon" / "flow.msgpack"
    pose_cfg = _tiny_config(tiny_data, tmp_path / "pose", kind="pose-encoder")
    with pytest.raises(BayesblendError, match="canonical-vae run's codes"):
        train_flow_from_run(pose_cfg, progress=False)
    with pytest.raises(BayesblendError, match="not a 'pose-encoder' run"):
        bundle_from_runs(tmp_path / "bad", tmp_path / "canon", tmp_path / "canon")
    # the runs make a v2 bundle: canonical decoder, flow, pose encoder, checksums, frame in the card
    b = load_bundle(bundle_from_runs(tmp_path / "v2", tmp_path / "canon", tmp_path / "pose"))
    assert b.canonical_frame.size == 64 and b.stamp == 24 and b.latent_dim == 4
    m = np.asarray(b.decode(jnp.zeros((2, 4))))
    assert m.shape == (2, 6, 64, 64)
    np.testing.assert_allclose(m.sum(axis=(-2, -1)), 1.0, atol=1e-5)
    assert set(b.params) == {"decoder", "encoder", "pose_encoder", "flow"}
    assert b.default_latent_prior == "flow" and b.flow.dim == 4
    for a, c in zip(
        jax.tree_util.tree_leaves(b.params["pose_encoder"]),
        jax.tree_util.tree_leaves(pose["params"]["encoder"]),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
    # the bundle encodes canonical morphologies at the training's input scale: the pose run's teacher
    canonical = jnp.asarray(vae["data"].batch(np.arange(3))["canonical"])
    scale = jnp.full((6,), canon_cfg.canonical_sigma)
    want = Encoder(4, (4, 8, 8)).apply(pose["params"]["teacher"], scale_input(canonical, scale))[0]
    np.testing.assert_allclose(np.asarray(b.encode(canonical)[0]), np.asarray(want), rtol=1e-5, atol=1e-6)
    # Networks: the amortised encoder is the pose encoder, on survey stamps
    nets = Networks(b, "flow")
    w = nets.weights()
    assert nets.encoder_name == "pose_encoder" and set(w) == {"decoder", "pose_encoder", "flow"}
    mean, log_sigma = nets.encode(w, jnp.ones((2, 6, 24, 24)), jnp.ones((2, 6)))
    assert mean.shape == log_sigma.shape == (2, PoseLayout(4, 6).size)


def _small_bundle(tmp_path, flow: bool = False):
    """A v2 bundle of untrained networks: 16-pixel canonical grid, 24-pixel stamps, optional flow."""
    arch = {
        "survey": "lsst",
        "bands": list("ugrizy"),
        "stamp": 24,
        "latent_dim": 4,
        "encoder_features": [4, 8, 8],
        "decoder_features": [8, 8, 8, 4],
        "canonical_frame": {"size": 16, "hlr_pixels": 2.0, "reference_band": "r"},
    }
    enc = Encoder(latent_dim=4, features=(4, 8, 8))
    dec = Decoder(bands=6, stamp=16, features=(8, 8, 8, 4))
    params = {
        "decoder": dec.init(jax.random.PRNGKey(0), jnp.zeros(4)),
        "encoder": enc.init(jax.random.PRNGKey(1), jnp.zeros((6, 16, 16))),
    }
    if flow:
        arch["flow"] = {"kind": "RealNVP", "dim": 4, "layers": 2, "hidden": 8}
        params["flow"] = flow_module.RealNVP(4, 2, 8).init(jax.random.PRNGKey(2), jnp.zeros((1, 4)))
    return save_bundle(tmp_path / "b", {"architecture": arch}, params), params, dec


def test_bundle_round_trip_and_tamper_refused(tmp_path):
    path, params, dec = _small_bundle(tmp_path)
    b = load_bundle(path)
    z = jnp.ones((2, 4))
    np.testing.assert_array_equal(np.asarray(b.decode(z)), np.asarray(dec.apply(params["decoder"], z)))
    assert b.bands == tuple("ugrizy") and b.latent_dim == 4 and b.canonical_frame.size == 16
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


def _refusal(path) -> str:
    with pytest.raises(BundleError) as info:
        load_bundle(path)
    message = str(info.value)
    assert len(message.splitlines()) == 1
    return message


def test_galaxy_model_v1_bundle_and_bad_frames_are_refused(tmp_path):
    path, _, _ = _small_bundle(tmp_path)
    card = json.loads((path / "card.json").read_text())
    # a v1 bundle: observed-frame decoder on the stamp grid, no canonical frame in the architecture
    v1 = {k: v for k, v in card["architecture"].items() if k != "canonical_frame"}
    (path / "card.json").write_text(json.dumps(card | {"architecture": v1}))
    message = _refusal(path)
    assert "galaxy model v1 bundle" in message and "no longer supports" in message
    assert str(path) in message and DEFAULT_MODEL in message
    card["architecture"]["canonical_frame"] = {"size": 15, "hlr_pixels": 2.0, "reference_band": "r"}
    (path / "card.json").write_text(json.dumps(card))
    assert "invalid canonical_frame" in _refusal(path)
    card["architecture"]["canonical_frame"] = {"size": 16}
    (path / "card.json").write_text(json.dumps(card))
    assert "invalid canonical_frame" in _refusal(path)


def test_networks_flow_maps_invert_and_a_bundle_without_pose_encoder_cannot_encode(tmp_path):
    path, params, dec = _small_bundle(tmp_path, flow=True)
    b = load_bundle(path)
    assert DEFAULT_MODEL == "lsst-v2"
    flow_nets, normal_nets = Networks(b, "flow"), Networks(b, "normal")
    assert flow_nets == Networks(b, "flow") and flow_nets != normal_nets
    w = flow_nets.weights()
    assert set(w) == {"decoder", "flow"} and set(normal_nets.weights()) == {"decoder"}
    u = jax.random.normal(jax.random.PRNGKey(3), (5, 4))
    z = flow_nets.latent(w, u)
    assert float(jnp.abs(z - u).max()) > 1e-3  # the flow moves draws...
    np.testing.assert_allclose(np.asarray(flow_nets.to_base(w, z)), np.asarray(u), atol=1e-5)  # ...invertibly
    assert normal_nets.to_latent(w) is None and normal_nets.to_base(w, z) is z
    for forward_mode in (False, True):
        np.testing.assert_allclose(
            np.asarray(flow_nets.decode(w, z, forward_mode=forward_mode)),
            np.asarray(dec.apply(params["decoder"], z)),
            rtol=1e-5,
            atol=1e-7,
        )
    with pytest.raises(BundleError, match="no pose_encoder"):
        flow_nets.encode(w, jnp.ones((1, 6, 24, 24)), jnp.ones((1, 6)))
    with pytest.raises(BundleError, match="no canonical_sigma"):
        b.encode(jnp.ones((1, 6, 16, 16)))


def test_v1_training_kinds_are_refused_in_one_line(tmp_path):
    for kind in ("vae", "deblender"):
        cfg = tmp_path / f"{kind}.toml"
        cfg.write_text(f"kind = '{kind}'\n")
        with pytest.raises(BayesblendError, match=f"kind '{kind}' trains galaxy model v1") as info:
            TrainConfig.from_toml(cfg)
        assert "canonical-vae, pose-encoder" in str(info.value) and "\n" not in str(info.value)
    (tmp_path / "other.toml").write_text("kind = 'gan'\n")
    with pytest.raises(BayesblendError, match="kind must be one of canonical-vae, pose-encoder, got 'gan'"):
        TrainConfig.from_toml(tmp_path / "other.toml")
    assert TrainConfig().kind == "canonical-vae"


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


def test_size_band_comes_from_the_card():
    from pathlib import Path

    from bayesblend.prior.bundle import PriorBundle

    arch = {"architecture": {"bands": list("ugrizy")}}
    card = arch | {"size_prior": {"band": "i"}}
    assert PriorBundle(card, Path("."), None, None).size_band == "i"
    assert PriorBundle(arch, Path("."), None, None).size_band == "r"  # no size prior: r when modelled
    gz = {"architecture": {"bands": ["g", "i", "z"]}}
    assert PriorBundle(gz, Path("."), None, None).size_band == "i"  # else the middle band
