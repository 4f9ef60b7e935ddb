"""Multi-step arithmetic written as text, learned by a causal implicit language model.

Text form
---------
A problem is a chain of ``terms`` operands (``min_terms..max_terms``, uniform) in ``0..max_operand``
joined by ``+`` or ``-``; the model writes the running total after every operation, the last one
being the answer::

    prompt:      "12 + 7 - 3 ="
    completion:  " 19 16"            (12 + 7 = 19, then 19 - 3 = 16; the answer is 16)

Running totals never go below zero (a ``-`` whose operand exceeds the running total is drawn again
as ``+``). Rows: ``prompt``, ``completion``, ``answer`` (int), ``operands``, ``ops`` (``"+"`` / ``"-"``)
and ``terms``; deterministic in ``(split, n, seed)`` (`split_rng`; a smaller ``n`` is a prefix),
cached with `cached_dataset`.

Tokenizer
---------
A character-level ``tokenizers`` tokenizer (a `WordLevel` model over the characters ``0-9 + - =``
and space, each character its own token; a `Fuse` decoder), wrapped as
`transformers.PreTrainedTokenizerFast` with ``[PAD] = 0``, ``[BOS] = 1``, ``[EOS] = 2``,
``[UNK] = 3`` and LEFT padding (batched generation). `arith_tokenizer` builds it; the training loop
saves it next to the trained model (`save_artifacts`), so ``AutoTokenizer.from_pretrained(model_dir)``
loads it.

Training and evaluation
-----------------------
``encode`` gives ``[BOS] prompt completion [EOS]`` right-padded (training batches), with ``labels``
equal to the input ids except ``-100`` on ``[BOS]``, the prompt and the padding: the loss is on the
completion and its ``[EOS]`` only. The task is *generative* (a `GenerativeTask`): the evaluation
harness scores it by generating (``implicit_hf.eval.generative.complete``: ``model.generate(..., num_loops=K,
do_sample=False)`` on the left-padded prompts, up to ``max_new_tokens``) once per loop count ``K``
(generation cannot reuse one trajectory), and `compute_metrics` scores the generated text:
``answer_accuracy`` (headline: the last number written is the answer) and ``exact_match`` (every running total right).

Perturbation (the text Lipschitz probe of the paper's LLM case): `perturb` replaces ``round(eps)``
(at least 1) operands by other values (totals kept >= 0), so the prompts differ by that many words;
``||δ||`` is the word-level edit distance of the prompts. `lipschitz_pairs` reads the committed
pairs file ``data/arith_pairs.jsonl`` (written by `write_pairs`), on which the harness measures
``word edit distance(outputs) / word edit distance(prompts)`` at every loop count.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import datasets
import numpy as np
import torch
from tokenizers import Regex, decoders, pre_tokenizers

from ...checks import at_least, not_above
from ..base import Example, list_feature, row_generators, split_rng
from ..edit_distance import word_edit_distance
from ..generation import EOS_ID, PAD_ID, GenerativeTask, word_level_tokenizer

CHARACTERS = "0123456789+-= "
PAIRS_FILE = Path(__file__).parent / "data" / "arith_pairs.jsonl"


def arith_tokenizer():
    """The character-level tokenizer of the task (`PreTrainedTokenizerFast`, left padding)."""
    return word_level_tokenizer(
        CHARACTERS,
        pre_tokenizers.Split(Regex("."), behavior="isolated"),  # one token per character
        decoders.Fuse(),  # characters back together, no spaces added
        model_max_length=256,
    )


class ArithLMTask(GenerativeTask):
    """Write the running totals of a chain of additions and subtractions, as a causal language model."""

    name = "arith_lm"
    quality_metric = "answer_accuracy"
    higher_is_better = True
    metric_name = "arith_lm_metrics"

    def __init__(
        self,
        cache_dir: str | Path | None = None,
        min_terms: Annotated[int, at_least(2), not_above("max_terms")] = 2,
        max_terms: Annotated[int, at_least(2)] = 3,
        max_operand: Annotated[int, at_least(1)] = 29,
        use_cache: bool = True,
        pairs_file: str | Path | None = None,
    ):
        super().__init__(cache_dir)
        self.min_terms, self.max_terms, self.max_operand = int(min_terms), int(max_terms), int(max_operand)
        self.use_cache = use_cache
        self.pairs_file = Path(pairs_file) if pairs_file is not None else PAIRS_FILE
        # a given pairs file is read and checked when the task is built; the committed one when the probe runs
        # (`write_pairs` builds the task to write it)
        self.pairs = read_pairs(self.pairs_file) if pairs_file is not None else None
        self.tokenizer = arith_tokenizer()

    @property
    def max_new_tokens(self) -> int:
        """Enough new tokens for the longest completion (a space and a total per operation) and [EOS]."""
        digits = len(str(self.max_operand * self.max_terms))
        return (self.max_terms - 1) * (digits + 1) + 1

    # ------------------------------------------------------------------ data

    def dataset_path(self, split: str, n: int, seed: int) -> Path:
        """Where `build_dataset` caches ``(split, n, seed)``."""
        return self.cache_dir / f"{split}-terms{self.min_terms}to{self.max_terms}-max{self.max_operand}-{n}-seed{seed}"

    def features(self):
        """The rows of `make_row`: ``prompt``, ``completion``, ``answer``, ``operands``, ``ops``, ``terms``."""
        return datasets.Features(
            {
                "prompt": datasets.Value("string"),
                "completion": datasets.Value("string"),
                "answer": datasets.Value("int32"),
                "operands": list_feature(datasets.Value("int32")),
                "ops": list_feature(datasets.Value("string")),
                "terms": datasets.Value("int32"),
            }
        )

    def generate(self, rng: np.random.Generator, n: int, split: str) -> list[Example]:
        """``n`` random chains (`random_problem`)."""
        return [make_row(*random_problem(rng, self.min_terms, self.max_terms, self.max_operand)) for _ in range(n)]

    # ------------------------------------------------------------------ encode / decode

    def encode(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        """``[BOS] prompt completion [EOS]`` right-padded: ``input_ids``, ``attention_mask`` and, when every
        row has its ``completion``, ``labels`` (-100 on [BOS], the prompt and the padding)."""
        with_labels = all(example.get("completion") is not None for example in examples)
        sequences, prompt_lengths = [], []
        for example in examples:
            prompt = self.tokenizer(example["prompt"])["input_ids"]  # [BOS] + characters
            completion = []
            if with_labels:
                completion = self.tokenizer(example["completion"], add_special_tokens=False)["input_ids"] + [EOS_ID]
            sequences.append(prompt + completion)
            prompt_lengths.append(len(prompt))
        batch, length = len(sequences), max(len(s) for s in sequences)
        input_ids = torch.full((batch, length), PAD_ID, dtype=torch.long)
        attention_mask = torch.zeros(batch, length, dtype=torch.long)
        labels = torch.full((batch, length), -100, dtype=torch.long)
        for k, (sequence, prompt_length) in enumerate(zip(sequences, prompt_lengths, strict=True)):
            input_ids[k, : len(sequence)] = torch.tensor(sequence)
            attention_mask[k, : len(sequence)] = 1
            labels[k, prompt_length : len(sequence)] = torch.tensor(sequence[prompt_length:], dtype=torch.long)
        encoded = {"input_ids": input_ids, "attention_mask": attention_mask}
        if with_labels:
            encoded["labels"] = labels
        return encoded

    def decode(self, logits: torch.Tensor, inputs: dict[str, torch.Tensor]) -> list[str]:
        """The teacher-forced completion of every row: the greedy next token after the prompt's ``=`` and
        after every given completion token, up to the first predicted [EOS] (text)."""
        if logits.ndim != 3:
            raise ValueError(f"logits must have shape (B, T, vocab); got {tuple(logits.shape)}")
        equals = self.tokenizer.convert_tokens_to_ids("=")
        predicted = logits.detach().argmax(-1).cpu()
        ids = inputs["input_ids"].cpu()
        mask = inputs.get("attention_mask")
        lengths = mask.sum(-1).tolist() if mask is not None else [ids.shape[1]] * ids.shape[0]
        texts = []
        for k, length in enumerate(lengths):
            positions = (ids[k, :length] == equals).nonzero()
            if positions.numel() == 0:
                raise ValueError(f"row {k}: no '=' in the input")
            tokens = predicted[k, int(positions[-1]) : length].tolist()
            if EOS_ID in tokens:
                tokens = tokens[: tokens.index(EOS_ID)]
            texts.append(self.tokenizer.decode(tokens, skip_special_tokens=True))
        return texts

    # ------------------------------------------------------------------ perturbations

    def perturb_rows(self, examples: list[Example], eps: float, seed: int) -> tuple[list[Example], torch.Tensor]:
        """Rows with ``max(1, round(eps))`` operands replaced by other values (running totals kept >= 0),
        completion recomputed; ``||δ||`` = word-level edit distance of the prompts (``eps = 0``: unchanged)."""
        generators = row_generators(seed, len(examples))
        perturbed, norms = [], []
        for example, rng in zip(examples, generators, strict=True):
            operands, ops = list(example["operands"]), list(example["ops"])
            changes = min(max(1, round(eps)), len(operands))
            for position in rng.permutation(len(operands))[:changes].tolist():
                candidates = [
                    value
                    for value in range(self.max_operand + 1)
                    if value != operands[position]
                    and _valid([*operands[:position], value, *operands[position + 1 :]], ops)
                ]
                if candidates:
                    operands[position] = int(candidates[int(rng.integers(len(candidates)))])
            row = make_row(operands, ops)
            perturbed.append({**example, **row})
            norms.append(float(word_edit_distance(example["prompt"], row["prompt"])))
        return perturbed, torch.tensor(norms, dtype=torch.float64)

    def lipschitz_pairs(self) -> list[dict[str, Any]]:
        """The prompt pairs of the text Lipschitz probe (``pairs_file``; `read_pairs`)."""
        return [dict(pair) for pair in self.pairs or read_pairs(self.pairs_file)]


def read_pairs(path: Path) -> list[dict[str, Any]]:
    """The prompt pairs in ``path``: one JSON object per line with the strings ``prompt_a`` and ``prompt_b``, at
    least one pair; a ``ValueError`` or ``OSError`` naming ``pairs_file``, the path and the line otherwise."""
    where = f"pairs_file {str(path)!r}"
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{where} is not a UTF-8 text file of JSON lines: {err}") from None
    except OSError as err:
        raise OSError(f"{where} cannot be read: {err.strerror or err}") from None
    pairs = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            pair = json.loads(line)
        except ValueError as err:
            raise ValueError(f"{where}: line {number} is not JSON: {err}") from None
        if not isinstance(pair, dict) or not all(isinstance(pair.get(key), str) for key in ("prompt_a", "prompt_b")):
            raise ValueError(f"{where}: line {number} must be a JSON object with the strings prompt_a and prompt_b")
        pairs.append(pair)
    if not pairs:
        raise ValueError(f"{where} holds no pairs (one JSON object per line with prompt_a and prompt_b)")
    return pairs


# ---------------------------------------------------------------------- problems and text


def random_problem(rng: np.random.Generator, min_terms: int, max_terms: int, max_operand: int) -> tuple[list, list]:
    """Operands and operators of a random chain whose running totals stay >= 0."""
    terms = int(rng.integers(min_terms, max_terms + 1))
    operands = [int(rng.integers(0, max_operand + 1))]
    ops = []
    total = operands[0]
    for _ in range(terms - 1):
        value = int(rng.integers(0, max_operand + 1))
        op = "-" if rng.random() < 0.5 and value <= total else "+"
        total = total - value if op == "-" else total + value
        operands.append(value)
        ops.append(op)
    return operands, ops


def running_totals(operands: list[int], ops: list[str]) -> list[int]:
    """The total after every operation (``len(ops)`` values)."""
    if len(operands) != len(ops) + 1:
        raise ValueError(f"{len(operands)} operands need {len(operands) - 1} operators; got {len(ops)}")
    totals, total = [], operands[0]
    for op, value in zip(ops, operands[1:], strict=True):
        if op not in ("+", "-"):
            raise ValueError(f"operators must be '+' or '-'; got {op!r}")
        total = total + value if op == "+" else total - value
        totals.append(total)
    return totals


def _valid(operands: list[int], ops: list[str]) -> bool:
    return all(total >= 0 for total in running_totals(operands, ops))


def make_row(operands: list[int], ops: list[str]) -> Example:
    """A data-set row of the chain ``operands[0] ops[0] operands[1] ...``."""
    totals = running_totals(operands, ops)
    words = [str(operands[0])]
    for op, value in zip(ops, operands[1:], strict=True):
        words += [op, str(value)]
    return {
        "prompt": " ".join(words) + " =",
        "completion": "".join(f" {t}" for t in totals),
        "answer": totals[-1],
        "operands": [int(v) for v in operands],
        "ops": list(ops),
        "terms": len(operands),
    }


def write_pairs(path: str | Path, n: int = 150, seed: int = 0, two_word_fraction: float = 1 / 3) -> Path:
    """Write ``n`` prompt pairs (JSON lines) for the text Lipschitz probe: problems of the ``pairs`` split
    (the default task: 2..3 terms, operands 0..29, as in training) and the same problem with one operand
    changed, or two for the first ``two_word_fraction`` of them."""
    task = ArithLMTask()
    rng = split_rng("pairs", seed)
    lines = []
    for k in range(n):
        row = make_row(*random_problem(rng, task.min_terms, task.max_terms, task.max_operand))
        words = 2 if k < round(n * two_word_fraction) and row["terms"] >= 2 else 1
        (other,), distance = task.perturb([row], float(words), seed=seed * 100003 + k)
        lines.append(
            json.dumps(
                {
                    "prompt_a": row["prompt"],
                    "prompt_b": other["prompt"],
                    "prompt_distance": int(distance[0]),
                    "answer_a": row["answer"],
                    "answer_b": other["answer"],
                }
            )
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path
