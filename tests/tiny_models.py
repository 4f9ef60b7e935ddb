"""The tests' tiny models, built in one place: tens of thousands of parameters, milliseconds on a CPU, and the
same weights for the same seed.

`conftest.py` hands each builder to tests and fixtures as a fixture of the same name. Code that runs while a test
file is imported (a parametrize table, a file's own sizes bound once with `functools.partial`) imports the
builders from here. A test that needs other sizes or settings passes them as overrides; the defaults below are
shared by every file, so changing one changes the numbers many tests check.
"""

from pathlib import Path
from typing import Any

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from implicit_hf import ImplicitConfig, ImplicitForCausalLM
from implicit_hf.tasks.base import TaskAdapter
from implicit_hf.tasks.models import build_model

# The sizes of every tiny implicit model: one layer per group, two loops.
TINY_SIZES = {
    "hidden_size": 32,
    "num_attention_heads": 4,
    "num_prelude_layers": 1,
    "num_core_layers": 1,
    "num_coda_layers": 1,
    "num_loops": 2,
}
TINY_VOCAB = 61

# The Llama-family sources that `tiny_source` builds (the models `convert` reads).
SOURCE_ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}


def tiny_config(**overrides: Any) -> ImplicitConfig:
    """An `ImplicitConfig` of `TINY_SIZES` over a `TINY_VOCAB`-token vocabulary, updated by ``overrides``."""
    return ImplicitConfig(**{"vocab_size": TINY_VOCAB, **TINY_SIZES, **overrides})


def tiny_model_of(model_class: type[PreTrainedModel], seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A ``model_class`` (any implicit head) on ``tiny_config(**overrides)``, its weights drawn right after
    ``torch.manual_seed(seed)``, in eval mode."""
    config = tiny_config(**overrides)
    torch.manual_seed(seed)
    return model_class(config).eval()


def tiny_causal_lm(seed: int = 0, **overrides: Any) -> ImplicitForCausalLM:
    """`tiny_model_of` for the causal LM, the head most tests use."""
    return tiny_model_of(ImplicitForCausalLM, seed, **overrides)


def tiny_task_model(task: TaskAdapter, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """The model ``task`` trains (its head and vocabulary or feature sizes, through `build_model`) at
    `TINY_SIZES` updated by ``overrides``, weights drawn right after ``torch.manual_seed(seed)``, in eval mode."""
    settings = {**TINY_SIZES, **overrides}
    torch.manual_seed(seed)
    return build_model(task, **settings).eval()


def tiny_checkpoint(
    path: Path, tokenizer: PreTrainedTokenizerBase | None = None, seed: int = 0, **overrides: Any
) -> ImplicitForCausalLM:
    """`tiny_causal_lm` saved to ``path`` and returned. With a ``tokenizer`` it is saved beside the weights and sets
    the vocabulary size and the pad and EOS token ids, so that the checkpoint generates text."""
    if tokenizer is not None:
        text = {
            "vocab_size": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        }
        overrides = {**text, **overrides}
    model = tiny_causal_lm(seed, **overrides)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return model


def tiny_source(model_type: str, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A small Llama-family model (``model_type`` a key of `SOURCE_ARCHITECTURES`) of the kind `convert` turns into
    an implicit one: five layers, grouped-query attention, untied embeddings and random (not zero) biases, so that
    a dropped bias would show; weights drawn right after ``torch.manual_seed(seed)``, in eval mode."""
    config_class, model_class = SOURCE_ARCHITECTURES[model_type]
    settings = dict(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    if model_type == "mistral":
        settings["sliding_window"] = None
    settings.update(overrides)
    torch.manual_seed(seed)
    model = model_class(config_class(**settings)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0, 0.1)
    return model
