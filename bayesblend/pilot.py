"""The pilot fit of a detection run: the scenes fitted once with their detected sources, to find the
sources in its residual, checkpointed so that a killed pilot resumes and the final fit reuses it.

A pilot batch's checkpoint (``pilot-NNNNN.npz``) holds each blend's point
estimate, and for a MAP pilot its optimisation trace and identity (scene,
cutout, member positions): a blend that the residual sources left alone
is the same fit in the final stage, and takes the pilot's MAP
(:func:`pilot_optima`) instead of optimising again.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bayesblend.blends import model_error_of
from bayesblend.errors import BadPixelWarning, MaskedBlendWarning
from bayesblend.fitting import BatchFit, common_keys, iter_posteriors, plan_batches
from bayesblend.io import atomic_path
from bayesblend.plan import PlannedBlends, plan_scenes
from bayesblend.posterior import Posterior, render_blend
from bayesblend.prior.bundle import Networks, PriorBundle
from bayesblend.scene import Scene, add_cutout
from bayesblend.settings import InferenceConfig

if TYPE_CHECKING:
    from distributed import Client


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
    per scene, not every blend. Returns what :func:`~bayesblend.infer.find_sources` does; the
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
                for i, item in zip(b, _read_pilot(saved[tuple(b)]), strict=True):
                    blend = planned[i]
                    add_cutout(
                        models[planned.plans[i].scene], render_blend(nets, blend, item["point"]), blend.origin
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
            with atomic_path(saved[tuple(part.index)]) as tmp, open(tmp, "wb") as fh:
                np.savez(fh, **_pilot_record(planned, part))
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
    members = [p.membership for p in planned.plans]
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


def _pilot_record(planned: PlannedBlends, part: BatchFit) -> dict[str, np.ndarray]:
    """What a pilot checkpoint holds of each blend ``j`` of a batch: ``j/<parameter>`` (its point
    estimate), and for MAP ``j/map_trace`` and the blend's identity (``j/scene``, ``j/region``, the
    members' ``j/x`` and ``j/y``) for :func:`pilot_optima`."""
    out = {}
    for j, (i, r) in enumerate(zip(part.index, part.results, strict=True)):
        out |= {f"{j}/{k}": np.asarray(v) for k, v in r["point"].items()}
        if "map_trace" in r:
            plan = planned.plans[i]
            x, y = planned.positions[plan.scene]
            out |= {f"{j}/map_trace": np.asarray(r["map_trace"]), f"{j}/scene": np.asarray(plan.scene)}
            out |= {
                f"{j}/region": np.asarray(plan.region),
                f"{j}/x": x[plan.members],
                f"{j}/y": y[plan.members],
            }
    return out


#: What a pilot checkpoint holds of a blend besides its point estimate.
_PILOT_EXTRA = ("map_trace", "scene", "region", "x", "y")


def _read_pilot(path: Path) -> list[dict]:
    """The blends of one pilot checkpoint file, in batch order: ``point``, and for MAP ``map_trace``
    and ``identity`` (:func:`_blend_identity`)."""
    with np.load(path) as f:
        keys = {}
        for k in f.files:
            j, name = k.split("/", 1)
            keys.setdefault(int(j), {})[name] = f[k]
    out = []
    for j in sorted(keys):
        rec = keys[j]
        item = {"point": {k: v for k, v in rec.items() if k not in _PILOT_EXTRA}}
        if "map_trace" in rec:
            item["map_trace"] = rec["map_trace"]
            item["identity"] = _blend_identity(rec["scene"], rec["region"], rec["x"], rec["y"])
        out.append(item)
    return out


def _blend_identity(scene, region, x, y) -> tuple:
    """What makes two planned blends the same fit: scene, cutout and member positions (exactly)."""
    xb, yb = np.asarray(x, np.float64).tobytes(), np.asarray(y, np.float64).tobytes()
    return (int(scene), tuple(int(v) for v in region), xb, yb)


def pilot_optima(checkpoint: str | os.PathLike, planned: PlannedBlends) -> dict[int, dict]:
    """The pilot's MAP of each planned blend that it fitted as it is, from its checkpoint directory.

    A blend that the residual sources left alone (the same scene, cutout and
    member positions, hence the same data) has the same MAP in the final fit
    as in the pilot, when both use the same settings: the final fit of a MAP,
    SVI or NUTS run takes it from here (``fitted`` of
    :func:`~bayesblend.fitting.iter_fits`) instead of optimising again. Maps
    each such blend's index to ``{"point": ..., "map_trace": ...}``.
    """
    known = {}
    for path in sorted(Path(checkpoint).glob("pilot-*.npz")):
        for item in _read_pilot(path):
            if "identity" in item:
                known[item["identity"]] = {"point": item["point"], "map_trace": item["map_trace"]}
    out = {}
    for i, plan in enumerate(planned.plans):
        x, y = planned.positions[plan.scene]
        ident = _blend_identity(plan.scene, plan.region, x[plan.members], y[plan.members])
        if ident in known:
            out[i] = known[ident]
    return out
