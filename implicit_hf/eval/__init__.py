"""Evaluation: score an implicit model at many loop counts from one trajectory run.

`sweep` scores a model in memory (`run.py`: from one trajectory run per batch, `sweep.py`, or, for a generative
task, by generating, `generative.py`; both build their records with `records.py`); `run_eval` loads a checkpoint,
sweeps it on a task's test split and writes ``results.json``, ``results.csv`` and plots (`plots.py`); `main` is
``implicit-hf eval`` (`harness.py`); `lm_eval_bridge.py` runs lm-evaluation-harness at several loop counts.
"""

from ..loop_counts import parse_loops
from ..tasks.models import load_model
from .harness import add_arguments, main, run_eval, run_from_args
from .run import sweep
from .sweep import estimate_flops, lipschitz_ratios

__all__ = [
    "add_arguments",
    "estimate_flops",
    "lipschitz_ratios",
    "load_model",
    "main",
    "parse_loops",
    "run_eval",
    "run_from_args",
    "sweep",
]
