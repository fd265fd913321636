#!/usr/bin/env bash
# Shear-bias runs of RESULTS.md (each resumable: rerun to continue; --max-minutes bounds a session).
# Shapes reconvolved to the survey PSF, unresolved sources flagged (runs named *-rc-*):
#  1. calibration set (seed 5): MAP, flow latent prior (the default), true positions; stores R in the card
#  2. independent validation set (seed 6), divided by the stored R
#  3. isolated galaxies (seed 5), uncalibrated
#  4. blends with detection on (seed 5), uncalibrated
# The earlier runs at the model PSF (blends-map-s5, blends-map-normal-s5, blends-map-s6) were made
# before reconvolution; their items cannot be resumed with this code (the run key differs).
set -euo pipefail
BB=${BB:-.venv/bin/bayesblend}
CAL_MIN=${CAL_MIN:-35}
VAL_MIN=${VAL_MIN:-15}
ISO_MIN=${ISO_MIN:-12}
DET_MIN=${DET_MIN:-10}
OUT=benchmarks/shear
$BB shear-bias --kind blends --method map --seed 5 --n 2000 --out $OUT/blends-map-rc-s5 --max-minutes "$CAL_MIN" --quiet --json $OUT/blends-map-rc-s5.json --calibrate
$BB shear-bias --kind blends --method map --seed 6 --n 2000 --out $OUT/blends-map-rc-s6 --max-minutes "$VAL_MIN" --quiet --json $OUT/blends-map-rc-s6.json --calibrated
$BB shear-bias --kind isolated --method map --seed 5 --n 2000 --out $OUT/isolated-map-rc-s5 --max-minutes "$ISO_MIN" --quiet --json $OUT/isolated-map-rc-s5.json
$BB shear-bias --kind blends --detect --method map --seed 5 --n 2000 --out $OUT/blends-detect-map-rc-s5 --max-minutes "$DET_MIN" --quiet --json $OUT/blends-detect-map-rc-s5.json
