"""Everything that is the model: config, layers and heads, solvers, gradient modes."""

from .configuration_implicit import ImplicitConfig
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
from .solvers import SolverStats, anderson, broyden, get_solver, picard

__all__ = [
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
]
