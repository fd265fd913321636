"""Truth measurements on noiseless images: S/N and blendedness (Arcelin et al. 2021, sect. 2.2, 4.1)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def snr(image: np.ndarray, sky: float | np.ndarray) -> float | np.ndarray:
    """Signal-to-noise ratio of an isolated source, paper eq. 7.

    ``S/N = sqrt(sum_p I_p^2 / (I_p + sky))`` over the pixels of the noiseless
    image ``I`` (electrons) with the sky level ``sky`` (electrons per pixel).

    Parameters
    ----------
    image : numpy.ndarray
        ``(..., y, x)`` noiseless images, electrons.
    sky : float or numpy.ndarray
        Sky level, electrons per pixel, broadcast against ``image``.

    Returns
    -------
    float for one image, else an array of the leading shape.
    """
    i = np.clip(np.asarray(image, dtype=np.float64), 0.0, None)
    s = np.sqrt(np.sum(i * i / (i + sky), axis=(-2, -1)))
    return float(s) if s.ndim == 0 else s


def blendedness(
    stamps: Sequence[tuple[tuple[int, int, int, int], np.ndarray] | None],
    total: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blendedness of every source with its closest neighbour and with the whole scene.

    Parameters
    ----------
    stamps : sequence of ((x0, x1, y0, y1), image) or None
        Each source's noiseless image on its pixel box of the scene (None if
        the source falls outside the scene).
    total : numpy.ndarray
        ``(y, x)`` noiseless image of the whole scene, same band.
    x, y : numpy.ndarray
        Source centres, pixels; the closest neighbour is the closest centre.

    Returns
    -------
    b_closest : numpy.ndarray
        Eq. 1, ``<I_i, I_j> / sqrt(<I_i, I_i> <I_j, I_j>)`` with j the closest
        neighbour; 0 for an isolated source.
    b_tot : numpy.ndarray
        Eq. 3, ``1 - <I_i, I_i> / <I_i, I_total>``; 0 for an isolated source.
    closest : numpy.ndarray of int
        Row of the closest neighbour, -1 if none.
    """
    n = len(stamps)
    b_closest = np.zeros(n)
    b_tot = np.zeros(n)
    closest = np.full(n, -1, dtype=np.int64)
    if n == 0:
        return b_closest, b_tot, closest
    pos = np.stack([np.asarray(x, float), np.asarray(y, float)], axis=1)
    d2 = np.sum((pos[:, None, :] - pos[None, :, :]) ** 2, axis=-1)
    np.fill_diagonal(d2, np.inf)
    for i, si in enumerate(stamps):
        if si is None:
            b_closest[i] = b_tot[i] = np.nan
            continue
        (x0, x1, y0, y1), img = si
        img = img.astype(np.float64)
        self_dot = float(np.sum(img * img))
        cross_tot = float(np.sum(img * total[y0:y1, x0:x1]))
        b_tot[i] = 1.0 - self_dot / cross_tot if cross_tot > 0 else np.nan
        if n > 1:
            j = int(np.argmin(d2[i]))
            closest[i] = j
            sj = stamps[j]
            if sj is None:
                continue
            (u0, u1, v0, v1), imj = sj
            ox0, ox1, oy0, oy1 = max(x0, u0), min(x1, u1), max(y0, v0), min(y1, v1)
            if ox0 < ox1 and oy0 < oy1:
                a = img[oy0 - y0 : oy1 - y0, ox0 - x0 : ox1 - x0]
                b = imj[oy0 - v0 : oy1 - v0, ox0 - u0 : ox1 - u0].astype(np.float64)
                norm = np.sqrt(self_dot * float(np.sum(imj.astype(np.float64) ** 2)))
                b_closest[i] = float(np.sum(a * b)) / norm if norm > 0 else 0.0
    return np.clip(b_closest, 0.0, 1.0), np.clip(b_tot, 0.0, 1.0), closest
