"""The latent prior: a RealNVP normalising flow fitted to the encoder's latent distribution.

Written in Flax (affine coupling layers, Dinh, Sohl-Dickstein & Bengio 2017)
rather than taken from flowjax or distrax: the latent space is small (16-32
dimensions), so a handful of coupling layers with small MLPs is enough, and a
plain Flax module is a pure function of its parameters that NumPyro can call
inside a model (``numpyro.factor`` with :func:`log_prob`) and XLA can fuse,
without another dependency. Following MADNESS (Biswas et al. 2025) and the
VAE + flow poster, the flow is fitted to latent codes of isolated training
galaxies drawn from the encoder's q(z | x), i.e. to the aggregate posterior,
so that it is a sharper prior than N(0, I). Each galaxy is brightened to
S/N >= 100 before encoding (see :func:`train_flow_from_run`) so that the flow
describes the whole population's true shapes, not the round posterior of faint
galaxies.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bayesblend.simulate.truth import snr as truth_snr
from bayesblend.survey import poisson_variance

if TYPE_CHECKING:  # bayesblend.prior.train is imported where it is used: types only here
    from bayesblend.prior.train import TrainConfig

LOG_2PI = float(np.log(2 * np.pi))
#: Galaxies are brightened to at least this S/N before encoding for the flow's training set.
SNR_FOR_FLOW = 100.0


class Coupling(nn.Module):
    """Affine coupling: the masked half conditions a scale and shift of the other half."""

    dim: int
    mask: Sequence[int]
    hidden: int = 64

    def setup(self) -> None:
        """Build the conditioner MLP: masked input -> ``(log_s, t)``, ``2 * dim`` outputs."""
        self.net = nn.Sequential(
            [nn.Dense(self.hidden), nn.gelu, nn.Dense(self.hidden), nn.gelu, nn.Dense(2 * self.dim)]
        )

    def _params(self, z: jnp.ndarray):
        m = jnp.asarray(self.mask, dtype=z.dtype)
        h = self.net(z * m)
        log_s, t = jnp.split(h, 2, axis=-1)
        log_s = jnp.tanh(log_s) * (1 - m)  # bounded scales keep the flow stable
        return m, log_s, t * (1 - m)

    def forward(self, z: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Data -> base direction; returns ``(u, log|det du/dz|)``."""
        m, log_s, t = self._params(z)
        u = z * m + (1 - m) * (z * jnp.exp(log_s) + t)
        return u, jnp.sum(log_s, axis=-1)

    def inverse(self, u: jnp.ndarray) -> jnp.ndarray:
        """Base -> data direction."""
        m, log_s, t = self._params(u)  # masked part is unchanged, so conditioning is identical
        return u * m + (1 - m) * (u - t) * jnp.exp(-log_s)


class RealNVP(nn.Module):
    """A stack of affine couplings with alternating (then shuffled) masks over a standard normal base."""

    dim: int
    layers: int = 6
    hidden: int = 64

    def setup(self) -> None:
        """Build the couplings: two alternating masks, then fixed random half-masks (seed 0)."""
        rng = np.random.default_rng(0)
        masks = []
        for k in range(self.layers):
            if k < 2:
                m = (np.arange(self.dim) % 2 == k % 2).astype(int)
            else:
                m = np.zeros(self.dim, dtype=int)
                m[rng.permutation(self.dim)[: self.dim // 2]] = 1
            masks.append(tuple(int(v) for v in m))
        self.couplings = [Coupling(self.dim, masks[k], self.hidden) for k in range(self.layers)]

    def __call__(self, z: jnp.ndarray) -> jnp.ndarray:
        return self.log_prob(z)

    def log_prob(self, z: jnp.ndarray) -> jnp.ndarray:
        """``log p(z)`` (nats), shape ``z.shape[:-1]``."""
        logdet = jnp.zeros(z.shape[:-1])
        u = z
        for c in self.couplings:
            u, ld = c.forward(u)
            logdet = logdet + ld
        return -0.5 * jnp.sum(u**2, axis=-1) - 0.5 * self.dim * LOG_2PI + logdet

    def to_base(self, z: jnp.ndarray) -> jnp.ndarray:
        """Map latent codes to the base space (the inverse of :meth:`sample_from_base`)."""
        u = z
        for c in self.couplings:
            u, _ = c.forward(u)
        return u

    def sample_from_base(self, u: jnp.ndarray) -> jnp.ndarray:
        """Map base draws ``u ~ N(0, I)`` to latent codes."""
        z = u
        for c in reversed(self.couplings):
            z = c.inverse(z)
        return z


def log_prob(flow: RealNVP, params: dict, z: jnp.ndarray) -> jnp.ndarray:
    """Flow log density of latent codes ``(..., latent)``, nats.

    Parameters
    ----------
    flow : RealNVP
    params : dict
        The flow's Flax parameters.
    z : array ``(..., latent)``
        Latent codes.

    Returns
    -------
    jax.Array
        ``log p(z)``, shape ``z.shape[:-1]``.
    """
    return flow.apply(params, z, method=RealNVP.log_prob)


def sample(flow: RealNVP, params: dict, key: jax.Array, n: int) -> jnp.ndarray:
    """``n`` latent codes drawn from the flow, ``(n, latent)``.

    Parameters
    ----------
    flow : RealNVP
    params : dict
        The flow's Flax parameters.
    key : jax.Array
        PRNG key of the base draws.
    n : int
        Number of codes.

    Returns
    -------
    jax.Array
        ``(n, latent)`` latent codes.
    """
    u = jax.random.normal(key, (n, flow.dim))
    return flow.apply(params, u, method=RealNVP.sample_from_base)


def brightened_observation(clean: np.ndarray, sky: np.ndarray, band: int, normal: np.ndarray) -> np.ndarray:
    """Noiseless stamps brightened by ``max(1, SNR_FOR_FLOW / S/N)``, then observed with noise.

    The S/N is measured before brightening; as the source's own Poisson
    variance grows with it, the brightened S/N is a little below
    :data:`SNR_FOR_FLOW` for galaxies bright enough to matter against the sky.

    Parameters
    ----------
    clean : array ``(n, band, y, x)``
        Noiseless stamps, electrons.
    sky : array ``(band,)`` or ``(n, band)``
        Sky level per pixel, electrons.
    band : int
        Index of the band whose S/N (optimal, sky plus source variance) sets the boost.
    normal : array like ``clean``
        Standard-normal draws for the noise.

    Returns
    -------
    numpy.ndarray
        Each galaxy scaled by that factor (shape, size and colour unchanged) plus
        Gaussian noise of variance sky + signal, in ``clean``'s dtype.
    """
    sky = np.asarray(sky, clean.dtype)
    sky_b = sky[..., band].reshape(-1, 1, 1)
    snr = truth_snr(clean[:, band], sky_b)
    boost = np.maximum(1.0, SNR_FOR_FLOW / np.maximum(snr, 1e-3)).astype(clean.dtype)
    bright = clean * boost[:, None, None, None]
    var = poisson_variance(bright, sky)
    return bright + np.sqrt(var) * np.asarray(normal, clean.dtype)


def fit_flow(
    z: np.ndarray,
    layers: int = 6,
    hidden: int = 64,
    steps: int = 4000,
    batch_size: int = 512,
    learning_rate: float = 2e-3,
    seed: int = 0,
    progress: bool = False,
) -> tuple[RealNVP, dict, dict]:
    """Fit a RealNVP to samples ``z`` ``(n, latent)`` by maximum likelihood.

    The last 10 % of the samples are held out; returns the flow, its
    parameters and ``{"train_nll": ..., "val_nll": ...}`` per latent dimension.
    """
    from tqdm import tqdm

    z = np.asarray(z, dtype=np.float32)
    n, dim = z.shape
    nval = max(1, n // 10)
    train, val = z[: n - nval], z[n - nval :]
    flow = RealNVP(dim=dim, layers=layers, hidden=hidden)
    params = flow.init(jax.random.PRNGKey(seed), jnp.zeros((1, dim)))
    sched = optax.cosine_decay_schedule(learning_rate, steps, alpha=0.05)
    tx = optax.chain(optax.clip_by_global_norm(10.0), optax.adam(sched))
    opt = tx.init(params)

    def nll(p, x):
        return -jnp.mean(flow.apply(p, x, method=RealNVP.log_prob))

    @jax.jit
    def step(p, o, x):
        loss, g = jax.value_and_grad(nll)(p, x)
        upd, o = tx.update(g, o, p)
        return optax.apply_updates(p, upd), o, loss

    rng = np.random.default_rng(seed)
    loss = jnp.nan
    for _ in tqdm(range(steps), desc="train flow", disable=not progress, file=sys.stderr):
        params, opt, loss = step(params, opt, jnp.asarray(train[rng.integers(0, len(train), batch_size)]))
    metrics = {
        "train_nll_per_dim": float(loss) / dim,
        "val_nll_per_dim": float(nll(params, jnp.asarray(val))) / dim,
        "val_nll_per_dim_standard_normal": float(0.5 * np.mean(np.sum(val**2, 1)) / dim + 0.5 * LOG_2PI),
        "n_train": int(len(train)),
    }
    return flow, params, metrics


def train_flow_from_run(cfg: TrainConfig, progress: bool = True, n_galaxies: int = 50000) -> Path:
    """Fit the flow to q(z | x) draws of training galaxies from a VAE run.

    For a canonical VAE (galaxy model v2) ``x`` is each galaxy's noiseless
    canonical morphology; for v1's VAE the galaxy brightened to S/N >= 100.

    Writes ``<run>/flow.msgpack`` and ``<run>/flow_metrics.json``; returns the flow file.

    Parameters
    ----------
    cfg : TrainConfig
        The VAE run's configuration (its ``out`` holds ``checkpoint.msgpack``).
    progress : bool
        Show a progress bar on stderr.
    n_galaxies : int
        Training galaxies encoded (one q(z | x) draw each).

    Returns
    -------
    pathlib.Path
        ``<run>/flow.msgpack``.
    """
    import json

    from flax import serialization

    from bayesblend.errors import BayesblendError
    from bayesblend.io import atomic_path
    from bayesblend.prior.networks import scale_input
    from bayesblend.prior.train import CanonicalData, TrainingData, build_networks

    checkpoint = Path(cfg.out, "checkpoint.msgpack")
    if not checkpoint.exists():
        raise BayesblendError(f"{cfg.out}: no VAE checkpoint to fit the flow to (train the VAE first)")
    canonical = cfg.kind == "canonical-vae"
    if canonical:
        data = CanonicalData(cfg.data, cfg.validation_items)
        sigma = jnp.full((len(data.bands),), cfg.canonical_sigma, dtype=jnp.float32)
    else:
        data = TrainingData(cfg.data, "vae", cfg.validation_items)
        sigma = jnp.sqrt(jnp.asarray(data.sky))
    enc, _ = build_networks(cfg, len(data.bands), data.stamp)
    state = serialization.msgpack_restore(checkpoint.read_bytes())
    params = state["params"]["encoder"]
    encode = jax.jit(lambda p, x: enc.apply(p, scale_input(x, sigma)))
    idx = data.train_idx[: min(n_galaxies, len(data.train_idx))]
    key = jax.random.PRNGKey(cfg.seed + 7)
    zs = []
    for chunk in np.array_split(idx, max(1, len(idx) // 256)):
        key, k1, k2 = jax.random.split(key, 3)
        if canonical:
            # the canonical VAE encodes noiseless canonical morphologies: every code is informative
            image = jnp.asarray(data.batch(chunk)["canonical"])
        else:
            clean = data.batch(chunk)["clean"]
            # A population prior must describe every galaxy's true shape. Encoding the stamps as
            # observed makes the faint majority's q(z|x) sit on the round "average galaxy", and a
            # flow fitted to that draws galaxies far rounder than the population. So each galaxy
            # is brightened to S/N >= 100 in the reference band (its shape and size unchanged)
            # and observed with the matching noise before encoding: informative codes for all.
            r = data.bands.index("r") if "r" in data.bands else 0
            image = brightened_observation(clean, data.sky, r, jax.random.normal(k1, clean.shape))
        mean, log_sigma = encode(params, jnp.asarray(image, dtype=jnp.float32))
        zs.append(np.asarray(mean + jnp.exp(log_sigma) * jax.random.normal(k2, mean.shape)))
    z = np.concatenate(zs)
    flow, fparams, metrics = fit_flow(z, seed=cfg.seed, progress=progress)
    out = Path(cfg.out)
    with atomic_path(out / "flow.msgpack") as tmp:
        tmp.write_bytes(serialization.to_bytes(fparams))
    metrics.update({"layers": flow.layers, "hidden": flow.hidden, "dim": flow.dim})
    with atomic_path(out / "flow_metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=1))
    return out / "flow.msgpack"
