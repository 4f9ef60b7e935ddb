#!/usr/bin/env bash
# Multi-hop reasoning with a real LLM (results/smollm2/multihop), from the repository root with the venv
# active, after results/smollm2/healed/run.sh (outputs/smollm2-healed/model and outputs/smollm2-full):
# LoRA-fine-tune the healed implicit SmolLM2 and the original 30-layer model with the same rank, steps and
# data (configs/recipes/smollm2_multihop*.yaml), then score both with lm-evaluation-harness on held-out
# problems of 1 to 16 hops (training saw 1-4), the implicit model at several loop counts.
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} OMP_WAIT_POLICY=PASSIVE
out=results/smollm2/multihop
N=${N:-200}
HOPS=1,2,4,8,16
implicit-hf train configs/recipes/smollm2_multihop.yaml
implicit-hf train configs/recipes/smollm2_multihop_original.yaml
for run in smollm2-multihop:implicit smollm2-multihop-original:original; do
  mkdir -p "$out/${run#*:}"
  cp outputs/${run%:*}/{train_log.jsonl,train_config.json,metrics.json} "$out/${run#*:}/"
done
# held-out documents (the test split; training draws from the train split), the training task's settings
implicit-hf lm-eval-data multihop --hops $HOPS --n "$N" --out outputs/multihop-lm-eval-data
TASKS_DIR=$(python -c "from implicit_hf.tasks.reasoning.multihop import LM_EVAL_DIR; print(LM_EVAL_DIR)")
TASKS=$(echo $HOPS | sed 's/\([0-9]\+\)/multihop_hops\1/g')
META='{"data_dir": "outputs/multihop-lm-eval-data"}'
implicit-hf lm-eval --model outputs/smollm2-multihop/model --tasks "$TASKS" --loops 1,2,3,4,6,8,12 \
    --include-path "$TASKS_DIR" --metadata "$META" --out "$out/implicit"
implicit-hf lm-eval --model outputs/smollm2-multihop-original/model --tasks "$TASKS" --loops 1 \
    --include-path "$TASKS_DIR" --metadata "$META" --out "$out/original"
python "$out/summarise.py" "$out" outputs/multihop-lm-eval-data
