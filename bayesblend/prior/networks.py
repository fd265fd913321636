"""Flax networks: the galaxy decoder (decoder contract) and the encoders.

Decoder: latent ``z`` -> ``(band, N, N)`` canonical morphology
(:mod:`bayesblend.canonical`). The last layer is a softmax over the pixels of
each band, so the output is non-negative and sums to one per band by
construction (the decoder contract). It is sized for inference: every
likelihood gradient calls it, so it stays small (its XLA FLOP count per
forward pass is measured in the model card).

Encoder: an image ``(band, S, S)`` scaled by ``asinh(x / (k sigma_b))`` with
``sigma_b`` a per-band scale (which tames the dynamic range of bright pixels
while keeping faint ones linear) -> the mean and log standard deviation of a
diagonal Gaussian. The canonical VAE's encoder takes canonical morphologies
(``sigma_b`` the training's ``canonical_sigma``) to q(z | C); the amortised
pose encoder (:mod:`bayesblend.prior.amortised`) is the same class on noisy
survey stamps in electrons (``sigma_b`` the band's sky noise), with an output
for every source parameter.

Layers are NHWC inside (Flax convention); public inputs and outputs are
``(band, y, x)`` as everywhere in bayesblend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

_DIMS = ("NHWC", "HWIO", "NHWC")


def _conv_same(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=_DIMS)


def _conv_up2(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    return jax.lax.conv_transpose(x, kernel, (2, 2), "SAME", dimension_numbers=_DIMS)


def _flip(kernel: jnp.ndarray) -> jnp.ndarray:
    """The kernel of the input gradient: spatially flipped, input and output channels swapped."""
    return kernel[::-1, ::-1].swapaxes(2, 3)


@jax.custom_vjp
def conv_same(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    """3x3 'SAME' convolution (NHWC, HWIO) whose input gradient is itself a plain convolution.

    XLA on the CPU runs the convolutions that JAX's automatic transpose
    produces 5-15x slower inside ``while`` loops than outside (non-canonical
    kernel layout; jax-ml/jax#12868), and MAP, SVI and NUTS take every
    gradient inside a loop. Writing the input gradient as a forward
    convolution with the flipped kernel keeps it on the fast path. Values
    are those of ``flax.linen.Conv`` (tested).
    """
    return _conv_same(x, kernel)


def _conv_same_fwd(x, kernel):
    return _conv_same(x, kernel), (x, kernel)


def _conv_same_bwd(res, g):
    x, kernel = res
    gk = jax.vjp(lambda k: _conv_same(x, k), kernel)[1](g)[0]  # dropped by XLA unless training
    return _conv_same(g, _flip(kernel)), gk


conv_same.defvjp(_conv_same_fwd, _conv_same_bwd)


@jax.custom_vjp
def conv_up2(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    """3x3 stride-2 'SAME' transposed convolution with a loop-friendly input gradient (see :func:`conv_same`).

    The input gradient is a stride-2 convolution with the flipped kernel and
    padding (0, 1), equal to JAX's own transpose (tested).
    """
    return _conv_up2(x, kernel)


def _conv_up2_fwd(x, kernel):
    return _conv_up2(x, kernel), (x, kernel)


def _conv_up2_bwd(res, g):
    x, kernel = res
    gk = jax.vjp(lambda k: _conv_up2(x, k), kernel)[1](g)[0]
    gx = jax.lax.conv_general_dilated(g, _flip(kernel), (2, 2), ((0, 1), (0, 1)), dimension_numbers=_DIMS)
    return gx, gk


conv_up2.defvjp(_conv_up2_fwd, _conv_up2_bwd)


def _batched(op, x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    """Apply an NHWC op to ``x`` with any number (including zero) of leading batch axes."""
    lead = x.shape[:-3]
    y = op(x.reshape((-1,) + x.shape[-3:]), kernel)
    return y.reshape(lead + y.shape[-3:])


class _Conv3x3(nn.Module):
    """A 3x3 convolution layer with a ``kernel`` (HWIO) and a ``bias``, initialised as Flax's.

    Subclasses name the operation; Flax names parameters after the subclass
    (``Conv_0``, ``ConvTranspose_0``...), so trained weights load unchanged.
    ``loop_friendly`` selects the op with the hand-written input gradient
    (fast in loops, no forward mode) or the plain one (both modes).
    """

    features: int
    loop_friendly: bool = True

    @staticmethod
    def op(loop_friendly: bool) -> Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]:
        """The NHWC operation ``(x, kernel) -> y`` of the layer (each subclass names its own)."""
        raise NotImplementedError

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        return _batched(self.op(self.loop_friendly), x, kernel) + bias


class Conv(_Conv3x3):
    """3x3 stride-1 'SAME' convolution (:func:`conv_same`); parameters as ``flax.linen.Conv``."""

    @staticmethod
    def op(loop_friendly: bool) -> Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]:
        """:func:`conv_same` if ``loop_friendly`` (fast in loops, no forward mode), else the plain one."""
        return conv_same if loop_friendly else _conv_same


class ConvTranspose(_Conv3x3):
    """3x3 stride-2 'SAME' transposed convolution (:func:`conv_up2`); parameters as Flax's."""

    @staticmethod
    def op(loop_friendly: bool) -> Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]:
        """:func:`conv_up2` if ``loop_friendly`` (fast in loops, no forward mode), else the plain one."""
        return conv_up2 if loop_friendly else _conv_up2


#: Scale, in units of the sky noise, below which the encoder input is linear.
ASINH_SOFTENING = 3.0


def scale_input(image: jnp.ndarray, noise_sigma: jnp.ndarray) -> jnp.ndarray:
    """``asinh(x / (k sigma_b))``: the encoder's input scaling, ``(..., band, y, x)``."""
    s = ASINH_SOFTENING * noise_sigma[..., :, None, None]
    return jnp.arcsinh(image / s)


class Decoder(nn.Module):
    """Latent code -> canonical morphology ``(band, S, S)`` with unit sum per band.

    Attributes
    ----------
    bands : int
        Number of bands.
    stamp : int
        Output side S, pixels (divisible by 8): the canonical grid's side.
    features : tuple of int
        Channels at the 1/8, 1/4, 1/2 and full resolution stages.
    loop_friendly : bool
        Convolutions with hand-written input gradients that stay fast inside
        XLA loops on the CPU (:func:`conv_same`); they have no forward-mode
        rule, so forward-mode users (Jacobian columns) take a clone with
        ``loop_friendly=False``. Same parameters, same values.
    """

    bands: int = 6
    stamp: int = 48
    features: Sequence[int] = (64, 48, 32, 16)
    loop_friendly: bool = True

    @nn.compact
    def __call__(self, z: jnp.ndarray) -> jnp.ndarray:
        base = self.stamp // 8
        f = self.features
        x = nn.gelu(nn.Dense(256)(z))
        x = nn.gelu(nn.Dense(base * base * f[0])(x))
        x = x.reshape(z.shape[:-1] + (base, base, f[0]))
        for k, ch in enumerate(f[1:]):
            x = nn.gelu(ConvTranspose(ch, self.loop_friendly)(x))
            if k < len(f) - 2:  # no extra conv at full resolution: it would dominate the cost
                x = nn.gelu(Conv(ch, self.loop_friendly)(x))
        logits = Conv(self.bands, self.loop_friendly)(x)  # (..., S, S, band)
        logits = jnp.moveaxis(logits, -1, -3)  # (..., band, S, S)
        flat = logits.reshape(logits.shape[:-2] + (-1,))
        return jax.nn.softmax(flat, axis=-1).reshape(logits.shape)


class Encoder(nn.Module):
    """Scaled image ``(band, S, S)`` -> ``(mean, log_sigma)``, each ``(latent_dim,)``.

    Attributes
    ----------
    latent_dim : int
        Size of the output: the latent code's dimension (canonical VAE) or
        :attr:`PoseLayout.size <bayesblend.prior.amortised.PoseLayout.size>` (pose encoder).
    features : tuple of int
        Channels of the stride-2 stages (e.g. 64 -> 32 -> 16 -> 8 pixels).
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
