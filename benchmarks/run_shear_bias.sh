#!/usr/bin/env bash
# Shear-bias runs of RESULTS.md (resumable: rerun to continue). Calibration set (seed 5) then an
# independent validation set (seed 6), MAP on the shipped lsst-v1 bundle, true positions.
set -euo pipefail
BB=${BB:-.venv/bin/bayesblend}
CAL_MIN=${CAL_MIN:-50}
VAL_MIN=${VAL_MIN:-35}
$BB shear-bias --kind blends --method map --seed 5 --n 2000 --out benchmarks/shear/blends-map-s5 --max-minutes "$CAL_MIN" --quiet --json benchmarks/shear/blends-map-s5.json
$BB shear-bias --kind blends --method map --seed 6 --n 2000 --out benchmarks/shear/blends-map-s6 --max-minutes "$VAL_MIN" --quiet --json benchmarks/shear/blends-map-s6.json
