"""Task adapters: domain problems as sequence problems (see `base.TaskAdapter`).

``BUILTIN_TASK_MODULES`` (which module defines each built-in task) needs no import of torch; the rest is
loaded from `base` on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

# Built-in tasks, imported on first use (importing a task module registers its class).
BUILTIN_TASK_MODULES = {
    "lp": "implicit_hf.tasks.lp",
    "deblur": "implicit_hf.tasks.imaging",
    "ns": "implicit_hf.tasks.pde",
    "sudoku": "implicit_hf.tasks.reasoning.sudoku",
    "maze": "implicit_hf.tasks.reasoning.maze",
    "text": "implicit_hf.tasks.text",
    "addition": "implicit_hf.tasks.reasoning.addition",
    "arith_lm": "implicit_hf.tasks.reasoning.arith_lm",
    "multihop": "implicit_hf.tasks.reasoning.multihop",
    "state_tracking": "implicit_hf.tasks.reasoning.state_tracking",
}

_EXPORTS = {"TASKS": ".base", "Example": ".base", "TaskAdapter": ".base", "get_task": ".base", "build_model": ".models"}

__all__ = ["BUILTIN_TASK_MODULES", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
