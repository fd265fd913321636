"""Shear bias m, c from the harness's items: per estimator, by S/N and blendedness.

Reads the items of :mod:`bayesblend.shear.harness` and estimates, per
variant and estimator (:data:`~bayesblend.shear.harness.ESTIMATORS`), the
field's shear from the galaxies kept in all ten variants, then

    m_i = (g_hat_i(+g) - g_hat_i(-g)) / (2 g) - 1,      c_i = g_hat_i(0, 0)

with delete-one-block jackknife errors over items; also the ellipticity
slope ``alpha`` and the responsivity table a calibration run stores.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from bayesblend.catalog import FLAGS
from bayesblend.errors import BayesblendError
from bayesblend.shear.calibration import ResponsivityTable, posterior_e_sigma, responsivity_table
from bayesblend.shear.catalog import EXCLUDE_FLAGS, shape_weight, usable_shapes
from bayesblend.shear.estimators import hierarchical_mode
from bayesblend.shear.harness import ESTIMATORS, load_items, pooled_config, run_dirs
from bayesblend.shear.lensing import InterimPrior
from bayesblend.shear.statistics import jackknife, jackknife_blocks, weighted_ratio_replicates
from bayesblend.simulate.scenes import SHEAR_DESIGN


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
            f"{', '.join(map(str, run_dirs(out)))}: none of its {use.size} galaxies is usable in all 10 "
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
    for e in est.values():  # sigma_m scales as 1/sqrt(n): the galaxies this selection needs for the goal
        e["galaxies_for_sigma_m"] = galaxies_for_sigma_m(e["m_err"], e.get("n", res["n_used"]))
    res["estimators"] = est
    gr = galaxy_responses(sel, g)
    resp = gr["response"][np.isfinite(gr["response"])]
    if resp.size >= 2 and np.mean(resp) != 0:
        sd, mean = float(np.std(resp, ddof=1)), float(np.mean(resp))
        res["response_scatter"] = {
            "mean": mean,
            "sd": sd,
            "sigma_m": sd / abs(mean) / np.sqrt(resp.size),
            "galaxies_for_sigma_m": galaxies_for_sigma_m(sd / abs(mean), 1),
        }
    res["responsivity_table"] = None
    res["responsivity_table_problem"] = None
    try:
        res["responsivity_table"] = responsivity_table(
            gr["response"], gr["e_sigma"], gr["weight"], items[use], n_bins=n_bins
        ).to_dict()
    except BayesblendError as exc:  # the summary stands without it; say why it has none
        res["responsivity_table_problem"] = str(exc)
    return res


#: The sigma_m the harness is sized for (issue 24): galaxies needed are reported against it.
SIGMA_M_GOAL = 0.01


def galaxies_for_sigma_m(sigma_m: float, n: int, goal: float = SIGMA_M_GOAL) -> int | None:
    """Galaxies giving ``goal`` from ``sigma_m`` measured on ``n`` (``sigma_m ∝ n^-1/2``); None if unknown."""
    if not (np.isfinite(sigma_m) and sigma_m > 0 and n > 0):
        return None
    return int(np.ceil(n * (sigma_m / goal) ** 2))


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
    need = {k: e.get("galaxies_for_sigma_m") for k, e in res["estimators"].items() if k != "truth"}
    if need:
        lines.append(
            f"galaxies for sigma_m = {SIGMA_M_GOAL:g} (from the jackknife sigma_m, ∝ n^-1/2): "
            + ", ".join(f"{k} {v if v is not None else '?'}" for k, v in need.items())
        )
    if res.get("response_scatter"):
        rs = res["response_scatter"]
        lines.append(
            f"per-galaxy response {rs['mean']:.3f} ± {rs['sd']:.3f} (sd): sigma_m {rs['sigma_m']:.4f} from "
            f"its scatter; {rs['galaxies_for_sigma_m']} galaxies for sigma_m = {SIGMA_M_GOAL:g}"
        )
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
