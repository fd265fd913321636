import galsim
import numpy as np
import pytest

from bayesblend.errors import BayesblendError
from bayesblend.simulate.render import lensed_ellipticity, render_scene
from bayesblend.simulate.scenes import (
    shear_twins,
    simulate_blend,
    simulate_field,
    simulate_isolated,
)
from bayesblend.simulate.truth import blendedness
from tests.conftest import make_layout


def test_noiseless_flux_equals_catalogue_flux(lsst):
    # A compact bulge+disk galaxy (SED fluxes) on a large stamp: the image sum is the catalogue flux.
    layout = make_layout(79.5, 79.5, bulge_frac=0.4, disk_hlr=0.4, bulge_hlr=0.15, mag_r=22.0)
    big = render_scene(lsst, layout, (160, 160), None)
    assert big.truth["mag_r"][0] == pytest.approx(22.0, abs=1e-9)
    for b in lsst.band_names:
        k = lsst.band_index(b)
        assert big.noiseless[k].sum() == pytest.approx(big.truth[f"flux_{b}"][0], rel=3e-3)
        mag = lsst.band(b).magzero - 2.5 * np.log10(big.truth[f"flux_{b}"][0])
        assert big.truth[f"mag_{b}"][0] == pytest.approx(mag, abs=1e-9)
    # A population galaxy on the usual stamp is truncated: the loss is what the truth reports.
    wide = simulate_isolated(7, 0, stamp_size=160, noise=False, mag_range=(21.0, 23.0))
    small = simulate_isolated(7, 0, stamp_size=48, noise=False, mag_range=(21.0, 23.0))
    for b in lsst.band_names:
        k = lsst.band_index(b)
        frac = small.truth[f"frac_in_image_{b}"][0]
        assert small.noiseless[k].sum() == pytest.approx(frac * small.truth[f"flux_{b}"][0], rel=1e-5)
        assert 0.8 < frac <= 1.0 + 1e-6
        # truncation measured against a 160-pixel stamp (itself within 1 % of the total)
        ratio = small.noiseless[k].sum() / wide.noiseless[k].sum()
        assert frac == pytest.approx(ratio * wide.truth[f"frac_in_image_{b}"][0], rel=1e-4)
        assert wide.truth[f"frac_in_image_{b}"][0] > 0.99


def _centroid(image):
    """Light centroid ``(x, y)`` of ``(..., y, x)`` images, pixels."""
    yy, xx = np.indices(image.shape[-2:])
    total = image.sum(axis=(-2, -1))
    return (image * xx).sum(axis=(-2, -1)) / total, (image * yy).sum(axis=(-2, -1)) / total


def test_noiseless_image_is_non_negative_and_centred_on_the_true_position(lsst):
    r = simulate_isolated(11, 3, max_shift=3.0, noise=False)
    m = r.noiseless.astype(np.float64)
    assert m.shape == (6, 48, 48) and m.min() >= 0
    assert abs(r.truth["x"][0] - 23.5) > 0.5  # shifted off the stamp centre
    cx, cy = _centroid(m)  # every band (light truncated by the stamp moves it a little)
    np.testing.assert_allclose(cx, r.truth["x"][0], atol=0.05)
    np.testing.assert_allclose(cy, r.truth["y"][0], atol=0.05)


def test_pixel_noise_variance_is_sky_plus_signal(lsst):
    layout = make_layout(23.5, 23.5, flux=3e7, bands=("g", "r"), disk_hlr=0.5)
    draws = np.stack(
        [render_scene(lsst, layout, (48, 48), noise_seed=s, bands=("g", "r")).scene.image for s in range(300)]
    )
    ref = render_scene(lsst, layout, (48, 48), noise_seed=None, bands=("g", "r"))
    expected = ref.scene.variance  # sky + signal
    var = draws.var(axis=0, ddof=1)
    ratio = var / expected
    assert ratio.mean() == pytest.approx(1.0, abs=0.02)
    bright = ref.noiseless > np.array([lsst.sky_counts("g"), lsst.sky_counts("r")])[:, None, None]
    assert bright.sum() > 20
    assert ratio[bright].mean() == pytest.approx(1.0, abs=0.05)
    assert draws.mean(axis=0).mean() == pytest.approx(ref.noiseless.mean(), rel=0.01)


def _adaptive_shape(image, scale, psf_sigma_arcsec):
    """PSF-corrected shear-type ellipticity from GalSim adaptive moments (Gaussian PSF subtracted)."""
    res = galsim.hsm.FindAdaptiveMom(galsim.Image(image.astype(np.float64), scale=scale))
    g = res.observed_shape
    sigma = res.moments_sigma * scale
    m = galsim.Shear(g1=g.g1, g2=g.g2).getMatrix()
    cov = sigma**2 * m @ m.T - psf_sigma_arcsec**2 * np.eye(2)
    e1 = (cov[0, 0] - cov[1, 1]) / (cov[0, 0] + cov[1, 1])
    e2 = 2 * cov[0, 1] / (cov[0, 0] + cov[1, 1])
    shear = galsim.Shear(e1=e1, e2=e2)
    return np.array([shear.g1, shear.g2])


#: A PSF FWHM (arcsec) far below the LSST pixel (0.2"): the noiseless image is then the lensed
#: galaxy itself (pixel-convolved), whose adaptive moments give its shape.
NARROW_PSF = 0.05


def test_applied_shear_comes_back_from_adaptive_moments_of_a_round_galaxy(lsst):
    g = (0.02, -0.013)
    layout = make_layout(47.5, 47.5, flux=1e6, bands=("r",), disk_hlr=1.0)
    out = render_scene(lsst, layout, (96, 96), None, bands=("r",), shear=g, psf_fwhm=[NARROW_PSF])
    measured = _adaptive_shape(out.noiseless[0], lsst.pixel_scale, NARROW_PSF / 2.3548)
    np.testing.assert_allclose(measured, g, atol=1e-3)
    np.testing.assert_allclose([out.truth["e1"][0], out.truth["e2"][0]], g, atol=1e-12)


def test_truth_ellipticity_of_a_sheared_elliptical_galaxy_matches_the_image(lsst):
    layout = make_layout(79.5, 79.5, flux=1e6, bands=("r",), disk_hlr=2.0, e1=0.3, e2=-0.15)
    out = render_scene(
        lsst, layout, (160, 160), None, bands=("r",), shear=(0.02, 0.01), psf_fwhm=[NARROW_PSF]
    )
    measured = _adaptive_shape(out.noiseless[0], lsst.pixel_scale, NARROW_PSF / 2.3548)
    truth = np.array([out.truth["e1"][0], out.truth["e2"][0]])
    np.testing.assert_allclose(truth, lensed_ellipticity(0.3, -0.15, 0.02, 0.01), atol=1e-12)
    np.testing.assert_allclose(measured, truth, atol=2e-3)


def test_blendedness_bounds_and_isolated_is_zero():
    iso = simulate_isolated(5, 1)
    assert iso.truth["b_tot"][0] == 0 and iso.truth["b_closest"][0] == 0
    assert np.isnan(iso.truth["dmag_closest"][0]) and iso.truth["closest_id"][0] == -1
    for i in range(6):
        t = simulate_blend(5, i).truth
        for c in ("b_tot", "b_closest"):
            assert np.all((t[c] >= 0) & (t[c] <= 1))
        assert t["is_target"][0] and t["mag_r"][0] == np.min(t["mag_r"])
        if len(t) > 1:
            j = t["closest_id"][0]
            assert t["dmag_closest"][0] == pytest.approx(t["mag_r"][j] - t["mag_r"][0])


def test_blendedness_of_identical_overlapping_galaxies():
    img = np.exp(-((np.arange(20) - 10.0) ** 2) / 8)[None, :] * np.ones((20, 1))
    stamps = [((0, 20, 0, 20), img), ((0, 20, 0, 20), img)]
    bc, bt, closest = blendedness(stamps, 2 * img, np.array([10.0, 10.0]), np.array([10.0, 10.0]))
    np.testing.assert_allclose(bc, 1.0)
    np.testing.assert_allclose(bt, 0.5)
    np.testing.assert_array_equal(closest, [1, 0])


def test_blend_members_sum_to_the_blend_and_sit_in_the_annulus(lsst):
    for i in range(5):
        r = simulate_blend(2, i, noise=False)
        np.testing.assert_allclose(r.sources.sum(axis=0), r.noiseless, rtol=1e-5, atol=1e-3)
        t = r.truth
        d = np.hypot(t["x"] - t["x"][0], t["y"] - t["y"][0]) * lsst.pixel_scale
        assert np.all((d[1:] >= 0.325 - 1e-9) & (d[1:] <= 2.0 + 1e-9))
        assert 1 <= len(t) <= 4


def test_each_blend_member_image_is_centred_on_its_own_true_position():
    r = simulate_blend(3, 0, noise=False)
    assert len(r.truth) >= 2
    # r band; star-forming knots and the stamp's edge move a member's centroid by up to ~0.1 pixel
    cx, cy = _centroid(r.sources[:, 2].astype(np.float64))
    np.testing.assert_allclose(cx, r.truth["x"], atol=0.2)
    np.testing.assert_allclose(cy, r.truth["y"], atol=0.2)


def test_same_seed_same_images_other_seed_other_images():
    a, b, c = simulate_blend(9, 4), simulate_blend(9, 4), simulate_blend(10, 4)
    np.testing.assert_array_equal(a.scene.image, b.scene.image)
    assert not np.array_equal(a.scene.image, c.scene.image)


def test_shear_twins_share_galaxies_and_noise_and_rotation_flips_ellipticity():
    twins = shear_twins("isolated", 4, 2, shear=0.02)
    assert len(twins) == 10
    base, rotated = twins[0], twins[5]
    assert base.truth["shear_g1"][0] == 0 and not base.truth["rotated"][0] and rotated.truth["rotated"][0]
    np.testing.assert_allclose(rotated.truth["e1_int"], -base.truth["e1_int"])
    np.testing.assert_allclose(rotated.truth["e2_int"], -base.truth["e2_int"])
    # the same noise realisation: image minus noiseless is identical up to Poisson on changed signal
    n0 = base.scene.image - base.noiseless
    n1 = twins[1].scene.image - twins[1].noiseless
    sky_only = base.noiseless < 1.0
    assert np.corrcoef(n0[sky_only], n1[sky_only])[0, 1] > 0.99
    # at zero shear a twin pair's ellipticities cancel exactly; under shear the pair mean is near g
    np.testing.assert_allclose(base.truth["e1"] + rotated.truth["e1"], 0.0, atol=1e-12)
    e_int = np.hypot(base.truth["e1_int"][0], base.truth["e2_int"][0])
    pair = (twins[1].truth["e1"][0] + twins[6].truth["e1"][0]) / 2
    assert abs(pair - 0.02) <= 0.02 * e_int**2 + 1e-6
    assert abs(pair - 0.02) < abs(twins[1].truth["e1"][0] - 0.02) or e_int < 1e-3


def test_field_density_and_truth(lsst):
    f = simulate_field(1, 0, shape=(128, 128), density=100.0)
    area = (128 * lsst.pixel_scale / 60) ** 2
    assert abs(len(f.truth) - 100 * area) < 5 * np.sqrt(100 * area)
    assert f.scene.image.shape == (6, 128, 128)
    assert np.all((f.truth["x"] >= -0.5) & (f.truth["x"] <= 127.5))
    assert np.all(np.isfinite(f.truth["ra"]))


def test_impossible_parameters_are_clear_errors(lsst):
    with pytest.raises(BayesblendError, match="negative or non-finite source flux in band"):
        render_scene(lsst, make_layout(10, 10, flux=-5.0, bands=("r",)), (20, 20), 0, bands=("r",))
    with pytest.raises(BayesblendError, match="unknown band 'w'"):
        simulate_isolated(0, bands=["g", "w"])
    with pytest.raises(BayesblendError, match="smaller than 4 x the widest PSF FWHM"):
        simulate_isolated(0, stamp_size=10)
    with pytest.raises(BayesblendError, match="annulus"):
        simulate_blend(0, annulus=(2.0, 1.0))
    with pytest.raises(BayesblendError, match=r"\|g\| < 1"):
        simulate_isolated(0, shear=(0.9, 0.9))
