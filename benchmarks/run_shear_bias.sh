#!/usr/bin/env bash
# Shear-bias runs of RESULTS.md (each resumable: rerun to continue; --max-minutes bounds a session).
# Shapes reconvolved to the survey PSF, unresolved sources flagged (runs named *-rc-*):
#  1. calibration set (seed 5): MAP, flow latent prior (the default), true positions
#  2. second calibration set (seed 6; it was the validation set until the table was recalibrated on both)
#  3. isolated galaxies (seed 5), uncalibrated
#  4. blends with detection on (seed 5), uncalibrated (the run key records the detector, bayesblend.detect.DETECTOR;
#     blends-detect-map-sm2-s5 was made before re-detection from the residual became the default)
#  5. the calibration: seeds 5 and 6 pooled; stores R and a 4-bin R table in the card (no fitting)
#  6. independent validation set (seed 7), divided by the stored table
# Runs are named *-sm2-*: the second scene model (windowed light-centroid placement, flux prior centred on
# the amortised joint fluxes, 3 % model error; README "Worked example: deblending"). The *-rc-* runs were
# made with the first (plain first-moment centroid, detection flux prior, no model error) and the runs
# at the model PSF (blends-map-s5, blends-map-normal-s5, blends-map-s6) before reconvolution; none of
# them can be resumed with this code (the run key differs). STEPS picks which runs (default all four).
set -euo pipefail
BB=${BB:-.venv/bin/bayesblend}
CAL_MIN=${CAL_MIN:-35}
VAL_MIN=${VAL_MIN:-15}
ISO_MIN=${ISO_MIN:-12}
DET_MIN=${DET_MIN:-10}
VAL7_MIN=${VAL7_MIN:-50}
OUT=benchmarks/shear
STEPS=${STEPS:-123456}
step() {  # step N ARGS...: run "bayesblend ARGS" when N is in STEPS
    local n=$1
    shift
    if [[ $STEPS == *$n* ]]; then "$BB" "$@"; fi
}
step 1 shear-bias --kind blends --method map --seed 5 --n 2000 --out $OUT/blends-map-sm2-s5 --max-minutes "$CAL_MIN" --quiet --json $OUT/blends-map-sm2-s5.json
step 2 shear-bias --kind blends --method map --seed 6 --n 2000 --out $OUT/blends-map-sm2-s6 --max-minutes "$VAL_MIN" --quiet --json $OUT/blends-map-sm2-s6.json
step 3 shear-bias --kind isolated --method map --seed 5 --n 2000 --out $OUT/isolated-map-sm2-s5 --max-minutes "$ISO_MIN" --quiet --json $OUT/isolated-map-sm2-s5.json
step 4 shear-bias --kind blends --detect --method map --seed 5 --n 2000 --out $OUT/blends-redetect-map-sm2-s5 --max-minutes "$DET_MIN" --quiet --json $OUT/blends-redetect-map-sm2-s5.json
step 5 shear-bias --report --n 2000 --out $OUT/blends-map-sm2-s5 --pool $OUT/blends-map-sm2-s6 --bins 4 --json $OUT/blends-map-sm2-s5s6.json --calibrate
step 6 shear-bias --kind blends --method map --seed 7 --n 2000 --out $OUT/blends-map-sm2-s7 --max-minutes "$VAL7_MIN" --quiet --json $OUT/blends-map-sm2-s7.json --calibrated
