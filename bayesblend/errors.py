"""Exception types of bayesblend.

Every error a user can cause by bad input is a :class:`BayesblendError` with a
one-line message naming the problem; the CLI prints it and exits with code 2.
"""

from __future__ import annotations


class BayesblendError(ValueError):
    """Bad input or configuration, reported to the user in one line."""


class SceneFormatError(BayesblendError):
    """A scene file is not in the bayesblend scene-FITS format."""


class BundleError(BayesblendError):
    """A model bundle is missing, tampered with or incompatible."""


class MaskedBlendError(BayesblendError):
    """Every pixel of a blend's cutout is masked: there is nothing to fit."""


class MaskedBlendWarning(UserWarning):
    """A fully masked blend of a scene was left out; the scene's other blends are fitted."""


class BadPixelWarning(UserWarning):
    """Pixels with a non-finite value or variance were masked (reported once per scene, with their count)."""
