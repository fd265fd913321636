import numpy as np
import pytest

from bayesblend.errors import BayesblendError
from bayesblend.simulate.galaxy import circularised_hlr
from bayesblend.simulate.population import (
    COUNTS_SLOPE,
    band_fluxes,
    draw_catalog,
    number_density,
)


@pytest.fixture(scope="module")
def cat():
    return draw_catalog(np.random.default_rng(3), 20000)


def test_ellipticity_dispersion_is_0p26_per_component(cat):
    for c in ("e1_int", "e2_int"):
        assert np.std(cat[c]) == pytest.approx(0.26, abs=0.008)
        assert abs(np.mean(cat[c])) < 0.01
    e = np.hypot(cat["e1_int"], cat["e2_int"])
    assert e.max() < 1.0


def test_number_counts_slope_and_magnitude_cut(cat):
    mag = np.asarray(cat["mag_r_ref"])
    assert mag.min() >= 18.0 and mag.max() <= 27.5
    hist, edges = np.histogram(mag, bins=np.arange(22.0, 27.51, 0.5))
    slope = np.polyfit(0.5 * (edges[1:] + edges[:-1]), np.log10(hist), 1)[0]
    assert slope == pytest.approx(COUNTS_SLOPE, abs=0.03)
    assert 150 < number_density() < 300  # galaxies / arcmin^2 to r = 27.5


def test_fainter_galaxies_are_smaller_and_further(cat):
    mag = np.asarray(cat["mag_r_ref"])
    bright, faint = mag < 24, mag > 26.5
    assert np.median(cat["disk_hlr"][bright]) > 1.5 * np.median(cat["disk_hlr"][faint])
    assert np.median(cat["redshift"][bright]) < np.median(cat["redshift"][faint])


def test_r_band_magnitude_is_the_population_magnitude(cat, lsst):
    flux, bt = band_fluxes(lsst, cat[:500])
    r = lsst.band_index("r")
    np.testing.assert_allclose(lsst.counts_to_mag(flux[:, r], "r"), cat["mag_r_ref"][:500], atol=1e-9)
    np.testing.assert_allclose(bt[:, r], cat["bulge_frac"][:500], atol=1e-12)
    # bulges are redder than disks: B/T grows from g to i for mixed galaxies
    mixed = (cat["bulge_frac"][:500] > 0.1) & (cat["bulge_frac"][:500] < 0.9)
    assert np.mean(bt[mixed, lsst.band_index("i")] > bt[mixed, lsst.band_index("g")]) > 0.9


def test_circularised_hlr_limits():
    np.testing.assert_allclose(
        circularised_hlr(np.array([0.0]), np.array([0.3]), np.array([1.0])), 1.0, rtol=1e-6
    )
    np.testing.assert_allclose(
        circularised_hlr(np.array([1.0]), np.array([0.3]), np.array([1.0])), 0.3, rtol=1e-6
    )


def test_bad_population_parameters():
    with pytest.raises(BayesblendError, match="mag_min < mag_max"):
        draw_catalog(np.random.default_rng(0), 5, mag_min=27.0, mag_max=20.0)
    with pytest.raises(BayesblendError, match=">= 0"):
        draw_catalog(np.random.default_rng(0), -1)
