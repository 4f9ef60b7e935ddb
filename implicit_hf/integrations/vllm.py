"""vLLM plugin: serve `ImplicitForCausalLM` checkpoints with ``vllm serve DIR`` or ``vllm.LLM(DIR)``.

Installed as a ``vllm.general_plugins`` entry point (``pyproject.toml``), so vLLM calls `register` in
every process it starts: it registers the ``implicit`` config with transformers' `AutoConfig` (no
``trust_remote_code`` needed) and the architecture ``ImplicitForCausalLM`` with vLLM's model
registry, lazily, as a ``"module:Class"`` string, so nothing of vLLM's model code is imported until
a model is built. The model itself is `implicit_hf.integrations.vllm_model.ImplicitForCausalLMVllm`.

The loop count comes from the checkpoint's ``config.num_loops``; override it per engine with
``LLM(DIR, hf_overrides={"num_loops": 16})`` or ``vllm serve DIR --hf-overrides '{"num_loops": 16}'``.

With a tolerance (``tol``), a prompt's keys and values depend on the whole prompt (it halts together), so
a cached prefix of another prompt would not be what this prompt computes: `ServingRules` turns vLLM's
prefix caching off for such an engine, with a warning, as vLLM does for its own models whose keys are not
a function of the prefix. What the loop spent is reported by `HaltingStatisticsWorker`
(``worker_extension_cls=WORKER_EXTENSION``; ``llm.collective_rpc("halting_statistics")``).
"""

from __future__ import annotations

import logging

ARCHITECTURE = "ImplicitForCausalLM"
MODEL_CLASS = "implicit_hf.integrations.vllm_model:ImplicitForCausalLMVllm"
WORKER_EXTENSION = "implicit_hf.integrations.vllm.HaltingStatisticsWorker"

logger = logging.getLogger(__name__)


class ServingRules:
    """vLLM's per-architecture configuration hook (its ``MODELS_CONFIG_MAP``), run when an engine's config is built."""

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        return

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        cache_config = vllm_config.cache_config
        if getattr(vllm_config.model_config.hf_config, "tol", None) is not None and cache_config.enable_prefix_caching:
            logger.warning(
                "implicit-hf: prefix caching is turned off: with tol a prompt halts as a whole, so a cached prefix "
                "of another prompt holds keys and values this prompt would not compute"
            )
            cache_config.enable_prefix_caching = False


class HaltingStatisticsWorker:
    """A vLLM worker extension: ``llm.collective_rpc("halting_statistics", kwargs={"reset": False})`` returns, per
    worker, what the implicit model's loop spent (`ImplicitForCausalLMVllm.halting_statistics`). Start the engine
    with ``worker_extension_cls=WORKER_EXTENSION`` (``vllm serve --worker-extension-cls``)."""

    def halting_statistics(self, reset: bool = False) -> dict:
        return self.get_model().halting_statistics(reset)


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group."""
    from transformers import AutoConfig
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from ..modeling.configuration_implicit import ImplicitConfig

    AutoConfig.register(ImplicitConfig.model_type, ImplicitConfig, exist_ok=True)
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    MODELS_CONFIG_MAP.setdefault(ARCHITECTURE, ServingRules)
