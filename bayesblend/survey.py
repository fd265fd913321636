"""Surveys and bands: pixel scale, PSF, zeropoints, sky and exposure.

Numbers come from ``surveycodex`` (pinned to 1.3.0 so that every simulation is
reproducible): LSST ``ugrizy`` at the 10-year depth, Euclid VIS (``IE``) and
Euclid NISP (``YE``, ``JE``, ``HE``). VIS and NISP have different pixel scales,
so they are two surveys here (``euclid_vis`` and ``euclid_nisp``): a
:class:`Survey` is one pixel grid.

Conventions (README "File formats"): images are in electrons over the full exposure, and
magnitudes are AB, ``m = magzero - 2.5 log10(counts)`` where ``magzero`` is the
magnitude that gives one electron over the full exposure. ``surveycodex``
zeropoints are per second, so ``magzero = zeropoint + 2.5 log10(exposure_time)``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import galsim
import numpy as np
import surveycodex

from bayesblend.errors import BayesblendError

#: Moffat index used for PSFs of space surveys (and available for ground ones).
MOFFAT_BETA = 2.5

#: Top-hat approximations of the Euclid passbands, in nm (lower, upper): VIS from
#: Cropper et al. 2016; NISP from Schirmer et al. 2022 (A&A 662, A92), 50 %
#: transmission edges. GalSim ships no Euclid curves and the project runs
#: offline, so these are used for the SED integrals that set colours.
EUCLID_TOPHATS_NM = {
    "IE": (550.0, 900.0),
    "YE": (949.6, 1212.3),
    "JE": (1167.6, 1567.0),
    "HE": (1521.5, 2021.4),
}


@dataclass(frozen=True)
class Band:
    """One filter of a survey.

    Attributes
    ----------
    name : str
        Band name as used in files (``u``, ``g``, ..., ``IE``).
    psf_fwhm : float
        Median PSF full width at half maximum, arcsec.
    zeropoint : float
        AB magnitude giving 1 electron per second.
    sky_brightness : float
        Sky surface brightness, AB mag / arcsec^2.
    exposure_time : float
        Total exposure time of the survey in this band, s.
    effective_wavelength : float
        Effective wavelength, nm.
    psf_profile : str
        ``"kolmogorov"`` (ground) or ``"moffat"`` (space) for default PSFs.
    """

    name: str
    psf_fwhm: float
    zeropoint: float
    sky_brightness: float
    exposure_time: float
    effective_wavelength: float
    psf_profile: str

    @property
    def magzero(self) -> float:
        """AB magnitude of a source giving one electron over the full exposure."""
        return self.zeropoint + 2.5 * float(np.log10(self.exposure_time))


@dataclass(frozen=True)
class Survey:
    """A survey seen on one pixel grid.

    Attributes
    ----------
    name : str
        Survey name (``lsst``, ``euclid_vis``, ``euclid_nisp``).
    pixel_scale : float
        arcsec per pixel.
    effective_area : float
        Effective collecting area, m^2.
    bands : tuple of Band
        Bands in the survey's order.
    """

    name: str
    pixel_scale: float
    effective_area: float
    bands: tuple[Band, ...]

    @property
    def band_names(self) -> tuple[str, ...]:
        """Band names in survey order."""
        return tuple(b.name for b in self.bands)

    def band(self, name: str) -> Band:
        """Return the band called ``name`` (a clear error if unknown)."""
        for b in self.bands:
            if b.name == name:
                return b
        raise BayesblendError(
            f"unknown band {name!r} for survey {self.name!r}; known bands: {', '.join(self.band_names)}"
        )

    def band_index(self, name: str) -> int:
        """Position of band ``name`` in the survey order."""
        self.band(name)
        return self.band_names.index(name)

    def check_bands(self, names: Sequence[str]) -> tuple[str, ...]:
        """Validate a list of band names, returning them as a tuple."""
        for n in names:
            self.band(n)
        return tuple(names)

    @property
    def magzero(self) -> np.ndarray:
        """Per-band ``magzero`` (AB mag for one electron over the exposure)."""
        return np.array([b.magzero for b in self.bands], dtype=np.float64)

    def mag_to_counts(self, mag: np.ndarray | float, band: str) -> np.ndarray:
        """AB magnitude -> electrons over the full exposure in ``band``."""
        return np.power(10.0, -0.4 * (np.asarray(mag, dtype=np.float64) - self.band(band).magzero))

    def counts_to_mag(self, counts: np.ndarray | float, band: str) -> np.ndarray:
        """Electrons over the full exposure in ``band`` -> AB magnitude.

        Non-positive counts give NaN (no magnitude), never an exception.
        """
        return flux_to_mag(counts, self.band(band).magzero)

    def sky_counts(self, band: str) -> float:
        """Mean sky level, electrons per pixel over the full exposure."""
        b = self.band(band)
        return float(self.mag_to_counts(b.sky_brightness, band) * self.pixel_scale**2)

    def sky_level(self, bands: Sequence[str] | None = None) -> np.ndarray:
        """Sky level per band, electrons per pixel, shape ``(band,)``, float64.

        Parameters
        ----------
        bands : sequence of str, optional
            Bands in the order wanted (default: all of the survey's).
        """
        names = self.band_names if bands is None else self.check_bands(bands)
        return np.array([self.sky_counts(b) for b in names])

    def noise_sigma(self, band: str) -> float:
        """Sky-limited noise standard deviation per pixel, electrons."""
        return float(np.sqrt(self.sky_counts(band)))

    def psf_object(self, band: str, fwhm: float | None = None) -> galsim.GSObject:
        """GalSim PSF profile of ``band`` (unit flux), at ``fwhm`` arcsec if given."""
        b = self.band(band)
        f = b.psf_fwhm if fwhm is None else float(fwhm)
        if not np.isfinite(f) or f <= 0:
            raise BayesblendError(f"PSF FWHM must be positive, got {fwhm!r} for band {band!r}")
        if b.psf_profile == "kolmogorov":
            return galsim.Kolmogorov(fwhm=f)
        return galsim.Moffat(beta=MOFFAT_BETA, fwhm=f)

    def psf_image(self, band: str, size: int = 41, fwhm: float | None = None) -> np.ndarray:
        """Centred PSF image of ``band``, pixel-convolved, summing to one.

        Parameters
        ----------
        band : str
            Band name.
        size : int
            Side in pixels; odd so that the centre is a pixel centre.
        fwhm : float, optional
            PSF FWHM in arcsec (defaults to the band's median), for PSF jitter.

        Returns
        -------
        numpy.ndarray
            ``(size, size)`` float32 image with unit sum.
        """
        f = self.band(band).psf_fwhm if fwhm is None else float(fwhm)
        return _psf_image(self, band, size, f).copy()

    def psf_images(
        self,
        bands: Sequence[str] | None = None,
        size: int = 41,
        fwhm: Sequence[float] | None = None,
    ) -> np.ndarray:
        """PSF images for several bands, shape ``(band, size, size)``."""
        bands = self.band_names if bands is None else self.check_bands(bands)
        fw = [None] * len(bands) if fwhm is None else list(fwhm)
        return np.stack([self.psf_image(b, size, f) for b, f in zip(bands, fw, strict=True)])

    def bandpass(self, band: str) -> galsim.Bandpass:
        """GalSim bandpass (AB zeropoint) used to turn SEDs into colours."""
        return _bandpass(self.name, self.band(band).name)


def flux_to_mag(flux: np.ndarray | float, magzero: np.ndarray | float) -> np.ndarray:
    """AB magnitude ``magzero - 2.5 log10(flux)`` of fluxes in electrons; NaN where flux <= 0.

    Parameters
    ----------
    flux : array_like
        Electrons over the full exposure.
    magzero : array_like
        AB magnitude of one electron over the exposure (broadcast against ``flux``).
    """
    f = np.asarray(flux, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        m = np.asarray(magzero, dtype=np.float64) - 2.5 * np.log10(f)
    return np.where(f > 0, m, np.nan)


#: A NumPy or a JAX array: :func:`poisson_variance` serves both.
ArrayT = TypeVar("ArrayT")


def poisson_variance(mean: ArrayT, sky: ArrayT) -> ArrayT:
    """Per-pixel variance of a sky-subtracted image, electrons^2: ``sky + max(mean, 0)``.

    The survey's noise model (Poisson noise of the sky and of the sources'
    own light, in electrons over the full exposure), the one definition used
    to simulate scenes, to train the prior, to weight the likelihood when a
    scene has no variance plane, and to whiten residuals for detection.

    Parameters
    ----------
    mean : numpy.ndarray or jax.Array
        Expected sky-subtracted image ``(..., band, y, x)``, electrons.
    sky : numpy.ndarray or jax.Array
        Sky level per band ``(..., band)``, electrons per pixel.

    Returns
    -------
    Array of ``mean``'s kind and shape (NumPy in, NumPy out; JAX in, JAX out).
    """
    return sky[..., :, None, None] + mean.clip(0.0)


@functools.lru_cache(maxsize=256)
def _psf_image(survey: Survey, band: str, size: int, fwhm: float) -> np.ndarray:
    """Band ``band``'s PSF at ``fwhm`` arcsec on ``size`` pixels (pixel-convolved, unit sum)."""
    if size % 2 == 0 or size < 3:
        raise BayesblendError(f"PSF image size must be odd and >= 3, got {size}")
    img = survey.psf_object(band, fwhm).drawImage(nx=size, ny=size, scale=survey.pixel_scale)
    arr = img.array.astype(np.float64)
    return (arr / arr.sum()).astype(np.float32)


@functools.cache
def _bandpass(survey: str, band: str) -> galsim.Bandpass:
    if survey == "lsst":
        bp = galsim.Bandpass(f"LSST_{band}.dat", wave_type="nm")
    else:
        lo, hi = EUCLID_TOPHATS_NM[band]
        table = galsim.LookupTable([lo - 1, lo, hi, hi + 1], [0.0, 1.0, 1.0, 0.0], interpolant="linear")
        bp = galsim.Bandpass(table, wave_type="nm")
    return bp.thin(rel_err=1e-4).withZeropoint("AB")


def _from_codex(codex_name: str, name: str, profile: str) -> Survey:
    s = surveycodex.get_survey(codex_name)
    bands = []
    for f in s.available_filters:
        flt = s.get_filter(f)
        bands.append(
            Band(
                name=f,
                psf_fwhm=float(flt.psf_fwhm.to_value("arcsec")),
                zeropoint=float(flt.zeropoint.value),
                sky_brightness=float(flt.sky_brightness.value),
                exposure_time=float(flt.full_exposure_time.to_value("s")),
                effective_wavelength=float(flt.effective_wavelength.to_value("nm")),
                psf_profile=profile,
            )
        )
    return Survey(
        name=name,
        pixel_scale=float(s.pixel_scale.to_value("arcsec")),
        effective_area=float(s.effective_area.to_value("m2")),
        bands=tuple(bands),
    )


#: Surveys known to bayesblend, with the profile of their default PSFs.
_FACTORIES = {
    "lsst": lambda: _from_codex("LSST", "lsst", "kolmogorov"),
    "euclid_vis": lambda: _from_codex("Euclid_VIS", "euclid_vis", "moffat"),
    "euclid_nisp": lambda: _from_codex("Euclid_NISP", "euclid_nisp", "moffat"),
}


@functools.cache
def get_survey(name: str = "lsst") -> Survey:
    """Return a known survey by name (case-insensitive): lsst, euclid_vis, euclid_nisp."""
    key = str(name).lower().replace("-", "_")
    if key not in _FACTORIES:
        raise BayesblendError(f"unknown survey {name!r}; known surveys: {', '.join(_FACTORIES)}")
    return _FACTORIES[key]()


def available_surveys() -> tuple[str, ...]:
    """Names accepted by :func:`get_survey`."""
    return tuple(_FACTORIES)
