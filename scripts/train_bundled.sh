#!/usr/bin/env bash
# Trains every bundled checkpoint from scratch, as their model cards describe
# (haltdet/checkpoints/*.md): synthetic data, the baseline (first stage, then its
# refiner), the halting model (from the baseline's step 2,900, then its refiner),
# halting_large (halting on 0.24 m pillars from the first step, then its refiner), and
# evaluates each on the validation split, halting_large also against the baseline on a
# second split. About 6 h 30 min on a 2-core CPU (halting_large 4 h 10 min of it, at one
# thread beside another run); run it from the repository root, in the background, on an
# otherwise idle machine:
#   nohup bash scripts/train_bundled.sh runs > runs/train_bundled.log 2>&1 &
# Then copy RUNS/baseline_refine/final.pt, RUNS/halting_refine/final.pt and
# RUNS/halting_large_refine/final.pt into haltdet/checkpoints/ as baseline.pt, halting.pt
# and halting_large.pt.
set -euo pipefail
RUNS=${1:-runs}
HALTDET=${HALTDET:-haltdet}
mkdir -p "$RUNS"
[ -f data/train/dataset.json ] || $HALTDET data synth --out data/train --frames 4000 --seed 0 --workers 2 --quiet
[ -f data/val/dataset.json ] || $HALTDET data synth --out data/val --frames 200 --seed 1234 --workers 2 --quiet
[ -f data/val2/dataset.json ] || $HALTDET data synth --out data/val2 --frames 200 --seed 4321 --workers 2 --quiet
$HALTDET train --config configs/baseline.yaml --out "$RUNS/baseline"
$HALTDET train --config configs/baseline_refine.yaml --init "$RUNS/baseline/final.pt" --out "$RUNS/baseline_refine"
$HALTDET eval --checkpoint "$RUNS/baseline_refine/final.pt" --data data/val --json "$RUNS/eval_baseline.json"
$HALTDET train --config configs/halting.yaml --init "$RUNS/baseline/step_2900.pt" --out "$RUNS/halting"
$HALTDET train --config configs/halting_refine.yaml --init "$RUNS/halting/final.pt" --out "$RUNS/halting_refine"
$HALTDET eval --checkpoint "$RUNS/halting_refine/final.pt" --data data/val --threshold 0.5 --json "$RUNS/eval_halting.json"
$HALTDET train --config configs/halting_large.yaml --out "$RUNS/halting_large"
$HALTDET train --config configs/halting_large_refine.yaml --init "$RUNS/halting_large/final.pt" --out "$RUNS/halting_large_refine"
for split in val val2; do
  $HALTDET eval --checkpoint "$RUNS/halting_large_refine/final.pt" --against "$RUNS/baseline_refine/final.pt" --data "data/$split" --bootstrap 1000 --json "$RUNS/eval_halting_large_$split.json"
done
