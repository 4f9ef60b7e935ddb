"""Evaluation: score an implicit model at many loop counts from one trajectory run.

`sweep` scores a model in memory (`sweep.py`; a generative task by generating, `generative.py`);
`run_eval` loads a checkpoint, sweeps it on a task's test split and writes ``results.json``,
``results.csv`` and plots; `main` is ``implicit-hf eval`` (`harness.py`).
"""

from ..loop_counts import parse_loops
from ..tasks.models import load_model, resolve_task
from .harness import add_arguments, main, run_eval, run_from_args
from .sweep import estimate_flops, lipschitz_ratios, sweep

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
