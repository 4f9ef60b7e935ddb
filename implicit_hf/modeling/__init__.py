"""Everything that is the model: config, layers and heads, solvers, gradient modes.

Importing this package registers ``model_type="implicit"`` with transformers' Auto classes
(`register_auto_classes`).
"""

import transformers

from . import modeling_implicit
from .configuration_implicit import AUTO_MAP, HEADS, MODEL_CLASSES, ImplicitConfig
from .gradients import fixed_point
from .modeling_implicit import (
    ImplicitForCausalLM,
    ImplicitForTokenClassification,
    ImplicitForTokenRegression,
    ImplicitHeadOutput,
    ImplicitModel,
    ImplicitModelOutput,
    ImplicitPreTrainedModel,
)
from .solvers import SolverStats, anderson, broyden, get_solver, picard, register_solver

__all__ = [
    "HEADS",
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
    "register_auto_classes",
    "register_solver",
]


def register_auto_classes() -> None:
    """Register ``model_type="implicit"`` with transformers' Auto classes (each loads the class `AUTO_MAP` names) and
    mark every class for ``auto_map`` (so saved checkpoints also load with ``trust_remote_code=True``); idempotent."""
    transformers.AutoConfig.register(ImplicitConfig.model_type, ImplicitConfig, exist_ok=True)
    ImplicitConfig.register_for_auto_class()
    for head in MODEL_CLASSES:
        model_class = getattr(modeling_implicit, head.model_class)
        if AUTO_MAP[head.auto_class] == f"modeling_implicit.{head.model_class}":
            getattr(transformers, head.auto_class).register(ImplicitConfig, model_class, exist_ok=True)
        model_class.register_for_auto_class(head.auto_class)


register_auto_classes()
