"""A deblending run on disk: scene files in, a partitioned catalogue out, resumable.

``bayesblend deblend`` runs :func:`deblend_files`. Its output directory holds:

``run.json``
    What was run: the scene files (name, size, SHA-256), the source list, the
    model bundle, method, seed and settings. Rerunning the same command in the
    same directory resumes the run; a different run there is refused (or,
    with ``overwrite``, replaces it), so a catalogue and its samples always
    come from one run.
``pilot/pilot-NNNNN.npz``
    Each finished pilot batch's point estimates (:mod:`bayesblend.pilot`), so
    that a killed pilot resumes too, and the MAP of every blend that the
    residual sources left alone, which the final fit of a MAP, SVI or NUTS run
    then takes instead of optimising again (removed with the run's end).
``sources.parquet``
    The sources fitted: ``file``, ``scene``, ``x``, ``y`` (pixels) and
    ``origin`` (``given``, ``detected``, or ``residual``: found in the pilot
    fit's residual). Written when detection is complete; a resumed run reads
    it instead of detecting again.
``catalog/part-NNNNN.parquet``
    The catalogue, one partition per batch of blends, each written atomically
    when its batch ends; ``pyarrow.dataset.dataset(OUT / "catalog")`` reads
    them as one table.
``posterior/part-NNNNN.nc``
    The same batch's posterior draws (ArviZ netCDF; ``source`` is the
    catalogue's ``id``), written before its catalogue partition: a partition
    present means its samples are too.
``catalog.fits``
    The whole catalogue, sorted by ``id``, written when every batch is done.
``figures/``
    Per-blend figures of the first blends, on request.

Killing a run loses at most the batches in flight, of the pilot or of the
fit: a rerun removes stray temporary files, skips the batches on disk, and
fits the rest.
Blend ``i`` (the catalogue's ``blend_id``) always draws from the same random
key, so a resumed run's rows are those an uninterrupted run would have written.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from astropy.table import Table, vstack

from bayesblend import __version__
from bayesblend.blends import group_sources
from bayesblend.errors import BayesblendError
from bayesblend.fitting import iter_posteriors, plan_batches
from bayesblend.infer import detect_scenes
from bayesblend.io import atomic_path, read_scene, read_table, rows_per_scene, write_table
from bayesblend.pilot import add_residual_sources, pilot_optima
from bayesblend.plan import plan_scenes
from bayesblend.posterior import Posterior
from bayesblend.prior.bundle import PriorBundle, load_bundle
from bayesblend.settings import InferenceConfig, check_method

if TYPE_CHECKING:
    import os

    from distributed import Client

RUN_FILE = "run.json"
SOURCES_FILE = "sources.parquet"
CATALOG_DIR = "catalog"
POSTERIOR_DIR = "posterior"
CATALOG_FILE = "catalog.fits"
FIGURES_DIR = "figures"
PILOT_DIR = "pilot"
#: Everything a run writes in its directory (what ``overwrite`` removes).
PRODUCTS = (
    RUN_FILE,
    SOURCES_FILE,
    PILOT_DIR,
    CATALOG_DIR,
    POSTERIOR_DIR,
    CATALOG_FILE,
    FIGURES_DIR,
    "posterior.nc",
)


@dataclass
class RunSummary:
    """What :func:`deblend_files` did.

    Attributes
    ----------
    out : pathlib.Path
        The run directory.
    n_sources, n_blends, n_batches : int
        Totals of the run.
    n_resumed : int
        Batches found finished on disk and skipped.
    catalog : pathlib.Path
        The whole catalogue (``catalog.fits``).
    figures : int
        Figures written by this call.
    n_from_pilot : int
        Blends whose MAP the final fit took from the pilot (:func:`~bayesblend.pilot.pilot_optima`).
    detect_seconds : float
        Wall time of this call's detection and pilot fit (about 0 when resumed after them), seconds.
    """

    out: Path
    n_sources: int
    n_blends: int
    n_batches: int
    n_resumed: int
    catalog: Path
    figures: int = 0
    n_from_pilot: int = 0
    detect_seconds: float = 0.0


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def run_key(
    paths: Sequence[str | os.PathLike],
    sources: str | os.PathLike | None,
    bundle: PriorBundle,
    method: str,
    seed: int,
    latent_prior: str,
    config: InferenceConfig,
    redetect: bool,
) -> dict:
    """The identity of a run (``run.json``): a rerun with the same key resumes it."""
    files = [{"name": str(p), "size": Path(p).stat().st_size, "sha256": file_digest(p)} for p in paths]
    key = {
        "bayesblend": __version__,
        "files": files,
        "sources": None if sources is None else {"name": str(sources), "sha256": file_digest(sources)},
        "bundle": {
            "name": str(bundle.card.get("name", bundle.path)),
            "card": file_digest(bundle.path / "card.json"),
        },
        "method": method,
        "seed": int(seed),
        "latent_prior": latent_prior,
        "redetect": bool(redetect) and sources is None,
        "config": asdict(config),
    }
    return json.loads(json.dumps(key))  # as run.json reads back (tuples become lists)


def _differences(old: dict, new: dict) -> list[str]:
    """Top-level fields of two run keys that differ (a file list names its first differing file)."""
    out = []
    for k in sorted(set(old) | set(new)):
        if old.get(k) != new.get(k):
            if k == "files" and isinstance(old.get(k), list):
                a, b = old[k], new[k]
                names = [f["name"] for f in b if f not in a] or [f["name"] for f in a if f not in b]
                out.append(f"files ({names[0]})" if names else "files (order)")
            else:
                out.append(k)
    return out


def open_run(out: str | os.PathLike, key: dict, overwrite: bool = False) -> bool:
    """Prepare the run directory ``out`` for the run ``key``; whether it resumes an earlier run.

    Stray temporary files of an interrupted run are removed. A directory
    holding another run (or outputs without a ``run.json``) is refused with a
    one-line error naming what differs, unless ``overwrite``: then that run's
    products are removed first.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BayesblendError(f"--out {out} is a file, not a directory")
    out.mkdir(parents=True, exist_ok=True)
    run_file = out / RUN_FILE
    old = None
    if run_file.exists():
        try:
            old = json.loads(run_file.read_text())
        except json.JSONDecodeError:
            old = {}
        old = old if isinstance(old, dict) else {}
    present = [p for p in PRODUCTS if (out / p).exists()]
    if old == key:
        _remove_temporaries(out)
        return True
    if present and not overwrite:
        if old is None:
            why = "outputs without a run.json"
        else:
            why = f"another run (differing in {', '.join(_differences(old, key))})"
        raise BayesblendError(f"{out} holds {why}: use another --out, or --overwrite to replace it")
    for p in present:
        target = out / p
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    _remove_temporaries(out)
    with atomic_path(run_file) as tmp:
        tmp.write_text(json.dumps(key, indent=1))
    return False


#: The temporary files a run writes (``atomic_path``: ``.<name>.<random>.tmp``), by directory.
TEMPORARIES = {
    ".": [f".{p}.*.tmp" for p in (RUN_FILE, SOURCES_FILE, CATALOG_FILE, "posterior.nc")],
    CATALOG_DIR: [".part-*.parquet.*.tmp"],
    POSTERIOR_DIR: [".part-*.nc.*.tmp"],
    FIGURES_DIR: [".blend_*.png.*.tmp"],
    PILOT_DIR: [".pilot-*.npz.*.tmp"],
}


def _remove_temporaries(out: Path) -> None:
    """Remove the temporary files an interrupted run left (its own names only)."""
    for d, patterns in TEMPORARIES.items():
        for pattern in patterns:
            for tmp in (out / d).glob(pattern):
                tmp.unlink()


def _check_parts(out: Path, batches: list[list[int]], part: dict) -> None:
    """Each catalogue partition on disk holds the blends of its batch (a one-line error if not)."""
    import pyarrow.parquet as pq

    for idx in batches:
        path = out / CATALOG_DIR / f"{part[tuple(idx)]}.parquet"
        if path.exists():
            ids = sorted(set(pq.read_table(path, columns=["blend_id"]).column(0).to_pylist()))
            if ids != sorted(idx):
                raise BayesblendError(
                    f"{path} holds blends {ids[:4]}... not its batch's: remove {out} and run again"
                )


def _sources_table(scenes, positions, origin) -> Table:
    """The ``sources.parquet`` table of every scene's sources."""
    n = [len(x) for x, _ in positions]
    return Table(
        {
            "file": np.array([sc.name for sc, k in zip(scenes, n, strict=True) for _ in range(k)], dtype=str),
            "scene": np.repeat(np.arange(len(scenes)), n).astype(np.int64),
            "x": np.concatenate([x for x, _ in positions]) if sum(n) else np.zeros(0),
            "y": np.concatenate([y for _, y in positions]) if sum(n) else np.zeros(0),
            "origin": np.concatenate(origin).astype(str) if sum(n) else np.zeros(0, str),
        }
    )


def _positions_from(table: Table, n_scenes: int) -> list[tuple[np.ndarray, np.ndarray]]:
    scene = np.asarray(table["scene"], int)
    return [
        (np.asarray(table["x"], float)[scene == i], np.asarray(table["y"], float)[scene == i])
        for i in range(n_scenes)
    ]


def deblend_files(
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    method: str = "nuts",
    prior: PriorBundle | str | None = None,
    seed: int = 0,
    latent_prior: str | None = None,
    config: InferenceConfig | None = None,
    sources: str | os.PathLike | None = None,
    redetect: bool = True,
    client: Client | None = None,
    workers: int | None = None,
    scheduler: str | None = None,
    progress: bool = False,
    overwrite: bool = False,
    figures: int = 0,
    truth: str | os.PathLike | None = None,
) -> RunSummary:
    """Deblend scene files into the run directory ``out`` (module docstring), resuming if it can.

    Parameters
    ----------
    paths : sequence of path
        Scene-FITS files.
    out : path
        Run directory.
    method, prior, seed, latent_prior, config, redetect
        As for :func:`bayesblend.infer.deblend`.
    sources : path, optional
        A source table (FITS or Parquet) of ``x``, ``y`` (pixels), with a
        ``scene`` column (file stem) or ``file`` column for several scenes;
        None detects.
    client : distributed.Client, optional
        Run the fits on this Dask cluster (:mod:`bayesblend.cluster`).
    workers : int, optional
        Without ``client`` or ``scheduler``: the size of the local cluster
        started for the run (default: one worker per core). A run of a single
        batch of blends, or ``workers=1``, runs in this process instead: one
        worker would do the same work with the cluster's overhead.
    scheduler : str, optional
        Address of a running Dask scheduler to use instead of a local cluster.
    progress : bool
        A progress bar counting blends.
    overwrite : bool
        Replace another run found in ``out`` instead of refusing.
    figures : int
        Write per-blend figures of the first this many blends (by ``blend_id``).
    truth : path, optional
        Truth table marked in the figures (simulations).
    """
    check_method(method)
    if not paths:
        raise BayesblendError("no scene files given")
    if workers is not None and workers < 1:
        raise BayesblendError(f"--workers must be at least 1, got {workers}")
    bundle = prior if isinstance(prior, PriorBundle) else load_bundle(prior)
    cfg = config or InferenceConfig()
    latent_prior = bundle.check_latent_prior(latent_prior)
    paths = [str(p) for p in paths]
    for p in paths:
        if not Path(p).is_file():
            raise BayesblendError(f"{p}: no such file")
    # every input is checked before anything is written
    given = None if sources is None else rows_per_scene(read_table(sources), paths, str(sources), "source")
    truths = None
    if truth is not None and figures:
        truths = rows_per_scene(read_table(truth), paths, str(truth), "truth")
    scenes = [read_scene(p) for p in paths]
    out = Path(out)
    open_run(out, run_key(paths, sources, bundle, method, seed, latent_prior, cfg, redetect), overwrite)
    t0 = time.perf_counter()
    with _RunClient(client, workers, scheduler) as cluster:
        if (out / SOURCES_FILE).exists():
            positions = _positions_from(read_table(out / SOURCES_FILE), len(scenes))
        else:
            per_scene = given if given is not None else [None] * len(scenes)
            positions, origin = detect_scenes(scenes, per_scene, bundle)
            if redetect:
                positions, origin, _ = add_residual_sources(
                    scenes,
                    positions,
                    origin,
                    bundle,
                    method,
                    cfg,
                    seed,
                    latent_prior,
                    client=cluster.get(_n_batches(positions, cfg)),
                    progress=progress,
                    keep_pilot=False,
                    checkpoint=out / PILOT_DIR,
                )
            write_table(out / SOURCES_FILE, _sources_table(scenes, positions, origin))
        detect_seconds = time.perf_counter() - t0
        planned = plan_scenes(scenes, positions, bundle, cfg)
        n_sources = sum(len(p.members) for p in planned.plans)
        # the pilot's MAP of the blends it fitted as they are (none for the amortised method)
        fitted = pilot_optima(out / PILOT_DIR, planned) if method != "amortised" else {}
        batches = plan_batches([(s, i in fitted) for i, s in enumerate(planned.specs)], cfg.batch_size)
        part = {tuple(idx): f"part-{k:05d}" for k, idx in enumerate(batches)}
        _check_parts(out, batches, part)
        done = [idx for idx in batches if (out / CATALOG_DIR / f"{part[tuple(idx)]}.parquet").exists()]
        todo = [idx for idx in batches if idx not in done]
        n_figures = 0
        for fit in iter_posteriors(
            bundle,
            planned,
            method,
            latent_prior,
            seed,
            cfg,
            todo,
            client=cluster.get(len(todo)),
            progress=progress,
            fitted=fitted,
        ):
            name = part[tuple(fit.index)]
            fit.posterior.to_netcdf(
                out / POSTERIOR_DIR / f"{name}.nc"
            )  # the samples first: a part implies them
            fit.posterior.write_catalog(out / CATALOG_DIR / f"{name}.parquet")
            wanted = [j for j, i in enumerate(fit.index) if i < figures]
            if wanted:
                from bayesblend.plots import plot_blends

                plot_blends(fit.posterior, out / FIGURES_DIR, truths, only=wanted)
                n_figures += len(wanted)
    if n_sources:
        catalog = finish_catalog(out, n_sources)
    else:  # nothing to fit: an empty catalogue with the full header
        empty = Posterior.from_fits(bundle, latent_prior, method, seed, cfg, scenes, [], [], [])
        catalog = empty.write_catalog(out / CATALOG_FILE)
    shutil.rmtree(out / PILOT_DIR, ignore_errors=True)  # its checkpoints served their purpose
    return RunSummary(
        out, n_sources, len(planned), len(batches), len(done), catalog, n_figures, len(fitted), detect_seconds
    )


def read_catalog(out: str | os.PathLike) -> Table:
    """The catalogue of a run directory: its partitions stacked and sorted by ``id``."""
    parts = sorted((Path(out) / CATALOG_DIR).glob("part-*.parquet"))
    if not parts:
        return Table()
    t = vstack([read_table(p) for p in parts], metadata_conflicts="silent")
    t.sort("id")
    return t


def finish_catalog(out: Path, n_sources: int) -> Path:
    """Write ``catalog.fits`` from the partitions, checking that every source is there exactly once."""
    t = read_catalog(out)
    ids = np.asarray(t["id"], np.int64) if len(t) else np.zeros(0, np.int64)
    if len(ids) != n_sources or not np.array_equal(ids, np.arange(n_sources)):
        raise BayesblendError(
            f"{out / CATALOG_DIR} holds {len(ids)} rows ({len(np.unique(ids))} distinct ids) for "
            f"{n_sources} sources: remove the directory and run again"
        )
    return write_table(out / CATALOG_FILE, t)


def _n_batches(positions: Sequence[tuple[np.ndarray, np.ndarray]], config: InferenceConfig) -> int:
    """About how many batches the blends of these sources make, to size the cluster before the scenes
    are read (the linking length's groups: footprints can only join some of them)."""
    groups = sum(len(group_sources(x, y, config.linking_length)[0]) for x, y in positions if len(x))
    return -(-groups // config.batch_size)


class _RunClient:
    """The Dask client of a run: the one given, or one started when a stage has more than one batch.

    A local cluster (or a connection to ``scheduler``) started here is closed
    when the run ends, however it ends.
    """

    def __init__(self, client: Client | None, workers: int | None, scheduler: str | None) -> None:
        self.client, self.workers, self.scheduler = client, workers, scheduler
        self.owned = False

    def get(self, n_batches: int) -> Client | None:
        """The client for a stage of ``n_batches`` batches (None: run them here)."""
        if self.client is not None:
            return self.client
        if self.scheduler is not None:
            from bayesblend.cluster import connect

            self.client, self.owned = connect(self.scheduler), True
            return self.client
        if self.workers == 1 or n_batches <= 1:
            return None
        from bayesblend.cluster import local_client

        self.client, self.owned = local_client(self.workers), True  # default: one worker per core
        return self.client

    def __enter__(self) -> _RunClient:
        return self

    def __exit__(self, *exc) -> None:
        if self.owned and self.client is not None:
            cluster = getattr(self.client, "cluster", None)
            self.client.close()
            if cluster is not None:
                cluster.close()
