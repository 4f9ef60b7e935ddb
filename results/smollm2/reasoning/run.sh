#!/usr/bin/env bash
# Reasoning against the original (README.md here), from the repository root with the venv active, after
# results/smollm2/looped/run.sh (outputs/smollm2-looped-healed/model and outputs/smollm2-full):
#   1. LoRA fine-tunes of the healed looped SmolLM2 and of the original with the same rank, layers, data, steps,
#      batch and learning rate (configs/recipes/smollm2_{state_tracking,multihop}_*.yaml): state tracking with 3
#      and 5 objects (1-8 swaps, dense labels) -- the two models of a setting train side by side, one thread each,
#      so their wall times compare -- and multihop (1-4 hops; the original's fine-tune and evaluation are those of
#      results/smollm2/multihop/original, the same recipe, data and seeds, unless RERUN_ORIGINAL=1);
#   2. implicit-hf lm-eval on the shipped tasks with held-out documents (the test split): state tracking at 4, 8,
#      16 and 32 swaps, multihop at 1, 2, 4, 8 and 16 hops; the looped model at loops 1, 2, 3, 4, 6, 8, 12, 16
#      from one trajectory (every count's coda and head run on it: a sweep of 16 counts costs about 1.5x this
#      one), the original at its one pass;
#   3. the loop's token shift on state tracking with 3 objects (below);
#   4. summarise.py: summary.json, summary.md and accuracy_vs_loops.png.
set -euo pipefail
export OMP_WAIT_POLICY=PASSIVE
out=results/smollm2/reasoning
N=${N:-200}
LOOPS=1,2,3,4,6,8,12,16
OBJECTS=${OBJECTS:-3 5}
TASKS_DIR=$(python -c "from implicit_hf.tasks.reasoning.lm_eval_tasks.documents import LM_EVAL_DIR; print(LM_EVAL_DIR)")

keep() {  # RUN_DIR RESULT_DIR: the training record beside the evaluation
  mkdir -p "$2" && cp "$1"/{train_log.jsonl,train_config.json,metrics.json} "$2/"
}
lm_eval() {  # MODEL RESULT_DIR LOOPS TASKS DATA_DIR
  OMP_NUM_THREADS=2 implicit-hf lm-eval --model "$1" --tasks "$4" --loops "$3" --include-path "$TASKS_DIR" \
      --metadata "{\"data_dir\": \"$5\"}" --out "$2"
}

for objects in $OBJECTS; do
  task=state_tracking_$objects
  data=outputs/st$objects-lm-eval-data
  for model in original looped; do
    tokenizer=$([ $model = original ] && echo outputs/smollm2-full || echo outputs/smollm2-looped-healed/model)
    OMP_NUM_THREADS=1 implicit-hf train configs/recipes/smollm2_state_tracking_$model.yaml --overwrite_output_dir true \
        --output_dir "outputs/smollm2-$task-$model" \
        --task_kwargs "{objects: $objects, steps: [1, 8], supervision: dense, tokenizer: $tokenizer}" \
        > "outputs/smollm2-$task-$model.log" 2>&1 &
  done
  wait
  implicit-hf lm-eval-data state_tracking --steps 4,8,16,32 --n "$N" --task-kwargs "{\"objects\": $objects}" --out $data
  for model in original looped; do keep "outputs/smollm2-$task-$model" "$out/$task/$model"; done
  tasks=state_tracking_steps4,state_tracking_steps8,state_tracking_steps16,state_tracking_steps32
  lm_eval "outputs/smollm2-$task-looped/model" "$out/$task/looped" $LOOPS $tasks $data
  lm_eval "outputs/smollm2-$task-original/model" "$out/$task/original" 1 $tasks $data
done

# The loop's token shift (--loop-shift 1: a causal convolution over the previous positions' state added to the
# core's input, its projection at zero so one loop is still the source): the core-table model
# (../looped/cores/run.sh c12_19_shift1: converted with the shift, healed alike), fine-tuned on state tracking
# with 3 objects as the looped model, the shift trained in full beside the LoRA.
shift=outputs/looped_probe_c12_19_shift1/model
OMP_NUM_THREADS=2 implicit-hf train configs/recipes/smollm2_state_tracking_looped.yaml --overwrite_output_dir true \
    --init_from $shift --output_dir outputs/smollm2-state_tracking_3-looped_shift \
    --task_kwargs "{objects: 3, steps: [1, 8], supervision: dense, tokenizer: $shift}" \
    --lora "{r: 16, parts: [prelude, core, coda], modules_to_save: [loop_shift]}"
keep outputs/smollm2-state_tracking_3-looped_shift "$out/state_tracking_3/looped_shift"
lm_eval outputs/smollm2-state_tracking_3-looped_shift/model "$out/state_tracking_3/looped_shift" $LOOPS \
    state_tracking_steps4,state_tracking_steps8,state_tracking_steps16,state_tracking_steps32 outputs/st3-lm-eval-data
# still rising at 16 loops on 32 swaps: more loops there
lm_eval outputs/smollm2-state_tracking_3-looped_shift/model "$out/state_tracking_3/looped_shift_more_loops" 16,24,32 \
    state_tracking_steps32 outputs/st3-lm-eval-data

data=outputs/multihop-lm-eval-data
tasks=multihop_hops1,multihop_hops2,multihop_hops4,multihop_hops8,multihop_hops16
implicit-hf lm-eval-data multihop --hops 1,2,4,8,16 --n "$N" --out $data
OMP_NUM_THREADS=2 implicit-hf train configs/recipes/smollm2_looped_multihop.yaml --overwrite_output_dir true
keep outputs/smollm2-looped-multihop "$out/multihop/looped"
lm_eval outputs/smollm2-looped-multihop/model "$out/multihop/looped" $LOOPS $tasks $data
if [ "${RERUN_ORIGINAL:-0}" = 1 ]; then
  OMP_NUM_THREADS=2 implicit-hf train configs/recipes/smollm2_multihop_original.yaml --overwrite_output_dir true
  keep outputs/smollm2-multihop-original "$out/multihop/original"
  lm_eval outputs/smollm2-multihop-original/model "$out/multihop/original" 1 $tasks $data
else
  mkdir -p "$out/multihop/original"
  cp results/smollm2/multihop/original/{train_log.jsonl,train_config.json,metrics.json,results.json,results.csv} \
      "$out/multihop/original/"
fi
python $out/summarise.py $out
