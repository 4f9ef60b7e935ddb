"""Evaluation harness: score an implicit model at many loop counts from one trajectory run.

`sweep` scores a model in memory; `run_eval` loads a checkpoint, sweeps it on a task's test split
and writes ``results.json``, ``results.csv`` and plots; `main` is ``implicit-hf eval``.
"""

from .harness import (
    add_arguments,
    estimate_flops,
    lipschitz_ratios,
    load_model,
    main,
    parse_loops,
    resolve_task,
    run_eval,
    run_from_args,
    sweep,
)

__all__ = [
    "add_arguments",
    "estimate_flops",
    "lipschitz_ratios",
    "load_model",
    "main",
    "parse_loops",
    "resolve_task",
    "run_eval",
    "run_from_args",
    "sweep",
]
