#!/usr/bin/env bash
# The points of docs/results_finetune.md at a budget one 2-core CPU gets through in about two hours:
# every model starts from the bundled baseline's first stage (4,000 steps,
# haltdet/checkpoints/baseline.md) and trains STEPS more steps (default 400) with the
# halting fine-tune recipe's schedule (configs/halting.yaml: learning rate 5e-4, one-cycle,
# 5 % warm-up). The baseline itself gets the same steps, so every point has had the same
# training. Points: the baseline and the halting model (two seeds each, the halting model
# at three thresholds; at a sparsity weight of 1 too, one seed), random dropping, top-k,
# cumulative ACT halting, coarser pillars, equal-size token groups and the ablations.
# Models of another width, depth or pillar size (the size points; halting_large, on 0.24 m
# pillars) are not fine-tuned from the baseline's weights; they are in
# scripts/reproduce_results.sh, which trains everything from the first step (about 40 h).
#
# Cost: 16 runs of 8-19 min at one thread, two at a time (LANES=2, one core each), about
# 115 min; then `haltdet pareto` (evaluation on data/val, 200 frames, two at a time, and one
# interleaved bench; about 12 min). Run it from the repository root, in the background:
#   nohup bash scripts/reproduce_results_finetune.sh > runs/reproduce_results_finetune.log 2>&1 &
# It can be stopped and started again: finished runs are skipped, stopped runs continue
# from their last checkpoint; evaluations are kept in runs/finetune/evaluations and reused
# while checkpoint, split and code are unchanged. The timing at the end needs the machine to itself.
# Outputs: runs/finetune/ (runs), docs/results/finetune/ (pareto.json, pareto.png)
# and docs/results_finetune.md (the table).
set -euo pipefail
HALTDET=${HALTDET:-haltdet}
RUNS=runs/finetune  # docs/results/pareto_finetune_spec.yaml names the checkpoints under it
LANES=${LANES:-2}
STEPS=${STEPS:-400}
mkdir -p "$RUNS"
[ -f data/train/dataset.json ] || $HALTDET data synth --out data/train --frames 4000 --seed 0 --workers 2 --quiet
[ -f data/val/dataset.json ] || $HALTDET data synth --out data/val --frames 200 --seed 1234 --workers 2 --quiet

# name | config | overrides; key points first, alternating between the lanes
RUN_LIST=(
  "baseline_s0|baseline|"
  "halting_s0|halting|"
  "halting_s1|halting|--set train.seed=1"
  "baseline_s1|baseline|--set train.seed=1"
  "topk|peer_topk|"
  "halting_lambda1|halting|--set train.sparsity_weight=1.0"
  "act|peer_act|"
  "random|peer_random|"
  "gradient_residual|halting|--set model.halting_gradient=residual"
  "gradient_hard|halting|--set model.halting_gradient=hard"
  "no_recycling|halting|--set model.recycling=false"
  "gradient_attention|halting|--set model.halting_gradient=attention"
  "coarse_048|peer_coarse|"
  "uniform_loss|halting|--set train.sparsity_uniform=true"
  "groups|peer_groups|"
  "coarse_064|peer_coarse|--set model.pillar_size=0.64"
)

# every run starts from the bundled baseline's first stage, with the same schedule; the
# halting gradient through both paths (what docs/results_finetune.md was made with; the
# gradient_* runs override it; the budget profile trains with the residual path, the default)
FRESH_ARGS=(--init haltdet/checkpoints/baseline.pt)
COMMON_ARGS=(--set train.max_steps="$STEPS" --set train.lr=0.0005 --set train.warmup_fraction=0.05
             --set train.save_steps=[] --set model.halting_gradient=both)
. "$(dirname "$0")/lanes.sh"
run_lanes

$HALTDET pareto docs/results/pareto_finetune_spec.yaml --out docs/results/finetune --jobs 2 --cache "$RUNS/evaluations" --quiet
mv docs/results/finetune/results.md docs/results_finetune.md
