import numpy as np
import pytest
from astropy.io import fits

from bayesblend.errors import SceneFormatError
from bayesblend.io import read_scene, write_scene
from bayesblend.scene import Scene
from bayesblend.simulate.scenes import simulate_blend


def test_scene_fits_round_trip_is_exact(tmp_path):
    r = simulate_blend(3, 1)
    scene = r.scene
    scene.mask = np.zeros(scene.image.shape, dtype=bool)
    scene.mask[2, 5:9, 7] = True
    path = write_scene(tmp_path / "s.fits", scene)
    back = read_scene(path)
    assert back.bands == scene.bands and back.survey == "lsst"
    np.testing.assert_array_equal(back.image, scene.image)
    np.testing.assert_array_equal(back.variance, scene.variance)
    np.testing.assert_array_equal(back.psf, scene.psf)
    np.testing.assert_array_equal(back.mask, scene.mask)
    np.testing.assert_array_equal(back.magzero, scene.magzero)
    assert back.pixel_scale == scene.pixel_scale
    xy = np.array([[3.0, 40.0], [20.5, 7.25]])
    np.testing.assert_allclose(back.wcs.wcs_pix2world(xy, 0), scene.wcs.wcs_pix2world(xy, 0), atol=1e-12)
    assert not list(tmp_path.glob("*.tmp"))  # nothing half-written left behind


def test_extension_names_are_case_insensitive_and_defaults_apply(tmp_path, lsst):
    img = np.random.default_rng(0).normal(size=(10, 12)).astype(np.float32)
    hdus = [fits.PrimaryHDU()]
    for b in ("g", "r"):
        h = fits.ImageHDU(img, name=f"image_{b}")
        h.header["FILTER"] = b
        hdus.append(h)
    fits.HDUList(hdus).writeto(tmp_path / "min.fits")
    s = read_scene(tmp_path / "min.fits")
    assert s.bands == ("g", "r") and s.survey == "lsst"
    assert s.magzero[1] == pytest.approx(lsst.band("r").magzero)  # documented default
    assert s.pixel_scale == pytest.approx(0.2) and s.psf is None and s.variance is None


@pytest.mark.parametrize(
    "content, message",
    [
        (b"this is not fits", "not a FITS file"),
        (None, "no IMAGE_<band> extension"),
    ],
)
def test_not_a_scene_is_one_line_error(tmp_path, content, message):
    path = tmp_path / "bad.fits"
    if content is None:
        fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.zeros((3, 3)), name="OTHER")]).writeto(path)
    else:
        path.write_bytes(content)
    with pytest.raises(SceneFormatError, match=message) as info:
        read_scene(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_missing_band_extension_and_unknown_zeropoint(tmp_path):
    hdus = [fits.PrimaryHDU(), fits.ImageHDU(np.zeros((4, 4), np.float32), name="IMAGE_r")]
    hdus[0].header["BANDS"] = "r,i"
    fits.HDUList(hdus).writeto(tmp_path / "a.fits")
    with pytest.raises(SceneFormatError, match="band 'i' listed in BANDS has no IMAGE_i"):
        read_scene(tmp_path / "a.fits")
    hdus = [fits.PrimaryHDU(), fits.ImageHDU(np.zeros((4, 4), np.float32), name="IMAGE_Q")]
    hdus[1].header["FILTER"] = "Q"
    fits.HDUList(hdus).writeto(tmp_path / "b.fits")
    with pytest.raises(SceneFormatError, match="no MAGZERO"):
        read_scene(tmp_path / "b.fits")


def test_scene_validates_shapes():
    with pytest.raises(Exception, match="one value per band"):
        Scene(image=np.zeros((2, 4, 4)), bands=("g", "r"), magzero=[30.0])
    with pytest.raises(Exception, match="variance has shape"):
        Scene(image=np.zeros((2, 4, 4)), bands=("g", "r"), magzero=[30.0, 30.0], variance=np.ones((2, 3, 4)))
