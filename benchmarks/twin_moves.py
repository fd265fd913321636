"""How far a galaxy's catalogue e1 moves between the +g and -g twins of the shear-bias harness.

The twins share their noise, so with a fit that is smooth in the data e1 moves by about 2 g R
(0.04 R at g = 0.02). This reruns items ``0 .. n-1`` of a harness configuration (MAP by default, with
the harness's common draws and optional ``--set`` overrides of the inference settings) and compares
the median |e1(+g) - e1(-g)| with that of a stored run's same items (``--against``, e.g. the run made
with independent draws per twin). One-off investigation of issue 24. Run::

    .venv/bin/python benchmarks/twin_moves.py --items 8 --against benchmarks/shear/v2-blends-map-s5
    .venv/bin/python benchmarks/twin_moves.py --items 5 --against benchmarks/shear/v2-blends-map-s5 \\
        --against benchmarks/shear/v2-blends-map-crn-s5 --set map_tolerance=1e-6 --set map_steps=40
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np

from bayesblend.prior.bundle import load_bundle
from bayesblend.shear.bias import galaxy_responses
from bayesblend.shear.harness import HarnessConfig, item_path, run_item


def summary(items: list[dict], shear: float) -> str:
    """Median |e1(+g) - e1(-g)| (all galaxies, and true S/N < 10) and the per-galaxy response spread."""
    resp = np.concatenate([galaxy_responses(d, shear)["response"] for d in items])
    move = np.concatenate([d["e1"][1] - d["e1"][2] for d in items])
    snr = np.concatenate([d["true_snr"][0] for d in items])
    ok = np.isfinite(resp)
    return (
        f"n {ok.sum()}, response {resp[ok].mean():.3f} ± {resp[ok].std():.3f} (sd); median |Δe1| "
        f"{np.nanmedian(np.abs(move)):.4f}, at S/N < 10 {np.nanmedian(np.abs(move[snr < 10])):.4f}"
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--items", type=int, default=8)
    p.add_argument(
        "--against", action="append", required=True, help="a stored harness run of the same seed and shear"
    )
    p.add_argument("--no-rerun", action="store_true", help="only summarise the stored runs' items")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--set", action="append", default=[], help="an inference setting, NAME=VALUE")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    settings = {k: float(v) if "." in v or "e" in v else int(v) for k, v in (s.split("=") for s in args.set)}
    cfg = HarnessConfig(kind="blends", seed=args.seed, method="map", settings=settings)
    for run in args.against:
        old = [dict(np.load(item_path(run, i))) for i in range(args.items)]
        print(f"{run} (items 0-{args.items - 1}): {summary(old, cfg.shear)}")
    if not args.no_rerun:
        new = [run_item(i, cfg, load_bundle()) for i in range(args.items)]
        print(f"rerun, common draws, settings {settings or 'default'}: {summary(new, cfg.shear)}")


if __name__ == "__main__":
    main()
