"""Shear responsivity measured on simulations: one R or a table in the posterior e dispersion.

The ensemble estimator divides the mean ellipticity by a responsivity ``R``
(``<e> = R g``). Posterior summaries are shrunk towards round by the prior
and by noise, so ``R < 1``; it is measured on simulations of the same model,
method and scene-model settings (``bayesblend shear-bias --calibrate``) and
stored in the model card. The hierarchical estimator
(:mod:`bayesblend.shear.estimators`) needs none of this.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bayesblend.catalog import SCENE_HEADER
from bayesblend.errors import BayesblendError
from bayesblend.shear.statistics import jackknife, jackknife_blocks, weighted_mean_replicates


def posterior_e_sigma(e1_std: np.ndarray, e2_std: np.ndarray) -> np.ndarray:
    """Per-component posterior ellipticity dispersion ``sqrt((std_e1^2 + std_e2^2) / 2)``.

    The variable the responsivity is tabulated in (:class:`ResponsivityTable`):
    how far the data, rather than the prior, set a galaxy's shape.
    """
    return np.sqrt(0.5 * (np.asarray(e1_std, float) ** 2 + np.asarray(e2_std, float) ** 2))


@dataclass(frozen=True)
class ResponsivityTable:
    """Shear responsivity as a step function of the posterior ellipticity dispersion.

    A galaxy whose shape the data pin down responds to shear almost fully; one
    whose posterior sits on the prior hardly responds. A single R measured on
    simulations holds only for a population with the simulations' mix of the
    two; tabulated in an observable (:func:`posterior_e_sigma`), it follows a
    population of another depth or size mix (the binned calibration of the
    KiDS and DES shear catalogues, here in one variable).

    Attributes
    ----------
    edges : tuple of float
        Inner bin edges in posterior e dispersion (``n_bins - 1``, increasing).
    R, R_err : tuple of float
        Weighted mean response and its jackknife error per bin (``n_bins``).
    n : tuple of int
        Calibration galaxies per bin.
    """

    edges: tuple[float, ...]
    R: tuple[float, ...]
    R_err: tuple[float, ...]
    n: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.R) != len(self.edges) + 1 or not np.all(np.diff(self.edges) > 0):
            raise BayesblendError("a responsivity table needs increasing edges and one R per bin")
        if not all(np.isfinite(r) and r > 0 for r in self.R):
            raise BayesblendError(f"responsivities must be positive numbers, got {self.R}")

    def __call__(self, e1_std: np.ndarray, e2_std: np.ndarray) -> np.ndarray:
        """Each galaxy's R from its posterior e1/e2 standard deviations (non-finite: the last bin)."""
        s = posterior_e_sigma(e1_std, e2_std)
        s = np.where(np.isfinite(s), s, np.inf)
        return np.asarray(self.R)[np.searchsorted(np.asarray(self.edges), s, side="right")]

    def __str__(self) -> str:
        """The bins as ``lo-hi: R ± err (n)``, comma-separated (dispersion edges to 3 decimals)."""
        lo = ["0", *(f"{x:.3f}" for x in self.edges)]
        hi = [*(f"{x:.3f}" for x in self.edges), "inf"]
        return ", ".join(
            f"{a}-{b}: {r:.3f} ± {e:.3f} ({n})"
            for a, b, r, e, n in zip(lo, hi, self.R, self.R_err, self.n, strict=True)
        )

    @property
    def mean(self) -> float:
        """The calibration set's overall R (bins weighted by their galaxies)."""
        return float(np.average(self.R, weights=self.n))

    def to_dict(self) -> dict:
        """A JSON-ready dict (the model card's ``R_table``)."""
        return {
            "variable": "posterior_e_sigma",
            **{k: list(getattr(self, k)) for k in ("edges", "R", "R_err", "n")},
        }

    @classmethod
    def from_dict(cls, d: dict) -> ResponsivityTable:
        """Inverse of :meth:`to_dict`."""
        return cls(tuple(d["edges"]), tuple(d["R"]), tuple(d["R_err"]), tuple(int(v) for v in d["n"]))


#: The fewest calibration galaxies per bin of a :class:`ResponsivityTable`.
GALAXIES_PER_BIN = 5


def responsivity_table(
    response: np.ndarray, e_sigma: np.ndarray, weight: np.ndarray, groups: np.ndarray, n_bins: int = 3
) -> ResponsivityTable:
    """Tabulate per-galaxy shear responses in quantile bins of the posterior e dispersion.

    Parameters
    ----------
    response : array ``(galaxy,)``
        Each calibration galaxy's response ``d<e>/dg`` (dimensionless), e.g. from
        the shear-bias harness's paired ``+g``/``-g`` variants.
    e_sigma : array ``(galaxy,)``
        Its posterior e dispersion (:func:`posterior_e_sigma`).
    weight : array ``(galaxy,)``
        Its ensemble weight (:func:`shape_weight`): R per bin is the weighted mean,
        as the ensemble estimator averages.
    groups : array ``(galaxy,)``
        Jackknife groups (e.g. simulation items).
    n_bins : int
        Bins, with equal numbers of galaxies.

    Raises
    ------
    BayesblendError
        With the reason in one line: fewer than one bin, fewer than
        ``GALAXIES_PER_BIN`` usable galaxies per bin, bins that cannot be told
        apart (tied dispersion quantiles) or a bin whose mean response is not
        positive (no table can divide by it).
    """
    response, e_sigma, weight = (np.asarray(a, float) for a in (response, e_sigma, weight))
    if n_bins < 1:
        raise BayesblendError(f"a responsivity table needs at least one bin, got {n_bins}")
    ok = np.isfinite(response) & np.isfinite(e_sigma) & (weight > 0)
    if ok.sum() < GALAXIES_PER_BIN * n_bins:
        raise BayesblendError(
            f"a {n_bins}-bin responsivity table needs at least {GALAXIES_PER_BIN * n_bins} galaxies, "
            f"got {int(ok.sum())}"
        )
    edges = np.quantile(e_sigma[ok], np.arange(1, n_bins) / n_bins)
    which = np.searchsorted(edges, e_sigma[ok], side="right")
    blocks = jackknife_blocks(np.asarray(groups)[ok], 50)
    R, R_err, n = [], [], []
    for b in range(n_bins):  # a few bins
        sel = which == b
        full, reps = weighted_mean_replicates(response[ok][sel], weight[ok][sel], blocks[sel])
        R.append(float(full))
        R_err.append(float(jackknife(full, reps[np.unique(blocks[sel])])))
        n.append(int(sel.sum()))
    return ResponsivityTable(tuple(float(e) for e in edges), tuple(R), tuple(R_err), tuple(n))


def responsivity_from_card(
    card: dict,
    method: str,
    scene_model: dict | None = None,
    binned: bool = False,
) -> tuple[float | ResponsivityTable, str]:
    """The shear responsivity of ``method`` stored in a model card, and where it came from.

    With ``binned``, the entry's :class:`ResponsivityTable` (``R_table``) when it
    has one, else its single R.

    Returns ``(1.0, "none")`` with a warning when the card holds none for that
    method, or none that applies: when ``scene_model``
    (:meth:`bayesblend.settings.InferenceConfig.scene_model_settings`, e.g. read back from a
    catalogue header with :func:`scene_model_from_header`) is given, it must
    equal the settings R was measured under. R is the mean response of the
    shapes a scene model produces: a change of flux prior or model error
    changes those shapes, and an R from another scene model would calibrate
    them wrongly.
    """
    entry = card.get("shear_responsivity", {}).get(method)
    if entry is None:
        return _uncalibrated(f"model card has no shear responsivity for method {method!r}")
    if scene_model is not None:
        made = entry.get("scene_model", {})
        differ = sorted(k for k in set(made) | set(scene_model) if made.get(k) != scene_model.get(k))
        if differ:
            these = ", ".join(f"{k}={scene_model.get(k, 'unrecorded')}" for k in differ)
            then = ", ".join(f"{k}={made.get(k, 'unrecorded')}" for k in differ)
            return _uncalibrated(
                f"the card's responsivity for {method!r} was measured with {then}; "
                f"these shapes were made with {these}"
            )
    source = str(entry.get("command", "model card"))
    if binned and "R_table" in entry:
        return ResponsivityTable.from_dict(entry["R_table"]), source
    return float(entry["R"]), source


def _uncalibrated(reason: str) -> tuple[float, str]:
    warnings.warn(f"{reason}: using R = 1 (uncalibrated)", stacklevel=3)
    return 1.0, "none"


def scene_model_from_header(meta: dict) -> dict:
    """The scene-model settings in a catalogue header (``catalog.SCENE_HEADER``); absent ones left out."""
    out = {}
    for k, key in SCENE_HEADER.items():
        if key in meta:
            v = meta[key]
            out[k] = v if isinstance(v, str) else float(v)
    return out


def store_responsivity(
    bundle_path: str | Path, method: str, ensemble: dict, summary: dict, command: str
) -> dict:
    """Store ``R = 1 + m`` of the ensemble estimator for ``method`` in a bundle's card; returns the entry.

    ``ensemble`` is the harness's uncalibrated ensemble result (m1, m2 and
    errors), ``summary`` the whole harness summary (its configuration and N,
    and its :class:`ResponsivityTable` as ``responsivity_table`` when it has one:
    stored as ``R_table``).
    """
    from bayesblend.prior.bundle import update_card

    entry = {
        "R": 1.0 + ensemble["m"],
        "R_err": ensemble["m_err"],
        "R11": 1.0 + ensemble["m1"],
        "R22": 1.0 + ensemble["m2"],
        "R11_err": ensemble["m1_err"],
        "R22_err": ensemble["m2_err"],
        "kind": summary["config"]["kind"],
        "latent_prior": summary["config"]["latent_prior"],
        "detect": summary["config"]["detect"],
        "seed": summary["config"]["seed"],
        "n_items": summary["n_items"],
        "n_galaxies": summary["n_used"],
        "scene_model": summary["config"].get("scene_model", {}),
        "command": command,
    }
    if summary.get("responsivity_table") is not None:
        entry["R_table"] = summary["responsivity_table"]
    update_card(bundle_path, f"shear_responsivity.{method}", entry)
    return entry
