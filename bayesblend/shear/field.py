"""The field's shear from a deblending run: the workflow behind ``bayesblend shear``.

:func:`field_shear` reads a posterior catalogue and, when there is one, its
posterior draws; builds the shear catalogue; and runs the estimators, the
default first: the hierarchical model on the posterior draws (no calibration
from simulations), then the ensemble mean as the quick look. The CLI only
parses arguments and prints what this returns.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.table import Table

from bayesblend.errors import BayesblendError
from bayesblend.shear.calibration import ResponsivityTable, responsivity_from_card, scene_model_from_header
from bayesblend.shear.catalog import SIGMA_E, posterior_ellipticities, shear_catalog
from bayesblend.shear.estimators import ShearEstimate, ensemble_shear, hierarchical_shear
from bayesblend.shear.lensing import interim_prior_from_card

#: Columns a posterior catalogue must have for a shear estimate.
CATALOG_COLUMNS = ("id", "blend_id", "x", "y", "ra", "dec", "e1", "e2", "e1_std", "e2_std", "flags")
#: Where the draws of a catalogue are looked for beside it when no posterior is named: the directory
#: of parts ``bayesblend deblend`` writes (:mod:`bayesblend.runs`), else a single file.
POSTERIOR_NAMES = ("posterior", "posterior.nc")


@dataclass
class FieldShear:
    """The estimates of one field's shear, and the shear catalogue they came from.

    Attributes
    ----------
    estimates : dict of str to ShearEstimate
        By estimator name, the default first (``hierarchical`` when posterior
        draws were read, else ``ensemble``).
    shear_catalog : astropy.table.Table
        :func:`~bayesblend.shear.catalog.shear_catalog` of the posterior catalogue.
    posterior : str or None
        The posterior draws used, if any.
    """

    estimates: dict[str, ShearEstimate]
    shear_catalog: Table
    posterior: str | None = None

    @property
    def default(self) -> ShearEstimate:
        """The default estimator's estimate."""
        return next(iter(self.estimates.values()))

    def to_dict(self) -> dict:
        """``{estimator: {g1, g2, g1_err, g2_err, n}}``, the default estimator first (JSON-ready)."""
        keys = ("g1", "g2", "g1_err", "g2_err", "n")
        return {name: {k: getattr(e, k) for k in keys} for name, e in self.estimates.items()}

    def write_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` to ``path`` atomically (a temporary file renamed on success)."""
        from bayesblend.io import atomic_path

        path = Path(path)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path


def field_shear(
    catalog: Table | str | Path,
    posterior: str | Path | None = None,
    bundle=None,
    sigma_e: float | None = None,
    seed: int = 0,
    find_posterior: bool = True,
) -> FieldShear:
    """Estimate a field's constant shear from a deblending run.

    Parameters
    ----------
    catalog : Table or path
        The posterior catalogue (``bayesblend deblend``'s ``catalog.fits``).
    posterior : path, optional
        Its posterior draws: a ``posterior.nc`` or a run's ``posterior/``
        directory of parts. Default: the ``posterior/`` (else ``posterior.nc``)
        beside a catalogue read from a path, when it exists (``find_posterior``).
    bundle : PriorBundle or str, optional
        The model that made the catalogue (default: its header's ``BUNDLE``):
        its card gives the interim prior of the hierarchical estimator and any
        stored responsivity of the ensemble one.
    sigma_e : float, optional
        Shape-noise term of the ensemble weights (default :data:`SIGMA_E`).
    seed : int
        Seed of the hierarchical estimator's NUTS.
    find_posterior : bool
        Look for the draws beside the catalogue when ``posterior`` is None.

    Returns
    -------
    FieldShear
        ``hierarchical`` first when there are posterior draws, then ``ensemble``.

    Raises
    ------
    BayesblendError
        In one line: a catalogue without the columns of a posterior catalogue,
        posterior draws that do not match it, or too few usable sources.
    """
    from bayesblend.io import read_table
    from bayesblend.prior.bundle import PriorBundle, load_bundle

    path = None
    if not isinstance(catalog, Table):
        path = Path(catalog)
        catalog = read_table(path)
    name = str(path) if path is not None else "catalogue"
    missing = [c for c in CATALOG_COLUMNS if c not in catalog.colnames]
    if missing:
        raise BayesblendError(f"{name}: not a bayesblend posterior catalogue (no {', '.join(missing)})")
    if posterior is None and find_posterior and path is not None:
        posterior = next((path.parent / n for n in POSTERIOR_NAMES if (path.parent / n).exists()), None)
    if not isinstance(bundle, PriorBundle):
        bundle = load_bundle(bundle or catalog.meta.get("BUNDLE"))
    method = str(catalog.meta.get("METHOD", "map")).lower()
    # a catalogue made before the scene-model settings were recorded has none: no stored R applies to it.
    # The warning that the ensemble is uncalibrated matters only when it is the sole estimate.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        R, source = responsivity_from_card(bundle.card, method, scene_model_from_header(catalog.meta), True)
    shear_cat = shear_catalog(catalog, R, SIGMA_E if sigma_e is None else sigma_e, source)
    ok = np.asarray(shear_cat["weight"]) > 0
    estimates: dict[str, ShearEstimate] = {}
    if posterior is not None:
        ids = np.asarray(catalog["id"]) if Path(posterior).is_dir() else None  # parts: matched by id
        e1, e2, _ = posterior_ellipticities(posterior, ids)
        if ids is None and e1.shape[0] != len(catalog):
            raise BayesblendError(f"{posterior} has {e1.shape[0]} sources, the catalogue {len(catalog)}")
        estimates["hierarchical"] = hierarchical_shear(
            e1[ok], e2[ok], interim_prior_from_card(bundle.card), seed=seed
        )
    ens = ensemble_shear(
        shear_cat["e1"],
        shear_cat["e2"],
        shear_cat["weight"],
        np.asarray(shear_cat["responsivity"]),
        groups=np.asarray(catalog["blend_id"]),
    )
    ens.details["calibrated"] = source != "none"
    ens.details["binned"] = isinstance(R, ResponsivityTable)
    estimates["ensemble"] = ens
    if posterior is None:
        for w in caught:
            warnings.warn(str(w.message), stacklevel=2)
        warnings.warn(
            f"{name}: no posterior draws (posterior/ beside it or --posterior), so no hierarchical "
            "estimate: the ensemble mean is biased where the posteriors are shrunk towards round",
            stacklevel=2,
        )
    return FieldShear(estimates, shear_cat, None if posterior is None else str(posterior))
