"""Pure-JAX forward model: model-frame morphology -> observed PSF -> sub-pixel shift -> flux.

The decoder contract (DESIGN.md): a source's observed image in band b is
``flux_b * (morphology_b conv K_b)`` shifted by its sub-pixel offset, where
``K_b`` is the difference kernel from the narrow model PSF to band b's PSF.
Both PSFs are images drawn the same way (pixel-convolved, unit sum), so in
Fourier space ``K_b = FFT(psf_b) / FFT(model_psf)`` and the pixel response
cancels. Convolution and shift are one multiplication in Fourier space on a
zero-padded grid of side ``n`` (even), which keeps PSF wings from wrapping
around onto the stamp.

Every function here is jit- and vmap-friendly (static shapes only).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

#: Zero-padding on each side of a stamp before the FFT, pixels.
DEFAULT_PAD = 8


def fft_size(stamp: int, pad: int = DEFAULT_PAD) -> int:
    """Side of the padded FFT grid for a stamp of side ``stamp``: even and >= stamp + 2 pad."""
    n = stamp + 2 * pad
    return n + (n % 2)


def embed_centred(image: np.ndarray | jnp.ndarray, n: int) -> jnp.ndarray:
    """Put centred PSF images ``(..., P, P)`` (P odd) on an ``n x n`` grid with their centre at (0, 0).

    A PSF larger than the grid is cropped to its central ``n - 1`` pixels.
    """
    img = jnp.asarray(image, dtype=jnp.float32)
    p = img.shape[-1]
    if p >= n:
        lo = (p - (n - 1)) // 2
        img = img[..., lo : lo + n - 1, lo : lo + n - 1]
        p = n - 1
    c = p // 2
    pad = [(0, 0)] * (img.ndim - 2) + [(0, n - p), (0, n - p)]
    grid = jnp.pad(img, pad)
    return jnp.roll(grid, shift=(-c, -c), axis=(-2, -1))


def difference_kernel(
    psf: np.ndarray | jnp.ndarray, model_psf: np.ndarray | jnp.ndarray, n: int
) -> jnp.ndarray:
    """Fourier-space difference kernel ``K_b = FFT(psf_b) / FFT(model_psf)``.

    Parameters
    ----------
    psf : array
        ``(..., band, P, P)`` centred PSF images, unit sum.
    model_psf : array
        ``(P', P')`` the model PSF image drawn the same way.
    n : int
        FFT grid side (:func:`fft_size`).

    Returns
    -------
    jax.Array
        Complex ``(..., band, n, n // 2 + 1)``.
    """
    fp = jnp.fft.rfft2(embed_centred(psf, n))
    fm = jnp.fft.rfft2(embed_centred(model_psf, n))
    # Wiener-style guard: the Gaussian model PSF never gets close to zero on the grid,
    # but this keeps the ratio finite for any PSF pair.
    return fp * jnp.conj(fm) / (jnp.abs(fm) ** 2 + 1e-9)


def shift_phase(offset: jnp.ndarray, n: int) -> jnp.ndarray:
    """Fourier phase ``exp(-2 pi i (kx dx + ky dy))`` for a shift ``offset = (dx, dy)`` in pixels."""
    ky = jnp.fft.fftfreq(n)[:, None]
    kx = jnp.fft.rfftfreq(n)[None, :]
    dx, dy = offset[..., 0, None, None], offset[..., 1, None, None]
    return jnp.exp(-2j * jnp.pi * (kx * dx + ky * dy))


def render_source(
    morphology: jnp.ndarray, flux: jnp.ndarray, offset: jnp.ndarray, kernel: jnp.ndarray
) -> jnp.ndarray:
    """Observed image of one source on its stamp.

    Parameters
    ----------
    morphology : jax.Array
        ``(band, S, S)`` model-frame morphology, centred at ``((S-1)/2, (S-1)/2)``.
    flux : jax.Array
        ``(band,)`` electrons.
    offset : jax.Array
        ``(2,)`` shift ``(dx, dy)`` in pixels of the source from the stamp centre.
    kernel : jax.Array
        ``(band, n, n // 2 + 1)`` from :func:`difference_kernel`.

    Returns
    -------
    jax.Array
        ``(band, S, S)`` electrons.
    """
    s = morphology.shape[-1]
    n = kernel.shape[-2]
    lo = (n - s) // 2
    hi = n - s - lo
    grid = jnp.pad(morphology, ((0, 0), (lo, hi), (lo, hi)))
    spec = jnp.fft.rfft2(grid) * kernel * shift_phase(offset, n)[None]
    image = jnp.fft.irfft2(spec, s=(n, n))[:, lo : lo + s, lo : lo + s]
    return flux[:, None, None] * image
