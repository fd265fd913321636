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
from typing import TYPE_CHECKING, Any

import numpy as np

from bayesblend.blends import (
    PreparedBlend,
    check_scene,
)
from bayesblend.errors import BayesblendError
from bayesblend.fitting import (
    as_fitted,
    common_keys,
    fit_blends,
    iter_fits,
    plan_batches,
)
from bayesblend.methods import joint_flux
from bayesblend.pilot import add_residual_sources
from bayesblend.plan import plan_scene, plan_scenes, prepare_planned
from bayesblend.posterior import Posterior
from bayesblend.prior.bundle import PriorBundle
from bayesblend.scene import Scene
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
    return list(planned), [p.membership for p in planned.plans]
