"""Shear from posterior catalogues and posterior ellipticity draws.

The modules, one concept each:

- :mod:`~bayesblend.shear.lensing`: the intrinsic ellipticity population, its
  density after a shear, and the interim prior of the scene model's draws
  (the lensing formula itself is :func:`bayesblend.ellipticity.lens`);
- :mod:`~bayesblend.shear.estimators`: the hierarchical model (the default;
  Schneider et al. 2015) and the ensemble mean (the quick look);
- :mod:`~bayesblend.shear.catalog`: which sources a shear estimate uses, their
  weights, the shear catalogue, the posterior draws on disk;
- :mod:`~bayesblend.shear.calibration`: responsivities measured on simulations,
  for the ensemble mean;
- :mod:`~bayesblend.shear.statistics`: delete-one-block jackknife errors;
- :mod:`~bayesblend.shear.field`: :func:`field_shear`, the workflow behind
  ``bayesblend shear``;
- :mod:`~bayesblend.shear.harness` and :mod:`~bayesblend.shear.bias`: the
  shear-bias harness (simulate, deblend, match) and its m, c figures (not
  imported here: they pull in the simulator).
"""

from bayesblend.shear.calibration import (
    GALAXIES_PER_BIN,
    ResponsivityTable,
    posterior_e_sigma,
    responsivity_from_card,
    responsivity_table,
    scene_model_from_header,
    store_responsivity,
)
from bayesblend.shear.catalog import (
    EXCLUDE_FLAGS,
    SIGMA_E,
    posterior_ellipticities,
    shape_weight,
    shear_catalog,
    usable,
    usable_shapes,
    valid_shapes,
)
from bayesblend.shear.estimators import (
    G_MAX,
    IS_ESS_MIN,
    S_RANGE,
    ShearEstimate,
    ensemble_shear,
    hierarchical_log_likelihood,
    hierarchical_mode,
    hierarchical_shear,
    importance_ess,
)
from bayesblend.shear.field import FieldShear, field_shear
from bayesblend.shear.lensing import (
    InterimPrior,
    component_sigma,
    interim_prior_from_card,
    intrinsic_log_density,
    sheared_log_density,
    unlens_log_jacobian,
)
from bayesblend.shear.statistics import (
    jackknife,
    jackknife_blocks,
    weighted_mean_replicates,
    weighted_ratio_replicates,
)

__all__ = [
    "EXCLUDE_FLAGS",
    "FieldShear",
    "GALAXIES_PER_BIN",
    "G_MAX",
    "IS_ESS_MIN",
    "InterimPrior",
    "ResponsivityTable",
    "SIGMA_E",
    "S_RANGE",
    "ShearEstimate",
    "component_sigma",
    "ensemble_shear",
    "field_shear",
    "hierarchical_log_likelihood",
    "hierarchical_mode",
    "hierarchical_shear",
    "importance_ess",
    "interim_prior_from_card",
    "intrinsic_log_density",
    "jackknife",
    "jackknife_blocks",
    "posterior_e_sigma",
    "posterior_ellipticities",
    "responsivity_from_card",
    "responsivity_table",
    "scene_model_from_header",
    "shape_weight",
    "shear_catalog",
    "sheared_log_density",
    "store_responsivity",
    "unlens_log_jacobian",
    "usable",
    "usable_shapes",
    "valid_shapes",
    "weighted_mean_replicates",
    "weighted_ratio_replicates",
]
