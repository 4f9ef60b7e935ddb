#!/usr/bin/env bash
# Adaptive compute on the trained implicit model: halt each answer at a relative-residual tolerance
# (at most 64 loops) per hop count; steps_mean in results.json is the mean loops used per answer token.
set -euo pipefail
export OMP_NUM_THREADS=2
for hops in 1 2 4 8 16; do
  .venv/bin/implicit-hf eval --model outputs/multihop_implicit/model --loops 64 --tol "${TOL:-1e-3}" --n 300 \
    --task-kwargs "{\"hops\": $hops, \"distractors\": 3}" --perturb-eps 0 --no-plots --out results/multihop/halting/hops$hops
done
