import json
import subprocess
import sys

import numpy as np
import pytest

from bayesblend.cli import main
from bayesblend.errors import BayesblendError
from bayesblend.io import read_scene, read_table
from bayesblend.simulate.dataset import ShardDataset, simulate_dataset
from bayesblend.simulate.scenes import simulate_isolated


def test_shards_do_not_depend_on_workers_or_shard_size(tmp_path):
    a = simulate_dataset(
        "isolated", 6, tmp_path / "a", seed=5, fmt="shards", workers=1, shard_size=4, progress=False
    )
    b = simulate_dataset(
        "isolated", 6, tmp_path / "b", seed=5, fmt="shards", workers=2, shard_size=3, progress=False
    )
    da, db = ShardDataset(a), ShardDataset(b)
    assert len(da) == len(db) == 6
    for name in ("noisy", "noiseless", "canonical"):
        np.testing.assert_array_equal(da.load(name), db.load(name))
    # an item equals the same item simulated directly
    direct = simulate_isolated(5, 4)
    np.testing.assert_array_equal(da.load("noisy", [4])[0], direct.scene.image)
    assert da.psf([0, 1]).shape == (2, 6, 41, 41)
    assert len(da.truth()) == 6 and list(da.truth()["blend_id"]) == list(range(6))
    # simulating again into the same place replaces every shard whole, leaving no temporary behind
    before = np.array(da.load("noisy"))
    simulate_dataset(
        "isolated", 6, tmp_path / "a", seed=6, fmt="shards", workers=1, shard_size=4, progress=False
    )
    again = ShardDataset(tmp_path / "a")
    assert not np.array_equal(again.load("noisy"), before)
    np.testing.assert_array_equal(again.load("noisy", [4])[0], simulate_isolated(6, 4).scene.image)
    assert not [q.name for q in (tmp_path / "a").rglob(".*")]


def test_format_1_datasets_with_v1_model_frame_morphologies_are_still_read(tmp_path):
    from bayesblend.prior.train import PoseData

    path = simulate_dataset("isolated", 5, tmp_path / "d", seed=3, fmt="shards", workers=1, progress=False)
    new = json.loads((path / "dataset.json").read_text())
    assert new["format_version"] == 2 and "model_psf_fwhm" not in new
    assert not list(path.rglob("morphology.npy"))
    # what format 1 also wrote: the target's model-frame morphology and the model PSF's FWHM
    for shard in new["shards"]:
        np.save(path / shard["dir"] / "morphology.npy", np.zeros((shard["n"], 6, 48, 48), np.float32))
    (path / "dataset.json").write_text(json.dumps(new | {"format_version": 1, "model_psf_fwhm": 0.25}))
    old = ShardDataset(path)
    assert len(old) == 5 and old.load("noiseless").shape == (5, 6, 48, 48)
    batch = PoseData(path, validation_items=1).batch(np.arange(4))
    assert batch["canonical"].shape == (4, 6, 64, 64) and batch["clean"].shape == (4, 6, 48, 48)


def test_blend_shards_hold_targets_and_members(tmp_path):
    d = ShardDataset(
        simulate_dataset(
            "blends",
            3,
            tmp_path / "bl",
            seed=1,
            fmt="shards",
            workers=1,
            members=True,
            psf_jitter=0.05,
            progress=False,
        )
    )
    members, noiseless, target = d.load("members"), d.load("noiseless"), d.load("target")
    assert members.shape == (3, 4, 6, 48, 48)
    np.testing.assert_allclose(members.sum(axis=1), noiseless, rtol=1e-4, atol=1e-2)
    np.testing.assert_array_equal(members[:, 0], target)
    assert d.psf().shape == (3, 6, 41, 41)  # jittered: one PSF per stamp


def test_cli_writes_fits_scenes_and_truth(tmp_path):
    rc = main(["simulate", "shear-pairs", "--n", "1", "--out", str(tmp_path), "--of", "isolated", "--quiet"])
    assert rc == 0
    truth = read_table(tmp_path / "truth.fits")
    assert len(truth) == 10 and set(truth["rotated"]) == {True, False}
    scene = read_scene(tmp_path / truth["file"][0])
    assert scene.image.shape == (6, 48, 48)


def test_cli_bad_input_is_one_line_and_exit_code_2(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bayesblend.cli",
            "simulate",
            "blends",
            "--n",
            "2",
            "--out",
            str(tmp_path),
            "--bands",
            "g,x",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown band 'x'" in lines[0] and "Traceback" not in proc.stderr
    assert not list(tmp_path.iterdir())


def test_dataset_argument_errors(tmp_path):
    with pytest.raises(BayesblendError, match="training shards"):
        simulate_dataset("field", 1, tmp_path, fmt="shards")
    with pytest.raises(BayesblendError, match="at least 1"):
        simulate_dataset("blends", 0, tmp_path)
