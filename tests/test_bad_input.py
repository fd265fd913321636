"""Bad input to deblending and the deblend command: clear one-line errors, warnings, nothing half-written."""

import numpy as np
import pytest
from astropy.table import Table

from bayesblend import catalog as cat
from bayesblend import methods
from bayesblend.cli import main
from bayesblend.errors import BayesblendError, MaskedBlendWarning
from bayesblend.infer import deblend
from bayesblend.io import rows_per_scene, write_scene
from bayesblend.scene import Scene
from bayesblend.simulate.scenes import simulate_blend, simulate_isolated

QUICK = dict(method="map", map_steps=6, num_draws=20)


@pytest.fixture(scope="module")
def galaxy():
    return simulate_isolated(8, 0, mag_range=(21.0, 22.0))


def test_missing_band_is_a_one_line_error(prior, galaxy):
    with pytest.raises(BayesblendError, match="lacks band.*u.*z.*y"):
        deblend(galaxy.scene.select_bands(["g", "r", "i"]), prior=prior, **QUICK)


def test_empty_scene_gives_an_empty_catalogue_with_the_full_schema(prior, galaxy, tmp_path):
    sc = galaxy.scene
    rng = np.random.default_rng(0)
    blank = Scene(
        image=rng.normal(0, 1, sc.image.shape) * np.sqrt(sc.variance if sc.variance is not None else 100.0),
        bands=sc.bands,
        magzero=sc.magzero,
        psf=sc.psf,
        variance=sc.variance,
    )
    post = deblend(blank, prior=prior, **QUICK)
    c = post.catalog()
    assert len(c) == 0 and c.colnames == [n for n, *_ in cat.columns(prior.bands)]
    post.write_catalog(tmp_path / "empty.fits")
    assert len(Table.read(tmp_path / "empty.fits")) == 0
    post.to_netcdf(tmp_path / "empty.nc")


def test_nan_pixels_are_masked_with_a_warning_and_edge_sources_are_flagged(prior, galaxy):
    sc = galaxy.scene.select_bands(list(galaxy.scene.bands))
    sc.image = sc.image.copy()
    sc.image[3, 5:8, 5:8] = np.nan
    sc.image[2, 0, 0] = np.inf
    with pytest.warns(UserWarning, match="non-finite pixels masked"):
        post = deblend(sc, sources=np.array([[23.5, 23.5], [1.0, 30.0]]), prior=prior, **QUICK)
    c = post.catalog()
    assert np.isfinite(c["flux_r"]).all()
    assert c["flags"][1] & cat.FLAGS["EDGE"] and not c["flags"][0] & cat.FLAGS["EDGE"]
    assert not np.isnan(post.to_inference_data().observed_data["image"].values).all()


def _field(galaxy, seed, mask=False):
    """A field of two blends: the galaxy, a stamp of pure noise, the galaxy again (side by side in x)."""
    sc = galaxy.scene.select_bands(list(galaxy.scene.bands))
    noise = np.random.default_rng(seed).normal(0.0, 1.0, sc.image.shape) * np.sqrt(sc.variance)
    w = sc.image.shape[-1]
    field = Scene(
        image=np.concatenate([sc.image, noise, sc.image], axis=-1),
        bands=sc.bands,
        magzero=sc.magzero,
        psf=sc.psf,
        variance=np.concatenate([sc.variance] * 3, axis=-1),
        mask=np.zeros((len(sc.bands), sc.image.shape[1], 3 * w), bool) if mask else None,
    )
    return field, w


def test_bad_pixels_of_a_scene_of_many_blends_are_reported_once_with_the_scene_count(prior, galaxy):
    """A row of NaNs across a Python-built field of two blends, detected and re-detected: one warning
    for the scene (not one per blend, nor one per pass), counting the scene's bad pixels once."""
    import warnings

    from bayesblend.errors import BadPixelWarning

    field, w = _field(galaxy, 2)
    field.image[3, 30, :] = np.nan  # crosses both galaxies' cutouts
    field.variance[1, 5, 7] = 0.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        post = deblend(field, prior=prior, method="amortised", num_draws=8)
    said = [str(x.message) for x in caught if issubclass(x.category, BadPixelWarning)]
    assert said == [
        f"scene 0: {3 * w} non-finite pixels masked",
        "scene 0: 1 pixels with a non-finite or non-positive variance masked",
    ]
    assert len(post.catalog()) >= 2 and np.isfinite(post.catalog()["flux_r"]).all()


def test_sources_outside_the_scene_are_dropped_with_a_warning(prior, galaxy, tmp_path):
    with pytest.warns(UserWarning, match="outside the scene dropped"):
        post = deblend(galaxy.scene, sources=np.array([[23.5, 23.5], [90.0, 4.0]]), prior=prior, **QUICK)
    assert post.n_sources == 1
    # the user's own source list as a FITS table (any case of x, y), by path
    Table({"X": [23.2], "Y": [23.9]}).write(tmp_path / "mine.fits")
    compiled = len(methods._COMPILED)
    post = deblend(galaxy.scene, sources=tmp_path / "mine.fits", prior=prior, **QUICK)
    assert post.n_sources == 1
    assert len(methods._COMPILED) == compiled  # same padded source count and settings: not compiled again
    c = post.catalog()
    assert c["x_det"][0] == pytest.approx(23.2) and c["y_det"][0] == pytest.approx(23.9)
    with pytest.raises(BayesblendError, match="columns x and y"):
        deblend(galaxy.scene, sources=Table({"ra": [1.0]}), prior=prior, **QUICK)
    with pytest.raises(BayesblendError, match="finite"):
        deblend(galaxy.scene, sources=np.array([[np.nan, 3.0]]), prior=prior, **QUICK)


def test_missing_psf_uses_the_survey_psf_with_a_warning(prior, galaxy):
    sc = galaxy.scene.select_bands(list(galaxy.scene.bands))
    sc.psf = None
    with pytest.warns(UserWarning, match="default PSF"):
        post = deblend(sc, sources=np.array([[23.5, 23.5]]), prior=prior, **QUICK)
    t = galaxy.truth
    assert abs(post.catalog()["flux_r"][0] / (t["flux_r"][0] * t["frac_in_image_r"][0]) - 1) < 0.15


def test_fully_masked_blend_and_bad_method(prior, galaxy):
    sc = galaxy.scene.select_bands(list(galaxy.scene.bands))
    sc.mask = np.ones(sc.image.shape, bool)
    with pytest.raises(BayesblendError, match=r"every pixel of every blend is masked \(1 source\(s\)\)"):
        with pytest.warns(MaskedBlendWarning, match="of scene 0 in fully masked blends left out"):
            deblend(sc, sources=np.array([[23.5, 23.5]]), prior=prior, **QUICK)
    # a field of two blends, one of them entirely masked: the other is still deblended
    field, w = _field(galaxy, 1, mask=True)
    field.mask[..., : 2 * w] = True  # the first galaxy's whole cutout (cutouts are rounded up in size)
    with pytest.warns(
        MaskedBlendWarning,
        match=r"1 source\(s\) of scene 0 in fully masked blends left out, at x, y = \(23.5, 23.5\)",
    ):
        post = deblend(field, sources=np.array([[23.5, 23.5], [2 * w + 23.5, 23.5]]), prior=prior, **QUICK)
    c = post.catalog()
    assert len(c) == 1 and abs(c["x"][0] - (2 * w + 23.5)) < 1.0
    t = galaxy.truth
    assert abs(c["flux_r"][0] / (t["flux_r"][0] * t["frac_in_image_r"][0]) - 1) < 0.15
    with pytest.raises(BayesblendError, match="unknown method"):
        deblend(galaxy.scene, method="hmc", prior=prior)


def test_cli_deblend_writes_catalogue_posterior_and_figures(tmp_path, capsys):
    # the knot-free pair of tests/test_deblend.py: a galaxy with many star-forming knots can be detected
    # on a knot 1-2 px from its profile centre, and the fit then stays between the two
    r = simulate_blend(21, 19, n_range=(2, 3), mag_range=(20.0, 24.0))
    scene = write_scene(tmp_path / "scene.fits", r.scene)
    out = tmp_path / "out"
    assert (
        main(["deblend", str(scene), "--method", "map", "--draws", "30", "--out", str(out), "--quiet"]) == 0
    )
    c = Table.read(out / "catalog.fits")
    assert len(c) >= 1 and "flux_r" in c.colnames and c.meta["METHOD"] == "map"
    t = r.truth  # both galaxies found (detection, then the residual of the first fit)
    d = np.hypot(np.asarray(t["x"])[:, None] - c["x"][None], np.asarray(t["y"])[:, None] - c["y"][None])
    assert d.min(axis=1).max() < 1.5
    parts = sorted(p.stem for p in (out / "posterior").glob("part-*.nc"))  # the samples of every part
    assert parts and parts == sorted(p.stem for p in (out / "catalog").glob("part-*.parquet"))
    # one figure per blend (detection may find a source far enough away to make a blend of its own)
    n_blends = len(set(np.asarray(c["blend_id"]).tolist()))
    assert sorted(p.name for p in (out / "figures").iterdir()) == [
        f"blend_{i:04d}.png" for i in range(n_blends)
    ]
    assert "catalog.fits" in capsys.readouterr().out
    assert not list(out.glob(".*.tmp"))


@pytest.mark.parametrize(
    "content, message",
    [(b"this is not FITS", "not a FITS file"), (None, "no such file")],
)
def test_cli_malformed_scene_is_exit_2_with_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "bad.fits"
    if content is not None:
        path.write_bytes(content)
    code = main(["deblend", str(path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert (
        code == 2 and message in err and len(err.splitlines()) == 1 and err.startswith("bayesblend: error:")
    )
    assert not (tmp_path / "o" / "catalog.fits").exists()


def test_truncated_scene_files_are_reported_as_truncated(tmp_path, capsys, galaxy):
    """A scene file cut anywhere (inside a header, inside a data unit, at most of its length) is one
    'truncated FITS file' line, from Python and as exit 2 from the CLI; the whole file still reads."""
    from bayesblend.errors import SceneFormatError
    from bayesblend.io import read_scene

    whole = write_scene(tmp_path / "whole.fits", galaxy.scene).read_bytes()
    assert read_scene(tmp_path / "whole.fits").image.shape == galaxy.scene.image.shape
    for fraction in (0.001, 0.05, 0.3, 0.5, 0.9):
        cut = tmp_path / f"cut{fraction}.fits"
        cut.write_bytes(whole[: int(len(whole) * fraction)])
        with pytest.raises(SceneFormatError, match=f"truncated FITS file \\({cut.stat().st_size} bytes"):
            read_scene(cut)
    assert main(["deblend", str(cut), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "truncated FITS file" in err and len(err.splitlines()) == 1
    # cut at a block boundary inside a data unit: astropy's warning is the evidence
    cut.write_bytes(whole[: 2880 * (len(whole) // 2880 // 2)])
    with pytest.raises(SceneFormatError, match="truncated FITS file"):
        read_scene(cut)


def test_a_band_of_nans_is_masked_once_with_the_file_named_and_detection_uses_the_others(tmp_path, galaxy):
    import warnings

    from bayesblend.detect import detect_sources
    from bayesblend.io import read_scene

    sc = galaxy.scene
    bad = Scene(sc.image.copy(), sc.bands, sc.magzero, psf=sc.psf, variance=sc.variance)
    bad.image[0] = np.nan
    path = write_scene(tmp_path / "nan_u.fits", bad)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read = read_scene(path)
        found = detect_sources(read)
    said = [str(w.message) for w in caught]
    assert said == [f"{path}: band 'u' without a finite, unmasked pixel: masked"], said
    assert read.mask[0].all() and not read.mask[1:].any() and np.isfinite(read.image).all()
    t = galaxy.truth
    assert len(found) >= 1 and np.hypot(found["x"] - t["x"][0], found["y"] - t["y"][0]).min() < 1.5
    nothing = Scene(np.full_like(sc.image, np.nan), sc.bands, sc.magzero, psf=sc.psf)
    with pytest.raises(BayesblendError, match="no band has a finite, unmasked pixel"):
        detect_sources(nothing)


def test_cli_sources_file_needs_x_y(tmp_path, capsys, galaxy):
    scene = write_scene(tmp_path / "s.fits", galaxy.scene)
    Table({"ra": [1.0], "dec": [2.0]}).write(tmp_path / "src.fits")
    code = main(
        ["deblend", str(scene), "--sources", str(tmp_path / "src.fits"), "--out", str(tmp_path / "o")]
    )
    assert code == 2 and "columns x and y" in capsys.readouterr().err


def test_bad_psf_images_are_one_line_errors_and_an_unnormalised_one_is_fixed(galaxy):
    sc = galaxy.scene
    nb = len(sc.bands)

    def with_psf(psf):
        return Scene(image=sc.image, bands=sc.bands, magzero=sc.magzero, psf=psf)

    with pytest.raises(BayesblendError, match="square with an odd side"):
        with_psf(sc.psf[:, 1:, 1:])  # 40 x 40: would sit half a pixel off
    bad = sc.psf.copy()
    bad[2, 0, 0] = np.nan
    with pytest.raises(BayesblendError, match="non-finite"):
        with_psf(bad)
    with pytest.raises(BayesblendError, match="non-positive sum"):
        with_psf(-sc.psf)
    with pytest.raises(BayesblendError, match=f"{nb} bands"):
        with_psf(sc.psf[:2])
    with pytest.warns(UserWarning, match="normalised to 1"):
        fixed = with_psf(2.5 * sc.psf)
    np.testing.assert_allclose(fixed.psf.sum(axis=(1, 2)), 1.0, rtol=1e-5)
    np.testing.assert_allclose(fixed.psf, sc.psf / sc.psf.sum(axis=(1, 2), keepdims=True), rtol=1e-5)


def test_scene_at_another_pixel_scale_is_refused(prior, galaxy):
    sc = galaxy.scene
    other = Scene(image=sc.image, bands=sc.bands, magzero=sc.magzero, psf=sc.psf, pixel_scale=0.1)
    with pytest.raises(BayesblendError, match="pixel scale 0.1 arcsec differs from the prior's 0.2"):
        deblend(other, prior=prior, **QUICK)


@pytest.mark.parametrize(
    "toml, message",
    [
        ("kind = 'canonical-vae'\nsteps = ", "not valid TOML"),
        ("kind = 'canonical-vae'\nsteps = 'many'", "steps must be int"),
        (
            "kind = 'canonical-vae'\ndecoder_features = [64, 'wide']",
            "decoder_features must be a list of integers",
        ),
        ("kind = 'canonical-vae'\nout = 'NOWHERE'", "no VAE checkpoint"),
        ("kind = 'vae'", "galaxy model v1"),
    ],
)
def test_cli_train_config_errors_are_one_line_exit_2(tmp_path, capsys, toml, message):
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml.replace("NOWHERE", str(tmp_path / "no-run")))
    assert main(["train", "flow", "--config", str(cfg), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("bayesblend: error:")


def test_cli_unusable_paths_are_one_line_exit_2(tmp_path, capsys, galaxy):
    scene = write_scene(tmp_path / "s.fits", galaxy.scene)
    (tmp_path / "taken").write_text("a file")
    assert main(["deblend", str(scene), "--out", str(tmp_path / "taken")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    Table({"ra": [1.0]}).write(tmp_path / "truth.fits")
    assert main(["deblend", str(scene), "--truth", str(tmp_path / "truth.fits"), "--out", str(tmp_path)]) == 2
    assert "needs columns x and y" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{not json")
    assert main(["shear-bias", "--report", "--n", "1", "--out", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a readable run configuration" in err and len(err.splitlines()) == 1


def test_truth_rows_go_to_their_own_scene(tmp_path):
    files = ["blends_000000.fits", "blends_000001.fits", "blends_000001.fits"]
    Table({"x": [1.0, 2.0, 3.0], "y": [0.0, 0.0, 0.0], "file": files}).write(tmp_path / "truth.fits")
    truth = Table.read(tmp_path / "truth.fits")  # FITS strings, as `bayesblend simulate` writes them
    a, b = rows_per_scene(truth, ["sims/blends_000001.fits", "blends_000000.fits"], "truth.fits", "truth")
    assert list(a["x"]) == [2.0, 3.0] and list(b["x"]) == [1.0]
    by_index = rows_per_scene(Table({"x": [1.0, 2.0], "y": [0.0, 0.0], "scene": [1, 0]}), ["a", "b"], "t")
    assert [list(t["x"]) for t in by_index] == [[2.0], [1.0]]
    assert len(rows_per_scene(Table({"x": [1.0], "y": [1.0]}), ["a.fits"], "t")[0]) == 1
    with pytest.raises(BayesblendError, match="several scenes needs a 'scene' column"):
        rows_per_scene(Table({"x": [1.0], "y": [1.0]}), ["a.fits", "b.fits"], "t")
    with pytest.warns(UserWarning) as caught:
        a, b = rows_per_scene(truth, ["renamed.fits", "blends_000000.fits"], "truth.fits", "truth")
    said = [str(w.message) for w in caught]
    assert any("no truth rows for renamed.fits" in m for m in said)
    assert any("2 truth row(s) name scenes not given (blends_000001)" in m for m in said)
    assert len(a) == 0 and len(b) == 1


def test_source_rows_go_to_the_scene_they_name(tmp_path):
    """--sources for many scenes: the 'scene' column is the file name without .fits; it wins over an index."""
    t = Table({"x": [1.0, 2.0, 3.0, 4.0], "y": [0.0] * 4, "scene": ["b", "a", "b.fits", "c"]})
    t.write(tmp_path / "src.fits")
    t = Table.read(tmp_path / "src.fits")
    with pytest.warns(UserWarning, match="1 source row.s. name scenes not given .c.: left out"):
        a, b = rows_per_scene(t, ["dir/a.fits", "b.fits"], "src.fits")
    assert list(a["x"]) == [2.0] and list(b["x"]) == [1.0, 3.0]
    both = Table({"x": [1.0, 2.0], "y": [0.0, 0.0], "scene": [0, 0], "file": ["b.fits", "a.fits"]})
    a, b = rows_per_scene(both, ["a.fits", "b.fits"], "t")  # the file name, not the index, decides
    assert list(a["x"]) == [2.0] and list(b["x"]) == [1.0]


def test_bayesblend_deblend_is_the_inference_entry_point():
    import bayesblend

    assert bayesblend.deblend is deblend and "deblend" in bayesblend.__all__
    with pytest.raises(AttributeError, match="no attribute 'deblender'"):
        bayesblend.deblender  # noqa: B018


def test_cli_sources_for_many_scenes_deblend_in_one_process_compiled_once(tmp_path, capsys):
    """One source list for three scene files: rows go to the scene they name, one compilation for all."""
    sims = [simulate_isolated(8, i, mag_range=(20.0 + i, 20.3 + i)) for i in range(3)]  # 1 mag apart
    paths = [str(write_scene(tmp_path / f"field_{i}.fits", s.scene)) for i, s in enumerate(sims)]
    order = [2, 0, 1]  # rows in another order than the files
    Table(
        {
            "x": [float(sims[k].truth["x"][0]) for k in order],
            "y": [float(sims[k].truth["y"][0]) for k in order],
            "scene": [f"field_{k}" for k in order],
        }
    ).write(tmp_path / "src.fits")
    compiled = len(methods._COMPILED)
    args = ["deblend", *paths, "--sources", str(tmp_path / "src.fits"), "--method", "amortised"]
    assert main([*args, "--draws", "8", "--no-figures", "--quiet", "--out", str(tmp_path / "o")]) == 0
    assert len(methods._COMPILED) <= compiled + 1  # three scenes, one padded size: one program
    assert "3 sources in 3 blends from 3 scene(s)" in capsys.readouterr().out
    c = Table.read(tmp_path / "o" / "catalog.fits")
    assert sorted(c["scene"]) == [0, 1, 2]
    for row in c:  # each scene fitted at its own galaxy: its position, and its magnitude (1 mag apart)
        truth = sims[int(row["scene"])].truth[0]
        assert row["x_det"] == pytest.approx(truth["x"]) and row["y_det"] == pytest.approx(truth["y"])
        assert abs(row["mag_r"] - truth["mag_r"]) < 0.3
