import galsim
import numpy as np
import pytest
from surveycodex.utilities import mag2counts, mean_sky_level

from bayesblend.errors import BayesblendError
from bayesblend.survey import available_surveys, get_survey


def test_counts_match_surveycodex(lsst):
    for b in lsst.band_names:
        ours = lsst.mag_to_counts(24.0, b)
        theirs = mag2counts(24.0, "LSST", b).value
        assert abs(ours - theirs) <= 1.0 + 1e-6 * theirs  # surveycodex truncates to int
        # surveycodex rounds counts per arcsec^2 to integers before scaling by the pixel area
        assert lsst.sky_counts(b) == pytest.approx(mean_sky_level("LSST", b).value, abs=0.05)


def test_magnitude_round_trip(lsst):
    mags = np.array([18.0, 22.5, 27.5])
    for b in lsst.band_names:
        back = lsst.counts_to_mag(lsst.mag_to_counts(mags, b), b)
        np.testing.assert_allclose(back, mags, atol=1e-10)
        assert lsst.band(b).magzero == pytest.approx(
            lsst.band(b).zeropoint + 2.5 * np.log10(lsst.band(b).exposure_time)
        )
    assert np.isnan(lsst.counts_to_mag(-5.0, "r"))


def test_noise_is_sky_limited_sqrt(lsst):
    assert lsst.noise_sigma("i") == pytest.approx(np.sqrt(lsst.sky_counts("i")))
    # deeper sky in the red: more sky counts in y than in u
    assert lsst.sky_counts("y") > lsst.sky_counts("u")


def test_unknown_band_and_survey_are_clear_errors(lsst):
    with pytest.raises(BayesblendError, match="unknown band 'q'.*u, g, r, i, z, y"):
        lsst.band("q")
    with pytest.raises(BayesblendError, match="unknown survey 'hst'"):
        get_survey("hst")


def test_psf_image_is_normalised_centred_and_has_the_band_fwhm(lsst):
    for b in ("u", "r", "y"):
        img = lsst.psf_image(b, size=41)
        assert img.shape == (41, 41)
        assert img.sum() == pytest.approx(1.0, abs=1e-5)
        yy, xx = np.mgrid[:41, :41]
        assert (img * xx).sum() == pytest.approx(20.0, abs=1e-3)
        assert (img * yy).sum() == pytest.approx(20.0, abs=1e-3)
        # pixel-convolved, so a little wider than the band's FWHM
        fwhm = galsim.Image(img.astype(np.float64), scale=lsst.pixel_scale).calculateFWHM()
        assert lsst.band(b).psf_fwhm * 0.97 < fwhm < lsst.band(b).psf_fwhm * 1.15
    wide = lsst.psf_image("r", fwhm=1.2)
    assert wide.max() < lsst.psf_image("r").max()
    with pytest.raises(BayesblendError, match="odd"):
        lsst.psf_image("r", size=40)


def test_euclid_surveys_defined_alike():
    assert set(available_surveys()) >= {"lsst", "euclid_vis", "euclid_nisp"}
    vis, nisp = get_survey("euclid_vis"), get_survey("euclid_nisp")
    assert vis.band_names == ("IE",) and vis.pixel_scale == pytest.approx(0.1)
    assert nisp.band_names == ("YE", "JE", "HE") and nisp.pixel_scale == pytest.approx(0.3)
    for s in (vis, nisp):
        for b in s.band_names:
            assert s.psf_image(b, size=21).sum() == pytest.approx(1.0, abs=1e-5)
