"""Blend plans: a scene's sources grouped into blends, each with its cutout and compiled shape,
prepared only when it is fitted.

A prepared blend holds its cutout's arrays and PSF spectrum (about 1.4 MB for
a 96 x 96 six-band cutout): a 2048 x 2048 field's 3 500 blends take 5 GB
prepared at once, a 4k x 4k coadd patch four times that. A plan is what is
known before the cutout is made (the sources, the region, the split flag and
the :class:`~bayesblend.model.SceneSpec` that sets the compiled program), so
a run batches blends by spec first and cuts each batch out as it goes
(:class:`PlannedBlends`).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bayesblend.blends import (
    PreparedBlend,
    bad_pixels,
    blend_region,
    blend_spec,
    group_sources,
    prepare_blend,
    warn_bad_pixels,
)
from bayesblend.detect import footprint_pairs
from bayesblend.errors import MaskedBlendError, MaskedBlendWarning
from bayesblend.model import SceneSpec
from bayesblend.prior.bundle import PriorBundle
from bayesblend.scene import Scene
from bayesblend.settings import InferenceConfig


@dataclass(frozen=True, eq=False)
class BlendPlan:
    """A blend before its cutout is made.

    Attributes
    ----------
    scene : int
        Index of its scene.
    members : numpy.ndarray
        Indices of its sources in the scene's source list.
    region : tuple of int
        ``(x0, y0, height, width)`` of its cutout in the scene, pixels.
    split : bool
        Whether it is a part of a linked group too large for one blend.
    spec : SceneSpec
        What its fit compiles for.
    """

    scene: int
    members: np.ndarray
    region: tuple[int, int, int, int]
    split: bool
    spec: SceneSpec

    @property
    def membership(self) -> dict:
        """``{"scene": scene index, "split": bool}``: what a Posterior records of the blend."""
        return {"scene": self.scene, "split": self.split}


def plan_scene(
    scene: Scene,
    index: int,
    x: np.ndarray,
    y: np.ndarray,
    bundle: PriorBundle,
    config: InferenceConfig,
    name: str = "the scene",
) -> list[BlendPlan]:
    """Group a scene's sources at ``(x, y)`` into blends and plan each cutout (``index``: the scene's).

    Sources closer than ``config.linking_length`` or in one footprint of the
    scene's light (:func:`bayesblend.detect.footprint_pairs`) are one blend
    (:func:`bayesblend.blends.group_sources`).

    Bad pixels are counted, with a warning, once for the whole scene; a blend
    whose every pixel is masked is left out with a warning naming its
    sources, so that one masked blend does not stop the rest of a field.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    if not len(x):
        return []
    sc = scene.select_bands(bundle.bands)
    bad_value, bad_variance, masked = bad_pixels(sc)
    where = "" if name == "the scene" else f"{name}: "
    warn_bad_pixels(bad_value, bad_variance, masked, where, stacklevel=4)
    valid = ~(bad_value | bad_variance | masked)
    shared = footprint_pairs(sc, x, y, survey=bundle.survey) if len(x) > 1 and valid.any() else None
    groups, split = group_sources(x, y, config.linking_length, pairs=shared)
    plans, left_out = [], []
    margin = config.region_margin + bundle.stamp // 2
    for g, s in zip(groups, split, strict=True):
        x0, y0, h, w = blend_region(x[g], y[g], scene.shape, margin)
        if not valid[:, max(y0, 0) : max(y0 + h, 0), max(x0, 0) : max(x0 + w, 0)].any():
            left_out.append(g)
            continue
        spec = blend_spec(
            bundle,
            (h, w),
            len(g),
            scene.variance is not None,
            config.log_flux_sigma,
            config.position_sigma,
            config.model_error,
        )
        plans.append(BlendPlan(index, np.asarray(g), (x0, y0, h, w), bool(s), spec))
    if left_out:
        idx = np.concatenate(left_out)
        at = ", ".join(f"({x[i]:.1f}, {y[i]:.1f})" for i in idx[:5])
        more = f" and {len(idx) - 5} more" if len(idx) > 5 else ""
        warnings.warn(
            f"{len(idx)} source(s) of {name} in fully masked blends left out, at x, y = {at}{more}",
            MaskedBlendWarning,
            stacklevel=3,
        )
    return plans


def prepare_planned(
    scene: Scene, x: np.ndarray, y: np.ndarray, plan: BlendPlan, bundle: PriorBundle, config: InferenceConfig
) -> PreparedBlend:
    """Cut out and prepare a planned blend of ``scene``, whose sources are at ``(x, y)``."""
    x0, y0, h, w = plan.region
    g = plan.members
    prep = prepare_blend(
        scene.cutout(x0, y0, h, w),
        np.asarray(x, float)[g] - x0,
        np.asarray(y, float)[g] - y0,
        bundle,
        config.log_flux_sigma,
        config.position_sigma,
        config.model_error,
        origin=(x0, y0),
        warn=False,
    )
    if prep.spec != plan.spec:  # a bug, not bad input: the plan must know what the fit compiles for
        raise RuntimeError(f"blend at {plan.region} prepared with spec {prep.spec}, planned {plan.spec}")
    return prep


class PlannedBlends(Sequence):
    """The prepared blends of many plans, each made when it is read (the last few kept).

    Reads like the list of :class:`~bayesblend.blends.PreparedBlend` that
    :func:`bayesblend.fitting.iter_fits` takes; ``specs`` and ``plans`` are
    known without preparing anything.
    """

    def __init__(
        self,
        scenes: Sequence[Scene],
        positions: Sequence[tuple[np.ndarray, np.ndarray]],
        plans: Sequence[BlendPlan],
        bundle: PriorBundle,
        config: InferenceConfig,
        keep: int = 128,
    ) -> None:
        self.scenes, self.positions, self.plans = list(scenes), list(positions), list(plans)
        self.bundle, self.config, self.keep = bundle, config, keep
        self._cache: OrderedDict[int, PreparedBlend] = OrderedDict()

    @property
    def specs(self) -> list[SceneSpec]:
        """Each blend's spec."""
        return [p.spec for p in self.plans]

    def __len__(self) -> int:
        return len(self.plans)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        plan = self.plans[i]
        x, y = self.positions[plan.scene]
        prep = prepare_planned(self.scenes[plan.scene], x, y, plan, self.bundle, self.config)
        self._cache[i] = prep
        if len(self._cache) > self.keep:
            self._cache.popitem(last=False)
        return prep


def plan_scenes(
    scenes: Sequence[Scene],
    positions: Sequence[tuple[np.ndarray, np.ndarray]],
    bundle: PriorBundle,
    config: InferenceConfig,
) -> PlannedBlends:
    """Every scene's blends, planned, to be prepared as they are read.

    Raises :class:`MaskedBlendError` when there are sources but every blend is masked.
    """
    plans = []
    for si, (sc, (x, y)) in enumerate(zip(scenes, positions, strict=True)):
        if len(x):
            plans += plan_scene(sc, si, x, y, bundle, config, name=f"scene {si}")
    n_given = sum(len(x) for x, _ in positions)
    if n_given and not plans:
        raise MaskedBlendError(
            f"every pixel of every blend is masked ({n_given} source(s)): nothing to deblend"
        )
    return PlannedBlends(scenes, positions, plans, bundle, config)
