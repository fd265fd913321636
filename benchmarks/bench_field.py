"""Whole-image benchmark (issue 25 item 6): one large simulated field deblended end to end.

For a field made by ``bayesblend simulate field --size 2048`` (LSST depth, the population's number
counts to r = 27.5), it records in ``--json``:

- detection: the sources found with the image whole and cut into tiles of two other sizes, and how
  far the lists differ (they should not);
- the run (:func:`bayesblend.runs.deblend_files`, MAP by default) on a local Dask cluster of
  ``--workers`` processes: wall time, sources per second, the peak memory of each worker (Dask's
  own monitor), and the run's batches (resumable: rerunning the same command continues a killed run,
  and the time then counts only this call);
- the blends of the run's sources by the linking length alone and with shared footprints joined;
- completeness (detected and fitted within 1.5 pixels of a true galaxy) by true r magnitude and
  S/N, and the median |flux_r / true - 1| of matched galaxies at true S/N > 10 and > 30.

Run (each from the repository root; ``--workers 1`` and ``2`` give the scaling ratio)::

    .venv/bin/bayesblend simulate field --n 1 --size 2048 --seed 21 --out data/field2048
    .venv/bin/python benchmarks/bench_field.py --field data/field2048 --workers 2 \\
        --out data/field2048-run-w2 --json benchmarks/field/lsst-v2-map-2048-w2.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from astropy.table import Table

from bayesblend.blends import group_sources
from bayesblend.cluster import local_client
from bayesblend.detect import detect_sources, footprint_pairs, match_sources
from bayesblend.fitting import fit_blends
from bayesblend.io import read_scene
from bayesblend.plan import plan_scenes
from bayesblend.prior.bundle import load_bundle
from bayesblend.runs import deblend_files
from bayesblend.settings import InferenceConfig


def tiling(scene, bands: list[str]) -> dict:
    """Sources found whole and with 1024- and 512-pixel tiles; the largest position difference."""
    sc = scene.select_bands(bands)
    out, base = {}, None
    for size in (None, 1024, 512):
        t0 = time.perf_counter()
        det = detect_sources(sc, tile_size=size)
        out[str(size or "whole")] = {"n": len(det), "seconds": round(time.perf_counter() - t0, 2)}
        xy = np.c_[det["x"], det["y"]]
        if base is None:
            base = xy
        elif len(xy) and len(base):
            d = np.hypot(base[:, None, 0] - xy[None, :, 0], base[:, None, 1] - xy[None, :, 1]).min(axis=1)
            out[str(size)]["unmatched_of_whole"] = int(np.sum(d > 1e-3))
            out[str(size)]["max_shift_pixels"] = float(d[d <= 1e-3].max()) if np.any(d <= 1e-3) else None
    return out


def grouping(scene, out: Path, bundle) -> dict:
    """The run's sources in blends by the linking length alone, and with shared footprints joined."""
    src = Table.read(out / "sources.parquet")
    x, y = np.asarray(src["x"], float), np.asarray(src["y"], float)
    cfg = InferenceConfig()
    pairs = footprint_pairs(scene.select_bands(list(bundle.bands)), x, y, survey=bundle.survey)
    out = {}
    for name, extra in (("linking_length", None), ("with_footprints", pairs)):
        groups, split = group_sources(x, y, cfg.linking_length, pairs=extra)
        size = np.array([len(g) for g in groups])
        out[name] = {
            "blends": len(groups),
            "largest": int(size.max()),
            "blends_of_5_or_more": int(np.sum(size >= 5)),
            "sources_in_split_blends": int(size[np.asarray(split)].sum()),
        }
    out["footprint_pairs"] = len(pairs)
    return out


def compile_cost(scene, out: Path, bundle, method: str) -> dict:
    """The run's distinct compiled shapes, and one fit's compile and run time (first call against second)."""
    src = Table.read(out / "sources.parquet")
    cfg = InferenceConfig()
    planned = plan_scenes([scene], [(np.asarray(src["x"]), np.asarray(src["y"]))], bundle, cfg)
    specs = planned.specs
    one = [planned[0]]
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        fit_blends(bundle, one, method, config=cfg)
        times.append(time.perf_counter() - t0)
    return {
        "distinct_specs": len(set(specs)),
        "first_spec": {"shape": list(specs[0].shape), "n_sources": specs[0].n_sources},
        "first_call_seconds": round(times[0], 2),
        "second_call_seconds": round(times[1], 2),
    }


def accuracy(catalog: Table, truth: Table) -> dict:
    """Completeness by true magnitude and S/N, and the flux error of matched galaxies."""
    hit = match_sources(truth["x"], truth["y"], catalog["x"], catalog["y"], 1.5)
    found = hit >= 0
    mag, snr = np.asarray(truth["mag_r"]), np.asarray(truth["snr"])
    true_flux = np.asarray(truth["flux_r"]) * np.asarray(truth["frac_in_image_r"])
    err = np.full(len(truth), np.nan)
    err[found] = np.asarray(catalog["flux_r"])[hit[found]] / true_flux[found] - 1
    out = {"n_true": len(truth), "n_catalog": len(catalog), "n_matched": int(found.sum())}
    out["completeness_by_mag_r"] = {
        f"{lo}-{hi}": round(float(found[(mag >= lo) & (mag < hi)].mean()), 3)
        for lo, hi in ((18, 22), (22, 23), (23, 24), (24, 25), (25, 26), (26, 27.5))
        if np.any((mag >= lo) & (mag < hi))
    }
    out["completeness_by_snr"] = {
        f">{s}": round(float(found[snr > s].mean()), 3) for s in (5, 10, 30) if np.any(snr > s)
    }
    for s in (10, 30):
        sel = found & (snr > s)
        out[f"median_abs_flux_r_error_snr_gt_{s}"] = round(float(np.median(np.abs(err[sel]))), 4)
    out["spurious_fraction"] = round(1 - out["n_matched"] / max(len(catalog), 1), 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--field", required=True, help="directory of bayesblend simulate field (one field)")
    p.add_argument("--out", required=True, help="run directory (resumable)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--method", default="map")
    p.add_argument("--json", required=True)
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    field = sorted(Path(args.field).glob("field_*.fits"))[0]
    truth = Table.read(Path(args.field) / "truth.fits")
    bundle = load_bundle()
    scene = read_scene(field)
    summary = {
        "date": datetime.now(UTC).isoformat(timespec="minutes"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
        "field": str(field),
        "shape": list(scene.shape),
        "method": args.method,
        "workers": args.workers,
        "detection_tiling": tiling(scene, list(bundle.bands)),
    }
    client = local_client(args.workers)
    t0 = time.perf_counter()
    try:
        run = deblend_files(
            [field], args.out, method=args.method, prior=bundle, config=InferenceConfig(), client=client
        )
        wall = time.perf_counter() - t0
        peaks = client.run(lambda dask_worker: max(dask_worker.monitor.quantities["memory"]))
    finally:
        cluster = client.cluster
        client.close()
        cluster.close()
    summary["run"] = {
        "sources": run.n_sources,
        "blends": run.n_blends,
        "batches": run.n_batches,
        "batches_resumed": run.n_resumed,
        "blends_given_the_pilots_map": run.n_from_pilot,
        "detection_and_pilot_seconds": round(run.detect_seconds, 1),
        "wall_seconds": round(wall, 1),
        "sources_per_second": round(run.n_sources / wall, 3) if not run.n_resumed else None,
        "peak_memory_per_worker_gib": sorted(round(v / 2**30, 2) for v in peaks.values()),
        "peak_memory_main_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }
    summary["accuracy"] = accuracy(Table.read(run.catalog), truth)
    summary["grouping"] = grouping(scene, Path(args.out), bundle)
    summary["compile"] = compile_cost(scene, Path(args.out), bundle, args.method)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
