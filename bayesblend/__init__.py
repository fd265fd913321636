"""bayesblend: Bayesian deblending of galaxy survey images with a learned VAE prior.

Entry points: :func:`load_prior` (the shipped prior bundle), :func:`deblend`
(:func:`bayesblend.infer.deblend`, imported on first use), the simulator in
:mod:`bayesblend.simulate`, scene files in :mod:`bayesblend.io`, and the
``bayesblend`` command (:mod:`bayesblend.cli`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # types only: importing the bundle layer here would slow ``import bayesblend``
    from bayesblend.infer import deblend
    from bayesblend.prior.bundle import PriorBundle
    from bayesblend.settings import InferenceConfig

__version__ = "0.1.0"

__all__ = ["InferenceConfig", "__version__", "deblend", "load_prior"]


def load_prior(name_or_path: str | None = None) -> PriorBundle:
    """Load a prior bundle; with no argument, the shipped default ``models/lsst-v2``.

    Checksums of every weight file are verified; a missing, tampered or
    incompatible bundle raises :class:`bayesblend.errors.BundleError`.

    Parameters
    ----------
    name_or_path : str, optional
        A bundle name under the models directory, or a bundle directory.

    Returns
    -------
    PriorBundle
        The loaded networks, their parameters and the model card.
    """
    from bayesblend.prior.bundle import load_bundle

    return load_bundle(name_or_path)


def __getattr__(name: str):
    """``bayesblend.deblend`` (:func:`bayesblend.infer.deblend`) and ``bayesblend.InferenceConfig``
    (:class:`bayesblend.settings.InferenceConfig`), imported (with JAX) on first use."""
    if name == "deblend":
        from bayesblend.infer import deblend

        return deblend
    if name == "InferenceConfig":
        from bayesblend.settings import InferenceConfig

        return InferenceConfig
    raise AttributeError(f"module 'bayesblend' has no attribute {name!r}")
