"""Pure-JAX forward model: model-frame morphology -> observed PSF -> sub-pixel shift -> flux.

The decoder contract: a source's observed image in band b is
``flux_b * (morphology_b conv K_b)`` shifted by its sub-pixel offset, where
``K_b`` is the difference kernel from the narrow model PSF to band b's PSF.
Both PSFs are images drawn the same way (pixel-convolved, unit sum), so in
Fourier space ``K_b = FFT(psf_b) / FFT(model_psf)`` and the pixel response
cancels. Convolution and shift are one multiplication in Fourier space on a
zero-padded grid of side ``n`` (even), which keeps PSF wings from wrapping
around onto the stamp.

In a scene (:func:`render_scene`) the offset places the morphology's light
centroid, not its stamp centre: the decoder's softmax output can put light
anywhere in the stamp, and a joint fit used that freedom to let faint
neighbours of a bright galaxy put their light on its core and absorb its
residuals (a refinement of shifting the stamp by the sub-pixel offset alone).
:func:`render_source` is the stamp-level operation and shifts the stamp as
given (training uses it with centred targets).

Every function here is jit- and vmap-friendly (static shapes only).
"""

from __future__ import annotations

import jax
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


#: Gaussian window (sigma, model-frame pixels) of :func:`light_centroid`.
CENTROID_WINDOW = 3.0
#: Mean-shift iterations of :func:`light_centroid` (each moves the window to the windowed centroid).
CENTROID_ITERATIONS = 4


def light_centroid(morphology: jnp.ndarray, window: float = CENTROID_WINDOW) -> jnp.ndarray:
    """Windowed centroid ``(dx, dy)`` of a morphology's light from its stamp centre, pixels.

    The first moment of the light under a round Gaussian window of ``window``
    pixels (sigma), iterated: the window starts at the plain first moment and is
    moved to the windowed centroid :data:`CENTROID_ITERATIONS` times (a mean
    shift, as in SExtractor's ``XWIN``/``YWIN`` or the centroid of GalSim's
    adaptive moments). For a symmetric profile it is the profile's centre. The
    plain first moment over the whole stamp is not: a decoded morphology's
    faint outer light has long lever arms, and an asymmetry there moved a
    bright galaxy's fitted position 0.65 px from its centre.

    Parameters
    ----------
    morphology : jax.Array
        ``(..., band, S, S)``; the bands are summed (one centroid for all bands,
        so colour gradients are kept) and negative pixels are ignored.
    window : float
        Gaussian window sigma, pixels (static).

    Returns
    -------
    jax.Array
        ``(..., 2)``; zero for an empty morphology.
    """
    light = jnp.clip(morphology, 0.0, None).sum(axis=-3)
    s = light.shape[-1]
    coords = jnp.arange(s, dtype=light.dtype) - (s - 1) / 2.0

    def moment(weighted: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        total = weighted.sum(axis=(-2, -1))
        safe = jnp.where(total > 0, total, 1.0)
        dx = jnp.einsum("...yx,x->...", weighted, coords) / safe
        dy = jnp.einsum("...yx,y->...", weighted, coords) / safe
        return jnp.stack([dx, dy], axis=-1), total > 0

    def step(_, centre: jnp.ndarray) -> jnp.ndarray:
        wx = jnp.exp(-0.5 * ((coords - centre[..., :1]) / window) ** 2)  # (..., S) along x
        wy = jnp.exp(-0.5 * ((coords - centre[..., 1:]) / window) ** 2)  # (..., S) along y
        new, ok = moment(light * wy[..., :, None] * wx[..., None, :])
        return jnp.where(ok[..., None], new, centre)

    start, nonempty = moment(light)
    centre = jax.lax.fori_loop(0, CENTROID_ITERATIONS, step, start)
    return centre * nonempty[..., None]


def render_scene(
    morphology: jnp.ndarray,
    flux: jnp.ndarray,
    offset: jnp.ndarray,
    anchor: jnp.ndarray,
    kernel: jnp.ndarray,
    shape: tuple[int, int],
) -> jnp.ndarray:
    """Sum of sources rendered on their stamps and pasted into a scene canvas.

    Parameters
    ----------
    morphology : jax.Array
        ``(source, band, S, S)`` model-frame morphologies.
    flux : jax.Array
        ``(source, band)`` electrons (zero for padded sources).
    offset : jax.Array
        ``(source, 2)`` sub-pixel ``(dx, dy)`` of each source's light centroid
        from its stamp centre. Each morphology is first shifted so that its
        centroid (:func:`light_centroid`) sits at the stamp centre, so a
        source's position is where its light is: a decoded morphology cannot
        put its light pixels away from the source's position (a joint fit
        otherwise uses faint neighbours' off-centre light to absorb a bright
        galaxy's residuals).
    anchor : jax.Array of int
        ``(source, 2)`` canvas pixel ``(x0, y0)`` of each stamp's first pixel;
        anywhere in ``[-S, W] x [-S, H]`` (sources across or beyond the edge
        are clipped by the canvas).
    kernel : jax.Array
        ``(band, n, n // 2 + 1)`` difference kernel of the scene's PSFs.
    shape : (int, int)
        ``(H, W)`` of the canvas (static).

    Returns
    -------
    jax.Array
        ``(band, H, W)`` electrons.
    """
    return paste_stamps(render_stamps(morphology, flux, offset, kernel), anchor, shape)


def render_stamps(
    morphology: jnp.ndarray, flux: jnp.ndarray, offset: jnp.ndarray, kernel: jnp.ndarray
) -> jnp.ndarray:
    """Each source's observed image on its own stamp, ``(source, band, S, S)`` electrons.

    The first half of :func:`render_scene` (same arguments): each morphology is
    shifted so that its light centroid lands ``offset`` from the stamp centre,
    convolved with the difference kernel and scaled by its flux. A source's
    stamp depends on that source's parameters only, which the Gauss-Newton
    Jacobian of the inference layer uses to differentiate one source at a time.
    """
    shift = offset - light_centroid(morphology)
    return jax.vmap(render_source, in_axes=(0, 0, 0, None))(morphology, flux, shift, kernel)


def paste_stamps(stamps: jnp.ndarray, anchor: jnp.ndarray, shape: tuple[int, int]) -> jnp.ndarray:
    """Sum of stamps ``(source, band, S, S)`` pasted at ``anchor`` into a ``(band, H, W)`` canvas.

    The second half of :func:`render_scene` (``anchor`` and ``shape`` as
    there); linear in the stamps. Parts of a stamp beyond the canvas are
    dropped.
    """
    s = stamps.shape[-1]
    nb = stamps.shape[-3]
    h, w = shape
    canvas = jnp.zeros((nb, h + 2 * s, w + 2 * s), dtype=stamps.dtype)
    anchor = jnp.clip(anchor, -s, jnp.array([w, h])) + s

    def paste(canvas, item):
        stamp, (x0, y0) = item
        start = (jnp.int32(0), y0.astype(jnp.int32), x0.astype(jnp.int32))
        current = jax.lax.dynamic_slice(canvas, start, (nb, s, s))
        return jax.lax.dynamic_update_slice(canvas, current + stamp, start), None

    canvas, _ = jax.lax.scan(paste, canvas, (stamps, anchor))
    return canvas[:, s : s + h, s : s + w]


def anchor_and_offset(x: np.ndarray, y: np.ndarray, stamp: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer stamp anchors and sub-pixel offsets placing stamp centres at positions ``(x, y)``.

    A stamp of side S has its centre at ``(S - 1) / 2``; the anchor is the
    nearest integer placement and the offset (within +-0.5 pixel) the rest.
    """
    c = (stamp - 1) / 2.0
    pos = np.stack([np.asarray(x, float), np.asarray(y, float)], axis=-1) - c
    anchor = np.round(pos).astype(np.int32)
    return anchor, (pos - anchor).astype(np.float32)
