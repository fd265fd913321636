"""The inference pipeline: sources to blends to fits to a :class:`~bayesblend.posterior.Posterior`.

:func:`deblend` takes one or more scenes and their sources (or detects them,
with a pilot fit that adds the galaxies found in its residual), groups the
sources into blends (:func:`prepare_scene`), fits every blend with the
chosen method in ``vmap`` batches of blends that share a padded size
(:func:`fit_blends`, one compilation per size: :func:`bayesblend.methods.batch_function`)
and assembles the draws into a Posterior. The methods themselves are in
:mod:`bayesblend.methods`, their settings in :mod:`bayesblend.settings`.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from bayesblend.blends import (
    PreparedBlend,
    bad_pixels,
    blend_region,
    check_scene,
    group_sources,
    model_error_of,
    prepare_blend,
    warn_bad_pixels,
)
from bayesblend.errors import BadPixelWarning, BayesblendError, MaskedBlendError, MaskedBlendWarning
from bayesblend.methods import batch_function, joint_flux
from bayesblend.model import SceneSpec
from bayesblend.posterior import Posterior
from bayesblend.prior.bundle import Networks, PriorBundle
from bayesblend.scene import Scene
from bayesblend.settings import METHODS, InferenceConfig, check_method

if TYPE_CHECKING:  # types only: astropy is imported where a table is read
    import os

    from astropy.table import Table

__all__ = ["METHODS", "InferenceConfig", "deblend", "fit_blends", "joint_flux", "prepare_scene"]


def fit_blends(
    bundle: PriorBundle,
    blends: Sequence[PreparedBlend],
    method: str = "nuts",
    latent_prior: str | None = None,
    seed: int = 0,
    config: InferenceConfig | None = None,
    progress: bool = False,
    key_index: Sequence[int] | None = None,
) -> list[dict]:
    """Fit prepared blends with ``method``; one result dict per blend (numpy arrays).

    Blends are grouped by spec and run in ``vmap`` batches of up to
    ``config.batch_size``; a short batch is padded by repetition to the next
    power of two, so only a few batch widths are ever compiled. Blend ``i``
    draws from the key ``fold_in(PRNGKey(seed), key_index[i])`` (default
    ``i``), so results do not depend on the batching; blends given the same
    index draw the same random numbers.
    """
    check_method(method)
    cfg = config or InferenceConfig()
    nets = Networks(bundle, bundle.check_latent_prior(latent_prior))
    weights = nets.weights()
    base = jax.random.PRNGKey(seed)
    key_index = list(range(len(blends))) if key_index is None else [int(k) for k in key_index]
    if len(key_index) != len(blends):
        raise BayesblendError(f"{len(blends)} blends but {len(key_index)} key indices")
    by_spec: dict[SceneSpec, list[int]] = {}
    for i, b in enumerate(blends):
        by_spec.setdefault(b.spec, []).append(i)
    batches = [
        (spec, idx[j : j + cfg.batch_size])
        for spec, idx in by_spec.items()
        for j in range(0, len(idx), cfg.batch_size)
    ]
    results: list[dict | None] = [None] * len(blends)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(blends), desc=f"deblend ({method})", unit="blend")
    for spec, idx in batches:
        width = min(1 << (len(idx) - 1).bit_length(), cfg.batch_size)  # 1, 2, 4...: few compiled widths
        full = idx + [idx[-1]] * (width - len(idx))
        data = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[blends[i].data for i in full])
        keys = jnp.stack([jax.random.fold_in(base, key_index[i]) for i in full])
        out = jax.device_get(batch_function(nets, method, spec, cfg)(weights, data, keys))
        for j, i in enumerate(idx):
            results[i] = jax.tree_util.tree_map(lambda a, j=j: np.asarray(a[j]), out)
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    return results  # type: ignore[return-value]


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
    blend of any scene is left.
    """
    groups, split = group_sources(x, y, config.linking_length)
    # bad pixels are counted, and warned about, once for the whole scene, not once per blend cut from it
    if groups:
        where = "" if name == "the scene" else f"{name}: "
        warn_bad_pixels(*bad_pixels(scene.select_bands(bundle.bands)), where, stacklevel=4)
    preps, kept_groups, kept_split, masked = [], [], [], []
    for g, s in zip(groups, split, strict=True):
        x0, y0, h, w = blend_region(x[g], y[g], scene.shape, config.region_margin + bundle.stamp // 2)
        cut = scene.cutout(x0, y0, h, w)
        try:
            prep = prepare_blend(
                cut,
                x[g] - x0,
                y[g] - y0,
                bundle,
                config.log_flux_sigma,
                config.position_sigma,
                config.model_error,
                origin=(x0, y0),
                warn=False,
            )
        except MaskedBlendError:
            masked.append(g)
            continue
        preps.append(prep)
        kept_groups.append(g)
        kept_split.append(s)
    if masked:
        left_out = np.concatenate(masked)
        where = ", ".join(f"({x[i]:.1f}, {y[i]:.1f})" for i in left_out[:5])
        more = f" and {len(left_out) - 5} more" if len(left_out) > 5 else ""
        warnings.warn(
            f"{len(left_out)} source(s) of {name} in fully masked blends left out, at x, y = {where}{more}",
            MaskedBlendWarning,
            stacklevel=3,
        )
    return preps, kept_groups, kept_split


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
    **settings
        Single :class:`InferenceConfig` fields overriding those of ``config``.

    Returns
    -------
    Posterior
        Draws of every source of every scene.
    """
    from bayesblend.detect import detect_sources, residual_sources
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
    positions: list[tuple[np.ndarray, np.ndarray]] = []
    detected: list[int] = []
    for si, (sc, src) in enumerate(zip(scenes, per_scene, strict=True)):
        check_scene(sc, bundle)
        pos = _as_positions(src, sc)
        if pos is None:
            det = detect_sources(sc.select_bands(bundle.bands), survey=bundle.survey)
            pos = (np.asarray(det["x"], float), np.asarray(det["y"], float))
            detected.append(si)
        positions.append(pos)
    if redetect and any(len(positions[si][0]) for si in detected):
        # a pilot fit (MAP, or the amortised start for the amortised method) of the detected
        # sources; the sources in its residual join them, then the method runs once on all
        pilot_method = "amortised" if method == "amortised" else "map"
        # only its point estimates are read, unless it is returned as the result below: then it
        # needs the method's draws; else one draw spares decoding and measuring the rest
        pilot_cfg = cfg if pilot_method == method else cfg.replace(num_draws=1)
        with warnings.catch_warnings():  # the run below says it again
            warnings.simplefilter("ignore", MaskedBlendWarning)
            warnings.simplefilter("ignore", BadPixelWarning)
            pilot = deblend(
                scenes,
                [np.c_[x, y] for x, y in positions],
                pilot_method,
                bundle,
                seed,
                latent_prior,
                pilot_cfg,
                common_draws=common_draws,
            )
        added = 0
        for si in detected:
            x, y = positions[si]
            model = pilot.scene_model(si)
            new = residual_sources(
                scenes[si].select_bands(bundle.bands),
                model,
                x,
                y,
                model_error_of(bundle, cfg.model_error),
                bundle.survey,
            )
            positions[si] = (np.r_[x, np.asarray(new["x"], float)], np.r_[y, np.asarray(new["y"], float)])
            added += len(new)
        if not added and pilot_method == method:
            return pilot
    preps: list[PreparedBlend] = []
    members: list[dict] = []
    for si, (sc, (x, y)) in enumerate(zip(scenes, positions, strict=True)):
        if len(x) == 0:
            continue
        p, _, split = prepare_scene(sc, x, y, bundle, cfg, name=f"scene {si}")
        members += [{"scene": si, "split": s} for s in split]
        preps.extend(p)
    n_given = sum(len(x) for x, _ in positions)
    if not preps and n_given:
        raise MaskedBlendError(
            f"every pixel of every blend is masked ({n_given} source(s)): nothing to deblend"
        )
    key_index = None
    if common_draws:  # the k-th blend of each scene
        seen: dict[int, int] = {}
        key_index = []
        for m in members:
            key_index.append(seen.get(m["scene"], 0))
            seen[m["scene"]] = key_index[-1] + 1
    results = fit_blends(bundle, preps, method, latent_prior, seed, cfg, progress, key_index)
    # the blends as fitted: the flux prior's centre is the one the fit used (amortised by default)
    for i, r in enumerate(results):
        preps[i] = dataclasses.replace(
            preps[i], data=dict(preps[i].data, log_flux0=jnp.asarray(r.pop("log_flux0")))
        )
    return Posterior.from_fits(bundle, latent_prior, method, seed, cfg, scenes, preps, members, results)
