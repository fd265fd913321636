"""The inference pipeline: sources to blends to fits to a :class:`~bayesblend.posterior.Posterior`.

:func:`deblend` takes one or more scenes and their sources (or detects them,
with a pilot fit that adds the galaxies found in its residual), groups the
sources into blends (:func:`prepare_scene`), fits every blend with the
chosen method in ``vmap`` batches of blends that share a padded size
(:mod:`bayesblend.fitting`, here or on a Dask cluster) and assembles the
draws into a Posterior. The methods themselves are in
:mod:`bayesblend.methods`, their settings in :mod:`bayesblend.settings`;
runs of files on disk, resumable, in :mod:`bayesblend.runs`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bayesblend.blends import (
    PreparedBlend,
    check_scene,
    model_error_of,
)
from bayesblend.errors import BadPixelWarning, BayesblendError, MaskedBlendWarning
from bayesblend.fitting import BatchFit, as_fitted, fit_blends, iter_fits, iter_posteriors, plan_batches
from bayesblend.io import atomic_path
from bayesblend.methods import joint_flux
from bayesblend.plan import plan_scene, plan_scenes, prepare_planned
from bayesblend.posterior import Posterior, render_blend
from bayesblend.prior.bundle import Networks, PriorBundle
from bayesblend.scene import Scene, add_cutout
from bayesblend.settings import METHODS, InferenceConfig, check_method

if TYPE_CHECKING:  # types only: astropy is imported where a table is read
    import os

    from astropy.table import Table
    from distributed import Client

__all__ = [
    "METHODS",
    "InferenceConfig",
    "deblend",
    "fit_blends",
    "iter_fits",
    "joint_flux",
    "plan_batches",
    "prepare_scene",
]


# --------------------------------------------------------------------------------------------
# the entry point


def _as_positions(sources, scene: Scene) -> tuple[np.ndarray, np.ndarray] | None:
    """``(x, y)`` from a table or array of sources, or None to run detection."""
    if sources is None:
        return None
    from astropy.table import Table

    if isinstance(sources, str | bytes) or hasattr(sources, "__fspath__"):
        from bayesblend.io import read_table

        sources = read_table(sources)
    if isinstance(sources, Table):
        names = {c.lower(): c for c in sources.colnames}
        if "x" not in names or "y" not in names:
            raise BayesblendError(f"source list needs columns x and y (pixels), has {sources.colnames}")
        x, y = np.asarray(sources[names["x"]], float), np.asarray(sources[names["y"]], float)
    else:
        arr = np.asarray(sources, float)
        if arr.ndim != 2 or arr.shape[-1] != 2:
            raise BayesblendError(
                f"sources must be a table with x, y or an (n, 2) array, got shape {arr.shape}"
            )
        x, y = arr[:, 0], arr[:, 1]
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise BayesblendError("source positions must be finite numbers")
    ny, nx = scene.shape
    outside = (x < -0.5) | (x > nx - 0.5) | (y < -0.5) | (y > ny - 0.5)
    if outside.any():
        warnings.warn(f"{int(outside.sum())} source(s) outside the scene dropped", stacklevel=3)
        x, y = x[~outside], y[~outside]
    return x, y


def prepare_scene(
    scene: Scene,
    x: np.ndarray,
    y: np.ndarray,
    bundle: PriorBundle,
    config: InferenceConfig,
    name: str = "the scene",
) -> tuple[list[PreparedBlend], list[np.ndarray], list[bool]]:
    """Group a scene's sources into blends and prepare each cutout; also the groups and split flags.

    A blend whose every pixel is masked is left out with a warning naming its
    sources, so that one masked blend does not stop the rest of a field (or of
    the other scenes); :func:`deblend` raises :class:`MaskedBlendError` when no
    blend of any scene is left. (:func:`bayesblend.plan.plan_scene`, every blend prepared.)
    """
    plans = plan_scene(scene, 0, x, y, bundle, config, name)
    preps = [prepare_planned(scene, x, y, p, bundle, config) for p in plans]
    return preps, [p.members for p in plans], [p.split for p in plans]


def deblend(
    scene: Scene | Sequence[Scene],
    sources: Table | np.ndarray | str | os.PathLike | Sequence | None = None,
    method: str = "nuts",
    prior: PriorBundle | str | None = None,
    seed: int = 0,
    latent_prior: str | None = None,
    config: InferenceConfig | None = None,
    progress: bool = False,
    redetect: bool = True,
    common_draws: bool = False,
    client: Client | None = None,
    **settings: Any,
) -> Posterior:
    """Deblend one scene or several: detect (or take) sources, group them into blends, infer.

    Parameters
    ----------
    scene : Scene or sequence of Scene
        Multi-band scenes (bands must include the prior's).
    sources : None, astropy Table, (n, 2) array, path, or a sequence of these (one per scene)
        Source positions ``x, y`` in pixels (0-based); None runs
        :func:`bayesblend.detect.detect_sources`.
    method : str
        ``"amortised"``, ``"map"``, ``"svi"`` or ``"nuts"``.
    prior : PriorBundle or str, optional
        The prior bundle (or its name or path); default the shipped ``lsst-v2``.
    seed : int
        Seed of every random draw.
    latent_prior : str, optional
        ``"flow"`` or ``"normal"`` (default: the bundle's recommendation).
    config : InferenceConfig, optional
        Settings; ``**settings`` override single fields (e.g. ``num_draws=500``).
    progress : bool
        Show a progress bar over blends.
    redetect : bool
        On the scenes whose sources were detected, fit the detections with
        MAP first (the amortised method for ``method="amortised"``), add the
        sources found in its residual (:func:`bayesblend.detect.residual_sources`:
        galaxies detection missed on a neighbour's wing), then run ``method``.
        On the held-out blends this finds 18 % more galaxies and cuts the
        median flux error at S/N > 30 from 11 % to 4 % (RESULTS "Detection").
        Costs the pilot fit. Ignored when sources are given.
    common_draws : bool
        Common random numbers across scenes: the k-th blend of every scene
        draws from the same key (else each blend has its own). For twin
        simulations that differ only by a shear or a rotation (the shear-bias
        harness), so that the Monte Carlo noise of the draws cancels in their
        differences as the pixel noise does. Leave it off for independent
        scenes: their draws would share Monte Carlo errors.
    client : distributed.Client, optional
        Fit the batches of blends on this Dask cluster's workers
        (:mod:`bayesblend.cluster`) instead of in this process; the results
        are the same.
    **settings
        Single :class:`InferenceConfig` fields overriding those of ``config``.

    Returns
    -------
    Posterior
        Draws of every source of every scene.
    """
    from bayesblend.prior.bundle import load_bundle

    check_method(method)
    bundle = prior if isinstance(prior, PriorBundle) else load_bundle(prior)
    cfg = (config or InferenceConfig()).replace(**settings)
    latent_prior = bundle.check_latent_prior(latent_prior)
    scenes = [scene] if isinstance(scene, Scene) else list(scene)
    if not scenes or not all(isinstance(s, Scene) for s in scenes):
        raise BayesblendError("deblend needs a Scene or a sequence of Scene objects")
    if isinstance(scene, Scene) or sources is None:
        per_scene = [sources] * len(scenes)
    else:
        per_scene = list(sources)
        if len(per_scene) != len(scenes):
            raise BayesblendError(f"{len(scenes)} scenes but {len(per_scene)} source lists")
    positions, _, pilot = find_sources(
        scenes, per_scene, bundle, method, cfg, seed, latent_prior, redetect, common_draws, client
    )
    if pilot is not None:
        return pilot
    preps, members = blends_of_scenes(scenes, positions, bundle, cfg)
    key_index = common_keys([m["scene"] for m in members]) if common_draws else None
    results = fit_blends(bundle, preps, method, latent_prior, seed, cfg, progress, key_index, client)
    preps = as_fitted(preps, results)
    return Posterior.from_fits(bundle, latent_prior, method, seed, cfg, scenes, preps, members, results)


def find_sources(
    scenes: Sequence[Scene],
    per_scene: Sequence,
    bundle: PriorBundle,
    method: str,
    config: InferenceConfig,
    seed: int = 0,
    latent_prior: str | None = None,
    redetect: bool = True,
    common_draws: bool = False,
    client: Client | None = None,
) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[np.ndarray], Posterior | None]:
    """The sources to fit in each scene: given, or detected and completed by a pilot fit's residual.

    ``per_scene`` holds, per scene, what :func:`deblend` accepts as its
    ``sources`` (None: detect). See :func:`deblend` for ``redetect``;
    :func:`detect_scenes` and :func:`add_residual_sources` are its two steps.

    Returns
    -------
    positions : list of (numpy.ndarray, numpy.ndarray)
        ``(x, y)`` per scene, pixels.
    origin : list of numpy.ndarray
        Per scene and source, ``"given"``, ``"detected"`` or ``"residual"``.
    pilot : Posterior or None
        The pilot fit when it is already the answer (the pilot ran ``method``
        with its settings and found no new source), else None.
    """
    positions, origin = detect_scenes(scenes, per_scene, bundle)
    if not redetect:
        return positions, origin, None
    return add_residual_sources(
        scenes, positions, origin, bundle, method, config, seed, latent_prior, common_draws, client
    )


def detect_scenes(
    scenes: Sequence[Scene], per_scene: Sequence, bundle: PriorBundle
) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[np.ndarray]]:
    """Per scene, the given sources or the detected ones (what :func:`find_sources` returns first)."""
    from bayesblend.detect import detect_sources

    positions: list[tuple[np.ndarray, np.ndarray]] = []
    origin: list[np.ndarray] = []
    for sc, src in zip(scenes, per_scene, strict=True):
        check_scene(sc, bundle)
        pos = _as_positions(src, sc)
        kind = "given"
        if pos is None:
            det = detect_sources(sc.select_bands(bundle.bands), survey=bundle.survey)
            pos, kind = (np.asarray(det["x"], float), np.asarray(det["y"], float)), "detected"
        positions.append(pos)
        origin.append(np.full(len(pos[0]), kind, dtype="<U8"))
    return positions, origin


def add_residual_sources(
    scenes: Sequence[Scene],
    positions: list[tuple[np.ndarray, np.ndarray]],
    origin: list[np.ndarray],
    bundle: PriorBundle,
    method: str,
    config: InferenceConfig,
    seed: int = 0,
    latent_prior: str | None = None,
    common_draws: bool = False,
    client: Client | None = None,
    progress: bool = False,
    keep_pilot: bool = True,
    checkpoint: str | os.PathLike | None = None,
) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[np.ndarray], Posterior | None]:
    """Fit the scenes with detected sources, and add the sources in each fit's residual.

    The pilot fit is MAP (the amortised start for ``method="amortised"``);
    scenes whose sources were all given are left alone. The pilot's blends
    are cut out, fitted and added to their scene's model batch by batch
    (:func:`iter_posteriors`), so a large image's pilot holds one scene model
    per scene, not every blend. Returns what :func:`find_sources` does; the
    pilot itself only with ``keep_pilot`` (which keeps every batch).

    With a ``checkpoint`` directory, each pilot batch's point estimates are
    saved there (``pilot-NNNNN.npz``) as it finishes, and a batch saved by an
    earlier, interrupted call is rendered from them instead of fitted again
    (the caller makes sure the scenes and settings are the same).
    """
    from bayesblend.detect import residual_sources

    detected = [i for i, o in enumerate(origin) if len(o) and (o == "detected").any()]
    if not detected:
        return positions, origin, None
    positions, origin = list(positions), list(origin)
    # a pilot fit (MAP, or the amortised start for the amortised method) of the detected
    # sources; the sources in its residual join them, then the method runs once on all
    pilot_method = "amortised" if method == "amortised" else "map"
    # only its point estimates are read, unless it is returned as the result below: then it
    # needs the method's draws; else one draw spares decoding and measuring the rest
    keep_pilot = keep_pilot and pilot_method == method
    pilot_cfg = config if keep_pilot else config.replace(num_draws=1)
    with warnings.catch_warnings():  # the fit after it says them again
        warnings.simplefilter("ignore", MaskedBlendWarning)
        warnings.simplefilter("ignore", BadPixelWarning)
        empty = (np.zeros(0), np.zeros(0))
        planned = plan_scenes(
            scenes, [p if i in detected else empty for i, p in enumerate(positions)], bundle, pilot_cfg
        )
    # float64: the sum does not depend (to a float32 rounding) on the order batches finish in
    models = {i: np.zeros((len(bundle.bands), *scenes[i].shape), np.float64) for i in detected}
    kept: list[BatchFit] = []
    batches = plan_batches(planned.specs, pilot_cfg.batch_size)
    saved = {}
    if checkpoint is not None and not keep_pilot:
        Path(checkpoint).mkdir(parents=True, exist_ok=True)
        saved = {tuple(b): Path(checkpoint) / f"pilot-{k:05d}.npz" for k, b in enumerate(batches)}
        nets = Networks(bundle, bundle.check_latent_prior(latent_prior))
        for b in batches:
            if saved[tuple(b)].exists():
                with np.load(saved[tuple(b)]) as f:
                    for j, i in enumerate(b):
                        point = {k[len(f"{j}/") :]: f[k] for k in f.files if k.startswith(f"{j}/")}
                        blend = planned[i]
                        add_cutout(
                            models[planned.plans[i].scene], render_blend(nets, blend, point), blend.origin
                        )
        batches = [b for b in batches if not saved[tuple(b)].exists()]
    for part in iter_posteriors(
        bundle,
        planned,
        pilot_method,
        latent_prior,
        seed,
        pilot_cfg,
        batches=batches,
        key_index=common_keys([p.scene for p in planned.plans]) if common_draws else None,
        client=client,
        progress=progress,
        desc=f"pilot ({pilot_method})",
    ):
        for j, i in enumerate(part.index):
            add_cutout(models[planned.plans[i].scene], part.posterior.model_image(j), part.blends[j].origin)
        if saved:
            points = {
                f"{j}/{k}": np.asarray(v) for j, p in enumerate(part.posterior.points) for k, v in p.items()
            }
            with atomic_path(saved[tuple(part.index)]) as tmp, open(tmp, "wb") as fh:
                np.savez(fh, **points)
        if keep_pilot:
            kept.append(part)
    added = 0
    for si in detected:
        x, y = positions[si]
        new = residual_sources(
            scenes[si].select_bands(bundle.bands),
            models[si],
            x,
            y,
            model_error_of(bundle, config.model_error),
            bundle.survey,
        )
        positions[si] = (np.r_[x, np.asarray(new["x"], float)], np.r_[y, np.asarray(new["y"], float)])
        origin[si] = np.r_[origin[si], np.full(len(new), "residual", dtype="<U8")]
        added += len(new)
    if added or not keep_pilot or not planned.plans:
        return positions, origin, None
    order = np.argsort(np.concatenate([p.index for p in kept]))
    blends = [b for p in kept for b in p.blends]
    results = [r for p in kept for r in p.results]
    members = [{"scene": p.scene, "split": p.split} for p in planned.plans]
    pilot = Posterior.from_fits(
        bundle,
        bundle.check_latent_prior(latent_prior),
        pilot_method,
        seed,
        pilot_cfg,
        scenes,
        [blends[k] for k in order],
        members,
        [results[k] for k in order],
    )
    return positions, origin, pilot


def common_keys(scene_of: Sequence[int]) -> list[int]:
    """Common random numbers across scenes: each blend's key index is its rank among its scene's blends.

    ``scene_of`` holds each blend's scene index, in blend order.
    """
    seen: dict[int, int] = {}
    keys = []
    for si in scene_of:
        keys.append(seen.get(si, 0))
        seen[si] = keys[-1] + 1
    return keys


def blends_of_scenes(
    scenes: Sequence[Scene],
    positions: Sequence[tuple[np.ndarray, np.ndarray]],
    bundle: PriorBundle,
    config: InferenceConfig,
) -> tuple[list[PreparedBlend], list[dict]]:
    """Every scene's sources grouped into prepared blends, and each blend's ``{"scene", "split"}``.

    Raises :class:`MaskedBlendError` when sources were given but every blend is masked
    (:func:`bayesblend.plan.plan_scenes`).
    """
    planned = plan_scenes(scenes, positions, bundle, config)
    return list(planned), [{"scene": p.scene, "split": p.split} for p in planned.plans]
