#!/usr/bin/env bash
# Reproduces results/multihop/: time a step of each recipe, train each for the same wall time
# (BUDGET_S seconds of training on 2 threads, one run at a time), then sweep loops at several hop counts.
# Usage: bash results/multihop/run.sh   (from the repository root; ~50 min on 2 CPU cores)
set -euo pipefail
BUDGET_S=${BUDGET_S:-900}
export OMP_NUM_THREADS=2
PY=.venv/bin/python
CLI=.venv/bin/implicit-hf
RES=results/multihop
for name in implicit explicit explicit_stack; do
  recipe=configs/recipes/multihop_$name.yaml
  # seconds per step: a 60-step run minus a 10-step run (start-up cancels; a 1-step run first
  # writes the data set cache, so neither timed run generates data)
  for n in 1 10 60; do
    start=$(date +%s.%N)
    $CLI train $recipe --output_dir /tmp/multihop_time_$name --max_steps $n --checkpoint_every 0 --eval_every 0 > /dev/null 2>&1
    eval "t$n=\$(echo \"\$(date +%s.%N) - $start\" | bc)"
    rm -rf /tmp/multihop_time_$name
  done
  steps=$(echo "$BUDGET_S * 50 / ($t60 - $t10) / 50 * 50" | bc)
  echo "$name: $steps steps for ${BUDGET_S}s" | tee -a $RES/budget.txt
  $CLI train $recipe --max_steps "$steps"
  mkdir -p $RES/$name && cp outputs/multihop_$name/{train_log.jsonl,metrics.json,train_config.json} $RES/$name/
done
for hops in 1 2 4 8 16; do
  $CLI eval --model outputs/multihop_implicit/model --loops 1,2,3,4,6,8,12,16,24,32,64 --n 300 \
    --task-kwargs "{\"hops\": $hops, \"distractors\": 3}" \
    --baseline outputs/multihop_explicit/model --baseline outputs/multihop_explicit_stack/model \
    --out $RES/hops$hops
done
