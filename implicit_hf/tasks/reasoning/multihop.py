"""Multi-hop variable lookup: a causal-LM task whose answer needs ``hops`` serial steps and no written work.

Text form
---------
A prompt is a list of assignments forming ``1 + distractors`` disjoint chains, then a question about
the last variable of the first chain; the answer (one digit) is written right after the question::

    prompt:      "qa=4; kd=7; xb=qa; mc=xb; ue=kd; mc?"
    completion:  "4"                                     (mc = xb = qa = 4: three hops)

A chain of ``h`` hops is ``h`` assignments: its first variable gets a digit, every later one the
previous variable (``update="copy"``) or the previous variable plus a digit, modulo 10
(``update="add"``: ``"xb=qa+3"``), so that every hop changes the value and no root value can stand in
for the answer. Variables are two-letter names drawn without replacement from the first
``num_variables`` of ``aa, ab, ..., zz``. ``order="interleaved"`` keeps each chain's assignments in
chain order and interleaves the chains at random; ``order="shuffled"`` shuffles all assignments.
With a causal model, interleaved order lets every assignment's position resolve its own value from
earlier ones, one hop per layer application (a looped core can run as many as it needs); shuffled
order leaves all the hops to the question's position.

``hops`` is the length of every chain: an integer, or ``[min, max]`` to draw each chain's length
uniformly (training mixes difficulties; evaluation fixes it). Only the first chain is asked in the
prompt; training rows also ask the other chains (``queries`` of them, each question right after the
previous answer: ``"...; mc?4; ue?7"``), a denser signal that leaks nothing, since chains share no
variable. Rows: ``prompt``, ``completion``, ``answer``, ``hops`` (the asked chain's) and, for the
training sequence, ``statements``, ``questions``, ``answers``; deterministic in ``(split, n, seed)``
(`split_rng`; a smaller ``n`` is a prefix), cached with `cached_dataset`.

Tokenizer, training, scoring
----------------------------
A word-level tokenizer (`multihop_tokenizer`: names, digits, ``= ; ? +`` each one token, spaces
dropped; `PreTrainedTokenizerFast`, LEFT padding) saved next to a trained model. ``encode`` gives
``[BOS] statements questions-and-answers`` right-padded, with ``labels`` on the answer digits only.
The task is generative: `complete` generates the one answer token with ``model.generate(...,
num_loops=K)`` (halting with ``tol``), and the local metric (``metrics/multihop_metrics.py``) scores
``exact_match`` of the answer. `lipschitz_pairs` gives prompt pairs that differ by one token (a
chain's first digit; half of them in the asked chain) for the text Lipschitz probe. The
lm-evaluation-harness tasks ``multihop_hops{k}`` (``tasks/reasoning/lm_eval/``) score the same
prompts as a 10-way choice of the answer digit; `write_lm_eval_data` writes their data files.
"""

from __future__ import annotations

import itertools
import json
import string
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..base import Example, TaskAdapter, cached_dataset, check_size_and_seed, load_local_metric, split_rng

SPECIAL_TOKENS = ("[PAD]", "[BOS]", "[EOS]", "[UNK]")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)
DIGITS = tuple(string.digits)
SYMBOLS = ("=", ";", "?", "+")
NAMES = tuple("".join(pair) for pair in itertools.product(string.ascii_lowercase, repeat=2))
UPDATES = ("copy", "add")
ORDERS = ("interleaved", "shuffled")
LM_EVAL_DIR = Path(__file__).parent / "lm_eval"


def multihop_tokenizer():
    """The task's word-level tokenizer: every name, digit and symbol one token; spaces dropped; left padding."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *DIGITS, *SYMBOLS, *NAMES))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex("[a-z]+|[^a-z]"), behavior="isolated")]
    )
    tokenizer.decoder = decoders.Fuse()
    tokenizer.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", BOS_ID)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="[PAD]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        unk_token="[UNK]",
        padding_side="left",
        model_max_length=4096,
    )


def _hop_range(hops: Any) -> tuple[int, int]:
    if isinstance(hops, (list, tuple)) and len(hops) == 2:
        low, high = hops
    else:
        low = high = hops
    for value in (low, high):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"hops must be an integer >= 1 or [min, max] of such integers; got {hops!r}")
    if low > high:
        raise ValueError(f"hops [min, max] needs min <= max; got {hops!r}")
    return int(low), int(high)


class MultiHopTask(TaskAdapter):
    """Answer ``x?`` after a list of chained assignments: ``hops`` serial lookups, no intermediate text."""

    name = "multihop"
    head = "causal_lm"
    quality_metric = "exact_match"
    higher_is_better = True
    generative = True

    def __init__(
        self,
        cache_dir: str | Path | None = None,
        hops: int | list[int] = 4,
        distractors: int = 3,
        update: str = "copy",
        order: str = "interleaved",
        queries: int | None = None,
        num_variables: int = len(NAMES),
        use_cache: bool = True,
        pairs: int = 150,
    ):
        super().__init__(cache_dir)
        self.min_hops, self.max_hops = _hop_range(hops)
        for name, value, low in (("distractors", distractors, 0), ("pairs", pairs, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
        if update not in UPDATES:
            raise ValueError(f"update must be one of {UPDATES}; got {update!r}")
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}; got {order!r}")
        chains = distractors + 1
        queries = chains if queries is None else queries
        if isinstance(queries, bool) or not isinstance(queries, int) or not 1 <= queries <= chains:
            raise ValueError(f"queries must be an integer in [1, distractors + 1 = {chains}]; got {queries!r}")
        if (
            isinstance(num_variables, bool)
            or not isinstance(num_variables, int)
            or not 1 <= num_variables <= len(NAMES)
        ):
            raise ValueError(f"num_variables must be an integer in [1, {len(NAMES)}]; got {num_variables!r}")
        if chains * self.max_hops > num_variables:
            raise ValueError(
                f"{chains} chains of up to {self.max_hops} hops need {chains * self.max_hops} distinct variables; "
                f"num_variables is {num_variables} (raise it, up to {len(NAMES)}, or use fewer hops or distractors)"
            )
        if not isinstance(use_cache, bool):
            raise ValueError(f"use_cache must be true or false; got {use_cache!r}")
        self.distractors, self.update, self.order, self.queries = distractors, update, order, queries
        self.num_variables, self.use_cache, self.num_pairs = num_variables, use_cache, pairs
        self.tokenizer = multihop_tokenizer()

    def model_config(self) -> dict[str, Any]:
        return {
            "vocab_size": len(self.tokenizer),
            "is_causal": True,
            "pad_token_id": PAD_ID,
            "bos_token_id": BOS_ID,
            "eos_token_id": EOS_ID,
        }

    def save_artifacts(self, model_dir: str | Path) -> None:
        """The tokenizer, next to the trained model (``AutoTokenizer.from_pretrained(model_dir)``)."""
        self.tokenizer.save_pretrained(str(model_dir))

    # ------------------------------------------------------------------ data

    def dataset_path(self, split: str, n: int, seed: int) -> Path:
        """Where `build_dataset` caches ``(split, n, seed)``."""
        return self.cache_dir / (
            f"{split}-hops{self.min_hops}to{self.max_hops}-d{self.distractors}-{self.update}-{self.order}"
            f"-q{self.queries}-v{self.num_variables}-{n}-seed{seed}"
        )

    def build_dataset(self, split: str, n: int, seed: int):
        """``n`` problems, deterministic in ``(split, n, seed)`` (a smaller ``n`` is a prefix), cached on disk."""
        import datasets

        check_size_and_seed(n, seed)

        def generate():
            rng = split_rng(split, seed)
            rows = [self.random_row(rng) for _ in range(n)]
            if not rows:
                return datasets.Dataset.from_dict({name: [] for name in _features()}, features=_features())
            return datasets.Dataset.from_list(rows, features=_features())

        return cached_dataset(self.dataset_path(split, n, seed), generate)

    def random_row(self, rng: np.random.Generator) -> Example:
        """One problem: the chains, their assignments in the task's order, and the questions."""
        chains = self.distractors + 1
        lengths = rng.integers(self.min_hops, self.max_hops + 1, size=chains).tolist()
        names = [NAMES[i] for i in rng.choice(self.num_variables, size=sum(lengths), replace=False).tolist()]
        variables = [names[sum(lengths[:c]) : sum(lengths[: c + 1])] for c in range(chains)]
        roots = rng.integers(0, 10, size=chains).tolist()
        deltas = [
            rng.integers(1, 10, size=length - 1).tolist() if self.update == "add" else [0] * (length - 1)
            for length in lengths
        ]
        statements = [chain_statements(v, r, d, self.update) for v, r, d in zip(variables, roots, deltas, strict=True)]
        answers = [(root + sum(delta)) % 10 for root, delta in zip(roots, deltas, strict=True)]
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
        asked = [0, *(1 + rng.permutation(chains - 1)).tolist()][: self.queries]
        return make_row(ordered, [variables[c][-1] for c in asked], [answers[c] for c in asked], lengths[0])

    # ------------------------------------------------------------------ encode / decode

    def encode(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        """Training sequences (every question and answer) right-padded, ``labels`` on the answer digits;
        rows without ``answers`` (prompts only) are encoded as their prompt, without labels."""
        if not examples:
            raise ValueError("encode needs at least one example")
        with_labels = all(example.get("answers") for example in examples)
        sequences, answer_positions = [], []
        for example in examples:
            if not with_labels:
                sequences.append(self.tokenizer(example["prompt"])["input_ids"])
                answer_positions.append([])
                continue
            ids = self.tokenizer(example["statements"] + ";")["input_ids"]
            positions = []
            for question, answer in zip(example["questions"], example["answers"], strict=True):
                ids += self.tokenizer(f"{question}?", add_special_tokens=False)["input_ids"]
                positions.append(len(ids))
                ids += [self.tokenizer.convert_tokens_to_ids(str(answer))]
                ids += [self.tokenizer.convert_tokens_to_ids(";")]
            sequences.append(ids[:-1])  # no separator after the last answer
            answer_positions.append(positions)
        batch, length = len(sequences), max(len(s) for s in sequences)
        input_ids = torch.full((batch, length), PAD_ID, dtype=torch.long)
        attention_mask = torch.zeros(batch, length, dtype=torch.long)
        labels = torch.full((batch, length), -100, dtype=torch.long)
        for k, (sequence, positions) in enumerate(zip(sequences, answer_positions, strict=True)):
            input_ids[k, : len(sequence)] = torch.tensor(sequence)
            attention_mask[k, : len(sequence)] = 1
            labels[k, positions] = input_ids[k, positions]
        encoded = {"input_ids": input_ids, "attention_mask": attention_mask}
        if with_labels:
            encoded["labels"] = labels
        return encoded

    def decode(self, logits: torch.Tensor, inputs: dict[str, torch.Tensor]) -> list[str]:
        """The answer digit predicted after the first question of every row (teacher-forced logits)."""
        if logits.ndim != 3:
            raise ValueError(f"logits must have shape (B, T, vocab); got {tuple(logits.shape)}")
        question = self.tokenizer.convert_tokens_to_ids("?")
        digit_ids = self.tokenizer.convert_tokens_to_ids(list(DIGITS))
        texts = []
        for k in range(logits.shape[0]):
            positions = (inputs["input_ids"][k] == question).nonzero()
            if positions.numel() == 0:
                raise ValueError(f"row {k}: no '?' in the input")
            scores = logits[k, int(positions[0]), digit_ids]
            texts.append(DIGITS[int(scores.argmax())])
        return texts

    @torch.no_grad()
    def complete(
        self,
        model: torch.nn.Module,
        prompts: list[str],
        num_loops: int,
        batch_size: int = 64,
        tol: float | None = None,
    ) -> list[str]:
        """The answer token ``model.generate(..., num_loops=num_loops, do_sample=False)`` writes after each
        prompt (left-padded batches of ``batch_size``; halting with ``tol``)."""
        device = next(model.parameters()).device
        texts = []
        for start in range(0, len(prompts), batch_size):
            batch = self.tokenizer(prompts[start : start + batch_size], padding=True, return_tensors="pt")
            batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
            extra = {} if tol is None else {"tol": tol}
            output = model.generate(
                **batch,
                num_loops=num_loops,
                do_sample=False,
                max_new_tokens=1,
                use_cache=self.use_cache,
                pad_token_id=PAD_ID,
                eos_token_id=EOS_ID,
                **extra,
            )
            new = output[:, batch["input_ids"].shape[1] :].cpu()
            texts.extend(self.tokenizer.batch_decode(new, skip_special_tokens=True))
        return texts

    def prompt(self, example: Example) -> str:
        """The text the model is asked to continue: the assignments and the first question."""
        return example["prompt"]

    # ------------------------------------------------------------------ metrics

    def compute_metrics(self, predictions: list[str], examples: list[Example]) -> dict[str, float]:
        """``exact_match`` of the answer (the generated text, stripped, equals the answer digit)."""
        if len(predictions) != len(examples):
            raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
        return load_local_metric("multihop_metrics").compute(
            predictions=[str(p) for p in predictions], references=[example["completion"] for example in examples]
        )

    # ------------------------------------------------------------------ perturbations

    def perturb(self, examples: list[Example], eps: float, seed: int) -> tuple[list[Example], torch.Tensor]:
        """Rows with ``max(1, round(eps))`` chains' first digits changed (answers recomputed); ``||δ||`` = the
        number of changed tokens (``eps = 0``: unchanged)."""
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0; got {eps!r}")
        if eps == 0:
            return [dict(example) for example in examples], torch.zeros(len(examples), dtype=torch.float64)
        generators = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(len(examples))]
        perturbed, norms = [], []
        for example, rng in zip(examples, generators, strict=True):
            chains = parse_chains(example["statements"])
            changes = min(max(1, round(eps)), len(chains))
            row = example
            for root in rng.permutation(sorted(chains))[:changes].tolist():
                row = change_root(row, root, int((chains[root] + rng.integers(1, 10)) % 10))
            perturbed.append(row)
            norms.append(float(changes))
        return perturbed, torch.tensor(norms, dtype=torch.float64)

    def lipschitz_pairs(self) -> list[dict[str, Any]]:
        """``pairs`` prompt pairs of the text Lipschitz probe (test-split problems at the task's hops): the
        same problem with one chain's first digit changed, in the asked chain for every other pair."""
        rng = split_rng("pairs", 0)
        pairs = []
        for k in range(self.num_pairs):
            row = self.random_row(rng)
            chains = parse_chains(row["statements"])
            asked_root = chain_of(row["statements"], row["questions"][0])
            others = [root for root in sorted(chains) if root != asked_root]
            root = asked_root if k % 2 == 0 or not others else others[int(rng.integers(len(others)))]
            other = change_root(row, root, int((chains[root] + rng.integers(1, 10)) % 10))
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


def chain_statements(variables: list[str], root: int, deltas: list[int], update: str) -> list[str]:
    """The assignments of one chain: ``v0=root``, then ``v_i=v_{i-1}`` (copy) or ``v_i=v_{i-1}+d`` (add)."""
    statements = [f"{variables[0]}={root}"]
    for previous, variable, delta in zip(variables[:-1], variables[1:], deltas, strict=True):
        statements.append(f"{variable}={previous}+{delta}" if update == "add" else f"{variable}={previous}")
    return statements


def make_row(statements: list[str], questions: list[str], answers: list[int], hops: int) -> Example:
    """A data-set row: the assignments (in order), the questions asked and their answers (the first is the prompt's)."""
    text = "; ".join(statements)
    return {
        "prompt": f"{text}; {questions[0]}?",
        "completion": str(answers[0]),
        "answer": int(answers[0]),
        "hops": int(hops),
        "statements": text,
        "questions": list(questions),
        "answers": [int(a) for a in answers],
    }


def evaluate_statements(statements: str) -> dict[str, int]:
    """The value of every variable of ``"a=4; b=a+3; ..."`` (modulo 10), in any order of the assignments."""
    rules = {}
    for statement in statements.split(";"):
        target, _, source = statement.strip().partition("=")
        name, _, delta = source.partition("+")
        rules[target] = (name, int(delta or 0))
    values: dict[str, int] = {}

    def value(variable: str) -> int:
        if variable not in values:
            name, delta = rules[variable]
            values[variable] = ((int(name) if name.isdigit() else value(name)) + delta) % 10
        return values[variable]

    for variable in rules:
        value(variable)
    return values


def parse_chains(statements: str) -> dict[str, int]:
    """``{first variable: its digit}`` of every chain in ``statements``."""
    chains = {}
    for statement in statements.split(";"):
        target, _, source = statement.strip().partition("=")
        if source.isdigit():
            chains[target] = int(source)
    return chains


def chain_of(statements: str, variable: str) -> str:
    """The first variable of the chain ``variable`` belongs to."""
    sources = {}
    for statement in statements.split(";"):
        target, _, source = statement.strip().partition("=")
        sources[target] = source.partition("+")[0]
    while not sources[variable].isdigit():
        variable = sources[variable]
    return variable


def change_root(row: Example, root: str, digit: int) -> Example:
    """``row`` with the chain starting at ``root`` given the first digit ``digit`` (answers recomputed)."""
    statements = [
        f"{root}={digit}" if s.partition("=")[0] == root else s
        for s in (s.strip() for s in row["statements"].split(";"))
    ]
    values = evaluate_statements("; ".join(statements))
    return make_row(statements, row["questions"], [values[q] for q in row["questions"]], row["hops"])


def write_lm_eval_data(
    out_dir: str | Path, hops: list[int], n: int = 500, seed: int = 0, **task_kwargs: Any
) -> list[Path]:
    """The data files of the lm-evaluation-harness tasks ``multihop_hops{k}``: ``n`` test-split problems per hop
    count (one JSON object per line: ``prompt``, ``answer``, ``hops``), written to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in hops:
        task = MultiHopTask(hops=k, **task_kwargs)
        rng = split_rng("test", seed)
        rows = [task.random_row(rng) for _ in range(n)]
        path = out / f"multihop_hops{k}.jsonl"
        path.write_text(
            "".join(json.dumps({key: row[key] for key in ("prompt", "answer", "hops")}) + "\n" for row in rows)
        )
        paths.append(path)
    return paths


def _features():
    import datasets

    sequence = getattr(datasets, "List", None) or datasets.Sequence  # `List` from datasets 4 on
    return datasets.Features(
        {
            "prompt": datasets.Value("string"),
            "completion": datasets.Value("string"),
            "answer": datasets.Value("int32"),
            "hops": datasets.Value("int32"),
            "statements": datasets.Value("string"),
            "questions": sequence(datasets.Value("string")),
            "answers": sequence(datasets.Value("int32")),
        }
    )
