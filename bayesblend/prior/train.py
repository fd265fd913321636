"""Training galaxy model v2: the canonical VAE and the amortised pose encoder (optax).

The canonical VAE (kind ``canonical-vae``) learns the canonical morphologies
of :mod:`bayesblend.canonical` alone: the encoder sees the noiseless canonical
image, and the reconstruction term is a Gaussian of fixed per-pixel width
``canonical_sigma`` (in units of the unit-sum image) on the canonical grid.
Pose, PSF and noise never enter, so nothing of them can leak into the latent
code. The KL weight is annealed linearly from 0 to ``beta`` over
``kl_anneal_steps``; loss values are per pixel (the sum over pixels and bands
divided by their number) so that learning rates do not depend on the grid size.

The pose encoder (kind ``pose-encoder``, :mod:`bayesblend.prior.amortised`)
learns q(z, pose | stamp) from noisy survey stamps, with the canonical VAE's
encoder (its ``init_from`` run) frozen as the teacher of the latent targets;
it is trained in stages (isolated galaxies, then blends), each later stage
starting from the encoder of the one before (``encoder_init``).
The latent flow is fitted afterwards to the canonical VAE's codes
(:func:`bayesblend.prior.flow.train_flow_from_run`), and
:func:`bundle_from_runs` assembles the runs into a model bundle.

Checkpoints (Flax msgpack, non-executable) are written atomically every
``checkpoint_every`` steps and a run resumes from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from bayesblend.canonical import CanonicalFrame
from bayesblend.errors import BayesblendError
from bayesblend.io import atomic_path
from bayesblend.prior.amortised import PoseLayout, make_pose_loss
from bayesblend.prior.bundle import flow_template, save_bundle
from bayesblend.prior.networks import Decoder, Encoder, scale_input
from bayesblend.simulate.dataset import ShardDataset

#: Training kinds: the canonical VAE and the pose encoder of galaxy model v2.
KINDS = ("canonical-vae", "pose-encoder")
#: Training kinds of galaxy model v1, no longer supported (named in the error a config of one gets).
V1_KINDS = ("vae", "deblender")


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run needs; read from a TOML file (``configs/*.toml``)."""

    kind: str = "canonical-vae"  # one of KINDS
    data: str = "data/lsst-v2-isolated-train"
    out: str = "runs/canonical-vae"
    # canonical-vae: a run whose decoder and encoder start this one; pose-encoder: the canonical VAE run
    init_from: str = ""
    # pose-encoder: a pose-encoder run whose encoder starts this one (a stage trained on other data)
    encoder_init: str = ""
    latent_dim: int = 16
    decoder_features: tuple[int, ...] = (64, 48, 32, 16)
    encoder_features: tuple[int, ...] = (24, 48, 64)
    batch_size: int = 64
    steps: int = 20000
    learning_rate: float = 1e-3
    warmup_steps: int = 500
    min_lr_fraction: float = 0.05
    beta: float = 1.0
    kl_anneal_steps: int = 4000
    grad_clip: float = 5.0
    validation_items: int = 1000
    checkpoint_every: int = 500
    seed: int = 0
    canonical_sigma: float = 2e-4  # canonical-vae: per-pixel width of the reconstruction term
    teacher_features: tuple[int, ...] = (24, 48, 64)  # pose-encoder: the canonical VAE's encoder

    @classmethod
    def from_toml(cls, path: str | Path) -> TrainConfig:
        """Read a config file; unknown keys are an error naming them."""
        path = Path(path)
        if not path.exists():
            raise BayesblendError(f"{path}: no such config file")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise BayesblendError(f"{path}: not valid TOML ({exc})") from None
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise BayesblendError(f"{path}: unknown config keys {unknown}")
        defaults = cls()
        for k, v in raw.items():
            want = type(getattr(defaults, k))
            if want is tuple:
                if not (isinstance(v, list) and all(isinstance(i, int) for i in v)):
                    raise BayesblendError(f"{path}: {k} must be a list of integers, got {v!r}")
                raw[k] = tuple(v)
            elif want is float and isinstance(v, int) and not isinstance(v, bool):
                raw[k] = float(v)
            elif not isinstance(v, want) or (isinstance(v, bool) and want is not bool):
                raise BayesblendError(f"{path}: {k} must be {want.__name__}, got {v!r}")
        cfg = cls(**raw)
        if cfg.kind in V1_KINDS:
            raise BayesblendError(
                f"{path}: kind {cfg.kind!r} trains galaxy model v1, which this version no longer "
                f"supports; kind must be one of {', '.join(KINDS)}"
            )
        if cfg.kind not in KINDS:
            raise BayesblendError(f"{path}: kind must be one of {', '.join(KINDS)}, got {cfg.kind!r}")
        return cfg


def build_networks(cfg: TrainConfig, bands: int, stamp: int) -> tuple[Encoder, Decoder]:
    """The canonical VAE's encoder and decoder a config describes (``stamp``: the canonical grid side)."""
    enc = Encoder(latent_dim=cfg.latent_dim, features=tuple(cfg.encoder_features))
    dec = Decoder(bands=bands, stamp=stamp, features=tuple(cfg.decoder_features))
    return enc, dec


class CanonicalData:
    """Batches of canonical morphologies ``(item, band, N, N)`` from a shard dataset.

    The last ``validation_items`` items of the dataset (at most a fifth of
    it) are held out: ``train_idx`` and ``val_idx``.
    """

    def __init__(self, path: str | Path, validation_items: int) -> None:
        self.ds = ShardDataset(path)
        m = self.ds.manifest
        if "canonical_frame" not in m:
            raise BayesblendError(f"{path}: no canonical morphologies (simulated before galaxy model v2)")
        self.frame = CanonicalFrame.from_dict(m["canonical_frame"])
        self.bands = list(m["bands"])
        self.stamp = self.frame.size
        n = len(self.ds)
        nval = min(validation_items, n // 5)
        self.train_idx = np.arange(n - nval)
        self.val_idx = np.arange(n - nval, n)

    def batch(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """``{"canonical": (item, band, N, N)}`` for items ``idx``."""
        return {"canonical": np.ascontiguousarray(self.ds.load("canonical", np.sort(idx)), dtype=np.float32)}


class PoseData(CanonicalData):
    """Batches for the pose encoder (:mod:`bayesblend.prior.amortised`) from a shard dataset.

    The input is the noiseless stamp (the blend, for blends), the targets the
    centred galaxy's true parameters and canonical morphology; held-out items
    as in :class:`CanonicalData`.
    """

    def __init__(self, path: str | Path, validation_items: int) -> None:
        super().__init__(path, validation_items)
        self.sky = np.asarray(self.ds.manifest["sky"], dtype=np.float32)
        self.stamp = self.ds.stamp  # the encoder's input is the survey stamp, not the canonical grid
        truth = self.ds.target_truth()
        self.e = np.stack([truth["e1"], truth["e2"]], 1).astype(np.float32)
        self.log_hlr = np.log(np.asarray(truth["hlr"], dtype=np.float32))
        self.log_flux = np.log(np.stack([truth[f"flux_{b}"] for b in self.bands], 1)).astype(np.float32)
        self.offset = self.ds.offsets(truth, self.stamp)

    def batch(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """Noiseless stamps, canonical morphologies and true pose of items ``idx``."""
        idx = np.sort(idx)
        return super().batch(idx) | {
            "clean": self.ds.load("noiseless", idx),
            "e": self.e[idx],
            "log_hlr": self.log_hlr[idx],
            "log_flux": self.log_flux[idx],
            "offset": self.offset[idx],
        }


def make_canonical_loss(
    enc: Encoder, dec: Decoder, sigma: float, bands: int
) -> Callable[[dict, dict, float, jax.Array], tuple[jnp.ndarray, dict[str, jnp.ndarray]]]:
    """The per-pixel negative ELBO of a batch of canonical morphologies, and its parts.

    The encoder input is ``asinh(C / (3 sigma))`` of the canonical image ``C``;
    the reconstruction term ``0.5 sum((decoder(z) - C)^2) / sigma^2``.

    Parameters
    ----------
    enc, dec : Encoder, Decoder
        The networks.
    sigma : float
        Per-pixel width of the reconstruction term, in units of the unit-sum image.
    bands : int
        Number of bands.

    Returns
    -------
    callable
        ``loss_fn(params, batch, beta, key) -> (loss, {"nll": ..., "kl": ...})``:
        ``params`` holds ``encoder`` and ``decoder``, ``batch`` the arrays of
        :meth:`CanonicalData.batch`, ``beta`` the KL weight and ``key`` a PRNG
        key for the latent draw.
    """
    scale = jnp.full((bands,), sigma, dtype=jnp.float32)

    def loss_fn(params, batch, beta, key):
        target = batch["canonical"]
        mean, log_sigma = enc.apply(params["encoder"], scale_input(target, scale))
        z = mean + jnp.exp(log_sigma) * jax.random.normal(key, mean.shape)
        pred = dec.apply(params["decoder"], z)
        npix = target.shape[-3] * target.shape[-2] * target.shape[-1]
        nll = 0.5 * jnp.sum((pred - target) ** 2, axis=(-3, -2, -1)) / sigma**2 / npix
        kl = 0.5 * jnp.sum(mean**2 + jnp.exp(2 * log_sigma) - 1.0 - 2 * log_sigma, axis=-1) / npix
        return jnp.mean(nll + beta * kl), {"nll": jnp.mean(nll), "kl": jnp.mean(kl)}

    return loss_fn


def _lr_schedule(cfg: TrainConfig):
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        decay_steps=max(cfg.steps, cfg.warmup_steps + 1),
        end_value=cfg.learning_rate * cfg.min_lr_fraction,
    )


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(serialization.to_bytes(state))


def train(
    cfg: TrainConfig, progress: bool = True, max_seconds: float | None = None, stop_at: int | None = None
) -> dict[str, Any]:
    """Train (or resume) the run described by ``cfg``; returns the final state and history.

    Parameters
    ----------
    cfg : TrainConfig
    progress : bool
        Show a progress bar with the losses on stderr.
    max_seconds : float, optional
        Stop (after checkpointing) once this wall time has passed; rerun to resume.
    stop_at : int, optional
        Stop (after checkpointing) at this step; rerun to resume.

    Every step's batch and random draws depend only on ``(seed, step)``, so a
    run stopped and resumed any number of times takes the same steps as one
    run straight through.
    """
    from tqdm import tqdm

    pose = cfg.kind == "pose-encoder"
    data = PoseData(cfg.data, cfg.validation_items) if pose else CanonicalData(cfg.data, cfg.validation_items)
    enc, dec = build_networks(cfg, len(data.bands), data.stamp)
    key = jax.random.PRNGKey(cfg.seed)
    k_enc, k_dec, key = jax.random.split(key, 3)
    if pose:
        if not cfg.init_from:
            raise BayesblendError("a pose-encoder run needs init_from: the canonical VAE run it encodes for")
        layout = PoseLayout(cfg.latent_dim, len(data.bands))
        teacher = Encoder(latent_dim=cfg.latent_dim, features=tuple(cfg.teacher_features))
        enc = Encoder(latent_dim=layout.size, features=tuple(cfg.encoder_features))
        src = serialization.msgpack_restore(Path(cfg.init_from, "checkpoint.msgpack").read_bytes())
        t_init = teacher.init(k_dec, jnp.zeros((len(data.bands), data.frame.size, data.frame.size)))
        params = {
            "encoder": enc.init(k_enc, jnp.zeros((len(data.bands), data.stamp, data.stamp))),
            "teacher": serialization.from_state_dict(t_init, src["params"]["encoder"]),
        }
    else:
        params = {
            "encoder": enc.init(k_enc, jnp.zeros((len(data.bands), data.stamp, data.stamp))),
            "decoder": dec.init(k_dec, jnp.zeros((cfg.latent_dim,))),
        }
    if cfg.encoder_init:
        if not pose:
            raise BayesblendError(
                "encoder_init starts a pose-encoder run; use init_from for a canonical-vae run"
            )
        src = serialization.msgpack_restore(Path(cfg.encoder_init, "checkpoint.msgpack").read_bytes())
        params["encoder"] = serialization.from_state_dict(params["encoder"], src["params"]["encoder"])
    if cfg.init_from and not pose:
        src = serialization.msgpack_restore(Path(cfg.init_from, "checkpoint.msgpack").read_bytes())
        params["decoder"] = serialization.from_state_dict(params["decoder"], src["params"]["decoder"])
        params["encoder"] = serialization.from_state_dict(params["encoder"], src["params"]["encoder"])
    trainable = "encoder" if pose else None
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), optax.adam(_lr_schedule(cfg)))
    if trainable:
        tx = optax.multi_transform(
            {"train": tx, "frozen": optax.set_to_zero()},
            {k: ("train" if k == trainable else "frozen") for k in params},
        )
    opt_state = tx.init(params)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint.msgpack"
    hist_file = out / "history.json"
    state = {"params": params, "opt_state": opt_state, "step": 0, "history": None, "seconds": 0.0}
    if ckpt.exists():
        raw = serialization.msgpack_restore(ckpt.read_bytes())
        state["params"] = serialization.from_state_dict(params, raw["params"])
        state["opt_state"] = serialization.from_state_dict(opt_state, raw["opt_state"])
        state["step"] = int(raw["step"])
        state["seconds"] = float(raw.get("seconds", 0.0))
        if hist_file.exists():
            state["history"] = json.loads(hist_file.read_text())
    with atomic_path(out / "config.json") as tmp:
        tmp.write_text(json.dumps(dataclasses.asdict(cfg), indent=1))

    if pose:
        loss_fn = make_pose_loss(enc, teacher, layout, data.sky, cfg.canonical_sigma)
    else:
        loss_fn = make_canonical_loss(enc, dec, cfg.canonical_sigma, len(data.bands))

    @jax.jit
    def step_fn(params, opt_state, batch, beta, key):
        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, beta, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, parts

    eval_fn = jax.jit(loss_fn)
    params, opt_state = state["params"], state["opt_state"]
    step = int(state["step"])
    history = state["history"] or {"step": [], "train": [], "val_nll": [], "val_kl": [], "seconds": []}
    t_start = time.time()
    seconds0 = float(state["seconds"])
    bar = tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.kind}", disable=not progress, file=sys.stderr)
    running = None

    def validate() -> tuple[float, float]:
        nll = kl = 0.0
        chunks = np.array_split(data.val_idx, max(1, len(data.val_idx) // cfg.batch_size))
        vkey = jax.random.PRNGKey(12345)
        for c in chunks:
            _, parts = eval_fn(params, data.batch(c), 1.0, vkey)
            nll += float(parts["nll"]) * len(c)
            kl += float(parts["kl"]) * len(c)
        return nll / len(data.val_idx), kl / len(data.val_idx)

    def checkpoint() -> None:
        vn, vk = validate()
        history["step"].append(step)
        history["train"].append(float(running) if running is not None else float("nan"))
        history["val_nll"].append(vn)
        history["val_kl"].append(vk)
        history["seconds"].append(seconds0 + time.time() - t_start)
        st = {
            "params": params,
            "opt_state": opt_state,
            "step": step,
            "seconds": seconds0 + time.time() - t_start,
        }
        _save_checkpoint(ckpt, st)
        with atomic_path(hist_file) as tmp:
            tmp.write_text(json.dumps(history))
        bar.write(f"step {step}: val nll {vn:.4f} kl {vk:.5f} ({history['seconds'][-1]:.0f} s)")

    try:
        while step < cfg.steps:
            step_rng = np.random.default_rng([cfg.seed, step])
            idx = step_rng.choice(data.train_idx, size=cfg.batch_size, replace=False)
            batch = {k: jnp.asarray(v) for k, v in data.batch(idx).items()}
            beta = cfg.beta * min(1.0, step / max(cfg.kl_anneal_steps, 1))
            # the step's key depends on the step number only, so a resumed run draws fresh noise and
            # latents instead of repeating those of its first steps
            sub = jax.random.fold_in(key, step)
            params, opt_state, loss, parts = step_fn(params, opt_state, batch, beta, sub)
            step += 1
            lv = float(loss)
            if not np.isfinite(lv):
                raise BayesblendError(
                    f"training diverged at step {step} (loss {lv}); lower the learning rate"
                )
            running = lv if running is None else 0.98 * running + 0.02 * lv
            bar.update(1)
            bar.set_postfix(
                loss=f"{running:.4f}", nll=f"{float(parts['nll']):.4f}", kl=f"{float(parts['kl']):.4f}"
            )
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                checkpoint()
            out_of_time = max_seconds is not None and time.time() - t_start > max_seconds
            if out_of_time or (stop_at is not None and step >= stop_at):
                if step % cfg.checkpoint_every:
                    checkpoint()
                break
    finally:
        bar.close()
    return {"params": params, "step": step, "history": history, "encoder": enc, "decoder": dec, "data": data}


def bundle_from_runs(
    out: str | Path,
    vae_run: str | Path,
    pose_run: str | Path | None = None,
    card_extra: dict | None = None,
) -> Path:
    """Assemble a bundle from training runs (canonical VAE, its flow, and the pose encoder).

    Reads each run's ``config.json``, ``checkpoint.msgpack`` and (for the VAE
    run) ``flow.msgpack`` / ``flow_metrics.json``; the data manifest gives the
    survey, bands, stamp size and canonical frame.

    Parameters
    ----------
    out : path
        Bundle directory (written by :func:`bayesblend.prior.bundle.save_bundle`).
    vae_run : path
        A ``canonical-vae`` run: its decoder, encoder and (when fitted) flow.
    pose_run : path, optional
        A ``pose-encoder`` run, stored as the ``pose_encoder``.
    card_extra : dict, optional
        Merged into the card (training recipe, hardware, metrics).

    Returns
    -------
    pathlib.Path
        ``out``.
    """
    vae_run = Path(vae_run)
    cfg = json.loads((vae_run / "config.json").read_text())
    if cfg["kind"] != "canonical-vae":
        raise BayesblendError(f"{vae_run}: a {cfg['kind']!r} run; a bundle's VAE is a 'canonical-vae' run")
    data = ShardDataset(cfg["data"])
    manifest = data.manifest
    arch = {
        "survey": manifest["survey"],
        "bands": list(manifest["bands"]),
        "stamp": data.stamp,
        "latent_dim": int(cfg["latent_dim"]),
        "encoder_features": list(cfg["encoder_features"]),
        "decoder_features": list(cfg["decoder_features"]),
        "pixel_scale": float(manifest["pixel_scale"]),
        "galaxy_model": "explicit pose (v2)",
        "canonical_frame": manifest["canonical_frame"],
        "canonical_sigma": float(cfg["canonical_sigma"]),
        "encoder_input": "asinh(C / (3 canonical_sigma)), C the canonical morphology (band, N, N)",
        "decoder_output": "softmax over pixels per band: non-negative, unit sum, canonical frame "
        "(round, reference-band half-light radius hlr_pixels), integrated over its pixels",
    }
    raw = serialization.msgpack_restore((vae_run / "checkpoint.msgpack").read_bytes())
    params = {"decoder": raw["params"]["decoder"], "encoder": raw["params"]["encoder"]}
    if (vae_run / "flow.msgpack").exists():
        fm = json.loads((vae_run / "flow_metrics.json").read_text())
        arch["flow"] = {"kind": "RealNVP", "dim": fm["dim"], "layers": fm["layers"], "hidden": fm["hidden"]}
        params["flow"] = serialization.from_state_dict(
            flow_template(arch), serialization.msgpack_restore((vae_run / "flow.msgpack").read_bytes())
        )
    if pose_run is not None:
        pose_cfg = json.loads((Path(pose_run) / "config.json").read_text())
        if pose_cfg["kind"] != "pose-encoder":
            raise BayesblendError(f"{pose_run}: a {pose_cfg['kind']!r} run, not a 'pose-encoder' run")
        draw = serialization.msgpack_restore((Path(pose_run) / "checkpoint.msgpack").read_bytes())
        arch["pose_encoder_features"] = list(pose_cfg["encoder_features"])
        arch["pose_encoder_output"] = (
            "mean and log sigma of (z, eta, log hlr [arcsec], log flux per band [electrons], "
            "offset [pixels]) of the stamp's centred galaxy (prior/amortised.py)"
        )
        params["pose_encoder"] = draw["params"]["encoder"]
    card = {"name": Path(out).name, "architecture": arch}
    card.update(card_extra or {})
    return save_bundle(out, card, params)
