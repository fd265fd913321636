"""The latent prior: a RealNVP normalising flow fitted to the encoder's latent distribution.

Written in Flax (affine coupling layers, Dinh, Sohl-Dickstein & Bengio 2017)
rather than taken from flowjax or distrax: the latent space is small (16-32
dimensions), so a handful of coupling layers with small MLPs is enough, and a
plain Flax module is a pure function of its parameters that NumPyro can call
inside a model (``numpyro.factor`` with :func:`log_prob`) and XLA can fuse,
without another dependency. Following MADNESS (Biswas et al. 2025) and the
VAE + flow poster, the flow is fitted to latent codes of training galaxies
drawn from the canonical VAE encoder's q(z | C), i.e. to the aggregate
posterior, so that it is a sharper prior than N(0, I). The encoder sees each
galaxy's noiseless canonical morphology ``C`` (see :func:`train_flow_from_run`),
so every code is informative and the flow describes the whole population's
morphologies, faint galaxies included.
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

if TYPE_CHECKING:  # bayesblend.prior.train is imported where it is used: types only here
    from bayesblend.prior.train import TrainConfig

LOG_2PI = float(np.log(2 * np.pi))


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
    """Fit the flow to q(z | C) draws of training galaxies from a canonical VAE run.

    ``C`` is each galaxy's noiseless canonical morphology, scaled as in
    training (``asinh(C / (3 canonical_sigma))``).

    Writes ``<run>/flow.msgpack`` and ``<run>/flow_metrics.json``; returns the flow file.

    Parameters
    ----------
    cfg : TrainConfig
        The ``canonical-vae`` run's configuration (its ``out`` holds ``checkpoint.msgpack``).
    progress : bool
        Show a progress bar on stderr.
    n_galaxies : int
        Training galaxies encoded (one q(z | C) draw each).

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
    from bayesblend.prior.train import CanonicalData, build_networks

    if cfg.kind != "canonical-vae":
        raise BayesblendError(f"the flow is fitted to a canonical-vae run's codes, not a {cfg.kind!r} run's")
    checkpoint = Path(cfg.out, "checkpoint.msgpack")
    if not checkpoint.exists():
        raise BayesblendError(f"{cfg.out}: no VAE checkpoint to fit the flow to (train the VAE first)")
    data = CanonicalData(cfg.data, cfg.validation_items)
    sigma = jnp.full((len(data.bands),), cfg.canonical_sigma, dtype=jnp.float32)
    enc, _ = build_networks(cfg, len(data.bands), data.stamp)
    state = serialization.msgpack_restore(checkpoint.read_bytes())
    params = state["params"]["encoder"]
    encode = jax.jit(lambda p, x: enc.apply(p, scale_input(x, sigma)))
    idx = data.train_idx[: min(n_galaxies, len(data.train_idx))]
    key = jax.random.PRNGKey(cfg.seed + 7)
    zs = []
    for chunk in np.array_split(idx, max(1, len(idx) // 256)):
        key, _, k2 = jax.random.split(key, 3)  # three-way, as when the shipped flow was fitted
        # noiseless canonical morphologies: every code is informative, faint galaxies' included
        image = jnp.asarray(data.batch(chunk)["canonical"], dtype=jnp.float32)
        mean, log_sigma = encode(params, image)
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
