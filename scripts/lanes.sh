# Sourced by scripts/reproduce_results*.sh. run_lanes trains every entry of RUN_LIST
# ("name|config|overrides") with `haltdet train` into $RUNS/name, LANES runs at a time,
# each at one thread pinned to its own core (the N-th lane takes every LANES-th entry from
# the N-th). Finished runs are skipped; a stopped run continues from its last checkpoint
# (one every 50 steps). FRESH_ARGS go to runs that start (e.g. --init CHECKPOINT),
# COMMON_ARGS to every run, before the entry's own overrides. No wall-time limit: every
# run gets its steps, however slow the machine.
[ -v FRESH_ARGS ] || FRESH_ARGS=()
[ -v COMMON_ARGS ] || COMMON_ARGS=()

train_run() {  # train_run LANE "name|config|overrides": train (or continue) one run
  local lane=$1 name config overrides start=("${FRESH_ARGS[@]}") pin=()
  IFS='|' read -r name config overrides <<< "$2"
  [ -f "$RUNS/$name/final.pt" ] && return 0
  [ -f "$RUNS/$name/latest.pt" ] && start=(--resume)
  if command -v taskset > /dev/null && [ "$LANES" -le "$(nproc)" ]; then pin=(taskset -c "$lane"); fi
  # shellcheck disable=SC2086  # the overrides are words
  OMP_NUM_THREADS=1 "${pin[@]}" $HALTDET train --config "$config" --out "$RUNS/$name" --threads 1 --quiet \
    --set train.checkpoint_every=50 --set train.max_minutes=0 "${start[@]}" "${COMMON_ARGS[@]}" $overrides \
    >> "$RUNS/$name.log" 2>&1
  echo "$(date -u +%FT%TZ) $name done"
}

run_lanes() {  # every entry of RUN_LIST, LANES at a time
  local n i
  for ((n = 0; n < LANES; n++)); do
    (for ((i = n; i < ${#RUN_LIST[@]}; i += LANES)); do train_run "$n" "${RUN_LIST[$i]}"; done) &
  done
  wait
}
