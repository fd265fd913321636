"""bayesblend: Bayesian deblending of galaxy survey images with a learned VAE prior.

Entry points: :func:`load_prior` (the shipped prior bundle), the simulator in
:mod:`bayesblend.simulate`, scene files in :mod:`bayesblend.io`, and the
``bayesblend`` command (:mod:`bayesblend.cli`).
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load_prior"]


def load_prior(name_or_path: str | None = None):
    """Load a prior bundle; with no argument, the shipped default ``models/lsst-v1``.

    Checksums of every weight file are verified; a missing, tampered or
    incompatible bundle raises :class:`bayesblend.errors.BundleError`.
    """
    from bayesblend.prior.bundle import load_bundle

    return load_bundle(name_or_path)
