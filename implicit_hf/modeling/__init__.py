"""Everything that is the model: config, layers and heads, solvers, gradient modes.

Importing this package registers ``model_type="implicit"`` with transformers' Auto classes
(`register_auto_classes`).
"""

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
from .solvers import SolverStats, anderson, broyden, get_solver, picard, register_solver

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
    "register_auto_classes",
    "register_solver",
]


def register_auto_classes() -> None:
    """Register ``model_type="implicit"`` with transformers' Auto classes and mark every class for ``auto_map``
    (so saved checkpoints also load with ``trust_remote_code=True``); idempotent."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForTokenClassification

    AutoConfig.register(ImplicitConfig.model_type, ImplicitConfig, exist_ok=True)
    AutoModel.register(ImplicitConfig, ImplicitModel, exist_ok=True)
    AutoModelForCausalLM.register(ImplicitConfig, ImplicitForCausalLM, exist_ok=True)
    AutoModelForTokenClassification.register(ImplicitConfig, ImplicitForTokenClassification, exist_ok=True)

    ImplicitConfig.register_for_auto_class()
    ImplicitModel.register_for_auto_class("AutoModel")
    ImplicitForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    ImplicitForTokenClassification.register_for_auto_class("AutoModelForTokenClassification")
    ImplicitForTokenRegression.register_for_auto_class("AutoModelForTokenClassification")


register_auto_classes()
