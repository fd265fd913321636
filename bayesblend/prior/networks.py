"""Flax networks: the galaxy decoder (decoder contract) and the encoders.

Decoder: latent ``z`` -> ``(band, S, S)`` model-frame morphology. The last layer
is a softmax over the pixels of each band, so the output is non-negative and
sums to one per band by construction (the decoder contract). It is sized for
inference: every likelihood gradient calls it, so it stays around 20-40 MFLOP
per forward pass (measured with XLA cost analysis in the model card).

Encoder: an observed noisy stamp ``(band, S, S)`` in electrons, scaled by
``asinh(x / (k sigma_b))`` with ``sigma_b`` the band's sky noise (which tames the
dynamic range of bright galaxies while keeping faint ones linear) -> the mean
and log standard deviation of a diagonal Gaussian q(z | x). The same class is
the amortised deblender encoder (trained on blends with the decoder frozen).

Layers are NHWC inside (Flax convention); public inputs and outputs are
``(band, y, x)`` as everywhere in bayesblend.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

#: Scale, in units of the sky noise, below which the encoder input is linear.
ASINH_SOFTENING = 3.0


def scale_input(image: jnp.ndarray, noise_sigma: jnp.ndarray) -> jnp.ndarray:
    """``asinh(x / (k sigma_b))``: the encoder's input scaling, ``(..., band, y, x)``."""
    s = ASINH_SOFTENING * noise_sigma[..., :, None, None]
    return jnp.arcsinh(image / s)


class Decoder(nn.Module):
    """Latent code -> model-frame morphology ``(band, S, S)`` with unit sum per band.

    Attributes
    ----------
    bands : int
        Number of bands.
    stamp : int
        Output side S (divisible by 8).
    features : tuple of int
        Channels at the 1/8, 1/4, 1/2 and full resolution stages.
    """

    bands: int = 6
    stamp: int = 48
    features: Sequence[int] = (64, 48, 32, 16)

    @nn.compact
    def __call__(self, z: jnp.ndarray) -> jnp.ndarray:
        base = self.stamp // 8
        f = self.features
        x = nn.gelu(nn.Dense(256)(z))
        x = nn.gelu(nn.Dense(base * base * f[0])(x))
        x = x.reshape(z.shape[:-1] + (base, base, f[0]))
        for k, ch in enumerate(f[1:]):
            x = nn.gelu(nn.ConvTranspose(ch, (3, 3), strides=(2, 2), padding="SAME")(x))
            if k < len(f) - 2:  # no extra conv at full resolution: it would dominate the cost
                x = nn.gelu(nn.Conv(ch, (3, 3), padding="SAME")(x))
        logits = nn.Conv(self.bands, (3, 3), padding="SAME")(x)  # (..., S, S, band)
        logits = jnp.moveaxis(logits, -1, -3)  # (..., band, S, S)
        flat = logits.reshape(logits.shape[:-2] + (-1,))
        return jax.nn.softmax(flat, axis=-1).reshape(logits.shape)


class Encoder(nn.Module):
    """Scaled observed stamp ``(band, S, S)`` -> ``(mean, log_sigma)`` of q(z | x).

    Attributes
    ----------
    latent_dim : int
        Dimension of z.
    features : tuple of int
        Channels of the stride-2 stages (48 -> 24 -> 12 -> 6).
    """

    latent_dim: int = 16
    features: Sequence[int] = (24, 48, 64)

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        h = jnp.moveaxis(x, -3, -1)  # (..., S, S, band)
        for k, ch in enumerate(self.features):
            h = nn.gelu(nn.Conv(ch, (3, 3), strides=(2, 2), padding="SAME")(h))
            if k > 0:  # no extra conv at half resolution: it would dominate the cost
                h = nn.gelu(nn.Conv(ch, (3, 3), padding="SAME")(h))
        h = h.reshape(h.shape[:-3] + (-1,))
        h = nn.gelu(nn.Dense(256)(h))
        mean = nn.Dense(self.latent_dim)(h)
        log_sigma = jnp.clip(nn.Dense(self.latent_dim)(h), -8.0, 2.0)
        return mean, log_sigma
