"""Multi-hop variable lookup: a causal-LM task whose answer needs ``hops`` serial steps and no written work.

Text form
---------
A prompt is a list of assignments forming ``1 + distractors`` disjoint chains, then a question about
the last variable of the first chain; the answer (one digit) is written right after the question::

    prompt:      "4>qa; 7>kd; qa>xb; xb>mc; kd>ue; ?mc"
    completion:  "4"                                     (mc = xb = qa = 4: three hops)

``v>w`` assigns the value of ``v`` (a digit or a variable) to ``w``. A chain of ``h`` hops is ``h``
assignments: its first variable gets a digit, every later one the previous variable
(``update="copy"``) or the previous variable plus a digit, modulo 10 (``update="add"``:
``"qa+3>xb"``), so that every hop changes the value and no chain's first digit can stand in for the
answer. Variables are two-letter names drawn without replacement from the first ``num_variables`` of
``aa, ab, ..., zz``. ``order="interleaved"`` keeps each chain's assignments in chain order and
interleaves the chains at random; ``order="shuffled"`` shuffles all assignments. With a causal
model, interleaved order lets every assignment resolve its value from earlier ones, one hop per
layer application (a looped core runs as many as it needs); shuffled order leaves all the hops to
the question's position.

Why this form: the value comes before the name it is given, so the position of a name holds its own
identity (the key of a lookup) and the value sits one step behind it; every name, digit and symbol
is one token. ``hops`` is the length of every chain: an integer, or ``[min, max]`` to draw each
chain's length uniformly (training mixes difficulties; evaluation fixes it).

Questions and training rows
---------------------------
Only the first chain is asked in the prompt. A training sequence asks many questions about the same
assignments (``questions="all"``: every variable, so every depth from 1 to the chain's length is
supervised; ``"last"``: the last variable of every chain), each seeing the assignments and itself
only: ``encode`` writes them after the assignments with a 4-D attention mask that hides the questions
from each other and position ids that restart where the assignments end, so every question is
exactly the prompt a model is asked at evaluation (and no answer can be read off another question
or found by elimination). Labels are on the answer digits only. Rows: ``prompt``, ``completion``,
``answer``, ``hops`` (the asked chain's), ``statements``, ``questions``, ``answers``;
deterministic in ``(split, n, seed)`` (`split_rng`; a smaller ``n`` is a prefix), cached with
`cached_dataset`.

Tokenizer, scoring, lm-eval
---------------------------
By default a word-level tokenizer (`multihop_tokenizer`: names, digits, ``> ; ? +`` each one token,
spaces dropped; `PreTrainedTokenizerFast`, LEFT padding) for models trained from scratch; with
``tokenizer=DIR`` a pretrained model's own (e.g. a converted SmolLM2's), used with left padding, which
must write every answer digit as one token that does not merge with the name before it (checked).
Either is saved next to a trained model. Every question of a training row is the tokens the
tokenizer gives ``prompt + answer`` after the assignments' tokens, so training sees exactly the
tokens a model is asked at evaluation. The task is
generative (a `GenerativeTask`): the evaluation generates the answer token with ``model.generate(...,
num_loops=K)`` (``implicit_hf.eval.generative.complete``; halting with ``tol``), and the local metric
(``metrics/multihop_metrics.py``) scores ``exact_match``. `lipschitz_pairs` gives prompt pairs that differ by
one token (a chain's first digit; in the asked chain for every other pair) for the text Lipschitz probe. The
lm-evaluation-harness tasks ``multihop_hops{k}`` (``tasks/reasoning/lm_eval_tasks/``) score the
same prompts as a 10-way choice of the answer digit; `write_lm_eval_data` writes their data files.
"""

from __future__ import annotations

import itertools
import string
from pathlib import Path
from typing import Annotated, Any, Literal

import datasets
import numpy as np
import torch
from tokenizers import Regex, decoders, pre_tokenizers

from ...checks import Allowed, CountRange, at_least, check_count_range
from ..base import Example, list_feature, row_generators, split_rng
from ..generation import GenerativeTask, pretrained_tokenizer, word_level_tokenizer
from .lm_eval_tasks.documents import LM_EVAL_DIR as LM_EVAL_DIR  # where `implicit-hf lm-eval-data` points lm-eval
from .lm_eval_tasks.documents import shipped_counts, write_documents

DIGITS = tuple(string.digits)
SYMBOLS = (">", ";", "?", "+")
NAMES = tuple("".join(pair) for pair in itertools.product(string.ascii_lowercase, repeat=2))
Update = Literal["copy", "add"]
Order = Literal["interleaved", "shuffled"]
Questions = Literal["all", "last"]


def multihop_tokenizer():
    """The task's word-level tokenizer: every name, digit and symbol one token; spaces dropped; left padding."""
    return word_level_tokenizer(
        (*DIGITS, *SYMBOLS, *NAMES),
        pre_tokenizers.Sequence(
            [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex("[a-z]+|[^a-z]"), behavior="isolated")]
        ),
        decoders.Fuse(),
    )


def digit_token_ids(tokenizer) -> list[int]:
    """The token id of every answer digit ``0``-``9``; a tokenizer that writes a digit as several tokens is refused."""
    ids = []
    for digit in DIGITS:
        tokens = tokenizer(digit, add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            raise ValueError(f"the tokenizer writes the digit {digit!r} as {len(tokens)} tokens; multihop needs one")
        ids.append(tokens[0])
    return ids


class MultiHopTask(GenerativeTask):
    """Answer ``?x`` after a list of chained assignments: ``hops`` serial lookups, no intermediate text."""

    name = "multihop"
    quality_metric = "exact_match"
    higher_is_better = True
    metric_name = "multihop_metrics"

    def __init__(
        self,
        cache_dir: str | Path | None = None,
        hops: CountRange = 4,
        distractors: Annotated[int, at_least(0)] = 3,
        update: Update = "copy",
        order: Order = "interleaved",
        questions: Questions = "all",
        num_variables: Annotated[
            int, Allowed(f"an integer in [1, {len(NAMES)}]", lambda value: 1 <= value <= len(NAMES))
        ] = len(NAMES),
        use_cache: bool = True,
        pairs: Annotated[int, at_least(1)] = 150,
        tokenizer: str | Path | None = None,
    ):
        super().__init__(cache_dir)
        self.min_hops, self.max_hops = check_count_range("hops", hops)
        distractors, pairs, num_variables = int(distractors), int(pairs), int(num_variables)
        chains = distractors + 1
        if chains * self.max_hops > num_variables:
            raise ValueError(
                f"{chains} chains of up to {self.max_hops} hops need {chains * self.max_hops} distinct variables; "
                f"num_variables is {num_variables} (raise it, up to {len(NAMES)}, or use fewer hops or distractors)"
            )
        self.distractors, self.update, self.order, self.questions = distractors, update, order, questions
        self.num_variables, self.use_cache, self.num_pairs = num_variables, use_cache, pairs
        self.tokenizer_path = None if tokenizer is None else str(tokenizer)
        self.tokenizer = multihop_tokenizer() if tokenizer is None else pretrained_tokenizer(self.tokenizer_path)
        self.digit_ids = digit_token_ids(self.tokenizer)

    # ------------------------------------------------------------------ data

    def dataset_path(self, split: str, n: int, seed: int) -> Path:
        """Where `build_dataset` caches ``(split, n, seed)``."""
        return self.cache_dir / (
            f"{split}-hops{self.min_hops}to{self.max_hops}-d{self.distractors}-{self.update}-{self.order}"
            f"-{self.questions}-v{self.num_variables}-{n}-seed{seed}"
        )  # text only: the rows do not depend on the tokenizer

    def features(self):
        """The rows of `make_row`: ``prompt``, ``completion``, ``answer``, ``hops``, ``statements``, ``questions``,
        ``answers``."""
        return datasets.Features(
            {
                "prompt": datasets.Value("string"),
                "completion": datasets.Value("string"),
                "answer": datasets.Value("int32"),
                "hops": datasets.Value("int32"),
                "statements": datasets.Value("string"),
                "questions": list_feature(datasets.Value("string")),
                "answers": list_feature(datasets.Value("int32")),
            }
        )

    def generate(self, rng: np.random.Generator, n: int, split: str) -> list[Example]:
        """``n`` random problems (`random_row`)."""
        return [self.random_row(rng) for _ in range(n)]

    def random_row(self, rng: np.random.Generator) -> Example:
        """One problem: the chains, their assignments in the task's order, and the questions."""
        chains = self.distractors + 1
        lengths = rng.integers(self.min_hops, self.max_hops + 1, size=chains).tolist()
        picked = [NAMES[i] for i in rng.choice(self.num_variables, size=sum(lengths), replace=False).tolist()]
        variables = [picked[sum(lengths[:c]) : sum(lengths[: c + 1])] for c in range(chains)]
        roots = rng.integers(0, 10, size=chains).tolist()
        statements = []
        for names, root in zip(variables, roots, strict=True):
            deltas = rng.integers(1, 10, size=len(names) - 1).tolist() if self.update == "add" else None
            statements.append(chain_statements(names, root, deltas))
        if self.order == "interleaved":  # a random interleaving that keeps every chain in order
            owners = rng.permutation(np.repeat(np.arange(chains), lengths)).tolist()
            cursor = [0] * chains
            ordered = []
            for owner in owners:
                ordered.append(statements[owner][cursor[owner]])
                cursor[owner] += 1
        else:
            flat = [s for chain in statements for s in chain]
            ordered = [flat[i] for i in rng.permutation(len(flat)).tolist()]
        if self.questions == "last":
            asked = [names[-1] for names in variables]
        else:
            asked = [name for names in variables for name in names]
        first = asked.index(variables[0][-1])
        others = [asked[i] for i in rng.permutation(len(asked)).tolist() if i != first]
        return make_row(ordered, [variables[0][-1], *others], lengths[0])

    # ------------------------------------------------------------------ encode / decode

    def encode(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        """Training rows: the assignments, then every question with its answer, each question hidden from the
        others (a 4-D boolean ``attention_mask`` ``(B, 1, T, T)`` and ``position_ids``), ``labels`` on the answer
        digits only. Rows without ``answers`` are encoded as their prompt (2-D mask, no labels)."""
        if not all(example.get("answers") for example in examples):
            prompts = self.tokenizer([example["prompt"] for example in examples], padding=True, return_tensors="pt")
            return {"input_ids": prompts["input_ids"], "attention_mask": prompts["attention_mask"]}
        rows = [self.question_tokens(example) for example in examples]
        length = max(len(prefix) + sum(len(q) for q in questions) for prefix, questions in rows)
        batch = len(rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((batch, length), pad, dtype=torch.long)
        position_ids = torch.zeros((batch, length), dtype=torch.long)
        labels = torch.full((batch, length), -100, dtype=torch.long)
        mask = torch.eye(length, dtype=torch.bool).repeat(batch, 1, 1, 1)  # padding attends to itself only
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        for k, (prefix, questions) in enumerate(rows):
            start = len(prefix)
            input_ids[k, :start] = torch.tensor(prefix)
            position_ids[k, :start] = torch.arange(start)
            mask[k, 0, :start, :start] = causal[:start, :start]
            at = start
            for tokens in questions:
                end = at + len(tokens)
                input_ids[k, at:end] = torch.tensor(tokens)
                position_ids[k, at:end] = torch.arange(start, start + len(tokens))
                mask[k, 0, at:end, :start] = True
                mask[k, 0, at:end, at:end] = causal[: len(tokens), : len(tokens)]
                labels[k, end - 1] = tokens[-1]
                at = end
        return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids, "labels": labels}

    def question_tokens(self, example: Example) -> tuple[list[int], list[list[int]]]:
        """The assignments' tokens and, for every question, the tokens that follow them in ``prompt + answer``
        (the question, then the answer digit last)."""
        prefix = self.tokenizer(example["statements"] + ";")["input_ids"]
        prompts = [f"{example['statements']}; ?{q}" for q in example["questions"]]
        texts = [p + str(a) for p, a in zip(prompts, example["answers"], strict=True)]
        encoded = self.tokenizer(prompts + texts)["input_ids"]
        questions = []
        for prompt, full, answer in zip(
            encoded[: len(prompts)], encoded[len(prompts) :], example["answers"], strict=True
        ):
            consistent = full[: len(prefix)] == prefix and full[: len(prompt)] == prompt
            if not consistent or full[len(prompt) :] != [self.digit_ids[answer]]:
                raise ValueError(
                    f"the tokenizer {self.tokenizer_path or 'multihop'!r} does not write {prompt!r} + {answer!r} as "
                    "the assignments' tokens, then the question's, then one answer-digit token: multihop cannot use it"
                )
            questions.append(full[len(prefix) :])
        return prefix, questions

    def decode(self, logits: torch.Tensor, inputs: dict[str, torch.Tensor]) -> list[str]:
        """The answer digit predicted for the first question of every row (teacher-forced logits): read where the
        first label is predicted, or, for prompt-only inputs, at the last position."""
        if logits.ndim != 3:
            raise ValueError(f"logits must have shape (B, T, vocab); got {tuple(logits.shape)}")
        texts = []
        for k in range(logits.shape[0]):
            if "labels" in inputs:
                labelled = (inputs["labels"][k] != -100).nonzero()
                if labelled.numel() == 0:
                    raise ValueError(f"row {k}: no labelled answer in the input")
                position = int(labelled[0]) - 1
            else:  # left-padded prompts end at the last position
                position = logits.shape[1] - 1
            scores = logits[k, position, self.digit_ids]
            texts.append(DIGITS[int(scores.argmax())])
        return texts

    # ------------------------------------------------------------------ perturbations

    def perturb_rows(self, examples: list[Example], eps: float, seed: int) -> tuple[list[Example], torch.Tensor]:
        """Rows with ``max(1, round(eps))`` chains' first digits changed (answers recomputed); ``||δ||`` = the
        number of changed tokens (``eps = 0``: unchanged)."""
        generators = row_generators(seed, len(examples))
        perturbed, norms = [], []
        for example, rng in zip(examples, generators, strict=True):
            roots = first_digits(example["statements"])
            changes = min(max(1, round(eps)), len(roots))
            row = example
            for root in rng.permutation(sorted(roots))[:changes].tolist():
                row = change_first_digit(row, root, int((roots[root] + rng.integers(1, 10)) % 10))
            perturbed.append(row)
            norms.append(float(changes))
        return perturbed, torch.tensor(norms, dtype=torch.float64)

    def lipschitz_pairs(self) -> list[dict[str, Any]]:
        """``pairs`` prompt pairs of the text Lipschitz probe (problems at the task's hops): the same problem with
        one chain's first digit changed, in the asked chain for every other pair."""
        rng = split_rng("pairs", 0)
        pairs = []
        for k in range(self.num_pairs):
            row = self.random_row(rng)
            roots = first_digits(row["statements"])
            asked = chain_start(row["statements"], row["questions"][0])
            others = [root for root in sorted(roots) if root != asked]
            root = asked if k % 2 == 0 or not others else others[int(rng.integers(len(others)))]
            other = change_first_digit(row, root, int((roots[root] + rng.integers(1, 10)) % 10))
            pairs.append(
                {
                    "prompt_a": row["prompt"],
                    "prompt_b": other["prompt"],
                    "answer_a": row["answer"],
                    "answer_b": other["answer"],
                }
            )
        return pairs


# ---------------------------------------------------------------------- problems and text


def chain_statements(variables: list[str], root: int, deltas: list[int] | None = None) -> list[str]:
    """The assignments of one chain: ``root>v0``, then ``v_{i-1}>v_i`` (copy) or ``v_{i-1}+d>v_i`` (add)."""
    statements = [f"{root}>{variables[0]}"]
    for i, (previous, variable) in enumerate(itertools.pairwise(variables)):
        statements.append(f"{previous}>{variable}" if deltas is None else f"{previous}+{deltas[i]}>{variable}")
    return statements


def parse_statements(statements: str) -> dict[str, tuple[str, int]]:
    """``{variable: (source, delta)}`` of ``"4>a; a+3>b; ..."`` (``source`` a variable or a digit)."""
    rules = {}
    for statement in statements.split(";"):
        source, _, target = statement.strip().partition(">")
        name, _, delta = source.partition("+")
        rules[target] = (name, int(delta or 0))
    return rules


def evaluate_statements(statements: str) -> dict[str, int]:
    """The value of every variable of ``"4>a; a+3>b; ..."`` (modulo 10), in any order of the assignments."""
    rules = parse_statements(statements)
    values: dict[str, int] = {}

    def value(variable: str) -> int:
        if variable not in values:
            source, delta = rules[variable]
            values[variable] = ((int(source) if source.isdigit() else value(source)) + delta) % 10
        return values[variable]

    for variable in rules:
        value(variable)
    return values


def first_digits(statements: str) -> dict[str, int]:
    """``{first variable: its digit}`` of every chain in ``statements``."""
    return {target: int(source) for target, (source, _) in parse_statements(statements).items() if source.isdigit()}


def chain_start(statements: str, variable: str) -> str:
    """The first variable of the chain ``variable`` belongs to."""
    rules = parse_statements(statements)
    while not rules[variable][0].isdigit():
        variable = rules[variable][0]
    return variable


def make_row(statements: list[str], questions: list[str], hops: int) -> Example:
    """A data-set row: the assignments (in order) and the questions asked (the first is the prompt's)."""
    text = "; ".join(statements)
    values = evaluate_statements(text)
    return {
        "prompt": f"{text}; ?{questions[0]}",
        "completion": str(values[questions[0]]),
        "answer": values[questions[0]],
        "hops": int(hops),
        "statements": text,
        "questions": list(questions),
        "answers": [values[q] for q in questions],
    }


def change_first_digit(row: Example, variable: str, digit: int) -> Example:
    """``row`` with the chain starting at ``variable`` given the first digit ``digit`` (answers recomputed)."""
    statements = [s.strip() for s in row["statements"].split(";")]
    statements = [f"{digit}>{variable}" if s.partition(">")[2] == variable else s for s in statements]
    return make_row(statements, row["questions"], row["hops"])


def lm_eval_hops() -> list[int]:
    """The hop counts of the lm-evaluation-harness tasks shipped in ``lm_eval_tasks/`` (``multihop_hops{k}.yaml``)."""
    return shipped_counts("multihop_hops")


def write_lm_eval_data(
    out_dir: str | Path, hops: list[int], n: int = 500, seed: int = 0, **task_kwargs: Any
) -> list[Path]:
    """The data files of the lm-evaluation-harness tasks ``multihop_hops{k}``: the first ``n`` problems of the
    test split (the rows `build_dataset("test", n, seed)` holds) of `MultiHopTask(hops=k, **task_kwargs)`, one
    JSON object per line (``prompt``, ``answer``, ``hops``), plus ``multihop_settings.json`` recording how."""

    def documents(k: int) -> list[dict[str, Any]]:
        task = MultiHopTask(hops=k, **task_kwargs)
        rows = task.generate(task.random_stream("test", seed), n, "test")
        return [{key: row[key] for key in ("prompt", "answer", "hops")} for row in rows]

    return write_documents(out_dir, "multihop_hops", hops, n, seed, task_kwargs, documents)
