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
over items. Estimators (:data:`ESTIMATORS`):

- ``truth``: the true lensed ellipticities (checks the harness: m = 0 up to O(g^2));
- ``ensemble``: the posterior catalogue's ``e1``, ``e2`` (:func:`bayesblend.shear.ensemble_shear`);
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

from bayesblend.catalog import FLAGS
from bayesblend.detect import DETECTOR, match_sources
from bayesblend.errors import BayesblendError
from bayesblend.io import atomic_path
from bayesblend.shear import (
    EXCLUDE_FLAGS,
    G_MAX,
    InterimPrior,
    ResponsivityTable,
    hierarchical_mode,
    jackknife,
    jackknife_blocks,
    posterior_e_sigma,
    responsivity_table,
    shape_weight,
    usable_shapes,
    weighted_ratio_replicates,
)
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
    for k_run, one in enumerate(_run_dirs(out)):
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


def _run_dirs(out: str | Path | Sequence[str | Path]) -> list[Path]:
    """One run directory or several, as a list."""
    return [Path(out)] if isinstance(out, str | Path) else [Path(o) for o in out]


def pooled_config(out: str | Path | Sequence[str | Path]) -> dict:
    """The configuration of one run, or of several runs pooled into one summary.

    Runs pool only when they differ in nothing but the simulation seed, and no
    seed comes twice (the same seed is the same galaxies and noise): then the
    pooled configuration is the first's, with ``seed`` the list of seeds.
    """
    dirs = _run_dirs(out)
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


def _usable(r: dict, min_resolution: float | None = None) -> np.ndarray:
    """Galaxies matched with a usable shape in every variant ``(galaxy,)``.

    ``min_resolution`` None: the shear catalogue's rule (its UNRESOLVED flag
    included); a number: that cut on the stored resolution instead of the flag.
    """
    exclude = EXCLUDE_FLAGS
    ok = r["matched"].copy()
    if min_resolution is not None:
        if "resolution" not in r:
            raise BayesblendError("these shear-bias items predate the resolution column: no resolution cut")
        exclude &= ~FLAGS["UNRESOLVED"]
        with np.errstate(invalid="ignore"):
            ok &= r["resolution"] >= min_resolution
    ok &= usable_shapes(r["e1"], r["e2"], r["flags"], exclude)
    return ok.all(axis=0)


def _pooled(a: np.ndarray) -> np.ndarray:
    """``(variant, galaxy, ...)`` -> ``(shear, 2 galaxy, ...)``: the two rotations pooled."""
    n = len(SHEAR_DESIGN)
    return np.concatenate([a[:n], a[n:]], axis=1)


def _biases(g_full: np.ndarray, g_reps: np.ndarray, shear: float) -> dict:
    """m1, m2, c1, c2 and jackknife errors from per-shear estimates ``(shear, 2)`` and replicates."""

    def mc(g):
        # SHEAR_DESIGN: (0,0), (+,0), (-,0), (0,+), (0,-)
        m1 = (g[..., 1, 0] - g[..., 2, 0]) / (2 * shear) - 1
        m2 = (g[..., 3, 1] - g[..., 4, 1]) / (2 * shear) - 1
        return np.stack([m1, m2, g[..., 0, 0], g[..., 0, 1]], axis=-1)

    full = mc(g_full)
    reps = mc(g_reps)
    err = jackknife(full, reps)
    names = ("m1", "m2", "c1", "c2")
    out = {n: float(v) for n, v in zip(names, full, strict=True)}
    out |= {f"{n}_err": float(v) for n, v in zip(names, err, strict=True)}
    m = 0.5 * (full[0] + full[1])
    m_reps = 0.5 * (reps[:, 0] + reps[:, 1])
    out["m"] = float(m)
    out["m_err"] = float(jackknife(np.asarray(m), m_reps))
    return out


def _ensemble(e1, e2, w, blocks, responsivity=1.0):
    """Per-shear ``sum(w e) / sum(w R)`` and its leave-one-block-out replicates.

    Arrays ``(shear, galaxy)``; ``responsivity`` a number or such an array.
    """
    R = np.broadcast_to(np.asarray(responsivity, float), e1.shape)
    full, reps = [], []
    for k in range(e1.shape[0]):  # the five shears of the design
        f, r, _ = weighted_ratio_replicates(np.stack([e1[k], e2[k]], axis=1), R[k], w[k], blocks)
        full.append(f)
        reps.append(r)
    return np.stack(full), np.stack(reps, axis=1)


def galaxy_responses(r: dict, shear: float) -> dict[str, np.ndarray]:
    """Each galaxy's shear response and the observables it is tabulated in, ``(galaxy,)`` each.

    ``response``: ``(d e1/d g1 + d e2/d g2) / 2`` from the paired ``+g``/``-g``
    variants, averaged over the two rotations; ``e_sigma`` and ``weight``: its
    posterior e dispersion and ensemble weight, averaged over the two unsheared
    variants (the observables a survey catalogue has).
    """
    n = len(SHEAR_DESIGN)  # SHEAR_DESIGN: (0,0), (+,0), (-,0), (0,+), (0,-); then the same rotated
    e1, e2 = r["e1"], r["e2"]
    r1 = (e1[1] - e1[2] + e1[n + 1] - e1[n + 2]) / (4 * shear)
    r2 = (e2[3] - e2[4] + e2[n + 3] - e2[n + 4]) / (4 * shear)
    response = 0.5 * (r1 + r2)
    z = [0, n]
    return {
        "response": response,
        "e_sigma": posterior_e_sigma(r["e1_std"][z], r["e2_std"][z]).mean(axis=0),
        "weight": shape_weight(r["e1_std"][z], r["e2_std"][z]).mean(axis=0),
    }


def _alpha(e_out: np.ndarray, e_in: np.ndarray, blocks: np.ndarray) -> tuple[float, float]:
    """Slope - 1 of ``e_out`` on ``e_in`` (least squares through the origin), jackknife error.

    Eq. 8's multiplicative ellipticity bias: ``e_out`` the deblended, ``e_in``
    the true ellipticities, ``blocks`` each row's jackknife block.
    """

    k = int(blocks.max()) + 1
    sxy, sxx = np.zeros(k), np.zeros(k)
    np.add.at(sxy, blocks, e_out * e_in)  # per-block sums: each replicate leaves one block out
    np.add.at(sxx, blocks, e_in**2)
    full = sxy.sum() / sxx.sum() - 1
    reps = (sxy.sum() - sxy) / (sxx.sum() - sxx) - 1
    return float(full), float(jackknife(np.asarray(full), reps))


def summarise(
    out: str | Path | Sequence[str | Path],
    responsivity: float | ResponsivityTable = 1.0,
    interim: InterimPrior | None = None,
    n_blocks: int = 50,
    estimators: tuple[str, ...] = ESTIMATORS,
    min_snr: float = 0.0,
    min_resolution: float | None = None,
    n_bins: int = 3,
) -> dict:
    """Shear biases of every estimator from a run's items (see the module docstring).

    Parameters
    ----------
    out : path or sequence of paths
        The run directory, or several runs to pool (:func:`pooled_config`:
        the same configuration with other seeds; jackknife blocks are whole
        items of any of them).
    responsivity : float or ResponsivityTable
        ``R`` dividing the ensemble estimates (1: uncalibrated), or a table
        giving each galaxy in each variant its own from its posterior e
        dispersion. The summary also holds the run's own table
        (``responsivity_table``, from :func:`galaxy_responses`, in ``n_bins``
        bins), or None with the reason in ``responsivity_table_problem`` when
        it cannot be built (too few galaxies for the bins, or e.g. a bin whose
        mean response is not positive).
    interim : InterimPrior, optional
        The prior the posterior draws were made under
        (:func:`bayesblend.shear.interim_prior_from_card` of the run's bundle);
        the ``hierarchical`` estimator is skipped without it.
    n_blocks : int
        Jackknife blocks (whole items per block).
    min_snr : float
        Keep galaxies whose true S/N (unsheared scene) is at least this. A cut on
        the truth, the same for all ten variants: it shows where the response
        comes from but leaves out the selection bias a cut on measured S/N has.
    min_resolution : float, optional
        Keep galaxies whose deblended resolution factor is at least this in
        every variant, instead of the shear catalogue's UNRESOLVED flag (0: no
        resolution cut). Like the flag, a cut on measured quantities applied
        to all ten variants alike: galaxies that cross it between variants
        are dropped, so the selection bias of the cut is not measured.
    n_bins : int
        Bins of the run's own responsivity table.
    """
    cfg = pooled_config(out)
    g = float(cfg["shear"])
    r = load_items(out)
    use = _usable(r, min_resolution) & (r["true_snr"][0] >= min_snr)
    if not use.any():
        raise BayesblendError(
            f"{', '.join(map(str, _run_dirs(out)))}: none of its {use.size} galaxies is usable in all 10 "
            "variants: run more items or relax the selection (--min-snr, --min-resolution)"
        )
    # an item is (run, item number): pooled runs share item numbers, not galaxies
    _, items = np.unique(np.stack([r["run"][0], r["item"][0]]), axis=1, return_inverse=True)
    items = items.ravel()  # numpy 2.0.0 returned the inverse as (1, n) here
    blocks_all = jackknife_blocks(items, n_blocks)
    table = isinstance(responsivity, ResponsivityTable)

    def calibration(d: dict) -> float | np.ndarray:
        """The responsivity of each pooled (shear, galaxy) entry of selection ``d``."""
        return _pooled(responsivity(d["e1_std"], d["e2_std"])) if table else responsivity

    res: dict = {
        "config": cfg,
        "n_items": int(len(np.unique(items))),
        "n_galaxies": int(use.size),
        "n_used": int(use.sum()),
        "responsivity": responsivity.mean if table else float(responsivity),
        "responsivity_binned": responsivity.to_dict() if table else None,
        "min_snr": float(min_snr),
        "min_resolution": min_resolution,
    }
    sel = {k: v[:, use] for k, v in r.items()}
    blocks = blocks_all[use]
    pblocks = np.concatenate([blocks, blocks])
    ones = np.ones_like(_pooled(sel["e1"]))
    est: dict = {}
    if "truth" in estimators:
        est["truth"] = _biases(*_ensemble(_pooled(sel["true_e1"]), _pooled(sel["true_e2"]), ones, pblocks), g)
    if "ensemble" in estimators:
        w = _pooled(shape_weight(sel["e1_std"], sel["e2_std"]))
        est["ensemble"] = _biases(
            *_ensemble(_pooled(sel["e1"]), _pooled(sel["e2"]), w, pblocks, calibration(sel)), g
        )
        est["ensemble"]["n"] = int(use.sum())
    # the blends' targets (every galaxy of an isolated run): their own ensemble, and eq. 8's alpha
    tgt = use & r["is_target"][0]
    if tgt.sum() >= 2:
        ts = {k: v[:, tgt] for k, v in r.items()}
        tb = np.concatenate([blocks_all[tgt]] * 2)
        if "ensemble_targets" in estimators:
            w = _pooled(shape_weight(ts["e1_std"], ts["e2_std"]))
            est["ensemble_targets"] = _biases(
                *_ensemble(_pooled(ts["e1"]), _pooled(ts["e2"]), w, tb, calibration(ts)), g
            )
            est["ensemble_targets"]["n"] = int(tgt.sum())
        # alpha: deblended against true ellipticity (the noiseless target's) at zero shear, both rotations
        z = [0, len(SHEAR_DESIGN)]
        a1 = _alpha(ts["e1"][z].ravel(), ts["true_e1"][z].ravel(), tb)
        a2 = _alpha(ts["e2"][z].ravel(), ts["true_e2"][z].ravel(), tb)
        res["alpha"] = {
            "alpha1": a1[0],
            "alpha1_err": a1[1],
            "alpha2": a2[0],
            "alpha2_err": a2[1],
            "n": int(tgt.sum()),
        }
    if "hierarchical" in estimators and interim is not None:
        e1 = _pooled(sel["e1_draws"])  # (shear, 2 galaxy, draw)
        e2 = _pooled(sel["e2_draws"])
        k = int(pblocks.max()) + 1
        masks = np.concatenate([np.ones((1, e1.shape[1])), (pblocks[None] != np.arange(k)[:, None])]).astype(
            np.float32
        )
        fits = np.stack([hierarchical_mode(e1[s], e2[s], interim, masks) for s in range(e1.shape[0])], axis=1)
        g_full, g_reps = fits[0, :, :2], fits[1:, :, :2]
        est["hierarchical"] = _biases(g_full, g_reps, g)
        est["hierarchical"]["sigma_e_scale"] = float(np.mean(fits[0, :, 2]))
        est["hierarchical"]["n"] = int(use.sum())
    res["estimators"] = est
    gr = galaxy_responses(sel, g)
    res["responsivity_table"] = None
    res["responsivity_table_problem"] = None
    try:
        res["responsivity_table"] = responsivity_table(
            gr["response"], gr["e_sigma"], gr["weight"], items[use], n_bins=n_bins
        ).to_dict()
    except BayesblendError as exc:  # the summary stands without it; say why it has none
        res["responsivity_table_problem"] = str(exc)
    return res


def _seeds(seed: int | list[int]) -> str:
    """``seed 5``, or ``seeds 5, 6`` for pooled runs."""
    return f"seeds {', '.join(map(str, seed))}" if isinstance(seed, list) else f"seed {seed}"


def format_summary(res: dict) -> str:
    """A plain-text table of :func:`summarise`'s result."""
    c = res["config"]
    cut = res.get("min_resolution")
    lines = [
        f"shear bias: {c['kind']}, method {c['method']}, detection {'on' if c['detect'] else 'off'}, "
        f"g = {c['shear']}, {_seeds(c['seed'])}, {res['n_items']} items, {res['n_used']}/{res['n_galaxies']} "
        f"galaxies usable in all 10 variants (true S/N >= {res.get('min_snr', 0.0):g}, resolution "
        f"{'flag' if cut is None else f'>= {cut:g}'}), "
        f"R = {res['responsivity']:.4f}{' (per galaxy, binned)' if res.get('responsivity_binned') else ''}",
        f"{'estimator':<18}{'n':>6}{'m1':>20}{'m2':>20}{'c1':>20}{'c2':>20}",
    ]
    for name, e in res["estimators"].items():
        row = f"{name:<18}{e.get('n', res['n_used']):>6}"
        for k in ("m1", "m2", "c1", "c2"):
            row += f"{e[k]:>+11.4f} ± {e[k + '_err']:.4f}"
        lines.append(row)
    if res.get("responsivity_table_problem"):
        lines.append(f"no responsivity table: {res['responsivity_table_problem']}")
    if "alpha" in res:
        a = res["alpha"]
        lines.append(
            "alpha (eq. 8, targets at g=0, deblended vs true e): "
            f"alpha1 = {a['alpha1']:+.4f} ± {a['alpha1_err']:.4f}, "
            f"alpha2 = {a['alpha2']:+.4f} ± {a['alpha2_err']:.4f} (n = {a['n']})"
        )
    return "\n".join(lines)
