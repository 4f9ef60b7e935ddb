"""State tracking: a causal-LM task whose answer is a hidden state after ``steps`` updates, with no written work.

Text form
---------
A start state, ``steps`` updates, a question, and the answer (the final state) right after it::

    group "symmetric", objects 3:   "ball: B. swap A C. swap B C. where?"    -> " A"
    group "cyclic", modulus 10:     "sum: four. add two. add nine. total?"    -> " five"

``symmetric``: a ball lies under one of ``objects`` cups (3, 5 or 7: A, B, C, ...); every update swaps two
cups (all ``objects (objects - 1) / 2`` swaps equally likely), moving the ball when it is under one of them:
the updates act as transpositions of S_objects ("where is the ball", as BIG-Bench Hard's
tracking_shuffled_objects with 3 / 5 / 7 objects). The order of updates matters, and a fixed-depth model has no
shortcut for long sequences of them. ``cyclic`` (the abelian control): a running sum modulo ``modulus``
(2..10; values and addends written as number words, every addend in 1..m-1); commutative, so attention can
count instead of iterating. ``steps`` is a count or ``[min, max]`` (drawn per row, uniformly).

Supervision
-----------
``dense``: a label after EVERY update (the state it leads to) and on the answer; ``answer``: the answer only.
The states are targets, never inputs. A label sits where a causal LM predicts the next token: the state
after an update is the target of the logits at the update's last token (`encode` writes it into ``labels``
one position on, as transformers' causal-LM loss expects), the answer that of the question's last token.
Those targets are not the next input token (except the answer): the loss is the model's own causal-LM
loss on the task's ``labels``. With ``transformers.Trainer``, give it the rows `encode` makes (a
``data_collator`` calling ``task.encode``): ``input_ids``, ``attention_mask`` and ``labels``.

Tokenizers
----------
By default a word-level tokenizer (`state_tracking_tokenizer`: every statement — ``ball: B.``, ``swap A C.``,
``where?`` — and every answer one token, right-aligned so that the loop of an implicit model can do one
update per iteration); with ``tokenizer=DIR`` a pretrained model's own (e.g. SmolLM2's), which must end a
token at the end of every statement and write every answer as one token (checked on every encoded row;
such a tokenizer is refused naming the knob). Either is saved next to a trained model.

Scoring
-------
Not generative: one trajectory run scores every loop count (``decode`` reads the logits at the labelled
positions: the predicted state index at every update for ``dense`` and the answer last; -1 where the
argmax is no state at all). The local metric (``metrics/state_tracking_metrics.py``) gives ``exact_match``
(the answer) and ``position_accuracy`` (every labelled position). `prompt` is the text a model answers by
``model.generate`` (``implicit_hf.eval.generative.greedy_completions``; halting with ``tol``: the loops spent per
answer). `perturb` changes updates (the
Lipschitz probe: predicted-state indices against the number of updates changed). The lm-evaluation-harness
tasks ``state_tracking_steps{k}`` (``lm_eval_tasks/``) score the same prompts as a choice among the states;
`write_lm_eval_data` writes their data files.
"""

from __future__ import annotations

import itertools
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import datasets
import numpy as np
import torch
from tokenizers import Regex, decoders, normalizers, pre_tokenizers

from ...checks import Allowed, CountRange, check_count_range
from ..base import Example, check_one_per_row, list_feature, row_generators
from ..generation import CausalLMTask, pretrained_tokenizer, word_level_tokenizer
from .lm_eval_tasks.documents import LM_EVAL_DIR as LM_EVAL_DIR  # where `implicit-hf lm-eval-data` points lm-eval
from .lm_eval_tasks.documents import shipped_counts, write_documents

GroupKind = Literal["symmetric", "cyclic"]
OBJECTS = (3, 5, 7)
MAX_MODULUS = 10
Supervision = Literal["dense", "answer"]
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
LETTERS = tuple(string.ascii_uppercase[: max(OBJECTS)])


@dataclass(frozen=True)
class Group:
    """The updates and their text: ``symmetric`` (swaps of ``size`` cups) or ``cyclic`` (addition modulo ``size``)."""

    kind: str
    size: int

    @property
    def updates(self) -> list[Any]:
        """Every update: a pair of cups ``(i, j)``, ``i < j``, or an addend in ``1 .. size - 1``."""
        if self.kind == "symmetric":
            return list(itertools.combinations(range(self.size), 2))
        return list(range(1, self.size))

    def apply(self, state: int, update: int) -> int:
        """The state after the update with index ``update`` (into `updates`)."""
        if self.kind == "cyclic":
            return (state + self.updates[update]) % self.size
        first, second = self.updates[update]
        return second if state == first else first if state == second else state

    def value(self, state: int) -> str:
        return LETTERS[state] if self.kind == "symmetric" else NUMBER_WORDS[state]

    def start_text(self, state: int) -> str:
        return f"{'ball' if self.kind == 'symmetric' else 'sum'}: {self.value(state)}."

    def update_text(self, update: int) -> str:
        if self.kind == "cyclic":
            return f"add {NUMBER_WORDS[self.updates[update]]}."
        first, second = self.updates[update]
        return f"swap {LETTERS[first]} {LETTERS[second]}."

    @property
    def question(self) -> str:
        return "where?" if self.kind == "symmetric" else "total?"

    def answer_text(self, state: int) -> str:
        """The completion: the state after a space (it follows the question)."""
        return f" {self.value(state)}"


ALL_GROUPS = [Group("symmetric", n) for n in OBJECTS] + [Group("cyclic", m) for m in range(2, MAX_MODULUS + 1)]


def state_tracking_tokenizer():
    """The task's word-level tokenizer: every statement (``ball: B.``, ``swap A C.``, ``add two.``), question
    and answer of every group one token, the same vocabulary for all settings; left padding."""
    words: dict[str, None] = {}  # ordered, without repeats
    for group in ALL_GROUPS:
        for text in (
            *(group.start_text(s) for s in range(group.size)),
            *(group.update_text(u) for u in range(len(group.updates))),
            group.question,
            *(group.answer_text(s).strip() for s in range(group.size)),
        ):
            words[text] = None
    # a statement ends at its '.' or '?'; what follows (the answer) is one more piece; spaces between are dropped
    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[^.?]*[.?]"), behavior="isolated"),
            pre_tokenizers.Split(Regex(r"^ +"), "removed"),
        ]
    )
    decoder = decoders.WordPiece(prefix="##", cleanup=False)  # tokens joined by spaces
    return word_level_tokenizer(list(words), pre_tokenizer, decoder, normalizer=normalizers.Strip())


def make_group(group: GroupKind, objects: int | None, cyclic: int | None) -> Group:
    """The `Group` of the task's knobs (``objects``, one of `OBJECTS`, checked by the task): ``objects`` for
    ``symmetric``, ``cyclic`` (the modulus) for ``cyclic``; a knob of the other group is refused."""
    if group == "symmetric":
        if cyclic is not None:
            raise ValueError(f"cyclic (the modulus) applies to group 'cyclic'; got cyclic={cyclic!r} with 'symmetric'")
        return Group(group, 3 if objects is None else int(objects))
    if objects is not None:
        raise ValueError(f"objects applies to group 'symmetric'; got objects={objects!r} with group 'cyclic'")
    modulus = 10 if cyclic is None else cyclic
    if not 2 <= modulus <= MAX_MODULUS:  # an integer or None: the task's annotation
        raise ValueError(f"cyclic (the modulus m) must be an integer in [2, {MAX_MODULUS}]; got {cyclic!r}")
    return Group(group, int(modulus))


class StateTrackingTask(CausalLMTask):
    """Track a hidden state through ``steps`` updates and answer it right after the question."""

    name = "state_tracking"
    quality_metric = "exact_match"
    higher_is_better = True
    metric_name = "state_tracking_metrics"

    def __init__(
        self,
        cache_dir: str | Path | None = None,
        group: GroupKind = "symmetric",
        objects: Annotated[int, Allowed(f"one of {OBJECTS}", lambda value: value in OBJECTS)] | None = None,
        cyclic: int | None = None,
        steps: CountRange = 8,
        supervision: Supervision = "dense",
        tokenizer: str | Path | None = None,
    ):
        super().__init__(cache_dir)
        self.group = make_group(group, objects, cyclic)
        self.min_steps, self.max_steps = check_count_range("steps", steps)
        self.supervision = supervision
        self.tokenizer_path = None if tokenizer is None else str(tokenizer)
        if self.tokenizer_path is not None and not Path(self.tokenizer_path).is_dir():
            raise ValueError(f"tokenizer must be a tokenizer directory; {self.tokenizer_path!r} is not one")
        self.tokenizer = state_tracking_tokenizer() if tokenizer is None else pretrained_tokenizer(self.tokenizer_path)
        self.state_ids = self._state_token_ids()
        self._check_tokenizer()

    def _state_token_ids(self) -> list[int]:
        """The token id of every state's answer text; a tokenizer writing one as several tokens is refused."""
        ids = []
        for state in range(self.group.size):
            text = self.group.answer_text(state)
            tokens = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(tokens) != 1:
                raise ValueError(
                    f"tokenizer {self.tokenizer_path!r} writes the answer {text!r} as {len(tokens)} tokens; "
                    "state_tracking needs one token per answer"
                )
            ids.append(tokens[0])
        return ids

    def _check_tokenizer(self) -> None:
        """Refuse, before any data is written, a tokenizer that merges a statement into its neighbours: one row
        using every update of the group is encoded."""
        updates = list(range(len(self.group.updates)))
        self.label_positions(make_row(self.group, 0, updates))

    def difficulty(self, example: Example) -> int:
        """The row's number of updates: what a loop schedule tied to difficulty draws its loop count above."""
        return int(example["steps"])

    # ------------------------------------------------------------------ data

    def dataset_path(self, split: str, n: int, seed: int) -> Path:
        """Where `build_dataset` caches ``(split, n, seed)`` (text only: the rows depend on neither the tokenizer
        nor the supervision)."""
        return self.cache_dir / (
            f"{split}-{self.group.kind}{self.group.size}-steps{self.min_steps}to{self.max_steps}-{n}-seed{seed}"
        )

    def features(self):
        """The rows of `make_row`."""
        return datasets.Features(
            {
                "prompt": datasets.Value("string"),
                "completion": datasets.Value("string"),
                "answer": datasets.Value("int32"),
                "steps": datasets.Value("int32"),
                "start": datasets.Value("int32"),
                "updates": list_feature(datasets.Value("int32")),
                "states": list_feature(datasets.Value("int32")),
            }
        )

    def generate(self, rng: np.random.Generator, n: int, split: str) -> list[Example]:
        """``n`` random problems: a uniform start, a uniform number of steps in range, uniform updates."""
        rows = []
        for _ in range(n):
            steps = int(rng.integers(self.min_steps, self.max_steps + 1))
            start = int(rng.integers(self.group.size))
            updates = rng.integers(len(self.group.updates), size=steps).tolist()
            rows.append(make_row(self.group, start, updates))
        return rows

    # ------------------------------------------------------------------ encode / decode

    def label_positions(self, example: Example) -> tuple[list[int], list[int]]:
        """The tokens of ``prompt + completion`` and, for every update and then the question, the index of its
        last token (where the next state is predicted). Refuses a tokenizer that does not end a token where a
        statement ends, or that writes the completion as more than one token."""
        text = example["prompt"] + example["completion"]
        encoded = self.tokenizer(text, return_offsets_mapping=True)
        ends = {end: index for index, (begin, end) in enumerate(encoded["offset_mapping"]) if end > begin}
        positions = []
        for end in statement_ends(example["prompt"])[1:]:  # every update, then the question
            if end not in ends:
                raise ValueError(
                    f"tokenizer {self.tokenizer_path!r} merges a statement of {example['prompt']!r} with its "
                    f"neighbour (no token ends at character {end}): state_tracking needs a token boundary after "
                    "every statement"
                )
            positions.append(ends[end])
        tokens = encoded["input_ids"]
        if positions[-1] != len(tokens) - 2 or tokens[-1] != self.state_ids[example["answer"]]:
            raise ValueError(
                f"tokenizer {self.tokenizer_path!r} does not write {example['completion']!r} after "
                f"{example['prompt']!r} as one answer token: state_tracking cannot use it"
            )
        return tokens, positions

    def encode(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        """``prompt + completion`` right-padded, with ``labels`` one position after every update's last token
        (the state it leads to; ``dense``) and on the answer token; -100 elsewhere."""
        encoded = [self.label_positions(example) for example in examples]
        length = max(len(tokens) for tokens, _ in encoded)
        input_ids = torch.full((len(examples), length), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
        labels = torch.full((len(examples), length), -100, dtype=torch.long)
        for k, (example, (tokens, positions)) in enumerate(zip(examples, encoded, strict=True)):
            input_ids[k, : len(tokens)] = torch.tensor(tokens)
            attention_mask[k, : len(tokens)] = 1
            targets = [*example["states"], example["answer"]]
            if self.supervision == "answer":
                positions, targets = positions[-1:], targets[-1:]
            labels[k, torch.tensor(positions) + 1] = torch.tensor([self.state_ids[s] for s in targets])
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def decode(self, logits: torch.Tensor, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Per row, the predicted state index at every labelled position (the answer last): the argmax over the
        whole vocabulary of the logits one position before each label, -1 where it is no state token."""
        if logits.ndim != 3:
            raise ValueError(f"logits must have shape (B, T, vocab); got {tuple(logits.shape)}")
        to_state = torch.full((logits.shape[-1],), -1, dtype=torch.long)
        to_state[torch.tensor(self.state_ids)] = torch.arange(len(self.state_ids))
        predicted = to_state[logits.argmax(-1).cpu()]
        labels = inputs["labels"].cpu()
        return [predicted[k, (labels[k] != -100).nonzero().flatten() - 1] for k in range(logits.shape[0])]

    def prompt(self, example: Example) -> str:
        """The text the model is asked to continue: the start, the updates and the question."""
        return example["prompt"]

    # ------------------------------------------------------------------ metrics

    def compute_metrics(self, predictions: list[torch.Tensor], examples: list[Example]) -> dict[str, float]:
        """``exact_match`` (the answer) and ``position_accuracy`` (every labelled position, pooled)."""
        check_one_per_row(predictions, examples)
        references = [[*example["states"], example["answer"]] for example in examples]
        if self.supervision == "answer":
            references = [reference[-1:] for reference in references]
        return self.load_metric().compute(
            predictions=[torch.as_tensor(p).tolist() for p in predictions], references=references
        )

    # ------------------------------------------------------------------ perturbations

    def perturb_rows(self, examples: list[Example], eps: float, seed: int) -> tuple[list[Example], torch.Tensor]:
        """Rows with ``max(1, round(eps))`` updates replaced by other updates (states recomputed); ``||δ||`` = the
        number of updates changed (``eps = 0``: unchanged)."""
        generators = row_generators(seed, len(examples))
        count = len(self.group.updates)
        perturbed, norms = [], []
        for example, rng in zip(examples, generators, strict=True):
            updates = list(example["updates"])
            changes = min(max(1, round(eps)), len(updates))
            for index in rng.permutation(len(updates))[:changes].tolist():
                updates[index] = int((updates[index] + rng.integers(1, count)) % count)
            perturbed.append(make_row(self.group, example["start"], updates))
            norms.append(float(changes))
        return perturbed, torch.tensor(norms, dtype=torch.float64)


# ---------------------------------------------------------------------- problems and text


def make_row(group: Group, start: int, updates: list[int]) -> Example:
    """A data-set row: the start state, the updates (indices into ``group.updates``), the text and every state."""
    states, state = [], start
    for update in updates:
        state = group.apply(state, update)
        states.append(state)
    text = " ".join([group.start_text(start), *(group.update_text(u) for u in updates), group.question])
    return {
        "prompt": text,
        "completion": group.answer_text(state),
        "answer": state,
        "steps": len(updates),
        "start": start,
        "updates": list(updates),
        "states": states,
    }


def statement_ends(prompt: str) -> list[int]:
    """The character offset just past each statement of ``prompt`` (the start, every update, the question)."""
    return [index + 1 for index, char in enumerate(prompt) if char in ".?"]


def lm_eval_steps() -> list[int]:
    """The step counts of the lm-evaluation-harness tasks shipped in ``lm_eval_tasks/``
    (``state_tracking_steps{k}.yaml``)."""
    return shipped_counts("state_tracking_steps")


def write_lm_eval_data(
    out_dir: str | Path, steps: list[int], n: int = 500, seed: int = 0, **task_kwargs: Any
) -> list[Path]:
    """The data files of the lm-evaluation-harness tasks ``state_tracking_steps{k}``: the first ``n`` problems of
    the test split of `StateTrackingTask(steps=k, **task_kwargs)`, one JSON object per line (``prompt``,
    ``answer``, ``choices``: every state's text, ``steps``), plus ``state_tracking_settings.json``."""

    def documents(k: int) -> list[dict[str, Any]]:
        task = StateTrackingTask(steps=k, **task_kwargs)
        choices = [task.group.value(state) for state in range(task.group.size)]
        rows = task.generate(task.random_stream("test", seed), n, "test")
        return [{"prompt": r["prompt"], "answer": r["answer"], "choices": choices, "steps": r["steps"]} for r in rows]

    return write_documents(out_dir, "state_tracking_steps", steps, n, seed, task_kwargs, documents)


__all__ = ["StateTrackingTask", "make_row", "state_tracking_tokenizer", "write_lm_eval_data", "lm_eval_steps"]
