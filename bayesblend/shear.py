"""Shear estimators from posterior catalogues and posterior ellipticity samples.

Two estimators of a constant reduced shear ``g = g1 + i g2`` over a field:

**Ensemble** (:func:`ensemble_shear`). The weighted mean of the catalogue's
shear-type ellipticities divided by a responsivity ``R``. For unbiased shapes
the mean of shear-type ellipticities estimates ``g`` directly (Seitz & Schneider
1997), so ``R = 1``; posterior summaries are shrunk towards round by the prior
and by noise, so ``R < 1`` and it is measured on simulations of the same model
and method (``bayesblend shear-bias --calibrate``) and stored in the model
card. Weights ``1 / (sigma_e^2 + sigma_i^2)`` use each source's posterior
ellipticity variance. Errors are delete-one-block jackknife over groups
(blends by default: neighbours share pixels, so their errors are correlated).

**Hierarchical** (:func:`hierarchical_shear`, Schneider et al. 2015,
arXiv:1411.2608). Each source's posterior draws ``e_ij`` were made under an
interim prior ``pi(e)``: in galaxy model v2 the ellipticity is a parameter of
the scene model with the Bernstein & Armstrong prior of the scale ``s`` in the
bundle's card (:class:`bayesblend.ellipticity.EtaPrior`), so ``pi`` is known
exactly (:func:`interim_prior_from_card`). The likelihood of the population
parameters is

    L(g, s) = prod_i (1/n_i) sum_j p(e_ij | g, s) / pi(e_ij),

with ``p(e | g, s) = p_s(e_s | s) |d e_s / d e|``, ``e_s = (e - g) / (1 - conj(g) e)``
the unlensed ellipticity and ``p_s`` the intrinsic distribution of Bernstein &
Armstrong (2014), ``p_s(e) ∝ (1 - |e|^2)^2 exp(-|e|^2 / 2 s^2)`` on the unit disc
(the simulator's population follows the same family). NUTS runs over
``(g1, g2, s)``; the per-source importance-weight effective sample size tells
where the posterior draws do not cover the population model.

Everything here works on arrays and tables: it knows nothing of scenes or
networks except through :class:`InterimPrior`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from astropy.table import Table

from bayesblend.catalog import E2SIGN, ELLIPTICITY_CONVENTION, FLAGS, SCENE_HEADER
from bayesblend.ellipticity import prior_log_density
from bayesblend.errors import BayesblendError

#: Per-component intrinsic shape dispersion of the ensemble weights (LSST-like, = the simulator's).
SIGMA_E = 0.26
#: Catalogue flags that exclude a source from shear estimates. UNRESOLVED: the shape is the
#: prior's. BLENDED: a neighbour's light dominates the source's pixels, and the fit often
#: hands it that neighbour's residuals (the HSC first-year shape catalogue, Mandelbaum et al.
#: 2018, cuts at 10^-0.375 = 0.42). On the stored shear-bias runs it removes no calibration
#: galaxy (seed 5) and 1 of 19 validation galaxies (seed 6): UNRESOLVED removes nearly all.
EXCLUDE_FLAGS = FLAGS["EDGE"] | FLAGS["MASKED_CENTRE"] | FLAGS["UNRESOLVED"] | FLAGS["BLENDED"]
#: Posterior-catalogue header keywords the shear catalogue carries over.
_SHEAR_HEADER = ("BUNDLE", "METHOD", "LATPRIOR", "SHAPEBND", "SHAPEPSF", *SCENE_HEADER.values())
#: Importance-weight ESS below which the hierarchical estimate counts a source as poorly covered.
IS_ESS_MIN = 5.0
#: Largest |g| and the range of the intrinsic scale ``s`` the hierarchical model allows.
G_MAX = 0.2
S_RANGE = (0.02, 1.0)
_MODE_START = (0.0, 0.0, 0.25)  # (g1, g2, s) where the maximum-likelihood search starts
_QUAD = 256  # quadrature nodes of the intrinsic distribution's normalisation


# ----------------------------------------------------------------------------- lensing algebra
def lens(e: jnp.ndarray, g: jnp.ndarray) -> jnp.ndarray:
    """Lensed shear-type ellipticity ``(e + g) / (1 + conj(g) e)`` (complex arrays)."""
    return (e + g) / (1.0 + jnp.conj(g) * e)


def unlens(e: jnp.ndarray, g: jnp.ndarray) -> jnp.ndarray:
    """Intrinsic ellipticity ``(e - g) / (1 - conj(g) e)`` of an observed one (inverse of :func:`lens`)."""
    return (e - g) / (1.0 - jnp.conj(g) * e)


def unlens_log_jacobian(e: jnp.ndarray, g: jnp.ndarray) -> jnp.ndarray:
    """``log |det d e_s / d e|`` of :func:`unlens` as a map of the plane (e1, e2) -> (e_s1, e_s2).

    The map is holomorphic, so the determinant is ``|f'(e)|^2`` with
    ``f'(e) = (1 - |g|^2) / (1 - conj(g) e)^2``.
    """
    return 2.0 * jnp.log1p(-(jnp.abs(g) ** 2)) - 4.0 * jnp.log(jnp.abs(1.0 - jnp.conj(g) * e))


# ----------------------------------------------------------------------------- intrinsic model
def _log_norm(s: jnp.ndarray) -> jnp.ndarray:
    """log of 2 pi int_0^1 r (1 - r^2)^2 exp(-r^2 / 2 s^2) dr (midpoint rule, exact enough at 256 nodes)."""
    r = (jnp.arange(_QUAD, dtype=jnp.float32) + 0.5) / _QUAD
    f = r * (1.0 - r**2) ** 2 * jnp.exp(-(r**2) / (2.0 * s**2))
    return jnp.log(2.0 * jnp.pi * jnp.sum(f) / _QUAD)


def intrinsic_log_density(e: jnp.ndarray, s: jnp.ndarray) -> jnp.ndarray:
    """Log density per unit (e1, e2) area of the intrinsic distribution at complex ``e``.

    Bernstein & Armstrong (2014): ``∝ (1 - |e|^2)^2 exp(-|e|^2 / 2 s^2)`` for ``|e| < 1``.
    """
    r2 = jnp.abs(e) ** 2
    inside = r2 < 1.0
    val = 2.0 * jnp.log(jnp.clip(1.0 - r2, 1e-12, None)) - r2 / (2.0 * s**2) - _log_norm(s)
    return jnp.where(inside, val, -jnp.inf)


def sheared_log_density(e: jnp.ndarray, g: jnp.ndarray, s: jnp.ndarray) -> jnp.ndarray:
    """Log density of observed ellipticity ``e`` for shear ``g`` and intrinsic scale ``s``."""
    return intrinsic_log_density(unlens(e, g), s) + unlens_log_jacobian(e, g)


def component_sigma(s: float) -> float:
    """Per-component dispersion of the intrinsic distribution of scale ``s``."""
    r = (np.arange(4096) + 0.5) / 4096
    p = r * (1 - r**2) ** 2 * np.exp(-(r**2) / (2 * s**2))
    return float(np.sqrt(np.sum(p * r**2) / np.sum(p) / 2.0))


# ----------------------------------------------------------------------------- interim prior
@dataclass(frozen=True)
class InterimPrior:
    """The prior ``pi(e)`` on shear-type ellipticity that a scene model's posterior draws were made under.

    Galaxy model v2 samples each source's ellipticity as a parameter with the
    Bernstein & Armstrong (2014) prior ``(1 - |e|^2)^2 exp(-|e|^2 / 2 s^2)``
    per unit (e1, e2) area, normalised on the unit disc
    (:class:`bayesblend.ellipticity.EtaPrior`), with ``s`` from the bundle's
    card; ``pi`` is that density, exactly (:func:`interim_prior_from_card`).
    The amortised method's draws come from an encoder trained on the
    simulator's population, which draws its ellipticities from the same form
    and scale.

    Attributes
    ----------
    s : float
        Scale of the form (dimensionless, > 0); :func:`component_sigma` gives
        its per-component dispersion.
    bundle : str
        Name of the model whose card it was read from (``""`` when made by hand).
    """

    s: float
    bundle: str = ""

    def __post_init__(self) -> None:
        if not (np.isfinite(self.s) and self.s > 0):
            raise BayesblendError(f"the interim prior's scale s must be a positive number, got {self.s}")

    def log_prob(self, e: jnp.ndarray) -> jnp.ndarray:
        """``log pi(e)`` per unit (e1, e2) area at complex ellipticities ``e`` (any shape).

        The scene model's own density (:func:`bayesblend.ellipticity.prior_log_density`);
        ``-inf`` where ``|e| >= 1``.
        """
        e = jnp.asarray(e)
        x = jnp.stack([jnp.real(e), jnp.imag(e)], axis=-1)
        return jnp.where(jnp.abs(e) < 1.0, prior_log_density(x, self.s), -jnp.inf)

    @property
    def sigma_e(self) -> float:
        """Per-component dispersion of ``pi`` (dimensionless)."""
        return component_sigma(self.s)


def interim_prior_from_card(card: dict) -> InterimPrior:
    """The interim ellipticity prior of a model: its card's ``ellipticity_prior``.

    Parameters
    ----------
    card : dict
        A bundle's model card (``PriorBundle.card``).

    Returns
    -------
    InterimPrior
        The Bernstein & Armstrong prior with the card's ``ellipticity_prior["s"]``.

    Raises
    ------
    BayesblendError
        In one line, when the card has no ``ellipticity_prior`` scale (no
        explicit ellipticity parameter, so no known interim prior) or a scale
        that is not a positive number.
    """
    name = card.get("name", "?")
    try:
        s = float(card["ellipticity_prior"]["s"])
    except (KeyError, TypeError, ValueError):
        raise BayesblendError(
            f"model card {name!r} has no ellipticity_prior scale s: the interim prior of its "
            "posterior ellipticities is unknown (a galaxy model v2 card records it)"
        ) from None
    if not (np.isfinite(s) and s > 0):
        raise BayesblendError(f"model card {name!r}: ellipticity_prior s must be a positive number, got {s}")
    return InterimPrior(s=s, bundle=str(name))


# ----------------------------------------------------------------------------- shear catalogue
def shape_weight(e1_std: np.ndarray, e2_std: np.ndarray, sigma_e: float = SIGMA_E) -> np.ndarray:
    """Inverse-variance weight ``1 / (sigma_e^2 + (std_e1^2 + std_e2^2) / 2)``."""
    var = 0.5 * (np.asarray(e1_std, float) ** 2 + np.asarray(e2_std, float) ** 2)
    return 1.0 / (sigma_e**2 + np.where(np.isfinite(var), var, np.inf))


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


def usable_shapes(
    e1: np.ndarray, e2: np.ndarray, flags: np.ndarray, exclude: int = EXCLUDE_FLAGS
) -> np.ndarray:
    """Finite e1, e2 with ``|e| < 1`` and no flag of ``exclude`` (arrays of any one shape)."""
    return valid_shapes(e1, e2) & ((np.asarray(flags, np.int64) & exclude) == 0)


def valid_shapes(e1: np.ndarray, e2: np.ndarray) -> np.ndarray:
    """Where a shear-type ellipticity is a shape at all: finite and ``|e| < 1`` (arrays of one shape)."""
    e1 = np.asarray(e1, float)
    e2 = np.asarray(e2, float)
    with np.errstate(invalid="ignore"):
        return np.isfinite(e1) & np.isfinite(e2) & (np.hypot(e1, e2) < 1.0)


def usable(catalog: Table) -> np.ndarray:
    """Sources of a catalogue a shear estimate may use (:func:`usable_shapes`)."""
    return usable_shapes(catalog["e1"], catalog["e2"], catalog["flags"])


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


def shear_catalog(
    catalog: Table,
    responsivity: float | ResponsivityTable = 1.0,
    sigma_e: float = SIGMA_E,
    source: str = "none",
) -> Table:
    """The weak-lensing catalogue of a posterior catalogue.

    Columns ``id, blend_id, ra, dec, x, y, e1, e2, e1_std, e2_std, weight,
    responsivity, flags``; unusable sources (:func:`usable`) get weight 0.
    ``responsivity`` is one R for every source or a :class:`ResponsivityTable`
    giving each its own from its posterior e dispersion. The header carries
    the ellipticity convention, the sign of e2 and where the responsivity came
    from; the field's shear is ``sum(w e) / sum(w R)``.
    """
    ok = usable(catalog)
    out = Table()
    for c in ("id", "blend_id", "ra", "dec", "x", "y", "e1", "e2", "e1_std", "e2_std"):
        out[c] = catalog[c]
    w = np.where(ok, shape_weight(catalog["e1_std"], catalog["e2_std"], sigma_e), 0.0)
    out["weight"] = w
    out["weight"].description = f"1/(sigma_e^2 + posterior e variance), sigma_e = {sigma_e}; 0 if unusable"
    if isinstance(responsivity, ResponsivityTable):
        out["responsivity"] = responsivity(catalog["e1_std"], catalog["e2_std"])
        how = "per source, from its posterior e dispersion (RESPBINS)"
        out.meta["RESPBINS"] = json.dumps(responsivity.to_dict())
    else:
        out["responsivity"] = np.full(len(catalog), float(responsivity))
        how = "one for all sources"
    out["responsivity"].description = f"shear responsivity R: <e> = R g (measured on simulations; {how})"
    out["flags"] = catalog["flags"]
    if "resolution" in catalog.colnames:
        out["resolution"] = catalog["resolution"]
    out.meta.update({k: v for k, v in catalog.meta.items() if k in _SHEAR_HEADER})
    out.meta.update(
        {
            "ELLCONV": ELLIPTICITY_CONVENTION,
            "E2SIGN": E2SIGN,
            "SIGMA_E": float(sigma_e),
            "RESPSRC": source,
            "ESTIMATR": "g = sum(w e) / sum(w R)",
        }
    )
    return out


# ----------------------------------------------------------------------------- ensemble
@dataclass
class ShearEstimate:
    """A field's shear with its errors.

    Attributes
    ----------
    g1, g2, g1_err, g2_err : float
    n : int
        Sources used.
    estimator : str
    details : dict
        Estimator-specific extras (responsivity, sigma_e, ESS...).
    """

    g1: float
    g2: float
    g1_err: float
    g2_err: float
    n: int
    estimator: str
    details: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return (
            f"g1 = {self.g1:+.5f} ± {self.g1_err:.5f}   g2 = {self.g2:+.5f} ± {self.g2_err:.5f}   "
            f"({self.estimator}, {self.n} sources)"
        )


def jackknife_blocks(groups: np.ndarray, n_blocks: int = 100) -> np.ndarray:
    """Block index of each row: whole groups go to one block, at most ``n_blocks`` blocks."""
    _, inverse = np.unique(np.asarray(groups), return_inverse=True)
    k = min(n_blocks, int(inverse.max()) + 1) if inverse.size else 1
    return inverse % k


def jackknife(values: np.ndarray, replicates: np.ndarray) -> np.ndarray:
    """Delete-one-block jackknife standard error from the ``(block, ...)`` leave-one-out ``replicates``."""
    k = replicates.shape[0]
    if k < 2:
        return np.full(np.shape(values), np.nan)
    mean = replicates.mean(axis=0)
    return np.sqrt((k - 1) / k * np.sum((replicates - mean) ** 2, axis=0))


def weighted_mean_replicates(
    x: np.ndarray, w: np.ndarray, blocks: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean of ``x`` ``(n, ...)`` over rows, and its leave-one-block-out replicates.

    A replicate is NaN where the other blocks have no weight (one block holds
    all of it), so the jackknife error is NaN: undefined, not zero.
    """
    x = np.asarray(x, float)
    w = np.asarray(w, float)
    wx = w.reshape(w.shape + (1,) * (x.ndim - 1)) * x
    k = int(blocks.max()) + 1 if blocks.size else 1
    sum_wx = np.zeros((k,) + x.shape[1:])
    sum_w = np.zeros(k)
    np.add.at(sum_wx, blocks, wx)
    np.add.at(sum_w, blocks, w)
    full = sum_wx.sum(0) / sum_w.sum()
    rest_w = (sum_w.sum() - sum_w).reshape((k,) + (1,) * (x.ndim - 1))
    with np.errstate(invalid="ignore", divide="ignore"):
        reps = (sum_wx.sum(0) - sum_wx) / rest_w
    return full, reps


def weighted_ratio_replicates(
    e: np.ndarray, responsivity: np.ndarray, w: np.ndarray, blocks: np.ndarray
) -> tuple[np.ndarray, np.ndarray, float]:
    """``sum(w e) / sum(w R)`` over rows, its leave-one-block-out replicates, and ``sum(w R) / sum(w)``.

    ``e`` ``(n, 2)``, ``responsivity`` and ``w`` ``(n,)``: numerator and
    denominator are replicated together, so the jackknife carries the
    galaxy-to-galaxy spread of R as well as of e.
    """
    full, reps = weighted_mean_replicates(np.c_[e, responsivity], w, blocks)
    return full[:2] / full[2], reps[:, :2] / reps[:, 2:], float(full[2])


def ensemble_shear(
    e1: np.ndarray,
    e2: np.ndarray,
    weight: np.ndarray | None = None,
    responsivity: float | np.ndarray = 1.0,
    groups: np.ndarray | None = None,
    n_blocks: int = 100,
) -> ShearEstimate:
    """``g = sum(w e) / sum(w R)`` with delete-one-block jackknife errors.

    Parameters
    ----------
    e1, e2 : array
        Shear-type ellipticities (dimensionless); non-finite rows are skipped.
    weight : array, optional
        Per-source weights (default 1); rows of weight 0 are skipped.
    responsivity : float or array
        ``R`` of ``<e> = R g``: one for all sources, or one per source (a
        :class:`ResponsivityTable`'s); the jackknife replicates the ratio.
    groups : array, optional
        Group label per source (e.g. blend id); a group is never split across
        jackknife blocks. Default: each source its own group.
    n_blocks : int
        Jackknife blocks.
    """
    e = np.stack([np.asarray(e1, float), np.asarray(e2, float)], axis=1)
    w = np.ones(len(e)) if weight is None else np.asarray(weight, float)
    R = np.broadcast_to(np.asarray(responsivity, float), (len(e),))
    ok = np.all(np.isfinite(e), axis=1) & np.isfinite(w) & (w > 0)
    if not np.all(np.isfinite(R[ok]) & (R[ok] > 0)):
        raise BayesblendError(f"responsivity must be positive numbers, got {np.unique(R[ok])[:5]}")
    if ok.sum() < 2:
        raise BayesblendError(f"a shear estimate needs at least 2 usable sources, got {int(ok.sum())}")
    groups = np.arange(len(e)) if groups is None else np.asarray(groups)
    blocks = jackknife_blocks(groups[ok], n_blocks)
    g, reps, mean_R = weighted_ratio_replicates(e[ok], R[ok], w[ok], blocks)
    err = jackknife(g, reps)
    return ShearEstimate(
        g1=float(g[0]),
        g2=float(g[1]),
        g1_err=float(err[0]),
        g2_err=float(err[1]),
        n=int(ok.sum()),
        estimator="ensemble",
        details={"responsivity": mean_R, "n_blocks": int(blocks.max()) + 1},
    )


# ----------------------------------------------------------------------------- hierarchical
def _log_like_terms(params, e, log_interim, valid):
    """Per-source log of the mean importance weight, and the log weights ``(source, draw)``."""
    g = params[0] + 1j * params[1]
    logw = sheared_log_density(e, g, params[2]) - log_interim
    logw = jnp.where(valid, logw, -jnp.inf)
    n = jnp.maximum(jnp.sum(valid, axis=1), 1)
    per_source = jax.nn.logsumexp(logw, axis=1) - jnp.log(n)
    return jnp.where(jnp.any(valid, axis=1), per_source, 0.0), logw


def hierarchical_log_likelihood(
    params: jnp.ndarray,
    e: jnp.ndarray,
    log_interim: jnp.ndarray,
    valid: jnp.ndarray,
    source_weight: jnp.ndarray | None = None,
) -> jnp.ndarray:
    """``sum_i w_i log( mean_j p(e_ij | g, s) / pi(e_ij) )`` for ``params = (g1, g2, s)``.

    ``e`` is complex ``(source, draw)``; ``valid`` marks real draws;
    ``source_weight`` (default 1) lets the jackknife drop sources.
    """
    per_source, _ = _log_like_terms(params, e, log_interim, valid)
    if source_weight is not None:
        per_source = per_source * source_weight
    return jnp.sum(per_source)


def importance_ess(
    params: jnp.ndarray | np.ndarray | Sequence[float],
    e: jnp.ndarray,
    log_interim: jnp.ndarray,
    valid: jnp.ndarray,
) -> jnp.ndarray:
    """Effective sample size of each source's importance weights at ``params``.

    Parameters
    ----------
    params : array ``(3,)``
        ``(g1, g2, s)``: reduced shear and intrinsic shape dispersion.
    e : array ``(source, draw)``
        Complex shear-type ellipticities of the posterior draws.
    log_interim : array ``(source, draw)``
        ``log pi(e)`` of the draws under the interim prior.
    valid : bool array ``(source, draw)``
        Real draws with a valid shape.

    Returns
    -------
    jax.Array
        ``(source,)`` ``(sum w)^2 / sum w^2``, in draws.
    """
    _, logw = _log_like_terms(jnp.asarray(params), e, log_interim, valid)
    w = jnp.exp(logw - jnp.max(logw, axis=1, keepdims=True))
    w = jnp.where(valid, w, 0.0)
    return jnp.sum(w, axis=1) ** 2 / jnp.maximum(jnp.sum(w**2, axis=1), 1e-30)


def _prepare_samples(e1: np.ndarray, e2: np.ndarray, interim: InterimPrior):
    e1 = np.asarray(e1, np.float32)
    e2 = np.asarray(e2, np.float32)
    if e1.ndim != 2 or e1.shape != e2.shape:
        raise BayesblendError(
            f"ellipticity samples must be (source, draw) arrays of one shape, got {e1.shape}, {e2.shape}"
        )
    valid = valid_shapes(e1, e2)
    e = jnp.asarray(np.where(valid, e1, 0.0) + 1j * np.where(valid, e2, 0.0), jnp.complex64)
    return e, interim.log_prob(e), jnp.asarray(valid)


def _unconstrain(p):
    """(g1, g2, s) -> unbounded coordinates (the optimiser's)."""
    g = p[:2] / G_MAX
    s01 = (p[2] - S_RANGE[0]) / (S_RANGE[1] - S_RANGE[0])
    return jnp.concatenate([jnp.arctanh(g), jnp.log(s01 / (1 - s01))[None]])


def _constrain(q):
    g = G_MAX * jnp.tanh(q[:2])
    s = S_RANGE[0] + (S_RANGE[1] - S_RANGE[0]) * jax.nn.sigmoid(q[2])
    return jnp.concatenate([g, s[None]])


@jax.jit
def _mode(e, log_interim, valid, source_weight, start):
    """Maximum-likelihood ``(g1, g2, s)`` by Newton steps in unconstrained coordinates."""

    def nll(q):
        return -hierarchical_log_likelihood(_constrain(q), e, log_interim, valid, source_weight)

    def step(q, _):
        grad = jax.grad(nll)(q)
        hess = jax.hessian(nll)(q)
        hess = hess + 1e-3 * jnp.eye(3) * (1.0 + jnp.abs(jnp.diag(hess)))
        dq = jnp.linalg.solve(hess, grad)
        dq = jnp.clip(dq, -0.5, 0.5)
        return q - dq, None

    q, _ = jax.lax.scan(step, _unconstrain(start), None, length=30)
    return _constrain(q)


def hierarchical_mode(
    e1: np.ndarray,
    e2: np.ndarray,
    interim: InterimPrior,
    source_weight: np.ndarray | None = None,
    start: Sequence[float] = _MODE_START,
) -> np.ndarray:
    """Maximum-likelihood ``(g1, g2, s)`` of the hierarchical model.

    ``source_weight`` may have leading axes ``(..., source)``: one fit per row
    (vmapped; the jackknife uses it).
    """
    return _modes(*_prepare_samples(e1, e2, interim), source_weight, start)


def _modes(e, logi, valid, source_weight, start) -> np.ndarray:
    """:func:`hierarchical_mode` on samples already through :func:`_prepare_samples`."""
    n = e.shape[0]
    sw = jnp.ones(n) if source_weight is None else jnp.asarray(source_weight, jnp.float32)
    start = jnp.asarray(start, jnp.float32)
    if sw.ndim == 1:
        return np.asarray(_mode(e, logi, valid, sw, start))
    flat = sw.reshape(-1, n)
    fits = jax.vmap(lambda w: _mode(e, logi, valid, w, start))(flat)
    return np.asarray(fits).reshape(sw.shape[:-1] + (3,))


def hierarchical_shear(
    e1: np.ndarray,
    e2: np.ndarray,
    interim: InterimPrior,
    num_warmup: int = 300,
    num_samples: int = 500,
    num_chains: int = 2,
    seed: int = 0,
) -> ShearEstimate:
    """Posterior of ``(g1, g2, s)`` by NUTS from posterior ellipticity draws made under ``interim``.

    Parameters
    ----------
    e1, e2 : array ``(source, draw)``
        Each source's posterior draws (NaN where a draw failed).
    interim : InterimPrior
        The prior the draws were made under (:func:`interim_prior_from_card` of
        the model that made them).
    num_warmup, num_samples, num_chains, seed
        NUTS settings (chains vectorised).

    Returns
    -------
    ShearEstimate
        Posterior means and standard deviations of g1, g2; ``details`` has the
        intrinsic scale ``s`` and ``sigma_e`` (per component), the interim
        prior's scale ``interim_s``, r-hat, the per-source importance ESS and
        the number of sources below :data:`IS_ESS_MIN`.
    """
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer import MCMC, NUTS

    e, logi, valid = _prepare_samples(e1, e2, interim)
    has = np.asarray(jnp.any(valid, axis=1))
    if has.sum() < 2:
        raise BayesblendError(
            f"the hierarchical estimate needs at least 2 sources with draws, got {int(has.sum())}"
        )

    def model():
        g1 = numpyro.sample("g1", dist.Uniform(-G_MAX, G_MAX))
        g2 = numpyro.sample("g2", dist.Uniform(-G_MAX, G_MAX))
        s = numpyro.sample("s", dist.Uniform(*S_RANGE))
        numpyro.factor("loglike", hierarchical_log_likelihood(jnp.stack([g1, g2, s]), e, logi, valid))

    start = _modes(e, logi, valid, None, _MODE_START)
    init = {
        "g1": jnp.full(num_chains, start[0]),
        "g2": jnp.full(num_chains, start[1]),
        "s": jnp.full(num_chains, start[2]),
    }
    mcmc = MCMC(
        NUTS(model),
        num_warmup=num_warmup,
        num_samples=num_samples,
        num_chains=num_chains,
        chain_method="vectorized",
        progress_bar=False,
    )
    mcmc.run(jax.random.PRNGKey(seed), init_params=init)
    s = {k: np.asarray(v) for k, v in mcmc.get_samples(group_by_chain=True).items()}
    from numpyro.diagnostics import split_gelman_rubin

    r_hat = {k: float(split_gelman_rubin(v)) for k, v in s.items()}
    post_mean = np.array([s["g1"].mean(), s["g2"].mean(), s["s"].mean()])
    ess = np.asarray(importance_ess(jnp.asarray(post_mean, jnp.float32), e, logi, valid))
    ess = np.where(has, ess, 0.0)
    return ShearEstimate(
        g1=float(post_mean[0]),
        g2=float(post_mean[1]),
        g1_err=float(s["g1"].std()),
        g2_err=float(s["g2"].std()),
        n=int(has.sum()),
        estimator="hierarchical",
        details={
            "s": float(post_mean[2]),
            "sigma_e": component_sigma(float(post_mean[2])),
            "interim_s": float(interim.s),
            "r_hat": r_hat,
            "importance_ess": ess,
            "n_low_ess": int(np.sum(has & (ess < IS_ESS_MIN))),
            "mode": [float(x) for x in start],
            "samples": {k: v.reshape(-1) for k, v in s.items()},
        },
    )


# ----------------------------------------------------------------------------- posterior samples on disk
def posterior_ellipticities(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(e1, e2)`` draws ``(source, draw)`` and the attributes of a ``posterior.nc``."""
    import xarray as xr

    path = Path(path)
    if not path.exists():
        raise BayesblendError(f"{path}: no such posterior file")
    try:
        ds = xr.open_dataset(path, group="posterior", engine="h5netcdf")
    except (OSError, ValueError) as exc:
        raise BayesblendError(
            f"{path}: not a bayesblend posterior netCDF ({exc.__class__.__name__})"
        ) from None
    with ds:
        if "e1" not in ds or "e2" not in ds:
            raise BayesblendError(f"{path}: posterior has no e1/e2 draws")

        def flat(v):
            a = np.asarray(ds[v].transpose("source", "chain", "draw").values, np.float32)
            return a.reshape(a.shape[0], -1)

        return flat("e1"), flat("e2"), dict(ds.attrs)


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
