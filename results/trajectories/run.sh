#!/usr/bin/env bash
# Trajectories in width (issue 28): existing checkpoints, no retraining. Each sweep scores the test split (seed 0)
# at the trained loop count, 2x and 4x, with K = 1, 4, 16, 64 trajectories per input (noise sigma chosen on the
# probe split, seed 1: results/trajectories/probes/), reduced by the lowest final residual; the ablation runs
# vote and a seeded random pick on the same trajectories (same seed and noise) at K = 16 (sudoku: 4 and 16; maze:
# 13x13 only).
# Usage: results/trajectories/run.sh sudoku|maze|state_tracking   (one thread: OMP_NUM_THREADS=1)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=results/trajectories
MAZE_NOISE=${MAZE_NOISE:-1.0}  # chosen by probe.sh maze (probes/README.md)
ST_NOISE=${ST_NOISE:-1.0}  # chosen by probe.sh state_tracking (probes/README.md)
eval_width() {  # NAME MODEL LOOPS COUNTS SELECT NOISE [eval options...]
  local name=$1 model=$2 loops=$3 counts=$4 select=$5 noise=$6
  shift 6
  .venv/bin/implicit-hf eval --model "$model" --loops "$loops" --trajectories "$counts" --select "$select" \
    --trajectory-noise "$noise" --perturb-eps 0 --out "$OUT/$name" "$@" | grep -A40 "^   K"
}
case "${1:?sudoku, maze or state_tracking}" in
  sudoku)
    hard=(--task sudoku --task-kwargs '{"min_givens": 25, "require_search": true}' --n 200 --batch-size 50)
    eval_width sudoku_hard outputs/sudoku_implicit/model 16,32,64 1,4,16,64 residual 1.0 "${hard[@]}"
    for select in vote random; do
      eval_width "sudoku_hard_$select" outputs/sudoku_implicit/model 16,32,64 4,16 "$select" 1.0 "${hard[@]}"
    done
    ;;
  maze)  # run.sh maze [SIZES]: 13x13 on 200 mazes with the ablation; 17x17 on 100 mazes without it (K = 64 at 96
    # loops on 17x17 takes ~40 min on one thread)
    for size in ${2:-13 17}; do
      n=$([ "$size" = 13 ] && echo 200 || echo 100)
      maze=(--task maze --task-kwargs "{\"size\": $size}" --n "$n" --batch-size 25 --trajectory-batch-size 400)
      eval_width "maze_$size" outputs/maze_implicit/model 24,48,96 1,4,16,64 residual "$MAZE_NOISE" "${maze[@]}"
      if [ "$size" = 13 ]; then
        for select in vote random; do
          eval_width "maze_${size}_$select" outputs/maze_implicit/model 24,48,96 16 "$select" "$MAZE_NOISE" "${maze[@]}"
        done
      fi
    done
    ;;
  state_tracking)
    for steps in 16 32; do
      st=(--task state_tracking --task-kwargs "{\"objects\": 5, \"steps\": $steps}" --n 250 --batch-size 50)
      eval_width "state_tracking_s5_steps$steps" outputs/state_tracking/s5_implicit/model 16,32,64 1,4,16,64 \
        residual "$ST_NOISE" "${st[@]}"
      for select in vote random; do
        eval_width "state_tracking_s5_steps${steps}_$select" outputs/state_tracking/s5_implicit/model 16,32,64 16 \
          "$select" "$ST_NOISE" "${st[@]}"
      done
    done
    ;;
esac
