"""Training: the denoising beta-VAE, the amortised deblender encoder, the canonical VAE (optax).

The reconstruction term is the survey's Gaussian likelihood through the forward
model of the decoder contract: decoder(z) -> difference kernel to the stamp's
PSF -> sub-pixel shift to the source's true position -> times the source's
flux in the stamp -> compared with the *noiseless* target with the per-pixel
variance ``sky + signal``. The encoder sees a noisy stamp drawn afresh at every
step (noiseless + Gaussian noise of that variance), so the denoising task never
sees the same noise twice. The KL weight is annealed linearly from 0 to
``beta`` over ``kl_anneal_steps``.

For the amortised deblender (Arcelin et al. 2021, sect. 3.3) the inputs are
blends, the target is the centred galaxy's isolated noiseless image, and the
decoder is frozen: only the encoder learns.

The canonical VAE (galaxy model v2, kind ``canonical-vae``) learns the
canonical morphologies of :mod:`bayesblend.canonical` alone: the encoder sees
the noiseless canonical image, and the reconstruction term is a Gaussian of
fixed per-pixel width ``canonical_sigma`` (in units of the unit-sum image) on
the canonical grid. Pose, PSF and noise never enter, so nothing of them can
leak into the latent code.

Loss values are per pixel (the sum over pixels and bands divided by their
number) so that learning rates do not depend on the stamp size.
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
from bayesblend.forward import difference_kernel, fft_size, render_source
from bayesblend.io import atomic_path
from bayesblend.prior.amortised import PoseLayout, make_pose_loss
from bayesblend.prior.networks import Decoder, Encoder, scale_input
from bayesblend.simulate.dataset import ShardDataset
from bayesblend.survey import get_survey, poisson_variance

#: Training kinds: v1's VAE and deblender, v2's canonical VAE.
KINDS = ("vae", "deblender", "canonical-vae", "pose-encoder")


@dataclasses.dataclass
class TrainConfig:
    """Everything a training run needs; read from a TOML file (``configs/*.toml``)."""

    kind: str = "vae"  # one of KINDS
    data: str = "data/lsst-isolated-train"
    out: str = "runs/vae"
    init_from: str = ""  # run directory whose decoder (deblender: and encoder) start this run
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
        if cfg.kind not in KINDS:
            raise BayesblendError(f"{path}: kind must be one of {', '.join(KINDS)}, got {cfg.kind!r}")
        return cfg


def build_networks(cfg: TrainConfig, bands: int, stamp: int) -> tuple[Encoder, Decoder]:
    """The encoder and decoder a config describes."""
    enc = Encoder(latent_dim=cfg.latent_dim, features=tuple(cfg.encoder_features))
    dec = Decoder(bands=bands, stamp=stamp, features=tuple(cfg.decoder_features))
    return enc, dec


class TrainingData:
    """Batches from a shard dataset: noiseless targets, inputs, PSFs, offsets and fluxes.

    For a VAE the input is the stamp itself (noise is added at each step); for
    the deblender the input is the noiseless blend and the target the centred
    galaxy alone. The last ``validation_items`` items are held out.
    """

    def __init__(self, path: str | Path, kind: str, validation_items: int) -> None:
        self.ds = ShardDataset(path)
        m = self.ds.manifest
        if kind == "deblender" and m["kind"] != "blends":
            raise BayesblendError(f"{path}: the deblender trains on blend shards, this is {m['kind']!r}")
        self.kind = kind
        self.sky = np.asarray(m["sky"], dtype=np.float32)
        self.bands = list(m["bands"])
        self.stamp = self.ds.stamp
        self.offsets = self.ds.offsets(self.ds.target_truth(), self.stamp)
        n = len(self.ds)
        nval = min(validation_items, n // 5)
        self.train_idx = np.arange(n - nval)
        self.val_idx = np.arange(n - nval, n)

    def batch(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """Arrays for items ``idx``: target, clean input, psf, offset, flux (in-stamp)."""
        idx = np.sort(idx)
        target = self.ds.load("target" if self.kind == "deblender" else "noiseless", idx)
        clean = target if self.kind == "vae" else self.ds.load("noiseless", idx)
        return {
            "target": target,
            "clean": clean,
            "psf": np.ascontiguousarray(self.ds.psf(idx), dtype=np.float32),
            "offset": self.offsets[idx],
            "flux": target.sum(axis=(-2, -1)).astype(np.float32),
        }


class CanonicalData:
    """Batches of canonical morphologies ``(item, band, N, N)`` from a shard dataset.

    The last ``validation_items`` items are held out, as in :class:`TrainingData`.
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
    """Per-pixel negative ELBO of canonical morphologies (same signature as :func:`make_loss`).

    The encoder input is ``asinh(C / (3 sigma))`` of the canonical image ``C``;
    the reconstruction term ``0.5 sum((decoder(z) - C)^2) / sigma^2``.
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


def make_loss(
    enc: Encoder, dec: Decoder, model_psf: np.ndarray, sky: np.ndarray, stamp: int
) -> Callable[[dict, dict, float, jax.Array], tuple[jnp.ndarray, dict[str, jnp.ndarray]]]:
    """The per-pixel negative ELBO of a batch, and its parts.

    Parameters
    ----------
    enc, dec : Encoder, Decoder
        The networks.
    model_psf : array ``(P, P)``
        The decoder's model PSF image (unit sum).
    sky : array ``(band,)``
        Sky level per pixel, electrons.
    stamp : int
        Stamp side, pixels.

    Returns
    -------
    callable
        ``loss_fn(params, batch, beta, key) -> (loss, {"nll": ..., "kl": ...})``:
        ``params`` holds ``encoder`` and ``decoder``, ``batch`` the arrays of
        :meth:`TrainingData.batch`, ``beta`` the KL weight and ``key`` a PRNG
        key for the input noise and the latent draw.
    """
    n = fft_size(stamp)
    sky = jnp.asarray(sky)
    sigma = jnp.sqrt(sky)
    render = jax.vmap(render_source)

    def loss_fn(params, batch, beta, key):
        k_noise, k_z = jax.random.split(key)
        clean = batch["clean"]
        var_in = poisson_variance(clean, sky)
        noisy = clean + jnp.sqrt(var_in) * jax.random.normal(k_noise, clean.shape)
        mean, log_sigma = enc.apply(params["encoder"], scale_input(noisy, sigma))
        z = mean + jnp.exp(log_sigma) * jax.random.normal(k_z, mean.shape)
        morph = dec.apply(params["decoder"], z)
        kernel = difference_kernel(batch["psf"], model_psf, n)
        pred = render(morph, batch["flux"], batch["offset"], kernel)
        target = batch["target"]
        var = poisson_variance(target, sky)
        npix = target.shape[-3] * target.shape[-2] * target.shape[-1]
        nll = 0.5 * jnp.sum((pred - target) ** 2 / var, axis=(-3, -2, -1)) / npix
        kl = 0.5 * jnp.sum(mean**2 + jnp.exp(2 * log_sigma) - 1.0 - 2 * log_sigma, axis=-1) / npix
        total = jnp.mean(nll + beta * kl)
        return total, {"nll": jnp.mean(nll), "kl": jnp.mean(kl)}

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

    canonical = cfg.kind == "canonical-vae"
    pose = cfg.kind == "pose-encoder"
    if canonical:
        data = CanonicalData(cfg.data, cfg.validation_items)
    elif pose:
        data = PoseData(cfg.data, cfg.validation_items)
    else:
        data = TrainingData(cfg.data, cfg.kind, cfg.validation_items)
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
    if cfg.init_from and not pose:
        src = serialization.msgpack_restore(Path(cfg.init_from, "checkpoint.msgpack").read_bytes())
        params["decoder"] = serialization.from_state_dict(params["decoder"], src["params"]["decoder"])
        params["encoder"] = serialization.from_state_dict(params["encoder"], src["params"]["encoder"])
    trainable = "encoder" if cfg.kind in ("deblender", "pose-encoder") else None
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

    if canonical:
        loss_fn = make_canonical_loss(enc, dec, cfg.canonical_sigma, len(data.bands))
    elif pose:
        loss_fn = make_pose_loss(enc, teacher, layout, data.sky, cfg.canonical_sigma)
    else:
        survey = get_survey(data.ds.manifest["survey"])
        model_psf = survey.model_psf_image(data.ds.psf([0]).shape[-1])
        loss_fn = make_loss(enc, dec, model_psf, data.sky, data.stamp)

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
