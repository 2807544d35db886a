#!/usr/bin/env bash
# Retrains and re-evaluates every point of docs/results_scratch.md: the baseline, the halting
# model at several thresholds, halting_large (halting on 0.24 m pillars), the token-reduction peers on the
# same backbone (random dropping, top-k, cumulative ACT halting, coarser pillars), the
# FlatFormer-style equal-size token groups encoder, the
# baseline at other sizes and the ablations, each trained from the first step for the
# baseline's 4,000 steps; then the refiner of halting_large, halting_large against the
# bundled baseline on a second validation split, and `haltdet pareto` runs that evaluate
# every point (with the split's noise and each point's difference from the first) and
# time all of them in one interleaved bench.
#
# Cost: 19 first-stage runs at one thread each on a 2-core CPU, two at a time (LANES=2, one
# core each): the baseline took 81 min and the halting model 110 min on one machine, 3 h
# and 5 h on a slower one, the larger models longer: one to two days, then ~3 h of
# evaluation (on 800 validation frames) and timing. Run it from
# the repository root, in the background:
#   nohup bash scripts/reproduce_results.sh > runs/reproduce_results.log 2>&1 &
# It can be stopped at any time and started again: finished runs are skipped, stopped
# runs continue from their last checkpoint. The timing at the end needs the machine to
# itself. Outputs: runs/results/ (runs, evaluations), docs/results/first_stage/ and
# docs/results/two_stage/ (pareto.json, pareto.png, results.md), and docs/results_scratch.md,
# the two tables.
set -euo pipefail
HALTDET=${HALTDET:-haltdet}
RUNS=runs/results  # docs/results/pareto_spec.yaml names the checkpoints under it
LANES=${LANES:-2}
mkdir -p "$RUNS"
[ -f data/train/dataset.json ] || $HALTDET data synth --out data/train --frames 4000 --seed 0 --workers 2 --quiet
[ -f data/val/dataset.json ] || $HALTDET data synth --out data/val --frames 200 --seed 1234 --workers 2 --quiet
[ -f data/val2/dataset.json ] || $HALTDET data synth --out data/val2 --frames 200 --seed 4321 --workers 2 --quiet
# the pareto split: data/val's 200 frames and 600 more (each frame's seed derives from the
# dataset seed and its index)
[ -f data/val800/dataset.json ] || $HALTDET data synth --out data/val800 --frames 800 --seed 1234 --workers 2 --quiet

# name | config | overrides
RUN_LIST=(
  "baseline_s0|baseline|"
  "halting_s0|halting_scratch|"
  "halting_large_s0|halting_large|"
  "baseline_s1|baseline|--set train.seed=1"
  "halting_s1|halting_scratch|--set train.seed=1"
  "halting_large_s1|halting_large|--set train.seed=1"
  "random|peer_random|"
  "topk|peer_topk|"
  "act|peer_act|"
  "coarse_048|peer_coarse|"
  "coarse_064|peer_coarse|--set model.pillar_size=0.64"
  "groups|peer_groups|"
  "size_small|baseline|--set model.d_model=48 --set model.num_layers=4 --set model.ffn_dim=96 --set model.pfn_channels=[24,48]"
  "size_large|baseline|--set model.d_model=96 --set model.num_layers=8 --set model.ffn_dim=192 --set model.pfn_channels=[48,96]"
  "no_recycling|halting_scratch|--set model.recycling=false"
  "uniform_loss|halting_scratch|--set train.sparsity_uniform=true"
  "gradient_residual|halting_scratch|--set model.halting_gradient=residual"
  "gradient_attention|halting_scratch|--set model.halting_gradient=attention"
  "gradient_hard|halting_scratch|--set model.halting_gradient=hard"
)

. "$(dirname "$0")/lanes.sh"
run_lanes

[ -f "$RUNS/halting_large_refine/final.pt" ] || $HALTDET train --config halting_large_refine \
  --init "$RUNS/halting_large_s0/final.pt" --out "$RUNS/halting_large_refine" --quiet
# halting_large against the bundled baseline on a fresh split too (the pareto runs use data/val)
$HALTDET eval --checkpoint "$RUNS/halting_large_refine/final.pt" --against baseline --data data/val2 \
  --bootstrap 1000 --quiet --json "$RUNS/eval_halting_large_val2.json"
$HALTDET pareto docs/results/pareto_spec.yaml --out docs/results/first_stage --threads 2 --quiet
$HALTDET pareto docs/results/pareto_two_stage_spec.yaml --out docs/results/two_stage --threads 2 --quiet
cat docs/results/first_stage/results.md docs/results/two_stage/results.md > docs/results_scratch.md
