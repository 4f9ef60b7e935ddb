"""vLLM plugin: serve `ImplicitForCausalLM` checkpoints with ``vllm serve DIR`` or ``vllm.LLM(DIR)``.

Installed as a ``vllm.general_plugins`` entry point (``pyproject.toml``), so vLLM calls `register` in
every process it starts: it registers the ``implicit`` config with transformers' `AutoConfig` (no
``trust_remote_code`` needed) and the architecture ``ImplicitForCausalLM`` with vLLM's model
registry, lazily, as a ``"module:Class"`` string, so nothing of vLLM's model code is imported until
a model is built. The model itself is `implicit_hf.integrations.vllm_model.ImplicitForCausalLMVllm`.

The loop count comes from the checkpoint's ``config.num_loops``; override it per engine with
``LLM(DIR, hf_overrides={"num_loops": 16})`` or ``vllm serve DIR --hf-overrides '{"num_loops": 16}'``.
"""

from __future__ import annotations

ARCHITECTURE = "ImplicitForCausalLM"
MODEL_CLASS = "implicit_hf.integrations.vllm_model:ImplicitForCausalLMVllm"


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group."""
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from ..modeling.configuration_implicit import ImplicitConfig

    AutoConfig.register(ImplicitConfig.model_type, ImplicitConfig, exist_ok=True)
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
