"""What the causal-LM tasks share: the base of a task that owns a tokenizer (`CausalLMTask`), a pretrained model's
tokenizer for a task, and greedy completion of prompts by ``model.generate`` at a loop count (the ``complete`` of a
task; halting with ``tol``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .base import TaskAdapter


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


# The special tokens of a task's own tokenizer (`word_level_tokenizer`), first in its vocabulary.
SPECIAL_TOKENS = ("[PAD]", "[BOS]", "[EOS]", "[UNK]")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(len(SPECIAL_TOKENS))


def word_level_tokenizer(
    words: Sequence[str], pre_tokenizer: Any, decoder: Any, normalizer: Any = None, model_max_length: int = 4096
):
    """A task's own tokenizer (`PreTrainedTokenizerFast`): `SPECIAL_TOKENS`, then one id per entry of ``words``
    (anything else is ``[UNK]``), pieces cut by ``pre_tokenizer`` (and ``normalizer``) and joined by ``decoder``
    (``tokenizers`` components), ``[BOS]`` before every text, left padding (generation)."""
    from tokenizers import Tokenizer, models, processors
    from transformers import PreTrainedTokenizerFast

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
    from transformers import AutoTokenizer

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


@torch.no_grad()
def greedy_completions(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[str],
    num_loops: int,
    batch_size: int = 64,
    tol: float | None = None,
    max_new_tokens: int = 1,
    use_cache: bool = True,
) -> list[str]:
    """The text ``model.generate(..., num_loops=num_loops, do_sample=False)`` writes after each prompt: left-padded
    batches of ``batch_size`` (``tokenizer`` pads on the left), at most ``max_new_tokens`` new tokens, halting
    at ``tol`` when given (``None``: the model's own setting), the KV cache as ``use_cache`` says."""
    device = next(model.parameters()).device
    texts = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start : start + batch_size], padding=True, return_tensors="pt")
        batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        extra = {} if tol is None else {"tol": tol}
        output = model.generate(
            **batch,
            num_loops=num_loops,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            use_cache=use_cache,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **extra,
        )
        new = output[:, batch["input_ids"].shape[1] :].cpu()
        texts.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    return texts
