"""Does R tabulated in the posterior e dispersion follow a population that one R does not? (issue 5)

Splits a calibration run's items in two (even / odd). From the even items it
measures one R (the ensemble's ``1 + m``) and a :class:`~bayesblend.shear.ResponsivityTable`;
on the odd items it gives m of the ensemble divided by each, for all usable
galaxies and for brighter and fainter selections on the true S/N (populations
unlike the calibration mix). Then the same for other runs (independent seeds),
calibrated on the whole calibration run. Summaries only: nothing is refitted.

With ``--card``, the first run is not split: every run given is divided by
the R and the table stored in the shipped model card (``shear_responsivity.map``),
i.e. a validation of the stored calibration on runs it was not measured on.

Run::

    .venv/bin/python benchmarks/responsivity_check.py benchmarks/shear/blends-map-sm2-s5 \
        benchmarks/shear/blends-map-sm2-s6
    .venv/bin/python benchmarks/responsivity_check.py --card benchmarks/shear/blends-map-sm2-s7
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np

from bayesblend.shear import ResponsivityTable
from bayesblend.shear.bias import summarise
from bayesblend.shear.harness import run_config

SELECTIONS = {"all": 0.0, "true S/N >= 10": 10.0, "true S/N >= 20": 20.0}


def _subset(run: Path, keep) -> Path:
    """A temporary run directory holding the items of ``run`` that ``keep(item)`` accepts."""
    tmp = Path(tempfile.mkdtemp(prefix="respcheck-"))
    (tmp / "items").mkdir()
    shutil.copy(run / "config.json", tmp / "config.json")
    for f in sorted((run / "items").glob("item_*.npz")):
        if keep(int(f.stem.split("_")[1])):
            (tmp / "items" / f.name).symlink_to(f.resolve())
    return tmp


def calibrations(run: Path) -> tuple[float, ResponsivityTable]:
    res = summarise(run, estimators=("ensemble",))
    return 1.0 + res["estimators"]["ensemble"]["m"], ResponsivityTable.from_dict(res["responsivity_table"])


def row(name: str, run: Path, R: float, table: ResponsivityTable) -> None:
    for sel, snr in SELECTIONS.items():
        out = []
        for cal in (R, table):
            try:
                res = summarise(run, responsivity=cal, estimators=("ensemble",), min_snr=snr)
            except Exception as exc:  # too few galaxies in a selection
                out.append(f"– ({exc.__class__.__name__})")
                continue
            e = res["estimators"]["ensemble"]
            out.append(f"{e['m']:+.3f} ± {e['m_err']:.3f}")
        print(f"| {name} | {sel} | {res['n_used']} | {out[0]} | {out[1]} |")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("calibration", type=Path)
    p.add_argument("others", type=Path, nargs="*")
    p.add_argument("--card", action="store_true", help="divide every run by the card's stored R and table")
    args = p.parse_args()
    print("| applied to | selection | galaxies | m, one R | m, R per galaxy (table) |")
    print("|---|---|---|---|---|")
    if args.card:
        from bayesblend.prior.bundle import load_bundle
        from bayesblend.shear import responsivity_from_card

        card = load_bundle().card
        for run in (args.calibration, *args.others):
            # the entry for the run's own method, and only if it was measured under the run's scene model
            made = run_config(run)
            applies = (made["method"], made.get("scene_model", {}))
            R, _ = responsivity_from_card(card, *applies)
            table, _ = responsivity_from_card(card, *applies, binned=True)
            if not isinstance(table, ResponsivityTable):
                raise SystemExit(f"{run}: the card has no responsivity table that applies to this run")
            print(f"<!-- card: R = {R:.3f}; table {table} -->")
            row(f"{run.name} (the card's calibration)", run, R, table)
        return
    even, odd = (
        _subset(args.calibration, lambda i: i % 2 == 0),
        _subset(args.calibration, lambda i: i % 2 == 1),
    )
    R, table = calibrations(even)
    print(f"<!-- even items: R = {R:.3f}; table R = {table.R}, edges {table.edges} -->")
    row(f"{args.calibration.name}, odd items (calibrated on the even ones)", odd, R, table)
    R, table = calibrations(args.calibration)
    for other in args.others:
        row(f"{other.name} (calibrated on all of {args.calibration.name})", other, R, table)
    for d in (even, odd):
        shutil.rmtree(d)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
