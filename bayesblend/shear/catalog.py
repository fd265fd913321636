"""The weak-lensing catalogue of a posterior catalogue, and the posterior ellipticity draws on disk.

Which sources a shear estimate may use (finite shapes inside the unit disc,
none of :data:`EXCLUDE_FLAGS`), their ensemble weights, and the shear
catalogue that ``bayesblend shear --out`` writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from astropy.table import Table

from bayesblend.catalog import E2SIGN, ELLIPTICITY_CONVENTION, FLAGS, SCENE_HEADER
from bayesblend.errors import BayesblendError
from bayesblend.shear.calibration import ResponsivityTable

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


def shape_weight(e1_std: np.ndarray, e2_std: np.ndarray, sigma_e: float = SIGMA_E) -> np.ndarray:
    """Inverse-variance weight ``1 / (sigma_e^2 + (std_e1^2 + std_e2^2) / 2)``."""
    var = 0.5 * (np.asarray(e1_std, float) ** 2 + np.asarray(e2_std, float) ** 2)
    return 1.0 / (sigma_e**2 + np.where(np.isfinite(var), var, np.inf))


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


def posterior_ellipticities(
    path: str | Path, ids: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(e1, e2)`` draws ``(source, draw)`` and the attributes of a ``posterior.nc``.

    ``path`` may also be a run's ``posterior/`` directory, whose parts
    (``part-*.nc``) are read in turn. With ``ids`` (the catalogue's ``id``
    column), the rows follow them, matched on the draws' ``source``
    coordinate; a source without draws is an error.
    """
    path = Path(path)
    if not path.exists():
        raise BayesblendError(f"{path}: no such posterior file")
    files = sorted(path.glob("part-*.nc")) if path.is_dir() else [path]
    if not files:
        raise BayesblendError(f"{path}: no posterior parts (part-*.nc) in it")
    parts = [_read_ellipticities(f) for f in files]
    source = np.concatenate([p[0] for p in parts])
    e1 = np.concatenate([p[1] for p in parts])
    e2 = np.concatenate([p[2] for p in parts])
    if ids is not None:
        ids = np.asarray(ids)
        order = {int(s): i for i, s in enumerate(source)}
        missing = [int(i) for i in ids if int(i) not in order]
        if missing:
            raise BayesblendError(
                f"{path}: no draws of catalogue source id {missing[0]} ({len(missing)} missing)"
            )
        rows = np.array([order[int(i)] for i in ids], dtype=int)
        e1, e2 = e1[rows], e2[rows]
    return e1, e2, parts[0][3]


def _read_ellipticities(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """The ``source`` coordinate, ``e1`` and ``e2`` draws ``(source, draw)`` and attributes of one netCDF."""
    import xarray as xr

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

        source = np.asarray(ds["source"].values) if "source" in ds.coords else np.arange(ds.sizes["source"])
        return source, flat("e1"), flat("e2"), dict(ds.attrs)
