"""Simulation throughput: stamps per second for isolated stamps and blends (training shards).

Run: ``.venv/bin/python benchmarks/bench_simulate.py [--n 4000] [--workers 2]``
Prints a Markdown table row per kind to paste into benchmarks/RESULTS.md with
the date, machine and command. The target (issue 2) is a 100k isolated training
set in under 15 minutes on 2 cores, i.e. >= 111 stamps/s.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import tempfile
import time

from bayesblend.simulate.dataset import simulate_dataset


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    args = p.parse_args()
    cpu = platform.processor() or platform.machine()
    print(f"date {datetime.date.today()}, {os.cpu_count()} cores ({cpu}), workers={args.workers}")
    print("| kind | n | seconds | stamps/s | 100k extrapolated (min) |")
    print("|---|---|---|---|---|")
    for kind in ("isolated", "blends"):
        tmp = tempfile.mkdtemp(prefix="bench-sim-")
        try:
            t0 = time.perf_counter()
            simulate_dataset(
                kind,
                args.n,
                tmp,
                seed=0,
                fmt="shards",
                workers=args.workers,
                shard_size=250,
                progress=False,
                max_shift=0.5,
                psf_jitter=0.05,
            )
            dt = time.perf_counter() - t0
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"| {kind} | {args.n} | {dt:.1f} | {args.n / dt:.0f} | {1e5 / (args.n / dt) / 60:.1f} |")


if __name__ == "__main__":
    main()
