"""The canonical frame of the galaxy model: where a morphology lives before its pose.

A canonical morphology is a galaxy made round (its ellipticity removed) and
scaled so that its half-light radius in the reference band is
``hlr_pixels`` canonical pixels, drawn noiseless and PSF-free on a
``size x size`` grid centred at ``((size-1)/2, (size-1)/2)``, each band
summing to one. The other bands keep their own sizes relative to the
reference band, so colour gradients survive. The simulator draws training
morphologies in this frame and the renderer (:func:`bayesblend.forward.render_pose`)
takes them to any survey's pixel grid through an explicit pose.

The frame is the model's contract with its training data, so a model bundle
records it and checks it on loading.

Choice of the default (64 pixels, half-light radius 4 pixels, so the grid
holds the galaxy out to 8 half-light radii): the de Vaucouleurs profile puts
5.7 % of its light beyond 8 half-light radii and 11 % beyond 5.3 (the extent
with a half-light radius of 6 pixels), so a smaller extent would cut the
bulges' wings and bias their fluxes; the simulator truncates Sersic bulges at
8 of their half-light radii (as the SDSS pipeline truncates its de Vaucouleurs
model, Stoughton et al. 2002, AJ 123, 485), so the grid holds every simulated
galaxy's light. A finer sampling on a larger grid would cost the VAE the
square of the side.
"""

from __future__ import annotations

from dataclasses import dataclass

from bayesblend.errors import BayesblendError


@dataclass(frozen=True)
class CanonicalFrame:
    """Grid of canonical morphologies.

    Attributes
    ----------
    size : int
        Side of the grid, canonical pixels (even).
    hlr_pixels : float
        Half-light radius of the reference band, canonical pixels.
    reference_band : str
        Band whose half-light radius is the pose's size.
    """

    size: int = 64
    hlr_pixels: float = 4.0
    reference_band: str = "r"

    def __post_init__(self) -> None:
        if self.size < 8 or self.size % 2:
            raise BayesblendError(f"canonical grid size must be even and >= 8, got {self.size}")
        if not 0 < self.hlr_pixels < self.size / 4:
            raise BayesblendError(
                f"canonical half-light radius must be in (0, size/4) pixels, got {self.hlr_pixels}"
            )

    @property
    def extent(self) -> float:
        """Half-width of the grid in reference half-light radii."""
        return self.size / 2 / self.hlr_pixels

    def to_dict(self) -> dict:
        return {"size": self.size, "hlr_pixels": self.hlr_pixels, "reference_band": self.reference_band}

    @classmethod
    def from_dict(cls, d: dict) -> CanonicalFrame:
        return cls(int(d["size"]), float(d["hlr_pixels"]), str(d["reference_band"]))


DEFAULT_FRAME = CanonicalFrame()
