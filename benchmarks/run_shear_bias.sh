#!/usr/bin/env bash
# Shear-bias runs of RESULTS.md (each resumable: rerun to continue; --max-minutes bounds a session).
#  1. calibration set (seed 5): MAP, flow latent prior (the default), true positions; stores R in the card
#  2. the same galaxies with the N(0, I) latent prior (is the flow's shrinkage the limit?)
#  3. independent validation set (seed 6), divided by the stored R
set -euo pipefail
BB=${BB:-.venv/bin/bayesblend}
CAL_MIN=${CAL_MIN:-25}
NORMAL_MIN=${NORMAL_MIN:-20}
VAL_MIN=${VAL_MIN:-20}
OUT=benchmarks/shear
$BB shear-bias --kind blends --method map --seed 5 --n 2000 --out $OUT/blends-map-s5 --max-minutes "$CAL_MIN" --quiet --json $OUT/blends-map-s5.json --calibrate
$BB shear-bias --kind blends --method map --seed 5 --n 2000 --latent-prior normal --out $OUT/blends-map-normal-s5 --max-minutes "$NORMAL_MIN" --quiet --json $OUT/blends-map-normal-s5.json
$BB shear-bias --kind blends --method map --seed 6 --n 2000 --out $OUT/blends-map-s6 --max-minutes "$VAL_MIN" --quiet --json $OUT/blends-map-s6.json --calibrated
