"""Multi-digit addition as a token-classification problem: one token per digit position, carries by iteration.

Generation (pure python)
------------------------
A problem adds two ``n``-digit numbers ``a + b`` (leading zeros allowed), ``n`` drawn uniformly from
``[min_digits, digits]`` per problem. Digits are stored least significant first: ``a[i]``, ``b[i]``
for ``i < n``; the sum has ``n + 1`` digits ``sum[i]`` (the last one is the final carry, 0 or 1).

Uniform digits make long carry chains rare (a carry passes position ``i`` only when
``a[i] + b[i] = 9``, probability 1/10), so longer inputs would hardly need more carry steps. With
probability ``chain_fraction`` (default 0.5) a problem therefore gets one planted chain: a length
``L`` uniform in ``[1, n]`` and a start ``s`` uniform in ``[0, n - L]``; positions
``s + 1 .. s + L - 1`` get *propagating* pairs (``a + b = 9``) and position ``s`` a *generating* pair
(``a + b >= 10``) or, with probability 1/2, a *killing* one (``a + b <= 8``), so whether the run
carries is decided ``L`` positions away (with generators only, a run of 9s would always carry and a
model could tell from its neighbours alone). The rest is uniform.

Rows: ``digits`` (``n``), ``a``, ``b`` (``n`` ints each), ``sum`` (``n + 1`` ints),
``carry_chain`` (the longest run of consecutive positions that receive a carry) and
``propagate_run`` (the longest run of propagating pairs): the carry into a digit is decided
``propagate_run + 1`` positions below it at worst, the number of neighbour-to-neighbour steps the
information must travel. Deterministic in
``(split, n, seed)`` (`split_rng`; a smaller ``n`` is a prefix), cached with `cached_dataset`.

Sequence form
-------------
Token 0 is ``START = 102`` (the carry into the least significant digit is 0; it gives every digit a
less significant neighbour, so no digit is special), token ``i + 1`` for ``i < n`` is
``1 + 10 * a[i] + b[i]`` (ids 1..100) and token ``n + 1`` (the final carry) is ``END = 101``: a row
has ``n + 2`` tokens. ``PAD = 0`` pads a batch to its longest row (``attention_mask`` 0, ``labels``
-100). ``labels`` hold ``sum[i]`` at token ``i + 1`` (10 classes) and -100 at ``START``.
Bidirectional attention.

The operator is local and length-independent: ``position_ids`` are all zero (RoPE is the identity,
no absolute position), and ``edge_features`` ``(B, T, T, 4)`` one-hot the relation of key ``j`` to
query ``i``: self (``j = i``), less significant neighbour (``j = i - 1``), more significant
neighbour (``j = i + 1``), other, each one-hot scaled by ``EDGE_SCALE = 8``; the model turns them
into a learned per-head attention bias (`ImplicitConfig.edge_features`). The scale lets the learned
bias reach a nearly hard local mask: unscaled, a first probe learned biases of only about +-0.5 to
0.9, enough on 9 tokens but not on 34, where the mass on the "other" tokens swamped the neighbours
(32-digit exact match 0.145 with errors at the least significant digit). Without absolute positions,
order is known only through the neighbour relations, one hop per application of a layer, so a carry
decided ``L`` positions below a digit needs about ``L`` layer applications: an implicit model
iterating one layer can add longer numbers by looping more; a fixed stack cannot pass its depth.

Metrics (``metrics/addition_metrics.py``): ``exact_match`` (every sum digit right, final carry
included) and ``digit_accuracy`` (fraction of the ``n + 1`` sum digits right, averaged over problems).

Perturbation (Lipschitz probe on discrete inputs): `perturb` replaces ONE random digit of ``a`` or
``b`` by a different random digit and recomputes the sum (a changed digit can flip a whole carry
chain). ``||δ|| = 1`` per row: one token changed (``eps`` only has to be > 0; ``eps = 0`` changes
nothing).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import datasets
import numpy as np
import torch

from ...checks import Fraction, at_least, not_above
from ..base import Example, TaskAdapter, check_one_per_row, list_feature, row_generators

PAD = 0
END = 101
START = 102
VOCAB_SIZE = 103
EDGE_SCALE = 8.0  # one-hot relation features times this (see the module docstring)
EDGE_FEATURES = 4  # self, less significant neighbour, more significant neighbour, other
SELF, LEFT, RIGHT, OTHER = range(EDGE_FEATURES)


class AdditionTask(TaskAdapter):
    """Add two multi-digit numbers, one token per digit pair (least significant first), one label per sum digit."""

    name = "addition"
    head = "token_classification"
    quality_metric = "exact_match"
    higher_is_better = True
    metric_name = "addition_metrics"

    def __init__(
        self,
        cache_dir: str | Path | None = None,
        digits: Annotated[int, at_least(1)] = 8,
        min_digits: Annotated[int, at_least(1), not_above("digits")] = 1,
        chain_fraction: Fraction = 0.5,
    ):
        super().__init__(cache_dir)
        self.digits = int(digits)
        self.min_digits = int(min_digits)
        self.chain_fraction = float(chain_fraction)

    def model_config(self) -> dict[str, Any]:
        return {
            "problem_type": "single_label_classification",
            "num_labels": 10,
            "vocab_size": VOCAB_SIZE,
            "edge_features": EDGE_FEATURES,
            "is_causal": False,
        }

    # ------------------------------------------------------------------ data

    def dataset_path(self, split: str, n: int, seed: int) -> Path:
        """Where `build_dataset` caches ``(split, n, seed)``."""
        return self.cache_dir / (
            f"{split}-digits{self.min_digits}to{self.digits}-chain{self.chain_fraction:g}-{n}-seed{seed}"
        )

    def features(self):
        """The rows of `make_row`: ``digits``, ``a``, ``b``, ``sum``, ``carry_chain``, ``propagate_run``."""
        digits = list_feature(datasets.Value("int8"))
        return datasets.Features(
            {
                "digits": datasets.Value("int32"),
                "a": digits,
                "b": digits,
                "sum": digits,
                "carry_chain": datasets.Value("int32"),
                "propagate_run": datasets.Value("int32"),
            }
        )

    def generate(self, rng: np.random.Generator, n: int, split: str) -> list[Example]:
        """``n`` random problems (`random_problem`)."""
        return [make_row(*random_problem(rng, self.min_digits, self.digits, self.chain_fraction)) for _ in range(n)]

    # ------------------------------------------------------------------ encode / decode

    def encode(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask``, ``position_ids`` (zeros) ``(B, T_max)``, ``edge_features``
        ``(B, T_max, T_max, 4)`` and, when every row has its ``sum``, ``labels`` (padding: PAD / 0 / -100)."""
        tokens = []
        for k, example in enumerate(examples):
            a, b = np.asarray(example["a"], dtype=np.int64), np.asarray(example["b"], dtype=np.int64)
            if a.ndim != 1 or a.shape != b.shape or a.size == 0:
                raise ValueError(f"example {k}: a and b must be equally long digit lists; got {a.shape}, {b.shape}")
            if a.min() < 0 or a.max() > 9 or b.min() < 0 or b.max() > 9:
                raise ValueError(f"example {k}: digits must be in 0..9")
            tokens.append(np.concatenate([[START], 1 + 10 * a + b, [END]]))
        batch, length = len(tokens), max(t.size for t in tokens)
        input_ids = torch.full((batch, length), PAD, dtype=torch.long)
        attention_mask = torch.zeros(batch, length, dtype=torch.long)
        edges = torch.zeros(batch, length, length, EDGE_FEATURES)
        for k, t in enumerate(tokens):
            input_ids[k, : t.size] = torch.from_numpy(t)
            attention_mask[k, : t.size] = 1
            edges[k, : t.size, : t.size] = relation_features(t.size)
        encoded = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": torch.zeros(batch, length, dtype=torch.long),
            "edge_features": edges,
        }
        if all(example.get("sum") is not None for example in examples):
            labels = torch.full((batch, length), -100, dtype=torch.long)
            for k, (example, t) in enumerate(zip(examples, tokens, strict=True)):
                total = np.asarray(example["sum"], dtype=np.int64)
                if total.shape != (t.size - 1,):
                    raise ValueError(f"example {k}: sum has {total.size} digits, expected {t.size - 1}")
                labels[k, 1 : t.size] = torch.from_numpy(total)
            encoded["labels"] = labels
        return encoded

    def decode(self, logits: torch.Tensor, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The predicted sum digits (least significant first, ``n + 1`` of them; long, on the CPU) per sample."""
        if logits.ndim != 3 or logits.shape[-1] != 10:
            raise ValueError(f"logits must have shape (B, T, 10); got {tuple(logits.shape)}")
        mask = inputs.get("attention_mask")
        lengths = mask.sum(-1).tolist() if mask is not None else [logits.shape[1]] * logits.shape[0]
        predicted = logits.detach().argmax(-1).cpu()
        return [predicted[k, 1:length].clone() for k, length in enumerate(lengths)]  # START has no digit

    # ------------------------------------------------------------------ metrics

    def compute_metrics(self, predictions: list[torch.Tensor], examples: list[Example]) -> dict[str, float]:
        """``exact_match`` (headline) and ``digit_accuracy``, means over problems."""
        check_one_per_row(predictions, examples)
        return self.load_metric().compute(
            predictions=[np.asarray(torch.as_tensor(p).cpu(), dtype=np.int64).reshape(-1) for p in predictions],
            references=[np.asarray(example["sum"], dtype=np.int64) for example in examples],
        )

    # ------------------------------------------------------------------ perturbations

    def perturb_rows(self, examples: list[Example], eps: float, seed: int) -> tuple[list[Example], torch.Tensor]:
        """Rows with one random digit of ``a`` or ``b`` replaced by another digit, sum recomputed;
        ``||δ|| = 1`` per row (``eps = 0``: rows unchanged, ``||δ|| = 0``)."""
        generators = row_generators(seed, len(examples))
        perturbed = []
        for example, rng in zip(examples, generators, strict=True):
            a, b = list(example["a"]), list(example["b"])
            operand = a if rng.integers(2) == 0 else b
            position = int(rng.integers(len(operand)))
            operand[position] = int((operand[position] + rng.integers(1, 10)) % 10)  # a different digit
            perturbed.append({**example, **make_row(a, b)})
        return perturbed, torch.ones(len(examples), dtype=torch.float64)


# ---------------------------------------------------------------------- problems


def random_problem(
    rng: np.random.Generator, min_digits: int, digits: int, chain_fraction: float
) -> tuple[list[int], list[int]]:
    """Digits of ``a`` and ``b`` (least significant first) of a random problem (see the module docstring)."""
    n = int(rng.integers(min_digits, digits + 1))
    a = rng.integers(0, 10, size=n)
    b = rng.integers(0, 10, size=n)
    if rng.random() < chain_fraction:
        chain = int(rng.integers(1, n + 1))
        start = int(rng.integers(0, n - chain + 1))
        if rng.random() < 0.5:  # a generating pair: a + b >= 10
            a[start] = rng.integers(1, 10)
            b[start] = rng.integers(10 - a[start], 10)
        else:  # a killing pair: a + b <= 8
            a[start] = rng.integers(0, 9)
            b[start] = rng.integers(0, 9 - a[start])
        for i in range(start + 1, start + chain):  # propagating pairs: a + b = 9
            a[i] = rng.integers(0, 10)
            b[i] = 9 - a[i]
    return a.tolist(), b.tolist()


def add_digits(a: list[int], b: list[int]) -> tuple[list[int], list[int]]:
    """Schoolbook addition, least significant digit first: the ``n + 1`` sum digits and the carry into
    every position (``carries[i]`` goes into position ``i``; ``carries[n]`` is the final carry)."""
    if len(a) != len(b):
        raise ValueError(f"a and b must have the same number of digits; got {len(a)} and {len(b)}")
    total, carries, carry = [], [], 0
    for x, y in zip(a, b, strict=True):
        carries.append(carry)
        s = x + y + carry
        total.append(s % 10)
        carry = s // 10
    carries.append(carry)
    total.append(carry)
    return total, carries


def longest_run(flags: list[int]) -> int:
    """The longest run of consecutive non-zero entries."""
    best = run = 0
    for flag in flags:
        run = run + 1 if flag else 0
        best = max(best, run)
    return best


def make_row(a: list[int], b: list[int]) -> Example:
    """A data-set row of the problem ``a + b`` (digits least significant first)."""
    total, carries = add_digits(a, b)
    return {
        "digits": len(a),
        "a": [int(x) for x in a],
        "b": [int(x) for x in b],
        "sum": total,
        "carry_chain": longest_run(carries),
        "propagate_run": longest_run([x + y == 9 for x, y in zip(a, b, strict=True)]),
    }


def relation_features(length: int) -> torch.Tensor:
    """The relation of key ``j`` to query ``i`` for ``length`` tokens, one-hot times `EDGE_SCALE`:
    ``(length, length, 4)`` (self, ``j = i - 1``, ``j = i + 1``, other)."""
    i = torch.arange(length)
    offset = i[None, :] - i[:, None]  # j - i
    relation = torch.full((length, length), OTHER, dtype=torch.long)
    relation[offset == 0] = SELF
    relation[offset == -1] = LEFT
    relation[offset == 1] = RIGHT
    return torch.nn.functional.one_hot(relation, EDGE_FEATURES).float() * EDGE_SCALE
