#!/usr/bin/env bash
# The points of docs/results_depth.md: the baseline with fewer layers against halting, each
# trained the same way from the step-2,900 snapshot of a baseline run from the first step
# (seed 1): 1,100 steps with the halting fine-tune's schedule (configs/halting.yaml:
# learning rate 5e-4, one-cycle, 5 % warm-up). Points: the 6-layer baseline continued so
# (the control); the baseline with 4 layers (the snapshot's first four) and the halting
# model with lambda adapted to 0.4 of the token-layers, three seeds each; the baseline with
# 8 layers (two added from their initialisation), two seeds; the halting
# model with its stages one layer later (before layers 3 and 5) and one layer earlier
# (before layers 1 and 3), two seeds each. The runs have
# the names and settings of scripts/reproduce_results_budget.sh under the same
# runs/budget, so either script reuses what the other trained.
#
# Cost, one thread per run on a 2-core CPU: the baseline's run from the first step where
# runs/budget has no snapshot (all 4,000 steps, about 75 min), then 13 runs of 18-28 min
# two at a time (about 160 min), then `haltdet pareto` (13 evaluations on data/val800, about
# 4 min each, two at a time, and one interleaved bench of about 3 min). About 4.5 hours.
# Run it from the repository root, in the background:
#   nohup bash scripts/reproduce_results_depth.sh > runs/reproduce_results_depth.log 2>&1 &
# It can be stopped and started again (scripts/lanes.sh). The timing at the end needs the
# machine to itself. Outputs: runs/budget/ (runs), docs/results/depth/ (pareto.json,
# pareto.png) and docs/results_depth.md (the table).
set -euo pipefail
HALTDET=${HALTDET:-haltdet}
RUNS=runs/budget  # docs/results/pareto_depth_spec.yaml names the checkpoints under it
LANES=${LANES:-2}
mkdir -p "$RUNS"
[ -f data/train/dataset.json ] || $HALTDET data synth --out data/train --frames 4000 --seed 0 --workers 2 --quiet
[ -f data/val800/dataset.json ] || $HALTDET data synth --out data/val800 --frames 800 --seed 1234 --workers 2 --quiet

. "$(dirname "$0")/lanes.sh"
if [ ! -f "$RUNS/baseline_s1/step_2900.pt" ]; then
  RUN_LIST=("baseline_s1|baseline|--set train.seed=1")
  LANES=1 run_lanes
fi

# name | config | overrides
RUN_LIST=(
  "baseline_restart|baseline|"
  "size_shallow|baseline|--set model.num_layers=4"
  "size_shallow_s1|baseline|--set model.num_layers=4 --set train.seed=1"
  "size_shallow_s2|baseline|--set model.num_layers=4 --set train.seed=2"
  "size_deep|baseline|--set model.num_layers=8"
  "size_deep_s1|baseline|--set model.num_layers=8 --set train.seed=1"
  "target_residual|halting|--set train.sparsity_target=0.4"
  "target_residual_s1|halting|--set train.sparsity_target=0.4 --set train.seed=1"
  "target_residual_s2|halting|--set train.sparsity_target=0.4 --set train.seed=2"
  "halting_after3|halting|--set model.halting_layers=[3,5]"
  "halting_after3_s1|halting|--set model.halting_layers=[3,5] --set train.seed=1"
  "halting_after1|halting|--set model.halting_layers=[1,3]"
  "halting_after1_s1|halting|--set model.halting_layers=[1,3] --set train.seed=1"
)
FRESH_ARGS=(--init "$RUNS/baseline_s1/step_2900.pt")
COMMON_ARGS=(--set train.max_steps=1100 --set train.lr=0.0005 --set train.warmup_fraction=0.05
             --set train.save_steps=[])
run_lanes

$HALTDET pareto docs/results/pareto_depth_spec.yaml --out docs/results/depth --jobs 2 --cache "$RUNS/evaluations" --quiet
mv docs/results/depth/results.md docs/results_depth.md
