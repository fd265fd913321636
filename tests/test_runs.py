"""Runs on disk: a partitioned catalogue, resuming after a kill, refusing another run's directory,
and the same rows from a two-worker local Dask cluster."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.dataset as pads
import pytest
from astropy.table import Table

from bayesblend.errors import BayesblendError
from bayesblend.io import write_scene
from bayesblend.posterior import Posterior
from bayesblend.runs import deblend_files, read_catalog
from bayesblend.settings import InferenceConfig
from bayesblend.simulate.scenes import simulate_field

#: Amortised fits, a few draws, one blend per batch: several parts from small scenes.
QUICK = dict(method="amortised", config=InferenceConfig(num_draws=4, batch_size=1), redetect=False)


@pytest.fixture(scope="module")
def scene_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("scenes")
    paths = []
    for i in range(2):
        f = simulate_field(11, i, shape=(96, 96), density=25.0, mag_range=(20.0, 23.0))
        paths.append(str(write_scene(d / f"field_{i}.fits", f.scene)))
    return paths


@pytest.fixture(scope="module")
def full_run(scene_files, tmp_path_factory, prior):
    out = tmp_path_factory.mktemp("full")
    run = deblend_files(scene_files, out, prior=prior, workers=1, **QUICK)
    return run, Table.read(run.catalog)


def _same_rows(a: Table, b: Table) -> None:
    assert list(a["id"]) == list(b["id"])
    for c in ("blend_id", "scene", "x", "flux_r", "e1", "size", "flags"):
        assert np.array_equal(np.asarray(a[c]), np.asarray(b[c])), c


def test_run_writes_a_partitioned_catalogue_with_its_samples(full_run, scene_files):
    run, cat = full_run
    assert run.n_batches == run.n_blends > 2 and run.n_resumed == 0
    assert len(cat) == run.n_sources and list(cat["id"]) == list(range(run.n_sources))
    # every row names its scene file
    assert set(cat["file"]) == {"field_0.fits", "field_1.fits"}
    assert np.array_equal(
        np.asarray(cat["file"]).astype(str) == "field_1.fits", np.asarray(cat["scene"]) == 1
    )
    parts = sorted((run.out / "catalog").glob("part-*.parquet"))
    assert len(parts) == run.n_batches
    assert pads.dataset(str(run.out / "catalog")).to_table().num_rows == run.n_sources
    samples = sorted((run.out / "posterior").glob("part-*.nc"))
    assert [p.stem for p in samples] == [p.stem for p in parts]
    key = json.loads((run.out / "run.json").read_text())
    assert [f["name"] for f in key["files"]] == scene_files and key["method"] == "amortised"
    src = Table.read(run.out / "sources.parquet")
    assert len(src) == run.n_sources and set(src["origin"]) == {"detected"}


def test_a_killed_run_resumes_without_losing_or_repeating_rows(
    full_run, scene_files, tmp_path, prior, monkeypatch
):
    run, cat = full_run
    out = tmp_path / "killed"
    write = Posterior.write_catalog
    calls = []

    def dies_on_third(self, path):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed between writing a part's samples and its catalogue
        return write(self, path)

    monkeypatch.setattr(Posterior, "write_catalog", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        deblend_files(scene_files, out, prior=prior, workers=1, **QUICK)
    monkeypatch.undo()
    assert len(list((out / "catalog").glob("*.parquet"))) == 2 and not (out / "catalog.fits").exists()
    (out / "catalog" / ".part-00007.parquet.x1.tmp").write_text("half-written")  # a stray temporary file
    again = deblend_files(scene_files, out, prior=prior, workers=1, **QUICK)
    assert again.n_resumed == 2 and again.n_sources == run.n_sources
    assert not list((out / "catalog").glob(".*.tmp"))
    _same_rows(Table.read(again.catalog), cat)  # as if never interrupted
    assert len(read_catalog(out)) == run.n_sources
    # rerunning a finished run fits nothing and writes the same catalogue
    assert deblend_files(scene_files, out, prior=prior, workers=1, **QUICK).n_resumed == run.n_batches


def test_another_run_in_the_same_directory_is_refused_or_replaced(scene_files, tmp_path, prior):
    out = tmp_path / "o"
    deblend_files(scene_files[:1], out, prior=prior, workers=1, **QUICK)
    with pytest.raises(BayesblendError, match=r"holds another run \(differing in files \(.*field_1.fits\)\)"):
        deblend_files(scene_files, out, prior=prior, workers=1, **QUICK)
    with pytest.raises(BayesblendError, match="differing in seed"):
        deblend_files(scene_files[:1], out, prior=prior, workers=1, seed=3, **QUICK)
    (out / "run.json").unlink()
    with pytest.raises(BayesblendError, match="outputs without a run.json"):
        deblend_files(scene_files[:1], out, prior=prior, workers=1, **QUICK)
    run = deblend_files(scene_files[:1], out, prior=prior, workers=1, seed=3, overwrite=True, **QUICK)
    assert Table.read(run.catalog).meta["SEED"] == 3
    assert json.loads((out / "run.json").read_text())["seed"] == 3
    assert len(list((out / "posterior").glob("*.nc"))) == run.n_batches


def test_two_worker_local_cluster_gives_the_same_catalogue(
    full_run, scene_files, tmp_path, prior, monkeypatch
):
    import bayesblend.cluster

    started = []
    real = bayesblend.cluster.local_client

    def spy(workers=None):
        started.append(workers)
        return real(workers)

    monkeypatch.setattr(bayesblend.cluster, "local_client", spy)
    run = deblend_files(scene_files, tmp_path / "dask", prior=prior, workers=2, **QUICK)
    assert started == [2]  # the batches ran on the cluster's two workers
    _same_rows(Table.read(run.catalog), full_run[1])


def test_bad_run_options_and_fully_masked_scenes_are_one_line_errors(scene_files, tmp_path, prior):
    from bayesblend.errors import MaskedBlendError
    from bayesblend.io import read_scene

    with pytest.raises(BayesblendError, match="--workers must be at least 1"):
        deblend_files(scene_files, tmp_path / "o", prior=prior, workers=0, **QUICK)
    masked = read_scene(scene_files[0])
    masked.mask = np.ones(masked.image.shape, bool)
    path = write_scene(tmp_path / "masked.fits", masked)
    Table({"x": [40.0, 60.0], "y": [40.0, 50.0]}).write(tmp_path / "src.fits")
    with pytest.warns(UserWarning), pytest.raises(MaskedBlendError, match="every pixel of every blend"):
        deblend_files([path], tmp_path / "m", prior=prior, sources=tmp_path / "src.fits", workers=1, **QUICK)


def test_a_run_killed_during_the_pilot_fit_resumes_the_pilot(scene_files, tmp_path, prior, monkeypatch):
    quick = dict(QUICK, redetect=True)
    whole = deblend_files(scene_files, tmp_path / "whole", prior=prior, workers=1, **quick)
    out = tmp_path / "killed"
    real, saves = np.savez, []

    def dies_on_second(*args, **kwargs):
        saves.append(1)
        if len(saves) == 2:
            raise KeyboardInterrupt  # killed while saving the second pilot batch
        return real(*args, **kwargs)

    monkeypatch.setattr(np, "savez", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        deblend_files(scene_files, out, prior=prior, workers=1, **quick)
    monkeypatch.undo()
    assert len(list((out / "pilot").glob("pilot-*.npz"))) == 1 and not (out / "sources.parquet").exists()
    again = deblend_files(scene_files, out, prior=prior, workers=1, **quick)
    assert not (out / "pilot").exists()  # checkpoints removed once the sources are known
    a, b = Table.read(whole.out / "sources.parquet"), Table.read(out / "sources.parquet")
    assert np.array_equal(a["x"], b["x"]) and list(a["origin"]) == list(b["origin"])
    _same_rows(Table.read(again.catalog), Table.read(whole.catalog))


def test_the_final_fit_takes_the_pilots_map_of_the_blends_it_left_alone(
    scene_files, tmp_path, prior, monkeypatch
):
    import bayesblend.runs as runs
    from bayesblend.fitting import fit_blends

    cfg = InferenceConfig(num_draws=4, batch_size=2, map_steps=3)
    quick = dict(method="map", config=cfg, redetect=True, workers=1)
    real, reused = runs.pilot_optima, []

    def spy(*args):
        reused.append(real(*args))
        return reused[-1]

    monkeypatch.setattr(runs, "pilot_optima", spy)
    warm = deblend_files(scene_files[:1], tmp_path / "warm", prior=prior, **quick)
    assert len(reused[0]) > 0  # the pilot's MAP served some blends
    assert not (warm.out / "pilot").exists()  # and is removed at the end
    monkeypatch.setattr(runs, "pilot_optima", lambda *a: {})
    cold = deblend_files(scene_files[:1], tmp_path / "cold", prior=prior, **quick)
    a, b = Table.read(warm.catalog), Table.read(cold.catalog)
    assert list(a["id"]) == list(b["id"]) and np.array_equal(a["blend_id"], b["blend_id"])
    for c in ("x", "flux_r", "e1", "size"):
        assert np.allclose(np.asarray(a[c]), np.asarray(b[c]), rtol=1e-4, atol=1e-5), c

    # a MAP given as fitted is taken as it is, not optimised again: a start that is not the optimum stays
    from bayesblend.io import read_scene
    from bayesblend.plan import plan_scenes

    sc = read_scene(scene_files[0])
    src = Table.read(cold.out / "sources.parquet")
    planned = plan_scenes([sc], [(np.asarray(src["x"]), np.asarray(src["y"]))], prior, cfg)
    first = fit_blends(prior, [planned[0]], "map", config=cfg)[0]
    moved = {k: v + 0.01 for k, v in first["point"].items()}
    from bayesblend.fitting import iter_fits

    ((_, (again,), _),) = iter_fits(
        prior, [planned[0]], "map", config=cfg, fitted={0: {"point": moved, "map_trace": first["map_trace"]}}
    )
    for k in moved:
        assert np.allclose(again["point"][k], moved[k]), k
    assert np.array_equal(again["map_trace"], first["map_trace"])
