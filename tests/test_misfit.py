"""The galaxy model's misfit: measured per band from fits against noiseless truths, read from the card."""

from pathlib import Path

import numpy as np
import pytest

from bayesblend.blends import model_error_of
from bayesblend.errors import BayesblendError, BundleError
from bayesblend.misfit import fit_misfit
from bayesblend.model import MODEL_ERROR
from bayesblend.prior.bundle import PriorBundle


def test_fit_misfit_recovers_a_known_fractional_error_per_band():
    rng = np.random.default_rng(1)
    m = rng.uniform(0.0, 5000.0, 20000)
    truth = [m * (1 + 0.04 * rng.normal(size=m.size)), m.copy(), m + 2.0 * rng.normal(size=m.size)]
    out = fit_misfit([m, m, m], truth, np.array([100.0, 100.0, 100.0]), ["g", "r", "i"])
    assert out["alpha"]["g"] == pytest.approx(0.04, rel=0.05)
    assert out["alpha"]["r"] == 0.0  # an exact model
    assert out["alpha"]["i"] < 0.005  # an additive error fades against the intensity: not fractional
    bright = [row for row in out["bins"]["g"] if row[0] >= 30]
    assert bright and all(abs(row[3] - 0.04) < 0.006 for row in bright)  # flat across bins: fractional
    with pytest.raises(ValueError, match="one entry per band"):
        fit_misfit([m], truth, np.array([100.0]), ["g", "r"])


def test_the_card_s_misfit_is_the_default_model_error():
    arch = {"architecture": {"bands": ["g", "r"]}}
    with_misfit = PriorBundle(arch | {"misfit": {"alpha": {"r": 0.02, "g": 0.05}}}, Path("."), None, None)
    assert with_misfit.misfit == (0.05, 0.02)  # in the bundle's band order
    assert model_error_of(with_misfit, None) == (0.05, 0.02)
    assert model_error_of(with_misfit, 0.0) == (0.0, 0.0)  # an explicit number wins, every band
    assert model_error_of(with_misfit, [0.1, 0.2]) == (0.1, 0.2)
    without = PriorBundle(arch, Path("."), None, None)
    assert without.misfit is None and model_error_of(without, None) == (MODEL_ERROR, MODEL_ERROR)
    with pytest.raises(BayesblendError, match="one value >= 0 or one per band"):
        model_error_of(without, [0.1, 0.2, 0.3])
    with pytest.raises(BundleError, match="misfit lacks band.s. r"):
        _ = PriorBundle(arch | {"misfit": {"alpha": {"g": 0.05}}}, Path("."), None, None).misfit
