"""MAP flux errors by true blendedness, from a bench_deblend run (the BLENDED flag's threshold, issue 4).

Reads ``<out>/map.jsonl`` written by ``bench_deblend.py`` and prints, per bin
of the truth's total blendedness (paper eq. 3), the number of galaxies, the
mean and median |Δf/f| in r and how many are off by more than 100 %.

Run::

    .venv/bin/python benchmarks/blendedness_check.py --out benchmarks/deblend
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

EDGES = (0.0, 0.1, 0.5, 0.9, 0.99, 1.01)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/deblend", help="directory holding map.jsonl")
    args = p.parse_args()
    rows = [json.loads(line) for line in (Path(args.out) / "map.jsonl").read_text().splitlines() if line]
    err = np.array([abs(r["q"]["flux_r"][2] / r["true_flux_r"] - 1) for r in rows])
    b = np.array([r["b_tot"] for r in rows])
    print(f"{len(rows)} galaxies of {len({r['blend'] for r in rows})} blends ({args.out}/map.jsonl)")
    print(
        "| true blendedness | galaxies | mean \\|Δf/f\\| r | median | off by > 100 % |\n|---|---|---|---|---|"
    )
    for lo, hi in zip(EDGES[:-1], EDGES[1:], strict=True):
        m = (b >= lo) & (b < hi)
        if m.any():
            cells = (f"{lo:g}–{min(hi, 1.0):g}", m.sum(), f"{err[m].mean():.3f}", f"{np.median(err[m]):.3f}")
            print("| " + " | ".join(map(str, (*cells, (err[m] > 1).sum()))) + " |")


if __name__ == "__main__":
    main()
