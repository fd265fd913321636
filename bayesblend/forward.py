"""Pure-JAX forward model: a canonical morphology through an explicit pose and the PSF to a survey stamp.

:func:`canonical_spectrum` and :func:`render_pose` are the renderer (the
comment block above :func:`shear_matrix` gives the method and why it is
written here rather than taken from jax-galsim); :func:`psf_spectrum` turns a
band's PSF image into the factor it multiplies; :func:`paste_stamps` and
:func:`anchor_and_offset` put sources' stamps into a scene. Every function
here is jit- and vmap-friendly (static shapes only).
"""

from __future__ import annotations

import functools

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


def paste_stamps(stamps: jnp.ndarray, anchor: jnp.ndarray, shape: tuple[int, int]) -> jnp.ndarray:
    """Sum of stamps ``(source, band, S, S)`` pasted at ``anchor`` into a ``(band, H, W)`` canvas.

    ``anchor`` ``(source, 2)`` int: canvas pixel ``(x0, y0)`` of each stamp's
    first pixel, anywhere in ``[-S, W] x [-S, H]``; ``shape`` ``(H, W)``
    (static). Linear in the stamps. Parts of a stamp beyond the canvas are
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


# ---------------------------------------------------------------------------
# The renderer
#
# A canonical morphology C (round, half-light radius ``hlr_pixels`` canonical
# pixels in the reference band, unit sum per band, centred at ((N-1)/2, (N-1)/2))
# becomes a source's observed stamp through an explicit pose. In Fourier space
# the sky profile of a source with area-preserving shear matrix S(e), half-light
# radius h (arcsec) and flux f is
#
#     I_b(k) = f_b * C_b(q) * u(q) / P(q),   q = (h / hlr_pixels) * S(e) k,
#
# with k in rad/arcsec, q in rad per canonical pixel, C_b(q) the discrete-time
# Fourier transform of the canonical image, u the Fourier transform of the
# quintic interpolant that makes the pixel samples a continuous profile, and P
# that of the canonical pixel: canonical images are integrated over their
# pixels (as the simulator draws them), and dividing by P takes that box off
# again, so that the pixel does not grow with the galaxy. Without it a galaxy of
# half-light radius 1.2" (canonical pixels of 0.3", larger than LSST's) came
# out broadened by a 0.3" box: 6 % of the peak in residuals against GalSim's
# drawing of the same galaxy, and a size 3 % too small when fitted; with it,
# 3 %. P(q) >= 0.64 per axis inside the canonical Nyquist band, and u / P keeps
# four of u's five sinc factors beyond it, so the division is well conditioned
# everywhere. C_b(q)
# at the off-grid points q is interpolated (quintic again) from the FFT of the
# zero-padded canonical image. Then each band's PSF (the DFT of its
# pixel-convolved PSF image, so the pixel response comes with it) and the
# sub-pixel shift multiply the spectrum, and one inverse FFT gives the stamp on
# the survey's pixel grid. Nothing depends on the survey's pixel scale except
# the k-grid, so one code path serves LSST (0.2"), Euclid VIS (0.1") and NISP
# (0.3") alike.
#
# Why not jax-galsim (evaluated, 2026-12-05, jax-galsim 2026.7.0): it implements
# GalSim's algorithm (the same quintic k-interpolation of a padded FFT), and drawn
# with its FFT size pinned it matches GalSim to 4e-5 of the peak, with correct
# gradients with respect to a shear (checked against finite differences). But a
# six-band LSST stamp costs 175 ms and 770 MFLOP per gradient with respect to the
# pose and the canonical image on this CPU, against 7 ms and 125 MFLOP here
# (benchmarks/bench_renderer.py, RESULTS "Renderer"): it rebuilds its objects
# band by band at trace time, cannot share one k-interpolation between bands, and
# would add three dependencies (jax-galsim, equinox, quadax) to the hot path.
# ---------------------------------------------------------------------------


def shear_matrix(e: jnp.ndarray) -> jnp.ndarray:
    """Area-preserving matrix of a shear-type ellipticity ``e = (e1, e2)``, ``(..., 2, 2)``.

    ``S = [[1 + e1, e2], [e2, 1 - e1]] / sqrt(1 - |e|^2)`` maps the round
    profile's coordinates to the sky's (GalSim's ``Shear.getMatrix``): a circle
    of radius r becomes an ellipse of axes ``r sqrt((1+|e|)/(1-|e|))`` and
    ``r sqrt((1-|e|)/(1+|e|))``, so ``|e| = (a - b) / (a + b)``. Symmetric, det 1.
    """
    e1, e2 = e[..., 0], e[..., 1]
    norm = 1.0 / jnp.sqrt(1.0 - e1**2 - e2**2)
    row0 = jnp.stack([1.0 + e1, e2], axis=-1)
    row1 = jnp.stack([e2, 1.0 - e1], axis=-1)
    return jnp.stack([row0, row1], axis=-2) * norm[..., None, None]


def quintic(x: jnp.ndarray) -> jnp.ndarray:
    """The quintic interpolation kernel (support |x| < 3 samples).

    The piecewise-quintic kernel of Bernstein & Gruen (2014, PASP 126, 287),
    GalSim's ``Quintic``: it reproduces polynomials to second order and is
    continuous with its first two derivatives, which makes interpolated values
    smooth in the interpolation point (the gradients of the renderer with
    respect to the pose go through it).
    """
    a = jnp.abs(x)
    one = 1.0 + a**3 * (-95.0 / 12.0 + a * (23.0 / 2.0 - a * 55.0 / 12.0))
    two = (a - 1.0) * (a - 2.0) * (-23.0 / 4.0 + a * (29.0 / 2.0 + a * (-83.0 / 8.0 + a * 55.0 / 24.0)))
    three = (a - 2.0) * (a - 3.0) ** 2 * (-9.0 / 4.0 + a * (25.0 / 12.0 - a * 11.0 / 24.0))
    return jnp.where(a <= 1.0, one, jnp.where(a <= 2.0, two, jnp.where(a < 3.0, three, 0.0)))


def quintic_ft(u: jnp.ndarray) -> jnp.ndarray:
    """Fourier transform of :func:`quintic` at frequency ``u`` (cycles per sample)."""
    s = jnp.sinc(u)
    piu = jnp.pi * u
    return s**5 * (s * (55.0 - 19.0 * piu**2) + 2.0 * jnp.cos(piu) * (piu**2 - 27.0))


def _interpolant_over_pixel(u: jnp.ndarray) -> jnp.ndarray:
    """``quintic_ft(u) / sinc(u)``: the interpolant with the canonical pixel's box deconvolved.

    :func:`quintic_ft` carries ``sinc(u)**5``, so the ratio is finite (zero)
    where ``sinc`` vanishes; written out to avoid 0 / 0 there.
    """
    s = jnp.sinc(u)
    piu = jnp.pi * u
    return s**4 * (s * (55.0 - 19.0 * piu**2) + 2.0 * jnp.cos(piu) * (piu**2 - 27.0))


#: Zero-padding factor of the canonical image before its FFT (k-space sampling density).
CANONICAL_PAD_FACTOR = 2


def canonical_spectrum(canonical: jnp.ndarray, pad_factor: int = CANONICAL_PAD_FACTOR) -> jnp.ndarray:
    """FFT of a zero-padded canonical morphology, centred for interpolation in k.

    Parameters
    ----------
    canonical : jax.Array
        ``(..., band, N, N)`` canonical morphology (N even), centred at
        ``((N-1)/2, (N-1)/2)``.
    pad_factor : int
        The padded grid has side ``pad_factor * N`` (static). GalSim's default
        is 4; 2 stays within 2.1e-4 of the peak of it on LSST stamps
        (``benchmarks/bench_renderer.py``) at a quarter of the FFT cost.

    Returns
    -------
    jax.Array
        Complex ``(..., band, P, P)``, the transform of the image rolled so that
        pixel ``N/2`` sits at index 0 (its true centre is then half a pixel
        below, which :func:`render_pose` puts back as a phase). It depends on
        the morphology only, so a fit over poses computes it once per ``z``.
    """
    n = canonical.shape[-1]
    p = pad_factor * n
    pad = [(0, 0)] * (canonical.ndim - 2) + [(0, p - n), (0, p - n)]
    grid = jnp.roll(jnp.pad(canonical, pad), shift=(-(n // 2), -(n // 2)), axis=(-2, -1))
    return jnp.fft.fft2(grid)


def psf_spectrum(psf: np.ndarray | jnp.ndarray, n: int) -> jnp.ndarray:
    """DFT of centred, pixel-convolved PSF images ``(..., band, P, P)`` on an ``n``-grid.

    The periodic part of the effective PSF's (PSF times pixel) transfer
    function; :func:`render_pose` multiplies it by the transform of the quintic
    interpolant that makes the image's samples a continuous profile, exactly as
    a GalSim ``InterpolatedImage`` of the PSF image with its default
    (quintic) interpolant. It carries the pixel response, as the scene's data
    do. Against GalSim drawing the analytic LSST r PSF at sub-pixel offsets the
    quintic interpolant gave smaller errors than the band-limited (plain DFT)
    one: 3.7e-3 against 5.2e-3 of the peak, the PSF being barely
    Nyquist-sampled at 0.2".

    Returns
    -------
    jax.Array
        Complex ``(..., band, n, n // 2 + 1)``, computed once per scene.
    """
    return jnp.fft.rfft2(embed_centred(psf, n))


def _interpolate_spectrum(spectrum: jnp.ndarray, qy: jnp.ndarray, qx: jnp.ndarray) -> jnp.ndarray:
    """Interpolate a periodic ``(..., band, P, P)`` spectrum at ``(qy, qx)`` (bins), ``(..., band, K)``.

    Quintic weights, 6 x 6 taps per point. The gather runs on a
    ``(P * P, 2 band)`` real layout, so that each tap fetches one contiguous
    row of every band's real and imaginary parts (1.4x faster on the CPU, with
    its transpose the scatter-add of the gradient, than gathering complex
    values band by band).
    """
    p = spectrum.shape[-1]
    lead = spectrum.shape[:-2]
    flat = spectrum.reshape((-1, p * p))
    table = jnp.concatenate([flat.real, flat.imag]).T  # (P*P, 2 B)
    taps = jnp.arange(-2, 4)
    fy, fx = jnp.floor(qy), jnp.floor(qx)
    wy = quintic(qy[:, None] - (fy[:, None] + taps))  # (K, 6)
    wx = quintic(qx[:, None] - (fx[:, None] + taps))
    iy = (fy.astype(jnp.int32)[:, None] + taps) % p
    ix = (fx.astype(jnp.int32)[:, None] + taps) % p
    values = table[iy[:, :, None] * p + ix[:, None, :]]  # (K, 6, 6, 2 B)
    out = jnp.einsum("kijc,ki,kj->ck", values, wy, wx)
    nb = flat.shape[0]
    return jax.lax.complex(out[:nb], out[nb:]).reshape(lead + (-1,))


@functools.cache
def _sampled_frequencies(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Frequencies ``(fx, fy)`` (cycles/pixel) whose sum makes each ``rfft2`` bin of an ``n``-grid.

    Every bin of the half-plane grid holds its own frequency; the Nyquist bins
    (``fx = 1/2`` or ``fy = -1/2``, n even) also hold their mirror at the
    opposite sign, since sampling folds ``+1/2`` and ``-1/2`` onto one bin.
    Dropping the mirror left alternating-sign ripples of 1 % of the peak on
    grids where the PSF is undersampled (Euclid NISP's 0.3" pixels).

    Returns
    -------
    freq : numpy.ndarray
        ``(K', 2)`` float32 frequencies.
    bins : numpy.ndarray
        ``(K',)`` int32 flat index of each one's bin in ``(n, n // 2 + 1)``.
    """
    fy, fx = np.meshgrid(np.fft.fftfreq(n), np.fft.rfftfreq(n), indexing="ij")
    freq = [np.stack([fx.ravel(), fy.ravel()], axis=-1)]
    bins = [np.arange(fx.size)]
    nyq_x = np.isclose(freq[0][:, 0], 0.5)
    nyq_y = np.isclose(freq[0][:, 1], -0.5)
    for mask, flip in ((nyq_x, (-1, 1)), (nyq_y, (1, -1)), (nyq_x & nyq_y, (-1, -1))):
        freq.append(freq[0][mask] * np.array(flip))
        bins.append(bins[0][mask])
    return np.concatenate(freq).astype(np.float32), np.concatenate(bins).astype(np.int32)


def render_pose(
    spectrum: jnp.ndarray,
    flux: jnp.ndarray,
    e: jnp.ndarray,
    hlr: jnp.ndarray,
    offset: jnp.ndarray,
    psf_ft: jnp.ndarray,
    *,
    stamp: int,
    pixel_scale: float,
    hlr_pixels: float,
) -> jnp.ndarray:
    """Observed image of one source from its canonical spectrum and explicit pose.

    Parameters
    ----------
    spectrum : jax.Array
        ``(band, P, P)`` from :func:`canonical_spectrum`.
    flux : jax.Array
        ``(band,)`` electrons.
    e : jax.Array
        ``(2,)`` shear-type ellipticity ``(e1, e2)``, ``|e| < 1``.
    hlr : jax.Array
        Scalar half-light radius of the source in arcsec: that of the
        canonical morphology's reference band, dilated (the shear preserves
        area, so it is the circularised radius ``sqrt(a b)``).
    offset : jax.Array
        ``(2,)`` shift ``(dx, dy)`` in survey pixels of the profile's centre
        from the stamp centre ``((S-1)/2, (S-1)/2)``.
    psf_ft : jax.Array
        ``(band, n, n // 2 + 1)`` from :func:`psf_spectrum`; ``n`` (even,
        >= ``stamp``) is the FFT grid, and light beyond ``(n - stamp) / 2``
        pixels from the stamp edge wraps around (``n = 2 stamp`` is safe).
    stamp : int
        Side S of the output stamp, pixels (static).
    pixel_scale : float
        Survey pixel scale, arcsec (static).
    hlr_pixels : float
        Half-light radius of the canonical morphology, canonical pixels (static).
    Returns
    -------
    jax.Array
        ``(band, S, S)`` electrons.
    """
    n = psf_ft.shape[-2]
    p = spectrum.shape[-1]
    grid, bins = _sampled_frequencies(n)
    freq = jnp.asarray(grid)  # (K', 2) cycles / pixel
    q = (hlr / hlr_pixels) * (2.0 * jnp.pi / pixel_scale) * freq @ shear_matrix(e)  # rad / canonical px
    cycles = q / (2.0 * jnp.pi)  # cycles / canonical pixel
    morph = _interpolate_spectrum(spectrum, cycles[:, 1] * p, cycles[:, 0] * p)
    # the rolled canonical image sits half a pixel off its true centre; quintic_ft
    # is the transform of the interpolant that makes its samples continuous, and the
    # sinc that of the canonical pixel they were integrated over, taken off
    morph = morph * jnp.exp(-1j * 0.5 * (q[:, 0] + q[:, 1]))
    morph = morph * (_interpolant_over_pixel(cycles[:, 0]) * _interpolant_over_pixel(cycles[:, 1]))
    lo = (n - stamp) // 2
    centre = lo + (stamp - 1) / 2.0 + offset  # pixels on the n-grid
    # the PSF image's samples made continuous by the same interpolant; then the shift
    psf_interp = quintic_ft(freq[:, 0]) * quintic_ft(freq[:, 1])
    morph = morph * (psf_interp * jnp.exp(-2j * jnp.pi * (freq @ centre)))
    k = n * (n // 2 + 1)
    morph = jnp.zeros(morph.shape[:-1] + (k,), morph.dtype).at[..., bins].add(morph)
    spec = morph * psf_ft.reshape(psf_ft.shape[:-2] + (-1,))
    image = jnp.fft.irfft2(spec.reshape(psf_ft.shape), s=(n, n))[:, lo : lo + stamp, lo : lo + stamp]
    return flux[:, None, None] * image
