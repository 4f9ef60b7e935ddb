"""What the causal-LM tasks share: the base of a task that owns a tokenizer (`CausalLMTask`), the base of one scored
by generating text (`GenerativeTask`), and a task's own or a pretrained model's tokenizer."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, models, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from .base import Example, TaskAdapter, check_one_per_row


class CausalLMTask(TaskAdapter):
    """A causal-LM task with a tokenizer: its own (built for the task, ``tokenizer_path`` None) or a pretrained
    model's (``tokenizer_path``). It fixes the model's vocabulary and causality, and with its own tokenizer the
    special-token ids (a pretrained model's checkpoint keeps its own), and saves the tokenizer beside a trained
    model."""

    head = "causal_lm"
    tokenizer: Any
    tokenizer_path: str | None = None

    def model_config(self) -> dict[str, Any]:
        config = {"vocab_size": len(self.tokenizer), "is_causal": True}
        if self.tokenizer_path is None:
            tokenizer = self.tokenizer
            config.update(
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        return config

    def save_artifacts(self, model_dir: str | Path) -> None:
        """The tokenizer, next to the trained model (``AutoTokenizer.from_pretrained(model_dir)``)."""
        self.tokenizer.save_pretrained(str(model_dir))


class GenerativeTask(CausalLMTask):
    """A causal-LM task scored by generating text at each loop count rather than from one trajectory (the evaluation
    recognises it by this class, `implicit_hf.eval.run.sweep`, and runs its one generate loop,
    `implicit_hf.eval.generative.complete`).

    It declares what that loop and the scoring need: `prompt` (the text to continue) and `expected` (the answer
    text) of a row, ``max_new_tokens`` and ``use_cache`` (of ``model.generate``), `lipschitz_pairs` (the prompt
    pairs of the text Lipschitz probe); `compute_metrics` scores the generated texts against the expected ones
    with the task's metric module.
    """

    max_new_tokens: int = 1  # enough new tokens for the longest answer (and its [EOS])
    use_cache: bool = True  # generate with the KV cache

    def prompt(self, example: Example) -> str:
        """The text the model is asked to continue (the row's ``prompt``)."""
        return example["prompt"]

    def expected(self, example: Example) -> str:
        """The text the model should write after `prompt` (the row's ``completion``)."""
        return example["completion"]

    @abstractmethod
    def lipschitz_pairs(self) -> list[dict[str, Any]]:
        """The prompt pairs ``{"prompt_a", "prompt_b"}`` of the text Lipschitz probe (two different prompts each)."""

    def compute_metrics(self, predictions: list[str], examples: list[Example]) -> dict[str, float]:
        """The task's metric module on the generated texts against `expected`, means over rows."""
        check_one_per_row(predictions, examples)
        return self.load_metric().compute(
            predictions=[str(p) for p in predictions], references=[self.expected(example) for example in examples]
        )


# The special tokens of a task's own tokenizer (`word_level_tokenizer`), first in its vocabulary.
SPECIAL_TOKENS = ("[PAD]", "[BOS]", "[EOS]", "[UNK]")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(len(SPECIAL_TOKENS))


def word_level_tokenizer(
    words: Sequence[str], pre_tokenizer: Any, decoder: Any, normalizer: Any = None, model_max_length: int = 4096
):
    """A task's own tokenizer (`PreTrainedTokenizerFast`): `SPECIAL_TOKENS`, then one id per entry of ``words``
    (anything else is ``[UNK]``), pieces cut by ``pre_tokenizer`` (and ``normalizer``) and joined by ``decoder``
    (``tokenizers`` components), ``[BOS]`` before every text, left padding (generation)."""
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *words))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    if normalizer is not None:
        tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoder
    tokenizer.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", BOS_ID)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="[PAD]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        unk_token="[UNK]",
        padding_side="left",
        model_max_length=model_max_length,
    )


def load_tokenizer(path: str | Path, name: str = "tokenizer", **kwargs: Any):
    """``AutoTokenizer.from_pretrained(path, **kwargs)``, or an ``OSError`` naming the setting ``name`` and ``path``
    when ``path`` holds no usable tokenizer (transformers says so with an ``OSError`` or a ``ValueError``)."""
    try:
        return AutoTokenizer.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError) as err:
        raise OSError(f"{name} {str(path)!r} has no usable tokenizer: {err}") from err


def pretrained_tokenizer(path: str):
    """A pretrained model's tokenizer for a task: left padding (generation), the EOS token as padding if it has
    none."""
    tokenizer = load_tokenizer(path, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
