"""Fitted positions against the truth on the deblending test's bright pair (issue 4, centroid placement).

The pair of ``tests/test_deblend.py`` (``simulate_blend(21, 3, n_range=(2, 3),
mag_range=(20, 24))``), deblended with MAP at the true positions; prints each
galaxy's offset of the catalogue's ``x, y`` from the profile centre, pixels.

Run::

    .venv/bin/python benchmarks/position_check.py
"""

from __future__ import annotations

import numpy as np


def main() -> None:
    import bayesblend
    from bayesblend.infer import deblend
    from bayesblend.simulate.scenes import simulate_blend

    pair = simulate_blend(21, 3, n_range=(2, 3), mag_range=(20.0, 24.0))
    t = pair.truth
    c = deblend(
        pair.scene, sources=np.c_[t["x"], t["y"]], method="map", prior=bayesblend.load_prior()
    ).catalog()
    for j in range(len(t)):
        dx, dy = c["x"][j] - t["x"][j], c["y"][j] - t["y"][j]
        print(
            f"galaxy {j}: mag_r {t['mag_r'][j]:.2f}, dx {dx:+.3f}, dy {dy:+.3f}, |d| {np.hypot(dx, dy):.3f}"
        )


if __name__ == "__main__":
    main()
