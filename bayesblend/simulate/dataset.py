"""Simulated datasets on disk: scene-FITS files or training shards, generated in parallel.

Two layouts under an output directory:

- **fits** (``isolated``, ``blends``, ``field``, ``shear-pairs``): one scene-FITS
  file per scene (``<kind>_<index>.fits``; shear pairs add the variant,
  ``_g1<+|-|0>_g2<+|-|0>_r<0|1>``) and ``truth.fits``, one row per source with
  ``blend_id`` and ``file``.
- **shards** (``isolated``, ``blends``): for training, ``shard-NNNNN/`` holding
  ``.npy`` arrays (memory-mappable, non-executable) and ``truth.fits``, plus
  ``dataset.json`` describing the set. Arrays, float32, in electrons except
  ``canonical`` and ``psf`` (unit sum per band): ``noisy`` and ``noiseless``
  ``(item, band, y, x)``, ``canonical`` (target's canonical morphology,
  ``(item, band, N, N)`` in the frame named by ``dataset.json``'s
  ``canonical_frame``), ``psf`` ``(item, band, p, p)`` when the PSF is
  jittered (else one ``psf.npy`` ``(band, p, p)`` beside ``dataset.json``);
  for blends also ``target`` ``(item, band, y, x)`` (the target's noiseless
  isolated image) and, with ``members=True``, ``members``
  ``(item, 4, band, y, x)`` (every member's noiseless image, zero-padded).
  ``dataset.json`` holds ``format_version``, ``kind``, ``n``, ``seed``,
  ``survey``, ``bands``, ``magzero`` (per band, AB mag of one electron),
  ``sky`` (per band, electrons per pixel), ``pixel_scale`` (arcsec),
  ``canonical_frame``, the simulation ``options``, ``members``, ``shards``
  (directory and item count of each) and the run's ``seconds`` and ``workers``.

  Format version 2 (this one) drops two things of galaxy model v1 that
  version 1 wrote: the ``morphology`` array (the target's model-frame
  morphology, ``(item, band, y, x)``) and the manifest's ``model_psf_fwhm``.
  Version 1 datasets are still read: readers load arrays and manifest keys
  by name and ignore those two. (Version 1 datasets simulated before galaxy
  model v2 also lack ``canonical`` and ``canonical_frame``; the training
  loaders refuse them.)

Items are reproducible from ``(seed, index)`` alone (see
:mod:`bayesblend.simulate.scenes`), so any number of workers and any shard size
give the same data. Shards and files are written atomically.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from astropy.table import Table

from bayesblend.canonical import DEFAULT_FRAME
from bayesblend.errors import BayesblendError
from bayesblend.io import atomic_path, read_table, write_scene, write_table
from bayesblend.simulate.scenes import (
    SHEAR_DESIGN,
    check_stamp,
    shear_twins,
    simulate_blend,
    simulate_field,
    simulate_isolated,
    stack_truth,
)
from bayesblend.survey import get_survey

KINDS = ("isolated", "blends", "field", "shear-pairs")
SHARD_KINDS = ("isolated", "blends")
MAX_MEMBERS = 4
#: 2: no ``morphology`` array or ``model_psf_fwhm`` (version 1 had them; both versions are read alike).
FORMAT_VERSION = 2


def _sign(v: float) -> str:
    return "+" if v > 0 else "-" if v < 0 else "0"


def _make_fits_chunk(job: dict) -> Table:
    kind, seed, out = job["kind"], job["seed"], Path(job["out"])
    opts = job["options"]
    tables = []
    for index in job["indices"]:
        if kind == "shear-pairs":
            scenes = shear_twins(
                opts.get("of", "blends"), seed, index, opts.get("shear", 0.02), **opts["sim"]
            )
            for r in scenes:
                g1, g2 = r.truth["shear_g1"][0], r.truth["shear_g2"][0]
                rot = int(r.truth["rotated"][0])
                name = f"pair_{index:06d}_g1{_sign(g1)}_g2{_sign(g2)}_r{rot}.fits"
                write_scene(out / name, r.scene)
                r.truth["file"] = np.full(len(r.truth), name)
                tables.append(r.truth)
            continue
        maker = {"isolated": simulate_isolated, "blends": simulate_blend, "field": simulate_field}[kind]
        r = maker(seed, index, **opts["sim"])
        name = f"{kind}_{index:06d}.fits"
        write_scene(out / name, r.scene)
        r.truth["file"] = np.full(len(r.truth), name)
        tables.append(r.truth)
    return stack_truth(tables)


def _make_shard(job: dict) -> tuple[int, int]:
    kind, seed, shard_dir = job["kind"], job["seed"], Path(job["shard_dir"])
    opts = job["options"]
    arrays: dict[str, list[np.ndarray]] = {"noisy": [], "noiseless": [], "canonical": []}
    if opts["sim"].get("psf_jitter", 0.0) > 0:
        arrays["psf"] = []
    if kind == "blends":
        arrays["target"] = []
        if opts.get("members"):
            arrays["members"] = []
    tables = []
    for index in job["indices"]:
        if kind == "isolated":
            r = simulate_isolated(seed, index, canonical=True, **opts["sim"])
        else:
            r = simulate_blend(seed, index, canonical=True, **opts["sim"])
            arrays["target"].append(r.sources[0])
            if "members" in arrays:
                m = np.zeros((MAX_MEMBERS, *r.sources.shape[1:]), dtype=np.float32)
                m[: len(r.sources)] = r.sources[:MAX_MEMBERS]
                arrays["members"].append(m)
        arrays["noisy"].append(r.scene.image)
        arrays["noiseless"].append(r.noiseless)
        arrays["canonical"].append(r.canonical[0])
        if "psf" in arrays:
            arrays["psf"].append(r.scene.psf)
        tables.append(r.truth)
    tmp = shard_dir.with_name(f".{shard_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, items in arrays.items():
        np.save(tmp / f"{name}.npy", np.stack(items).astype(np.float32))
    stack_truth(tables).write(tmp / "truth.fits", format="fits")
    # a directory cannot be renamed onto a non-empty one: move the old shard aside first, so that
    # only the instant between the two renames has no shard, and no reader ever sees half of one
    old = shard_dir.with_name(f".{shard_dir.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if shard_dir.exists():
        os.replace(shard_dir, old)
    os.replace(tmp, shard_dir)
    shutil.rmtree(old, ignore_errors=True)
    return job["shard"], len(job["indices"])


def _pool_map(fn, jobs: list[dict], workers: int, total: int, desc: str, progress: bool):
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="scene", disable=not progress, file=sys.stderr)
    results = []
    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                results.append(fn(job))
                bar.update(len(job["indices"]))
        else:
            # spawn: safe even when the parent has imported JAX (fork is not).
            ctx = mp.get_context("spawn")
            with ctx.Pool(workers) as pool:
                for job, res in zip(jobs, pool.imap(fn, jobs), strict=True):
                    results.append(res)
                    bar.update(len(job["indices"]))
    finally:
        bar.close()
    return results


def simulate_dataset(
    kind: str,
    n: int,
    out: str | os.PathLike,
    seed: int = 0,
    survey: str = "lsst",
    fmt: str = "fits",
    workers: int | None = None,
    shard_size: int = 500,
    members: bool = False,
    shear: float = 0.02,
    of: str = "blends",
    progress: bool = True,
    **sim_options: Any,
) -> Path:
    """Simulate ``n`` items of ``kind`` into ``out``.

    Parameters
    ----------
    kind : {"isolated", "blends", "field", "shear-pairs"}
        What to simulate (shear pairs: ten scenes per item, see
        :func:`bayesblend.simulate.scenes.shear_twins`).
    n : int
        Number of items (stamps, blends, fields or shear-pair sets).
    out : path
        Output directory (created).
    seed : int
        Seed of the whole set.
    survey : str
        Survey name.
    fmt : {"fits", "shards"}
        Scene-FITS files + truth table, or training shards.
    workers : int, optional
        Worker processes (default: all cores).
    shard_size : int
        Items per shard / per job.
    members : bool
        Store every blend member's noiseless image in shards.
    shear : float
        Shear amplitude for shear pairs.
    of : {"isolated", "blends"}
        What shear pairs are made of.
    progress : bool
        Show a progress bar on stderr.
    **sim_options
        Passed to the item simulator (``stamp_size``, ``max_shift``,
        ``psf_jitter``, ``bands``, ``n_range``, ``annulus``, ``shape``,
        ``density``, ``mag_range``, ``family``).

    Returns
    -------
    pathlib.Path
        The output directory.
    """
    if kind not in KINDS:
        raise BayesblendError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    if fmt not in ("fits", "shards"):
        raise BayesblendError(f"unknown format {fmt!r}; choose 'fits' or 'shards'")
    if fmt == "shards" and kind not in SHARD_KINDS:
        raise BayesblendError(f"training shards are made for {' and '.join(SHARD_KINDS)}, not {kind!r}")
    if n < 1:
        raise BayesblendError(f"--n must be at least 1, got {n}")
    if shard_size < 1:
        raise BayesblendError(f"shard size must be at least 1, got {shard_size}")
    s = get_survey(survey)
    if "bands" in sim_options and sim_options["bands"] is not None:
        sim_options["bands"] = list(s.check_bands(sim_options["bands"]))
    if kind != "field":
        check_stamp(s, sim_options.get("stamp_size", 48), sim_options.get("max_shift", 0.0))
    sim_options = {k: v for k, v in sim_options.items() if v is not None}
    sim_options["survey"] = survey
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    workers = max(1, os.cpu_count() or 1) if workers is None else max(1, int(workers))
    chunks = [list(range(i, min(i + shard_size, n))) for i in range(0, n, shard_size)]
    options = {"sim": sim_options, "members": members, "shear": shear, "of": of}
    t0 = time.time()
    if fmt == "fits":
        jobs = [
            {"kind": kind, "seed": seed, "out": str(out), "indices": c, "options": options} for c in chunks
        ]
        tables = _pool_map(_make_fits_chunk, jobs, workers, n, f"simulate {kind}", progress)
        truth = stack_truth(tables)
        truth.meta.update({"KIND": kind, "SEED": seed, "SURVEY": survey, "NITEMS": n})
        write_table(out / "truth.fits", truth)
    else:
        jobs = [
            {
                "kind": kind,
                "seed": seed,
                "shard": k,
                "shard_dir": str(out / f"shard-{k:05d}"),
                "indices": c,
                "options": options,
            }
            for k, c in enumerate(chunks)
        ]
        _pool_map(_make_shard, jobs, workers, n, f"simulate {kind} shards", progress)
        bands = list(sim_options.get("bands") or s.band_names)
        if not sim_options.get("psf_jitter", 0.0) > 0:
            with atomic_path(out / "psf.npy") as tmp, open(tmp, "wb") as fh:
                np.save(fh, s.psf_images(bands))
        manifest = {
            "format_version": FORMAT_VERSION,
            "kind": kind,
            "n": n,
            "seed": seed,
            "survey": survey,
            "bands": bands,
            "magzero": [s.band(b).magzero for b in bands],
            "sky": s.sky_level(bands).tolist(),
            "pixel_scale": s.pixel_scale,
            "canonical_frame": DEFAULT_FRAME.to_dict(),
            "options": {k: v for k, v in sim_options.items()},
            "members": members,
            "shards": [{"dir": f"shard-{k:05d}", "n": len(c)} for k, c in enumerate(chunks)],
            "seconds": round(time.time() - t0, 2),
            "workers": workers,
        }
        with atomic_path(out / "dataset.json") as tmp:
            tmp.write_text(json.dumps(manifest, indent=1, default=_json_default))
    return out


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, tuple | np.ndarray):
        return list(o)
    raise TypeError(f"cannot serialise {type(o)}")


class ShardDataset:
    """Read-only view of a shard dataset (arrays memory-mapped).

    Parameters
    ----------
    path : path
        Directory with ``dataset.json``.

    Attributes
    ----------
    manifest : dict
        The contents of ``dataset.json``.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        mf = self.path / "dataset.json"
        if not mf.exists():
            raise BayesblendError(f"{self.path}: not a shard dataset (no dataset.json)")
        self.manifest = json.loads(mf.read_text())
        self._offsets = np.cumsum([0] + [s["n"] for s in self.manifest["shards"]])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def bands(self) -> list[str]:
        """Band names in order."""
        return list(self.manifest["bands"])

    def arrays(self, name: str) -> list[np.ndarray]:
        """The memory-mapped per-shard arrays called ``name``."""
        out = []
        for s in self.manifest["shards"]:
            f = self.path / s["dir"] / f"{name}.npy"
            if not f.exists():
                raise BayesblendError(f"{self.path}: shard {s['dir']} has no array {name!r}")
            out.append(np.load(f, mmap_mode="r"))
        return out

    def load(self, name: str, indices: Sequence[int] | None = None) -> np.ndarray:
        """Array ``name`` for ``indices`` (all items by default), in memory."""
        parts = self.arrays(name)
        if indices is None:
            return np.concatenate([np.asarray(p) for p in parts])
        idx = np.asarray(indices)
        shard = np.searchsorted(self._offsets, idx, side="right") - 1
        out = np.empty((idx.size, *parts[0].shape[1:]), dtype=np.float32)
        for k in np.unique(shard):
            sel = shard == k
            out[sel] = parts[k][idx[sel] - self._offsets[k]]
        return out

    def psf(self, indices: Sequence[int] | None = None) -> np.ndarray:
        """PSF images ``(item, band, p, p)`` (broadcast from the shared PSF when not jittered)."""
        shared = self.path / "psf.npy"
        if shared.exists():
            p = np.load(shared)
            k = len(self) if indices is None else len(np.asarray(indices))
            return np.broadcast_to(p, (k, *p.shape))
        return self.load("psf", indices)

    def truth(self) -> Table:
        """The concatenated truth table."""
        return stack_truth([read_table(self.path / s["dir"] / "truth.fits") for s in self.manifest["shards"]])

    @property
    def stamp(self) -> int:
        """Side of the stamps, pixels."""
        return int(self.manifest["options"].get("stamp_size", 48))

    def target_truth(self) -> Table:
        """One truth row per item: the stamp's galaxy, or a blend's centred target."""
        truth = self.truth()
        if "is_target" in truth.colnames:
            truth = truth[np.asarray(truth["is_target"])]
        if len(truth) != len(self):
            raise BayesblendError(f"{self.path}: truth has {len(truth)} targets for {len(self)} items")
        return truth

    @staticmethod
    def offsets(truth: Table, stamp: int) -> np.ndarray:
        """``(n, 2)`` ``(dx, dy)`` of each row's position from the stamp centre ``(S - 1) / 2``, pixels."""
        c = (stamp - 1) / 2.0
        return np.stack([np.asarray(truth["x"]) - c, np.asarray(truth["y"]) - c], 1).astype(np.float32)


__all__ = ["KINDS", "SHEAR_DESIGN", "ShardDataset", "simulate_dataset"]
