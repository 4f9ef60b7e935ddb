#!/usr/bin/env bash
# Probe for the trajectory noise on sudoku hard: 50 held-out puzzles of ANOTHER seed (1) than the reported test
# split (seed 0), K = 16, at the trained loop count (16) and 4x (64); sigma chosen here, then fixed for the results.
set -euo pipefail
cd "$(dirname "$0")/../.."
for noise in 0.1 0.3 1.0 3.0; do
  .venv/bin/implicit-hf eval --model outputs/sudoku_implicit/model --task sudoku \
    --task-kwargs '{"min_givens": 25, "require_search": true}' --loops 16,64 --n 50 --seed 1 --batch-size 50 \
    --trajectories 1,16 --trajectory-noise "$noise" --perturb-eps 0 --no-plots \
    --out "results/trajectories/probes/sudoku_noise$noise" | grep -A5 "^   K"
done
