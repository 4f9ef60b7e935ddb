"""implicit-hf: implicit (deep-equilibrium, looped weight-tied) transformers for the Hugging Face stack.

Importing the package imports the model code (torch and transformers), which registers ``model_type="implicit"``
with transformers' Auto classes and marks every class for ``auto_map``, so saved checkpoints also load with
``trust_remote_code=True``: ``import implicit_hf; AutoModel.from_pretrained(path)`` works.

The ``implicit-hf`` command (`implicit_hf_command`) parses its arguments before anything heavy is imported: it sets
``IMPLICIT_HF_DEFER_MODELING=1``, and then the model code (and the registration with it) is imported when a command
first needs it (the model classes below also load on first use), so ``implicit-hf --help`` imports neither torch
nor transformers.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

__version__ = "0.1.0"

DEFER_MODELING_ENV = "IMPLICIT_HF_DEFER_MODELING"

_MODELING_EXPORTS = (
    "ImplicitConfig",
    "ImplicitForCausalLM",
    "ImplicitForTokenClassification",
    "ImplicitForTokenRegression",
    "ImplicitHeadOutput",
    "ImplicitModel",
    "ImplicitModelOutput",
    "ImplicitPreTrainedModel",
    "SolverStats",
    "anderson",
    "broyden",
    "fixed_point",
    "get_solver",
    "picard",
    "register_solver",
)

__all__ = [*_MODELING_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _MODELING_EXPORTS:
        value = getattr(importlib.import_module(".modeling", __name__), name)  # registers the Auto classes
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if os.environ.get(DEFER_MODELING_ENV) != "1":
    importlib.import_module(".modeling", __name__)
