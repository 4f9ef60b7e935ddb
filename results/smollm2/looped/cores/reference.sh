#!/usr/bin/env bash
# The reference of the core table: the original model fine-tuned by the same short heal (configs/recipes/smollm2_looped_heal.yaml: the same text,
# LoRA rank, layers, steps, learning rate and distillation) at one loop, where the looped conversion IS the
# original (so its LoRA sits on the same source layers as the looped model's); no stabiliser (nothing loops).
# Usage: results/smollm2/looped/cores/reference.sh NAME (a core already converted by run.sh, e.g. c12_15)
set -euo pipefail
name=$1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} OMP_WAIT_POLICY=PASSIVE
here=results/smollm2/looped/cores
out=$here/${name}_reference
mkdir -p "$out"
implicit-hf train configs/recipes/smollm2_looped_heal.yaml --init_from "outputs/looped_$name" --output_dir "outputs/looped_reference_$name" \
    --overwrite_output_dir true --loop_schedule null --model.num_loops 1 --fixed_point_penalty 0
cp "outputs/looped_reference_$name/"{train_log.jsonl,train_config.json,metrics.json} "$out/"
implicit-hf eval --model "outputs/looped_reference_$name/model" --task text \
    --task-kwargs '{"tokenizer": "outputs/smollm2-full", "seq_len": 64}' --loops 1 --n 100 --batch-size 10 \
    --perturb-eps 0 --out "$out" --no-plots
python results/smollm2/multihop/induction.py "$out/copy.json" "outputs/looped_reference_$name/model:1"
