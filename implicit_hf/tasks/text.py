"""Language modelling on local text: the data set for healing a converted LLM and for perplexity vs loops.

Corpus: ``corpus="pydoc"`` (default) is the text of the Python reference manual's topics that every
CPython ships (``pydoc_data.topics``, ~465k characters of English prose and code); any other value
is the path of a UTF-8 text file. It is tokenized with ``tokenizer`` (a tokenizer directory, e.g. a
converted checkpoint's; by default a character-level tokenizer of the corpus's own characters, built
here with ``tokenizers`` and saved with a trained model), cut into windows of ``seq_len`` tokens,
and every tenth window goes to the test split, the next one to validation, the rest to training (so
the splits never share text).
``copy_fraction`` (default 0): that fraction of the rows is the first half of a window written twice,
so that a model trained on them has to copy from its context (induction). 64-token windows of prose
rarely need that, and a retrofit that dropped layers loses it without such rows
(``results/smollm2/multihop/induction.json``).
Rows: ``input_ids`` (``seq_len`` ids). Deterministic in ``(split, n, seed)``; cached with
`cached_dataset` under a name that includes a fingerprint of the tokenizer and corpus.

Scoring: ``decode`` gives, per sample, ``log p(token_t | tokens_<t)`` for every token after the first;
the metric (``metrics/text_metrics.py``) is the perplexity ``exp(-mean log p)``. The Lipschitz probe
replaces one token of the first half by another (``||δ|| = 1``, a Hamming distance) and measures the
change of that log-probability vector.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from pydoc_data.topics import topics
from typing import Annotated, Any

import datasets
import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ..checks import Fraction, at_least
from .base import Example, TaskAdapter, check_one_per_row, list_feature
from .generation import load_tokenizer

SPLITS = ("train", "validation", "test")


def corpus_text(corpus: str) -> str:
    """The corpus's text: ``"pydoc"`` (CPython's bundled reference topics) or a UTF-8 file's contents; a
    ``ValueError`` naming ``corpus`` for anything else."""
    if corpus == "pydoc":
        return "\n\n".join(topics[name] for name in sorted(topics))
    path = Path(corpus)
    if not path.is_file():
        raise ValueError(f"corpus must be 'pydoc' or the path of a text file; {corpus!r} is neither")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"corpus {corpus!r} is not UTF-8 text: {err}") from err


def character_tokenizer(text: str):
    """A character-level tokenizer of the characters of ``text`` (sorted), plus ``<pad>``, ``<unk>``, ``<eos>``."""
    specials = ["<pad>", "<unk>", "<eos>"]
    vocab = {token: i for i, token in enumerate(specials + sorted(set(text)))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


class TextTask(TaskAdapter):
    """Next-token prediction on windows of a local corpus; quality: perplexity (lower is better)."""

    name = "text"
    head = "causal_lm"
    quality_metric = "perplexity"
    higher_is_better = False
    metric_name = "text_metrics"

    def __init__(
        self,
        cache_dir: str | Path | None = None,
        tokenizer: str | Path | None = None,
        corpus: str | Path = "pydoc",
        seq_len: Annotated[int, at_least(2)] = 64,
        copy_fraction: Fraction = 0.0,
    ):
        super().__init__(cache_dir)
        self.tokenizer_path = None if tokenizer is None else str(tokenizer)
        self.corpus, self.seq_len, self.copy_fraction = str(corpus), int(seq_len), float(copy_fraction)
        # read now, so that a corpus or tokenizer that cannot be read is refused when the task is built
        text = corpus_text(self.corpus)
        self.tokenizer = character_tokenizer(text) if tokenizer is None else load_tokenizer(self.tokenizer_path)

    def model_config(self) -> dict[str, Any]:
        return {"vocab_size": len(self.tokenizer), "is_causal": True}

    def save_artifacts(self, model_dir: str | Path) -> None:
        self.tokenizer.save_pretrained(model_dir)

    # ------------------------------------------------------------------ data

    def _windows(self, split: str) -> list[list[int]]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
        ids = self.tokenizer(corpus_text(self.corpus), add_special_tokens=False).input_ids
        windows = [ids[start : start + self.seq_len] for start in range(0, len(ids) - self.seq_len + 1, self.seq_len)]
        position = SPLITS.index(split)
        keep = {0: lambda i: i % 10 >= 2, 1: lambda i: i % 10 == 1, 2: lambda i: i % 10 == 0}[position]
        return [window for i, window in enumerate(windows) if keep(i)]

    def dataset_path(self, split: str, n: int, seed: int) -> Path:
        """Where `build_dataset` caches ``(split, n, seed)``; the name holds a fingerprint of tokenizer and corpus."""
        fingerprint = zlib.crc32(f"{self.tokenizer.backend_tokenizer.to_str()}|{self.corpus}".encode())
        copies = f"-copy{self.copy_fraction:g}" if self.copy_fraction else ""
        return self.cache_dir / f"{split}-{fingerprint:08x}-len{self.seq_len}{copies}-{n}-seed{seed}"

    def features(self):
        """``input_ids``: one window of ``seq_len`` token ids."""
        return datasets.Features({"input_ids": list_feature(datasets.Value("int32"))})

    def generate(self, rng: np.random.Generator, n: int, split: str) -> list[Example]:
        """``n`` windows of the split, in an order drawn from ``rng``; a ``copy_fraction`` of them (drawn from
        ``rng`` too) replaced by their first half written twice."""
        windows = self._windows(split)
        if n > len(windows):
            raise ValueError(
                f"the {split} split of {self.corpus!r} has {len(windows)} windows of "
                f"{self.seq_len} tokens; asked for {n}"
            )
        rows = [windows[i] for i in rng.permutation(len(windows))[:n]]
        if self.copy_fraction:
            half = (self.seq_len + 1) // 2
            copied = rng.random(n) < self.copy_fraction
            rows = [(row[:half] * 2)[: self.seq_len] if copy else row for row, copy in zip(rows, copied, strict=True)]
        return [{"input_ids": row} for row in rows]

    # ------------------------------------------------------------------ encode / decode

    def encode(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        input_ids = torch.tensor([example["input_ids"] for example in examples], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}

    def decode(self, logits: torch.Tensor, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Per sample: ``log p(token_t | tokens_<t)`` for t = 1 .. T-1 (float64, on the CPU)."""
        targets = inputs["input_ids"][:, 1:].to(logits.device)
        logprobs = logits[:, :-1].float().log_softmax(-1).gather(-1, targets[..., None])[..., 0]
        return list(logprobs.detach().double().cpu())

    def compute_metrics(self, predictions: list[torch.Tensor], examples: list[Example]) -> dict[str, float]:
        check_one_per_row(predictions, examples)
        return self.load_metric().compute(predictions=[p.tolist() for p in predictions])

    def perturb_rows(self, examples: list[Example], eps: float, seed: int) -> tuple[list[Example], torch.Tensor]:
        """One token of each row's first half replaced by another token id; ``||δ|| = 1`` (0 when ``eps == 0``)."""
        rng = np.random.default_rng(seed)
        vocab = len(self.tokenizer)
        perturbed = []
        for example in examples:
            ids = list(example["input_ids"])
            position = int(rng.integers(0, max(1, len(ids) // 2)))
            ids[position] = int((ids[position] + rng.integers(1, vocab)) % vocab)
            perturbed.append({**example, "input_ids": ids})
        return perturbed, torch.ones(len(examples))
