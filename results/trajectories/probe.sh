#!/usr/bin/env bash
# Probes for the trajectory noise: 50 inputs (state tracking: 100) of ANOTHER seed (1) than the test split the
# results score (seed 0), K = 16, lowest final residual, at the trained loop count and 4x. Sigma is chosen here
# (results/trajectories/probes/README.md), then fixed for the results (run.sh).
# Usage: results/trajectories/probe.sh sudoku|maze|state_tracking   (one thread: OMP_NUM_THREADS=1)
set -euo pipefail
cd "$(dirname "$0")/../.."
probe() {  # NAME MODEL LOOPS NOISE [eval options...]
  local name=$1 model=$2 loops=$3 noise=$4
  shift 4
  .venv/bin/implicit-hf eval --model "$model" --loops "$loops" --seed 1 --trajectories 1,16 \
    --trajectory-noise "$noise" --perturb-eps 0 --no-plots --out "results/trajectories/probes/${name}_noise$noise" "$@" \
    | grep -A5 "^   K"
}
case "${1:?sudoku, maze or state_tracking}" in
  sudoku)
    for noise in 0.1 0.3 1.0 3.0; do
      probe sudoku outputs/sudoku_implicit/model 16,64 "$noise" --task sudoku \
        --task-kwargs '{"min_givens": 25, "require_search": true}' --n 50 --batch-size 50
    done
    ;;
  maze)
    for noise in 0.3 1.0 3.0; do
      probe maze_13 outputs/maze_implicit/model 24,96 "$noise" --task maze --task-kwargs '{"size": 13}' --n 50 \
        --batch-size 25
    done
    ;;
  state_tracking)
    for noise in 0.3 1.0 3.0; do
      probe state_tracking_s5_steps32 outputs/state_tracking/s5_implicit/model 16,64 "$noise" --task state_tracking \
        --task-kwargs '{"objects": 5, "steps": 32}' --n 100 --batch-size 100
    done
    ;;
esac
