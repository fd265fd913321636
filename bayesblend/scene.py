"""The multi-band scene: the in-memory form of a scene-FITS file.

Arrays (README "File formats"): ``(band, y, x)``, float32, sky-subtracted, electrons
over the full exposure, bands in the survey's order.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from astropy.wcs import WCS

from bayesblend.errors import BayesblendError
from bayesblend.psf import PSFGrid, check_psf
from bayesblend.survey import get_survey


@dataclass
class Scene:
    """A multi-band image with what is needed to model it.

    Attributes
    ----------
    image : numpy.ndarray
        ``(band, y, x)`` float32, sky-subtracted, electrons.
    bands : tuple of str
        Band names, in the order of the first axis.
    magzero : numpy.ndarray
        ``(band,)`` AB magnitude of one electron over the full exposure
        (FITS keyword ``MAGZERO``).
    survey : str
        Survey name (``lsst``...).
    pixel_scale : float
        arcsec per pixel.
    psf : numpy.ndarray or None
        ``(band, py, px)`` centred PSF images with unit sum, or None.
    variance : numpy.ndarray or None
        ``(band, y, x)`` per-pixel variance, electrons^2, or None.
    mask : numpy.ndarray or None
        ``(band, y, x)`` bool, True = bad pixel, or None.
    wcs : astropy.wcs.WCS or None
        Celestial WCS shared by all bands.
    meta : dict
        Extra primary-header keywords (str -> scalar).
    psf_grid : PSFGrid or None
        A PSF that varies over the image: PSF images at listed positions
        (:class:`~bayesblend.psf.PSFGrid`), used instead of ``psf``.
    name : str
        The scene file's name (without its directory) when read from one, else empty; the
        catalogue's ``file`` column.
    """

    image: np.ndarray
    bands: tuple[str, ...]
    magzero: np.ndarray
    survey: str = "lsst"
    pixel_scale: float = 0.2
    psf: np.ndarray | None = None
    variance: np.ndarray | None = None
    mask: np.ndarray | None = None
    wcs: WCS | None = None
    meta: dict = field(default_factory=dict)
    psf_grid: PSFGrid | None = None
    name: str = ""

    def __post_init__(self) -> None:
        self.image = np.asarray(self.image, dtype=np.float32)
        if self.image.ndim != 3:
            raise BayesblendError(f"scene image must be (band, y, x), got shape {self.image.shape}")
        self.bands = tuple(str(b) for b in self.bands)
        nb = self.image.shape[0]
        if len(self.bands) != nb:
            raise BayesblendError(f"scene has {nb} image planes but {len(self.bands)} band names")
        if len(set(self.bands)) != nb:
            raise BayesblendError(f"duplicate band names in {self.bands}")
        self.magzero = np.asarray(self.magzero, dtype=np.float64).reshape(-1)
        if self.magzero.shape != (nb,):
            raise BayesblendError(f"magzero needs one value per band ({nb}), got {self.magzero.size}")
        for name in ("variance", "mask"):
            arr = getattr(self, name)
            if arr is not None:
                arr = np.asarray(arr, dtype=bool if name == "mask" else np.float32)
                if arr.shape != self.image.shape:
                    raise BayesblendError(f"scene {name} has shape {arr.shape}, image has {self.image.shape}")
                setattr(self, name, arr)
        if self.psf is not None:
            self.psf = check_psf(self.psf, nb)
        if self.psf_grid is not None and self.psf_grid.n_bands != nb:
            raise BayesblendError(f"scene PSF grid has {self.psf_grid.n_bands} bands, the image {nb}")

    @property
    def shape(self) -> tuple[int, int]:
        """``(ny, nx)`` of the image."""
        return self.image.shape[1], self.image.shape[2]

    def psf_images(self, survey: str | None = None, warn: bool = False) -> np.ndarray:
        """``(band, py, px)`` PSF images: the scene's own, else the survey's default PSF per band.

        With a PSF grid, the grid interpolated to the scene's centre (for a
        blend's cutout: the blend's PSF).

        Parameters
        ----------
        survey : str, optional
            Survey whose default PSF stands in (default: the scene's ``survey``).
        warn : bool
            Warn when the default stands in (once per fit, not per use).
        """
        if self.psf_grid is not None:
            ny, nx = self.shape
            return self.psf_grid.at((nx - 1) / 2.0, (ny - 1) / 2.0)
        if self.psf is not None:
            return self.psf
        if warn:
            warnings.warn("scene has no PSF: using the survey's default PSF per band", stacklevel=3)
        return get_survey(survey or self.survey).psf_images(self.bands)

    def band_index(self, band: str) -> int:
        """Index of ``band`` in this scene (a clear error if absent)."""
        if band not in self.bands:
            raise BayesblendError(f"band {band!r} not in scene (bands: {', '.join(self.bands)})")
        return self.bands.index(band)

    def select_bands(self, bands: Sequence[str]) -> Scene:
        """A scene restricted to (and reordered as) ``bands``."""
        idx = [self.band_index(b) for b in bands]

        def pick(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[idx]

        return Scene(
            image=self.image[idx],
            bands=tuple(bands),
            magzero=self.magzero[idx],
            survey=self.survey,
            pixel_scale=self.pixel_scale,
            psf=pick(self.psf),
            variance=pick(self.variance),
            mask=pick(self.mask),
            wcs=self.wcs,
            meta=dict(self.meta),
            psf_grid=None if self.psf_grid is None else self.psf_grid.select(idx),
            name=self.name,
        )

    def cutout(self, x0: int, y0: int, height: int, width: int) -> Scene:
        """The ``height x width`` region whose first pixel is scene pixel ``(x0, y0)``.

        The region may extend beyond the scene: pixels outside it are zero and
        masked, so a blend near an edge gets a cutout of the same fixed shape as
        any other (one compilation per shape). The WCS and a PSF grid are
        shifted to match.
        """
        ny, nx = self.shape
        ys, ye = max(y0, 0), min(y0 + height, ny)
        xs, xe = max(x0, 0), min(x0 + width, nx)
        if ys >= ye or xs >= xe:
            raise BayesblendError(f"cutout at ({x0}, {y0}) of {width}x{height} lies outside the scene")
        sl = (slice(None), slice(ys - y0, ye - y0), slice(xs - x0, xe - x0))
        src = (slice(None), slice(ys, ye), slice(xs, xe))
        nb = len(self.bands)

        def cut(a: np.ndarray | None, fill: float, dtype: type) -> np.ndarray | None:
            if a is None:
                return None
            out = np.full((nb, height, width), fill, dtype=dtype)
            out[sl] = a[src]
            return out

        outside = np.ones((nb, height, width), bool)
        outside[sl] = False
        mask = outside if self.mask is None else (cut(self.mask, True, bool) | outside)
        variance = cut(self.variance, 1.0, np.float32)
        wcs = None
        if self.wcs is not None:
            wcs = self.wcs.deepcopy()
            wcs.wcs.crpix = wcs.wcs.crpix - np.array([x0, y0])
        return Scene(
            image=cut(self.image, 0.0, np.float32),
            bands=self.bands,
            magzero=self.magzero,
            survey=self.survey,
            pixel_scale=self.pixel_scale,
            psf=self.psf,
            variance=variance,
            mask=mask if mask.any() else None,
            wcs=wcs,
            meta=dict(self.meta),
            psf_grid=None if self.psf_grid is None else self.psf_grid.shifted(-x0, -y0),
            name=self.name,
        )


def add_cutout(canvas: np.ndarray, image: np.ndarray, origin: tuple[int, int]) -> np.ndarray:
    """Add ``image`` ``(band, h, w)``, a cutout whose first pixel is at ``origin = (x0, y0)``, to ``canvas``.

    The inverse of :meth:`Scene.cutout` for models: the part of the cutout
    that overhangs the canvas is dropped. ``canvas`` ``(band, H, W)`` is
    changed in place and returned.
    """
    ny, nx = canvas.shape[-2:]
    x0, y0 = origin
    h, w = image.shape[-2:]
    ya, yb, xa, xb = max(y0, 0), min(y0 + h, ny), max(x0, 0), min(x0 + w, nx)
    if ya < yb and xa < xb:
        canvas[..., ya:yb, xa:xb] += image[..., ya - y0 : yb - y0, xa - x0 : xb - x0]
    return canvas
