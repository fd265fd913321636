"""The shear-bias harness: the paper's procedure (Arcelin et al. 2021, sect. 4.3) on our simulations.

Each *item* is one set of galaxies and one noise realisation rendered ten times
(:func:`bayesblend.simulate.scenes.shear_twins`): shears ``(0, 0)``,
``(+-g, 0)``, ``(0, +-g)``, each also rotated by 90 degrees so that intrinsic
shapes cancel in pairs. All ten scenes go through the full pipeline
(detection on or off, :func:`bayesblend.infer.deblend`), and every true galaxy
is matched to its fitted source in each variant. Per variant and estimator, a
shear ``g_hat`` is estimated from the galaxies kept in *all* ten variants;
then, component by component,

    m_i = (g_hat_i(+g) - g_hat_i(-g)) / (2 g) - 1,      c_i = g_hat_i(0, 0)

(eq. 9 of the paper; rotations pooled), with delete-one-block jackknife errors
over items (:mod:`bayesblend.shear.bias` turns the items into those figures).
Estimators (:data:`ESTIMATORS`):

- ``truth``: the true lensed ellipticities (checks the harness: m = 0 up to O(g^2));
- ``ensemble``: the posterior catalogue's ``e1``, ``e2`` (:func:`bayesblend.shear.estimators.ensemble_shear`);
- ``ensemble_targets``: the same, on the blends' targets only (all galaxies of isolated runs);
- ``hierarchical``: the posterior draws through the hierarchical model, given the interim prior.

The paper also measures the shape estimator on the noiseless isolated target
(its eq. 8 ``alpha`` and a "noiseless" estimator). In galaxy model v2 the
shape estimator is the scene model's ellipticity parameter, whose value for a
noiseless target is the true profile ellipticity (up to the model's own
error), so that estimator is ``truth`` and ``alpha`` is the slope, minus one,
of the deblended targets' ellipticities against their true ones at zero shear
(both rotations; least squares through the origin).

Items are written one file each (``items/item_NNNNN.npz``, atomically), so a
run resumes where it stopped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bayesblend.detect import DETECTOR, match_sources
from bayesblend.errors import BayesblendError
from bayesblend.io import atomic_path
from bayesblend.shear.estimators import G_MAX
from bayesblend.simulate.scenes import SHEAR_DESIGN

if TYPE_CHECKING:  # the bundle layer is imported where it is used: types only here
    from bayesblend.prior.bundle import PriorBundle

N_VARIANTS = 2 * len(SHEAR_DESIGN)  # (not rotated, rotated) x shears, the order of shear_twins
ESTIMATORS = ("truth", "ensemble", "ensemble_targets", "hierarchical")
#: Truth columns stored per variant and galaxy as ``true_<name>`` (``hlr``: arcsec, ``flux_r``: electrons).
TRUE_COLUMNS = ("e1", "e2", "e1_int", "e2_int", "snr", "mag_r", "b_tot", "flux_r", "hlr")


@dataclass(frozen=True)
class HarnessConfig:
    """What the harness simulates and how it deblends.

    Attributes
    ----------
    kind : {"blends", "isolated"}
    seed : int
        Simulation seed (items are ``0 .. n-1`` of it).
    shear : float
        Applied shear amplitude ``g``.
    method : str
        Inference method.
    detect : bool
        Detect sources (True) or give the true positions (False).
    max_shift, psf_jitter : float
        Simulation options (as the training and test sets).
    draws : int
        Posterior draws per source (MAP/SVI/amortised: draws; NUTS: per chain).
    match_radius : float
        Pixels within which a fitted source is matched to a true galaxy.
    latent_prior : str or None
    settings : dict
        Other :class:`bayesblend.infer.InferenceConfig` fields.
    """

    kind: str = "blends"
    seed: int = 5
    shear: float = 0.02
    method: str = "map"
    detect: bool = False
    max_shift: float = 0.5
    psf_jitter: float = 0.05
    draws: int = 64
    match_radius: float = 2.0
    latent_prior: str | None = None
    settings: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ("blends", "isolated"):
            raise BayesblendError(f"shear-bias runs on 'blends' or 'isolated', not {self.kind!r}")
        if not 0 < self.shear < G_MAX:
            raise BayesblendError(f"shear amplitude must be in (0, {G_MAX:g}), got {self.shear}")

    def key(self) -> dict:
        """Every field by name: the part of a run's ``config.json`` this configuration sets."""
        return asdict(self)


def run_item(item: int, cfg: HarnessConfig, bundle: PriorBundle) -> dict[str, np.ndarray]:
    """Simulate, deblend and match one item's ten variants; arrays ``(variant, galaxy, ...)``.

    Parameters
    ----------
    item : int
        Item index (the simulation's ``index`` and the inference seed).
    cfg : HarnessConfig
    bundle : PriorBundle
        The prior to deblend with.

    Returns
    -------
    dict of numpy.ndarray
        Per variant and true galaxy: the matched source's catalogue values
        (``e1``, ``e2``, their errors, ``flux_r`` in electrons, ``x``, ``y`` in
        pixels, ``size``: half-light radius in arcsec...), its ellipticity
        draws ``(variant, galaxy, draw)`` and the truth (``true_*``,
        :data:`TRUE_COLUMNS`).
    """
    from bayesblend.infer import deblend
    from bayesblend.simulate.scenes import shear_twins

    twins = shear_twins(
        cfg.kind, cfg.seed, item, cfg.shear, max_shift=cfg.max_shift, psf_jitter=cfg.psf_jitter
    )
    sources = None if cfg.detect else [np.c_[t.truth["x"], t.truth["y"]] for t in twins]
    post = deblend(
        [t.scene for t in twins],
        sources=sources,
        method=cfg.method,
        prior=bundle,
        seed=item,
        latent_prior=cfg.latent_prior,
        num_draws=cfg.draws,
        common_draws=True,  # the twins' draws share their Monte Carlo noise, as their pixels share noise
        **cfg.settings,
    )
    cat = post.catalog()
    chains, draws, n_src = post.draws["e1"].shape  # n_src may be 0 (nothing detected)
    e1d = post.draws["e1"].reshape(chains * draws, n_src)  # (sample, source)
    e2d = post.draws["e2"].reshape(chains * draws, n_src)
    keep = np.linspace(0, e1d.shape[0] - 1, min(cfg.draws, e1d.shape[0])).astype(int)
    e1d, e2d = e1d[keep].T, e2d[keep].T  # (source, draw)
    n_gal = len(twins[0].truth)
    n_draw = len(keep)
    names = ("e1", "e2", "e1_std", "e2_std", "flux_r", "x", "y", "size", "resolution")
    out = {k: np.full((N_VARIANTS, n_gal), np.nan) for k in names}
    out["matched"] = np.zeros((N_VARIANTS, n_gal), bool)
    out["flags"] = np.zeros((N_VARIANTS, n_gal), np.int64)
    out["e1_draws"] = np.full((N_VARIANTS, n_gal, n_draw), np.nan, np.float32)
    out["e2_draws"] = np.full((N_VARIANTS, n_gal, n_draw), np.nan, np.float32)
    for k in TRUE_COLUMNS:
        out[f"true_{k}"] = np.stack([np.asarray(t.truth[k], float) for t in twins])
    out["is_target"] = (
        np.stack([np.asarray(t.truth["is_target"], bool) for t in twins])
        if cfg.kind == "blends"
        else np.ones((N_VARIANTS, n_gal), bool)
    )
    scene = np.asarray(cat["scene"])
    for v, t in enumerate(twins):
        rows = np.flatnonzero(scene == v)
        j = match_sources(
            np.asarray(t.truth["x"]),
            np.asarray(t.truth["y"]),
            np.asarray(cat["x_det"])[rows],
            np.asarray(cat["y_det"])[rows],
            cfg.match_radius,
        )
        hit = j >= 0
        src = rows[j[hit]]
        out["matched"][v, hit] = True
        for k in names:
            out[k][v, hit] = np.asarray(cat[k], float)[src]
        out["flags"][v, hit] = np.asarray(cat["flags"])[src]
        out["e1_draws"][v, hit] = e1d[src]
        out["e2_draws"][v, hit] = e2d[src]
    return out


def item_path(out: str | Path, item: int) -> Path:
    """The file of item ``item`` in the run directory ``out``: ``out/items/item_NNNNN.npz``."""
    return Path(out) / "items" / f"item_{item:05d}.npz"


def run(
    cfg: HarnessConfig,
    n_items: int,
    out: str | Path,
    bundle: PriorBundle | None = None,
    progress: bool = True,
    time_limit: float | None = None,
) -> int:
    """Run items ``0 .. n_items-1`` that are not yet on disk; returns how many were run.

    ``out/config.json`` records the configuration, including every effective
    :class:`~bayesblend.infer.InferenceConfig` field (defaults too, so a run
    made before a default changed is not resumed under the new one); a run in
    a directory made with another configuration is refused (results would mix).
    """
    from bayesblend.prior.bundle import load_bundle
    from bayesblend.settings import InferenceConfig

    out = Path(out)
    (out / "items").mkdir(parents=True, exist_ok=True)
    bundle = bundle if bundle is not None else load_bundle()
    inference = InferenceConfig().replace(**cfg.settings)
    key = cfg.key() | {
        "bundle": str(bundle.card.get("name", bundle.path)),
        "inference": asdict(inference),
        "scene_model": inference.scene_model_settings(),
        "common_draws": True,  # runs made before the twins shared their draws' random numbers lack it
    }
    if cfg.detect:  # a run detecting with another detector is another run
        key["detector"] = DETECTOR
    cfg_file = out / "config.json"
    if cfg_file.exists():
        old = run_config(out)
        if old != json.loads(json.dumps(key)):
            raise BayesblendError(
                f"{out} holds a run with another configuration ({cfg_file}); use a new --out"
            )
    else:
        with atomic_path(cfg_file) as tmp:
            tmp.write_text(json.dumps(key, indent=1))
    todo = [i for i in range(n_items) if not item_path(out, i).exists()]
    t0 = time.time()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=f"shear-bias {cfg.kind}/{cfg.method}", unit="item")
    done = 0
    for i in todo:
        if time_limit is not None and time.time() - t0 > time_limit:
            break
        res = run_item(i, cfg, bundle)
        with atomic_path(item_path(out, i)) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **res)
        done += 1
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return done


def run_config(out: str | Path) -> dict:
    """The configuration a run directory was made with (``out/config.json``; a clear error if none)."""
    cfg_file = Path(out) / "config.json"
    if not cfg_file.exists():
        raise BayesblendError(f"{out}: no shear-bias run there (no config.json)")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise BayesblendError(f"{cfg_file}: not a readable run configuration ({exc})") from None


def load_items(out: str | Path | Sequence[str | Path]) -> dict[str, np.ndarray]:
    """All items of a run (or of several, pooled), concatenated along the galaxy axis.

    Adds ``item`` (the item number) and ``run`` (the index of its run in
    ``out``) per galaxy; the pair identifies an item. Only arrays of
    :func:`run_item`'s ``(variant, galaxy, ...)`` form are loaded (items of
    older runs may hold others, e.g. one value per variant: left out).
    """
    parts: dict[str, list] = {}
    n_files = 0
    for k_run, one in enumerate(run_dirs(out)):
        files = sorted((Path(one) / "items").glob("item_*.npz"))
        if not files:
            raise BayesblendError(f"{one}: no shear-bias items (run `bayesblend shear-bias` first)")
        for f in files:
            with np.load(f) as d:
                n = d["e1"].shape[1]
                item = int(f.stem.split("_")[1])
                for k in d.files:
                    if d[k].shape[:2] == (N_VARIANTS, n):
                        parts.setdefault(k, []).append(d[k])
                n_files += 1
                parts.setdefault("item", []).append(np.full((N_VARIANTS, n), item))
                parts.setdefault("run", []).append(np.full((N_VARIANTS, n), k_run))
    n_draw = min(p.shape[2] for p in parts["e1_draws"])
    for k in ("e1_draws", "e2_draws"):
        parts[k] = [p[:, :, :n_draw] for p in parts[k]]
    # an array some items lack (runs of other versions pooled) would misalign the galaxies: left out
    return {k: np.concatenate(v, axis=1) for k, v in parts.items() if len(v) == n_files}


def run_dirs(out: str | Path | Sequence[str | Path]) -> list[Path]:
    """One run directory or several, as a list."""
    return [Path(out)] if isinstance(out, str | Path) else [Path(o) for o in out]


def pooled_config(out: str | Path | Sequence[str | Path]) -> dict:
    """The configuration of one run, or of several runs pooled into one summary.

    Runs pool only when they differ in nothing but the simulation seed, and no
    seed comes twice (the same seed is the same galaxies and noise): then the
    pooled configuration is the first's, with ``seed`` the list of seeds.
    """
    dirs = run_dirs(out)
    if not dirs:
        raise BayesblendError("no shear-bias run given")
    cfgs = [run_config(d) for d in dirs]
    if len(cfgs) == 1:
        return cfgs[0]
    first = {k: v for k, v in cfgs[0].items() if k != "seed"}
    for d, c in zip(dirs[1:], cfgs[1:], strict=True):
        other = {k: v for k, v in c.items() if k != "seed"}
        if other != first:
            differ = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
            raise BayesblendError(
                f"{d} cannot be pooled with {dirs[0]}: its configuration differs in {', '.join(differ)}"
            )
    seeds = [c["seed"] for c in cfgs]
    if len(set(seeds)) < len(seeds):
        raise BayesblendError(f"runs to pool need different seeds (one seed is one set of galaxies): {seeds}")
    return cfgs[0] | {"seed": seeds}
