#!/usr/bin/env bash
# The points of docs/results.md and docs/results_capacity.md at the baseline's full budget:
# every first stage has had 4,000 training steps of batch 2. A baseline run from the first
# step (seed 1; the bundled baseline is an older seed-0 run) keeps its step-2,900 snapshot; every
# other point but a few then trains from that snapshot for the remaining 1,100 steps with
# the halting fine-tune schedule (configs/halting.yaml: learning rate 5e-4, one-cycle, 5 %
# warm-up), as the bundled halting model was trained, each with its own method: the
# halting model at sparsity weight 0.25 (three seeds), 0.1, 1 and 3, the halting model with 8
# encoder layers (weight 0.25 and 0.1), the baseline with 4 and 8 layers (a shallower
# encoder keeps the snapshot's first layers, a deeper one starts its extra layers afresh),
# top-k and random dropping (keep ratios 0.1 and 0.6), ACT halting, 0.48 m pillars, and the
# ablations: the halting gradient through both paths (weight 0.25, 0.5 with two seeds, and
# 1 with two seeds), the hard drop, no recycling, a uniform sparsity loss; and lambda
# adapted to 0.4 of the token-layers (train.sparsity_target) with the residual path and with
# both paths, two seeds each; and, as the schedule's control, the baseline itself continued
# with the fine-tune's schedule and no halting. From the first step, beside the baseline: a
# second baseline seed (0), the halting model (configs/halting_scratch.yaml, with both
# gradient paths, with the residual path at seeds 0 and 1, and with the residual path and
# halting from a quarter, and from half, of the steps on) and a wider baseline (d_model 96,
# FFN 192, PFN 48/96), whose step-2,900 snapshot starts the wider halting model (capacity
# for latency); the second baseline seed's snapshot starts a halting fine-tune too.
#
# Cost, one thread per run on a 2-core CPU, two at a time: the eight runs from the first
# step (72-132 min each, about 6 h two at a time), then 27 runs of 20-40 min (about 7.3 h),
# the wider halting model and the fine-tune on the second seed (35 and 25 min); then
# `haltdet pareto` twice (26 and 19 evaluations on data/val800, two at a time, and one
# interleaved bench each; ~30 and ~25 min). About 15 hours in all. Run it from the
# repository root, in the background:
#   nohup bash scripts/reproduce_results_budget.sh > runs/reproduce_results_budget.log 2>&1 &
# It can be stopped and started again: finished runs are skipped, stopped runs continue
# from their last checkpoint; evaluations are kept in runs/budget/evaluations and reused
# while checkpoint, split and code are unchanged. The timing at the end needs the machine to itself.
# Outputs: runs/budget/ (runs), docs/results/budget/ and docs/results/capacity/
# (pareto.json, pareto.png), docs/results.md and docs/results_capacity.md (the tables).
set -euo pipefail
HALTDET=${HALTDET:-haltdet}
RUNS=runs/budget  # docs/results/pareto_budget_spec.yaml names the checkpoints under it
LANES=${LANES:-2}
mkdir -p "$RUNS"
[ -f data/train/dataset.json ] || $HALTDET data synth --out data/train --frames 4000 --seed 0 --workers 2 --quiet
[ -f data/val800/dataset.json ] || $HALTDET data synth --out data/val800 --frames 800 --seed 1234 --workers 2 --quiet

# name | config | overrides
RUN_LIST=(
  "baseline_s1|baseline|--set train.seed=1"
  "halting_scratch|halting_scratch|--set train.sparsity_warmup=0.5"
  "halting_scratch_residual|halting_scratch|--set model.halting_gradient=residual --set train.sparsity_warmup=0.5"
  "size_wide|baseline|--set train.seed=1 --set model.d_model=96 --set model.ffn_dim=192 --set model.pfn_channels=[48,96]"
  "halting_scratch_start025|halting_scratch|--set model.halting_gradient=residual --set train.sparsity_warmup=0.5 --set train.halting_start=0.25"
  "halting_scratch_residual_s1|halting_scratch|--set model.halting_gradient=residual --set train.sparsity_warmup=0.5 --set train.seed=1"
  "baseline_s0|baseline|--set train.seed=0"
  "halting_scratch_start05_s1|halting_scratch|--set model.halting_gradient=residual --set train.sparsity_warmup=0.5 --set train.halting_start=0.5 --set train.seed=1"
)
. "$(dirname "$0")/lanes.sh"
run_lanes

RUN_LIST=(
  "halting|halting|"
  "topk|peer_topk|"
  "halting_lambda1|halting|--set train.sparsity_weight=1.0"
  "halting_lambda01|halting|--set train.sparsity_weight=0.1"
  "halting_lambda3|halting|--set train.sparsity_weight=3.0"
  "random|peer_random|"
  "halting_deep|halting|--set model.num_layers=8"
  "halting_deep_lambda01|halting|--set model.num_layers=8 --set train.sparsity_weight=0.1"
  "size_deep|baseline|--set model.num_layers=8"
  "act|peer_act|"
  "size_shallow|baseline|--set model.num_layers=4"
  "coarse_048|peer_coarse|"
  "halting_s1|halting|--set train.seed=1"
  "halting_s2|halting|--set train.seed=2"
  "target_residual|halting|--set train.sparsity_target=0.4"
  "target_residual_s1|halting|--set train.sparsity_target=0.4 --set train.seed=1"
  "target_both|halting|--set model.halting_gradient=both --set train.sparsity_target=0.4"
  "target_both_s1|halting|--set model.halting_gradient=both --set train.sparsity_target=0.4 --set train.seed=1"
  "gradient_both|halting|--set model.halting_gradient=both"
  "gradient_both_lambda05|halting|--set model.halting_gradient=both --set train.sparsity_weight=0.5"
  "gradient_both_lambda05_s1|halting|--set model.halting_gradient=both --set train.sparsity_weight=0.5 --set train.seed=1"
  "gradient_both_lambda1|halting|--set model.halting_gradient=both --set train.sparsity_weight=1.0"
  "gradient_both_lambda1_s1|halting|--set model.halting_gradient=both --set train.sparsity_weight=1.0 --set train.seed=1"
  "gradient_hard|halting|--set model.halting_gradient=hard"
  "no_recycling|halting|--set model.recycling=false"
  "uniform_loss|halting|--set train.sparsity_uniform=true"
  "baseline_restart|baseline|"
)
FRESH_ARGS=(--init "$RUNS/baseline_s1/step_2900.pt")
COMMON_ARGS=(--set train.max_steps=1100 --set train.lr=0.0005 --set train.warmup_fraction=0.05
             --set train.save_steps=[])
run_lanes

# The wider halting model: the same fine-tune from the wider baseline's snapshot
RUN_LIST=(
  "halting_wide|halting|--set model.d_model=96 --set model.ffn_dim=192 --set model.pfn_channels=[48,96]"
)
FRESH_ARGS=(--init "$RUNS/size_wide/step_2900.pt")
run_lanes

# The halting fine-tune from the snapshot of the baseline's second seed
RUN_LIST=(
  "halting_on_baseline_s0|halting|"
)
FRESH_ARGS=(--init "$RUNS/baseline_s0/step_2900.pt")
run_lanes

$HALTDET pareto docs/results/pareto_budget_spec.yaml --out docs/results/budget --jobs 2 --cache "$RUNS/evaluations" --quiet
mv docs/results/budget/results.md docs/results.md
$HALTDET pareto docs/results/pareto_capacity_spec.yaml --out docs/results/capacity --jobs 2 --cache "$RUNS/evaluations" --quiet
mv docs/results/capacity/results.md docs/results_capacity.md
