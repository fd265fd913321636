"""Canonical morphologies and true poses from the simulator (galaxy model v2 training data)."""

import galsim
import jax.numpy as jnp
import numpy as np
import pytest

from bayesblend import forward
from bayesblend.canonical import DEFAULT_FRAME, CanonicalFrame
from bayesblend.errors import BayesblendError
from bayesblend.simulate.galaxy import canonical_image, circularised_hlr, components, enclosed_fraction
from bayesblend.simulate.population import draw_catalog
from bayesblend.simulate.render import render_scene
from tests.conftest import make_layout


def _row(**kw):
    t = make_layout(0.0, 0.0, **{k: v for k, v in kw.items() if k in ("bulge_frac", "disk_hlr", "bulge_hlr")})
    for k in ("bulge_n", "knot_frac", "n_knots", "knot_seed"):
        if k in kw:
            t[k] = [kw[k]]
    return t[0]


def _radius_containing(img: np.ndarray, frac: float = 0.5) -> float:
    """Radius (pixels) enclosing ``frac`` of the light, by sub-pixel sampling of the image."""
    n = img.shape[-1]
    fine = 4
    yy, xx = (np.mgrid[: n * fine, : n * fine] + 0.5) / fine - 0.5 - (n - 1) / 2
    r = np.hypot(xx, yy).ravel()
    light = np.repeat(np.repeat(img, fine, 0), fine, 1).ravel() / fine**2
    order = np.argsort(r)
    return float(np.interp(frac, np.cumsum(light[order]), r[order]))


def test_truncated_sersic_half_light_radius_matches_galsim():
    bt, rb, rd, n = 0.6, 0.25, 0.7, 3.3
    ours = circularised_hlr(np.array([bt]), np.array([rb]), np.array([rd]), n)[0]
    comps = components(_row(bulge_frac=bt, bulge_hlr=rb, disk_hlr=rd, bulge_n=n))
    prof = bt * comps["bulge"] + (1 - bt) * comps["disk"]
    assert ours == pytest.approx(prof.calculateHLR(scale=0.01, size=1200), rel=2e-3)
    # the truncated profile holds all its light within the truncation radius
    assert enclosed_fraction(np.array([8.0]), 4.0)[0] == pytest.approx(1.0)
    assert enclosed_fraction(np.array([1.0]), 2.5)[0] == pytest.approx(0.5, abs=1e-6)


def test_canonical_image_is_round_unit_sum_and_at_the_canonical_size():
    row = _row(bulge_frac=0.4, bulge_hlr=0.2, disk_hlr=0.6, bulge_n=2.0)
    bt = np.array([0.6, 0.4, 0.2])  # redder bands more bulge-dominated: a colour gradient
    hlr_r = circularised_hlr(np.array([0.4]), np.array([0.2]), np.array([0.6]), 2.0)[0]
    img = canonical_image(row, bt, hlr_r)
    assert img.shape == (3, DEFAULT_FRAME.size, DEFAULT_FRAME.size) and img.dtype == np.float32
    assert img.min() >= 0
    np.testing.assert_allclose(img.sum(axis=(1, 2)), 1.0, rtol=1e-5)
    # the band with the r-band B/T has the canonical half-light radius; bulgier bands are smaller
    assert _radius_containing(img[1]) == pytest.approx(DEFAULT_FRAME.hlr_pixels, rel=0.03)
    assert _radius_containing(img[0]) < _radius_containing(img[1]) < _radius_containing(img[2])
    mom = galsim.hsm.FindAdaptiveMom(galsim.Image(img[1].astype(np.float64)))
    assert abs(mom.observed_shape.g1) < 1e-3 and abs(mom.observed_shape.g2) < 1e-3
    # against GalSim integrating the dilated profile over every pixel
    comps = components(row)
    scale = DEFAULT_FRAME.hlr_pixels / hlr_r
    prof = 0.4 * comps["bulge"] + 0.6 * comps["disk"]
    ref = prof.dilate(scale).withFlux(1.0).drawImage(nx=64, ny=64, scale=1.0, method="real_space").array
    assert np.abs(img[1] - ref / ref.sum()).max() < 0.01 * ref.max() / ref.sum()


def test_knots_make_an_irregular_canonical_image_of_the_right_size():
    row = _row(bulge_frac=0.0, disk_hlr=0.5, knot_frac=0.3, n_knots=12, knot_seed=5)
    img = canonical_image(row, np.array([0.0]), 0.5)[0]
    smooth = canonical_image(_row(bulge_frac=0.0, disk_hlr=0.5), np.array([0.0]), 0.5)[0]
    assert np.abs(img - smooth).max() > 0.2 * smooth.max()  # knots stand out
    assert _radius_containing(img) == pytest.approx(DEFAULT_FRAME.hlr_pixels, rel=0.25)
    np.testing.assert_allclose(img.sum(), 1.0, rtol=1e-5)


def test_canonical_image_with_the_true_pose_renders_the_simulated_galaxy(lsst):
    """The v2 contract end to end: canonical image + true pose through the renderer = GalSim's scene."""
    t = make_layout(24.3, 23.8, bulge_frac=0.3, disk_hlr=0.5, bulge_hlr=0.2, e1=0.3, e2=-0.2, mag_r=21.0)
    t["bulge_n"] = [3.0]
    out = render_scene(lsst, t, (48, 48), None, bands=("g", "r", "i"), canonical_for=[0])
    truth = out.truth[0]
    canon = out.canonical[0]
    assert canon.shape == (3, 64, 64)
    psf_ft = forward.psf_spectrum(out.scene.psf, 96)
    img = forward.render_pose(
        forward.canonical_spectrum(jnp.asarray(canon)),
        jnp.asarray([truth[f"flux_{b}"] for b in ("g", "r", "i")], jnp.float32),
        jnp.asarray([truth["e1"], truth["e2"]], jnp.float32),
        jnp.float32(truth["hlr"]),
        jnp.asarray([truth["x"] - 23.5, truth["y"] - 23.5], jnp.float32),
        psf_ft,
        stamp=48,
        pixel_scale=lsst.pixel_scale,
        hlr_pixels=DEFAULT_FRAME.hlr_pixels,
    )
    img = np.asarray(img)
    for b in range(3):
        peak = out.noiseless[b].max()
        assert np.abs(img[b] - out.noiseless[b]).max() < 0.01 * peak
        assert img[b].sum() == pytest.approx(out.noiseless[b].sum(), rel=5e-3)


def test_population_families_and_their_columns():
    rng = np.random.default_rng(4)
    t = draw_catalog(rng, 3000)
    assert {"bulge_n", "knot_frac", "n_knots", "knot_seed"} <= set(t.colnames)
    pure = np.asarray(t["bulge_frac"]) == 1
    assert np.all((t["bulge_n"][pure] >= 2.5) & (t["bulge_n"][pure] <= 5.0))
    assert np.all((t["bulge_n"][~pure] >= 1.0) & (t["bulge_n"][~pure] <= 4.0))
    knotty = np.asarray(t["n_knots"]) > 0
    assert np.all(np.asarray(t["bulge_frac"])[knotty] < 1)
    assert np.all((t["knot_frac"][knotty] >= 0.1) & (t["knot_frac"][knotty] <= 0.3))
    assert np.all(t["knot_frac"][~knotty] == 0)
    star_forming = np.isin(t["sed_disk"], [2, 3]) & ~pure
    assert np.mean(knotty[star_forming]) == pytest.approx(0.5, abs=0.05)
    s = draw_catalog(np.random.default_rng(4), 2000, family="sersic")
    assert np.all(s["bulge_frac"] == 1) and np.all(s["n_knots"] == 0)
    assert s["bulge_n"].min() >= 0.5 and s["bulge_n"].max() <= 4.0
    assert len(np.unique(s["sed_bulge"])) == 4
    with pytest.raises(BayesblendError, match="galaxy family"):
        draw_catalog(rng, 3, family="spiral")


def test_canonical_frame_refuses_bad_grids():
    with pytest.raises(BayesblendError, match="even"):
        CanonicalFrame(size=63)
    with pytest.raises(BayesblendError, match="half-light radius"):
        CanonicalFrame(size=64, hlr_pixels=20.0)
    assert CanonicalFrame.from_dict(DEFAULT_FRAME.to_dict()) == DEFAULT_FRAME
