"""implicit-hf: implicit (deep-equilibrium, looped weight-tied) transformers for the Hugging Face stack.

Importing the package registers ``model_type="implicit"`` with transformers' Auto classes, and
marks every class for ``auto_map`` so saved checkpoints also load with ``trust_remote_code=True``.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForTokenClassification

from .modeling import (
    ImplicitConfig,
    ImplicitForCausalLM,
    ImplicitForTokenClassification,
    ImplicitForTokenRegression,
    ImplicitHeadOutput,
    ImplicitModel,
    ImplicitModelOutput,
    ImplicitPreTrainedModel,
    SolverStats,
    anderson,
    broyden,
    fixed_point,
    get_solver,
    picard,
)

__version__ = "0.1.0"

AutoConfig.register(ImplicitConfig.model_type, ImplicitConfig, exist_ok=True)
AutoModel.register(ImplicitConfig, ImplicitModel, exist_ok=True)
AutoModelForCausalLM.register(ImplicitConfig, ImplicitForCausalLM, exist_ok=True)
AutoModelForTokenClassification.register(ImplicitConfig, ImplicitForTokenClassification, exist_ok=True)

ImplicitConfig.register_for_auto_class()
ImplicitModel.register_for_auto_class("AutoModel")
ImplicitForCausalLM.register_for_auto_class("AutoModelForCausalLM")
ImplicitForTokenClassification.register_for_auto_class("AutoModelForTokenClassification")
ImplicitForTokenRegression.register_for_auto_class("AutoModelForTokenClassification")

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
    "__version__",
]
