#!/usr/bin/env bash
# Reproduces results/state_tracking/ (from the repository root, with `make install` done; about 2 hours on 2 cores;
# OBJECTS="3" runs one setting, SKIP_TRAINING=1 re-runs the evaluation of trained models):
#   1. for 3 and 5 objects, the implicit model (its recipe as written) and its three baselines (the same layers
#      once, a non-tied stack, a Llama of equal parameters at the implicit model's training depth) train for the
#      same wall time: each recipe's seconds per step are timed alone on one thread (a 110-step run minus a
#      10-step run), the budget is the implicit recipe's max_steps at its rate, and each baseline's max_steps is
#      that budget at its own rate; the runs then train two at a time, one thread each;
#   2. the Llama baseline (trained as an implicit model that runs once) is exported as a LlamaForCausalLM;
#   3. every model is swept over loops 1..128 at 4, 8, 16 and 32 steps (N/2, N, 2N, 4N for N = 8) with the
#      baselines beside it (implicit-hf eval --baseline), and with implicit-hf lm-eval on the shipped tasks;
#   4. generate(tol=...) is timed per answer at each step count (halting.py), and summarise.py writes the tables
#      and the figure.
set -euo pipefail
export PATH="$PWD/.venv/bin:$PATH"
RES=results/state_tracking
OUT=outputs/state_tracking
LOOPS=1,2,3,4,6,8,12,16,24,32,48,64,96,128
mkdir -p "$OUT/logs" "$RES/train"

seconds() { python -c "import time; print(time.perf_counter())"; }
recipe_steps() { python -c "import yaml; print(yaml.safe_load(open('$1'))['max_steps'])"; }

train() {  # time the four recipes, then train them for the implicit recipe's wall time
  local objects=$1
  declare -A STEPS=() PER_STEP=()
  : > "$RES/budget_s$objects.txt"
  for name in implicit once stack llama; do
    recipe=configs/recipes/state_tracking_s${objects}_$name.yaml
    OMP_NUM_THREADS=1 implicit-hf train "$recipe" --output_dir /tmp/st_time --overwrite_output_dir true \
      --max_steps 1 --checkpoint_every 0 --eval_every 0 > /dev/null 2>&1  # writes the data set cache
    for n in 10 110; do
      start=$(seconds)
      OMP_NUM_THREADS=1 implicit-hf train "$recipe" --output_dir /tmp/st_time --overwrite_output_dir true \
        --max_steps $n --checkpoint_every 0 --eval_every 0 > /dev/null 2>&1
      eval "t$n=\$(python -c \"print($(seconds) - $start)\")"
    done
    PER_STEP[$name]=$(python -c "print(($t110 - $t10) / 100)")
  done
  budget=$(python -c "print($(recipe_steps configs/recipes/state_tracking_s${objects}_implicit.yaml) * ${PER_STEP[implicit]})")
  for name in implicit once stack llama; do
    STEPS[$name]=$(python -c "print(round($budget / ${PER_STEP[$name]} / 100) * 100)")
    echo "s${objects}_$name: ${STEPS[$name]} steps for $(python -c "print(round($budget))") s (alone, one thread: ${PER_STEP[$name]} s/step)" \
      | tee -a "$RES/budget_s$objects.txt"
  done
  for pair in "implicit once" "stack llama"; do
    for name in $pair; do
      steps=${STEPS[$name]}
      OMP_NUM_THREADS=1 implicit-hf train configs/recipes/state_tracking_s${objects}_$name.yaml --overwrite_output_dir true \
        --max_steps "$steps" --checkpoint_every $((steps / 4)) --eval_every $((steps / 4)) \
        > "$OUT/logs/s${objects}_$name.log" 2>&1 &
    done
    wait
  done
}

evaluate() {  # export the Llama, sweep every step count with the baselines, lm-eval, halting
  local objects=$1
  python -c "
from transformers import AutoTokenizer
from implicit_hf.modeling.convert import to_llama
from implicit_hf.tasks.models import load_model
source, target = '$OUT/s${objects}_llama/model', '$OUT/s${objects}_llama/llama'
to_llama(load_model(source, 'causal_lm')).save_pretrained(target)
AutoTokenizer.from_pretrained(source).save_pretrained(target)
"
  for name in implicit once stack llama; do
    mkdir -p "$RES/train/s${objects}_$name"
    cp "$OUT/s${objects}_$name"/{train_log.jsonl,metrics.json,train_config.json} "$RES/train/s${objects}_$name/"
  done
  for steps in 4 8 16 32; do
    OMP_NUM_THREADS=2 implicit-hf eval --model "$OUT/s${objects}_implicit/model" --loops $LOOPS --n 500 \
      --task-kwargs "{\"objects\": $objects, \"steps\": $steps}" \
      --baseline "$OUT/s${objects}_once/model" --baseline "$OUT/s${objects}_stack/model" \
      --baseline "$OUT/s${objects}_llama/llama" --out "$RES/s${objects}_steps$steps"
  done
  implicit-hf lm-eval-data state_tracking --steps 4,8,16,32 --n 500 --task-kwargs "{\"objects\": $objects}" \
    --out "$OUT/lm_eval_data/s$objects"
  OMP_NUM_THREADS=2 implicit-hf lm-eval --model "$OUT/s${objects}_implicit/model" \
    --tasks state_tracking_steps4,state_tracking_steps8,state_tracking_steps16,state_tracking_steps32 \
    --loops 1,2,4,8,12,16,24,32,48,64,128 --include-path implicit_hf/tasks/reasoning/lm_eval_tasks \
    --metadata "{\"data_dir\": \"$OUT/lm_eval_data/s$objects\"}" --batch-size 64 --out "$RES/lm_eval_s$objects"
  OMP_NUM_THREADS=2 python "$RES/halting.py" "$OUT/s${objects}_implicit/model" "$RES/halting_s$objects.json"
}

for objects in ${OBJECTS:-3 5}; do
  [ -n "${SKIP_TRAINING:-}" ] || train "$objects"
  evaluate "$objects"
done
python "$RES/summarise.py"
