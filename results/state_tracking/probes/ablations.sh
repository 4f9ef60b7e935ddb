#!/usr/bin/env bash
# The ablations of results/state_tracking/probes/README.md: each changes one setting of the 3-object recipe
# (configs/recipes/state_tracking_s3_implicit.yaml), two probes at a time, one thread each (about 65 minutes).
set -euo pipefail
export PATH="$PWD/.venv/bin:$PATH"
R=configs/recipes/state_tracking_s3_implicit.yaml
GROUPED="--group_by_difficulty true"
probe() { OMP_NUM_THREADS=1 python results/state_tracking/probes/probe.py "$@" > "outputs/state_tracking/probes/$1.log" 2>&1; }
mkdir -p outputs/state_tracking/probes
probe shift0 $R --model.loop_shift 0 & probe shift4 $R --model.loop_shift 4 & wait
probe answer_only $R --task_kwargs.supervision answer & probe no_position_encoding $R --model.position_encoding none & wait
probe schedule_above_steps $R $GROUPED --loop_schedule "{distribution: above_difficulty, extra: 1, min: 1, max: 64}" &
probe schedule_tied $R $GROUPED --loop_schedule "{distribution: above_difficulty, extra: 0, min: 1, max: 64}" & wait
probe schedule_poisson_lognormal $R --loop_schedule "{distribution: poisson_lognormal, mean: 13, min: 1, max: 32}" &
probe gradient_truncated4 $R --model.gradient truncated --model.gradient_steps 4 & wait
CYCLIC="--task_kwargs.group cyclic --task_kwargs.objects null"
probe gradient_jfb $R --model.gradient jfb & probe abelian_cyclic10 $R $CYCLIC & wait
# the abelian control without depth: the same layers once and the non-tied stack (the baselines' recipes)
probe abelian_cyclic10_once configs/recipes/state_tracking_s3_once.yaml $CYCLIC &
probe abelian_cyclic10_stack configs/recipes/state_tracking_s3_stack.yaml $CYCLIC & wait
