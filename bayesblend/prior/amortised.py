"""The amortised pose encoder of galaxy model v2: a noisy (blended) stamp -> q(z, pose | stamp).

The encoder maps an observed stamp, scaled as the VAE's input
(:func:`bayesblend.prior.networks.scale_input`), to the mean and log standard
deviation of a diagonal Gaussian over the centred galaxy's parameters in the
scene model's own unconstrained coordinates (:class:`PoseLayout`): the latent
code ``z``, ``eta`` of the ellipticity (:mod:`bayesblend.ellipticity`), the log
half-light radius (arcsec), the log flux per band (electrons) and the offset
from the stamp centre (pixels).

It is trained as a neural posterior estimator: the loss is
``-log q(theta_true | stamp)`` over simulated stamps with their true
parameters, where ``z_true`` is the canonical VAE encoder's mean code of the
galaxy's true canonical morphology. Minimising that expected loss makes q the
best diagonal-Gaussian approximation of the posterior under the simulator
(Papamakarios & Murray 2016, arXiv:1605.06376), so its widths mean something
and it starts MAP, SVI and NUTS near the answer. Noise is drawn afresh at every
step (``noiseless + N(0, sky + signal)``), as for the VAE.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from bayesblend.ellipticity import to_eta
from bayesblend.prior.networks import Encoder, scale_input
from bayesblend.survey import poisson_variance


@dataclass(frozen=True)
class PoseLayout:
    """Where each parameter sits in the encoder's output vector."""

    latent_dim: int
    bands: int

    @property
    def size(self) -> int:
        return self.latent_dim + 2 + 1 + self.bands + 2

    def slices(self) -> dict[str, slice]:
        k = self.latent_dim
        return {
            "z": slice(0, k),
            "eta": slice(k, k + 2),
            "log_hlr": slice(k + 2, k + 3),
            "log_flux": slice(k + 3, k + 3 + self.bands),
            "offset": slice(k + 3 + self.bands, k + 5 + self.bands),
        }

    def pack(self, parts: dict[str, jnp.ndarray]) -> jnp.ndarray:
        """``(..., size)`` from the named parts (``log_hlr`` may be ``(...)`` or ``(..., 1)``)."""
        log_hlr = parts["log_hlr"]
        if log_hlr.ndim == parts["z"].ndim - 1:
            log_hlr = log_hlr[..., None]
        return jnp.concatenate(
            [parts["z"], parts["eta"], log_hlr, parts["log_flux"], parts["offset"]], axis=-1
        )

    def unpack(self, vec: jnp.ndarray) -> dict[str, jnp.ndarray]:
        out = {k: vec[..., s] for k, s in self.slices().items()}
        out["log_hlr"] = out["log_hlr"][..., 0]
        return out


def make_pose_loss(
    enc: Encoder, teacher: Encoder, layout: PoseLayout, sky: np.ndarray, canonical_sigma: float
) -> Callable[[dict, dict, float, jax.Array], tuple[jnp.ndarray, dict[str, jnp.ndarray]]]:
    """Mean ``-log q(theta_true | stamp)`` per parameter, and its parts.

    Parameters
    ----------
    enc : Encoder
        The pose encoder (output size ``layout.size``).
    teacher : Encoder
        The canonical VAE's encoder, whose mean code of the true canonical
        morphology is the target ``z``.
    layout : PoseLayout
        Where each parameter sits in the encoder's output.
    sky : array ``(band,)``
        Sky level per pixel, electrons.
    canonical_sigma : float
        The canonical VAE's input scale (its training's ``canonical_sigma``).

    Returns
    -------
    callable
        ``loss_fn(params, batch, beta, key) -> (loss, {"nll": ..., "kl": ...})``,
        the signature of :func:`bayesblend.prior.train.make_canonical_loss`:
        ``params`` holds ``encoder`` (trained) and ``teacher`` (frozen),
        ``batch`` the arrays of :meth:`bayesblend.prior.train.PoseData.batch`,
        ``beta`` is unused and ``key`` draws the input noise. The aux output
        reports the NLL of ``z`` and of the pose separately (as ``nll`` and
        ``kl``, the names the training loop logs).
    """
    sky = jnp.asarray(sky)
    sigma = jnp.sqrt(sky)
    canon_scale = jnp.full((layout.bands,), canonical_sigma, dtype=jnp.float32)

    def loss_fn(params, batch, beta, key):
        del beta
        clean = batch["clean"]
        noisy = clean + jnp.sqrt(poisson_variance(clean, sky)) * jax.random.normal(key, clean.shape)
        mean, log_sigma = enc.apply(params["encoder"], scale_input(noisy, sigma))
        z_true, _ = teacher.apply(params["teacher"], scale_input(batch["canonical"], canon_scale))
        target = layout.pack(
            {
                "z": jax.lax.stop_gradient(z_true),
                "eta": to_eta(batch["e"]),
                "log_hlr": batch["log_hlr"],
                "log_flux": batch["log_flux"],
                "offset": batch["offset"],
            }
        )
        per = 0.5 * ((target - mean) / jnp.exp(log_sigma)) ** 2 + log_sigma
        k = layout.latent_dim
        nll_z = jnp.mean(per[..., :k])
        nll_pose = jnp.mean(per[..., k:])
        return jnp.mean(per), {"nll": nll_z, "kl": nll_pose}

    return loss_fn
