"""A :class:`~bayesblend.posterior.Posterior` as ArviZ ``InferenceData``.

Groups and dimensions (README "File formats"): ``posterior`` (``chain, draw,
source`` and ``band``, ``latent``, ``xy`` or ``component``), ``sample_stats``
(NUTS, per ``blend``), ``observed_data`` (each blend's cutout) and
``constant_data`` (the source table). The ``source`` and ``blend``
coordinates are the catalogue's ``id`` and ``blend_id``, so draws join the
catalogue's rows in any part of a partitioned run.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict
from typing import TYPE_CHECKING

import numpy as np

from bayesblend import catalog as cat

if TYPE_CHECKING:
    import arviz as az

    from bayesblend.posterior import Posterior


def arviz():
    """The ``arviz`` module, imported on first use (its import is slow and warns)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz as az
    return az


def to_inference_data(post: Posterior, observed: bool = True) -> az.InferenceData:
    """The draws as ``arviz.InferenceData``.

    Groups: ``posterior`` (dims ``chain, draw, source`` and ``band``,
    ``latent`` or ``xy``), ``sample_stats`` (NUTS: ``diverging``,
    ``tree_depth``, ``n_steps``, ``acceptance_rate``, ``lp``, ``energy``
    with dims ``chain, draw, blend``), ``observed_data`` (each blend's
    cutout, ``blend, band, y, x``, NaN-padded to the largest cutout and
    where masked) and ``constant_data`` (the source table).
    """
    az = arviz()
    dims = {
        "u": ["source", "latent"],
        "z": ["source", "latent"],
        "log_flux": ["source", "band"],
        "flux": ["source", "band"],
        "mag": ["source", "band"],
        "offset": ["source", "xy"],
        "eta": ["source", "component"],
        "log_hlr": ["source"],
    }
    dims.update({k: ["source"] for k in ("x", "y", "e1", "e2", "size")})
    stats_dims = {k: ["blend"] for k in post.stats}
    coords = {
        "source": np.asarray(post.sources["id"]),
        "band": list(post.bands),
        "latent": np.arange(post.bundle.latent_dim),
        "xy": ["x", "y"],
        "component": ["1", "2"],
        "blend": post.blend_ids,
    }
    kwargs = {}
    if observed and post.blends:
        h = max(b.spec.shape[0] for b in post.blends)
        w = max(b.spec.shape[1] for b in post.blends)
        obs = np.full((post.n_blends, len(post.bands), h, w), np.nan, np.float32)
        for i, b in enumerate(post.blends):
            img = np.where(np.asarray(b.data["valid"]), np.asarray(b.data["image"]), np.nan)
            obs[i, :, : img.shape[1], : img.shape[2]] = img
        kwargs["observed_data"] = {"image": obs}
        dims["image"] = ["blend", "band", "y", "x"]
    const = {c: np.asarray(post.sources[c]) for c in ("scene", "x_det", "y_det")}
    const["blend_id"] = post.blend_ids[np.asarray(post.sources["blend_id"], int)]
    dims.update({c: ["source"] for c in const})
    attrs = {
        "method": post.method,
        "seed": int(post.seed),
        "latent_prior": post.latent_prior,
        "bundle": str(post.bundle.card.get("name", post.bundle.path)),
        "config": json.dumps(asdict(post.config)),
        "ellipticity_convention": cat.ELLIPTICITY_CONVENTION,
        "size_unit": "arcsec",
        "flux_unit": "electron",
        "inference_library": "bayesblend",
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return az.from_dict(
            posterior={k: v for k, v in post.draws.items()},
            sample_stats=post.stats or None,
            constant_data=const,
            coords=coords,
            dims=dims | stats_dims,
            attrs=attrs,
            **kwargs,
        )
