"""The addition task: generator (planted carry chains), schoolbook sums, cache, encoding with mixed lengths,
local edge features, metrics, perturbations and a tiny training run."""

import math

import numpy as np
import pytest
import torch
from tiny_training import train_tiny

from implicit_hf.tasks import get_task
from implicit_hf.tasks.reasoning import addition as addition_module
from implicit_hf.tasks.reasoning.addition import EDGE_SCALE, END, PAD, START, AdditionTask


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("addition-cache")


@pytest.fixture(scope="module")
def task(cache):
    return AdditionTask(cache_dir=cache, digits=8)


@pytest.fixture(scope="module")
def rows(task):
    return list(task.build_dataset("train", 300, seed=0))


def as_int(digits):
    """The integer of a digit list, least significant digit first."""
    return sum(d * 10**i for i, d in enumerate(digits))


def test_registered_and_model_config(task):
    assert isinstance(get_task("addition", cache_dir=task.cache_dir, digits=24), AdditionTask)
    assert task.model_config() == {
        "problem_type": "single_label_classification",
        "num_labels": 10,
        "vocab_size": 103,
        "edge_features": 4,
        "is_causal": False,
    }
    for bad in ({"digits": 0}, {"digits": 2.0}, {"digits": True}, {"digits": 4, "min_digits": 5}):
        with pytest.raises(ValueError, match="digits"):
            AdditionTask(**bad)
    with pytest.raises(ValueError, match="chain_fraction"):
        AdditionTask(chain_fraction=1.5)


def test_sums_are_right_and_chains_are_planted(rows):
    lengths, runs = [], []
    for row in rows:
        n = row["digits"]
        assert 1 <= n <= 8 and len(row["a"]) == len(row["b"]) == n and len(row["sum"]) == n + 1
        assert all(0 <= d <= 9 for d in row["a"] + row["b"] + row["sum"])
        assert as_int(row["sum"]) == as_int(row["a"]) + as_int(row["b"])  # checked against python integers
        lengths.append(n)
        runs.append(row["propagate_run"])
    assert set(lengths) == set(range(1, 9))
    # uniform digits alone give a run of >= 3 propagating pairs with probability ~1e-3 per start; planted chains often
    assert sum(r >= 3 for r in runs) > 0.1 * len(rows)
    # a planted run of 9s carries only about half the time: its carry is decided at its far end
    long_runs = [row for row in rows if row["propagate_run"] >= 3]
    carried = [row["carry_chain"] >= row["propagate_run"] for row in long_runs]
    assert 0.25 < np.mean(carried) < 0.75


def test_add_digits_and_runs_by_hand():
    total, carries = addition_module.add_digits([9, 9, 1], [1, 0, 8])  # 199 + 801 = 1000
    assert total == [0, 0, 0, 1] and carries == [0, 1, 1, 1]
    row = addition_module.make_row([9, 9, 1], [1, 0, 8])
    assert row["carry_chain"] == 3 and row["propagate_run"] == 2 and row["digits"] == 3
    assert addition_module.longest_run([1, 1, 0, 1, 1, 1, 0]) == 3 and addition_module.longest_run([]) == 0
    with pytest.raises(ValueError, match="same number of digits"):
        addition_module.add_digits([1], [1, 2])


def test_generator_deterministic_and_split_dependent(rows, tmp_path):
    other_cache = AdditionTask(cache_dir=tmp_path, digits=8)
    assert list(other_cache.build_dataset("train", 300, seed=0)) == rows  # regenerated, not the cached copy
    assert list(other_cache.build_dataset("train", 20, seed=0)) == rows[:20]  # a prefix of the same stream
    for other in (other_cache.build_dataset("train", 20, seed=1), other_cache.build_dataset("test", 20, seed=0)):
        assert sum(a == b for a, b in zip(rows[:20], other, strict=True)) <= 2
    longer = list(AdditionTask(cache_dir=tmp_path, digits=24, min_digits=24).build_dataset("test", 10, seed=0))
    assert all(row["digits"] == 24 for row in longer)
    with pytest.raises(ValueError):
        other_cache.build_dataset("train", -1, seed=0)


def test_encode_mixed_lengths_and_decode_round_trip(task):
    short = addition_module.make_row([3], [4])  # 3 + 4 = 07
    long = addition_module.make_row([9, 9, 1], [1, 0, 8])
    enc = task.encode([short, long])
    assert set(enc) == {"input_ids", "attention_mask", "position_ids", "edge_features", "labels"}
    assert enc["input_ids"].tolist() == [[START, 35, END, PAD, PAD], [START, 92, 91, 19, END]]
    assert enc["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert enc["labels"].tolist() == [[-100, 7, 0, -100, -100], [-100, 0, 0, 0, 1]]
    assert torch.equal(enc["position_ids"], torch.zeros(2, 5, dtype=torch.long))  # no absolute positions
    edges = enc["edge_features"]
    assert edges.shape == (2, 5, 5, 4)
    assert torch.equal(edges[0, 3:], torch.zeros(2, 5, 4)) and torch.equal(edges[0, :, 3:], torch.zeros(5, 2, 4))
    relation = edges[1].argmax(-1)  # self 0, left neighbour 1, right neighbour 2, other 3
    assert relation[2].tolist() == [3, 1, 0, 2, 3] and relation[0].tolist() == [0, 2, 3, 3, 3]
    assert torch.equal(edges[1].sum(-1), torch.full((5, 5), EDGE_SCALE))
    assert "labels" not in task.encode([{"a": [1], "b": [2]}])
    # one-hot logits of the labels decode to the sums; padding and START are ignored
    logits = torch.nn.functional.one_hot(enc["labels"].clamp(min=0), 10).float()
    logits[enc["labels"] < 0] = 5.0
    decoded = task.decode(logits, enc)
    assert [d.tolist() for d in decoded] == [[7, 0], [0, 0, 0, 1]]
    assert task.compute_metrics(decoded, [short, long]) == {"exact_match": 1.0, "digit_accuracy": 1.0}
    with pytest.raises(ValueError, match="logits must have shape"):
        task.decode(logits[..., :2], enc)
    with pytest.raises(ValueError, match="encode needs"):
        task.encode([])
    with pytest.raises(ValueError, match="digits must be in"):
        task.encode([{"a": [10], "b": [0]}])


def test_metrics_hand_computed(task):
    row = addition_module.make_row([9, 9, 1], [1, 0, 8])  # sum digits 0 0 0 1
    right = torch.tensor([0, 0, 0, 1])
    one_wrong = torch.tensor([0, 0, 0, 0])  # the final carry missed
    two_wrong = torch.tensor([0, 9, 9, 1])
    scores = task.compute_metrics([right, one_wrong, two_wrong], [row, row, row])
    assert scores["exact_match"] == pytest.approx(1 / 3)
    assert scores["digit_accuracy"] == pytest.approx((1 + 3 / 4 + 2 / 4) / 3)
    metric = addition_module.AdditionTask.load_metric()
    assert metric.compute(predictions=[[1, 2, 0], [5, 1]], references=[[1, 2, 0], [5, 0]]) == {
        "exact_match": 0.5,
        "digit_accuracy": 0.75,
    }
    with pytest.raises(ValueError, match="prediction has shape"):
        metric.compute(predictions=[[1, 2]], references=[[1, 2, 0]])


def test_perturb(task, rows):
    perturbed, delta = task.perturb(rows[:30], 1.0, seed=0)
    assert torch.equal(delta, torch.ones(30, dtype=torch.float64))
    changed_sum = 0
    for before, after in zip(rows[:30], perturbed, strict=True):
        changes = [i for i in range(before["digits"]) if before["a"][i] != after["a"][i]]
        changes += [i for i in range(before["digits"]) if before["b"][i] != after["b"][i]]
        assert len(changes) == 1  # exactly one digit of one operand
        assert as_int(after["sum"]) == as_int(after["a"]) + as_int(after["b"])  # recomputed
        changed_sum += after["sum"] != before["sum"]
    assert changed_sum == 30  # a changed digit always changes the sum
    again, _ = task.perturb(rows[:30], 1.0, seed=0)
    other, _ = task.perturb(rows[:30], 1.0, seed=1)
    assert again == perturbed and other != perturbed
    unchanged, zero = task.perturb(rows[:2], 0.0, seed=0)
    assert unchanged == rows[:2] and torch.equal(zero, torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="eps"):
        task.perturb(rows[:2], -1.0, seed=0)


def test_model_is_length_independent_and_padding_free(task):
    from implicit_hf.tasks.models import build_model

    torch.manual_seed(0)
    model = build_model(
        task, hidden_size=32, num_attention_heads=4, num_prelude_layers=0, num_core_layers=1, num_coda_layers=0
    ).eval()
    rng = np.random.default_rng(0)
    short = addition_module.make_row(*addition_module.random_problem(rng, 3, 3, 0.0))
    long = addition_module.make_row(*addition_module.random_problem(rng, 30, 30, 1.0))
    enc = task.encode([short, long])
    out = model(**enc, num_loops=3)
    assert out.logits.shape == (2, 32, 10) and torch.isfinite(out.loss)
    alone = model(**task.encode([short]), num_loops=3)
    assert torch.allclose(alone.logits[0], out.logits[0, :5], atol=1e-4)  # padding changes nothing
    # the operator is local: after t loops a token sees only t neighbours on each side, so changing the
    # most significant digit of the long problem leaves the outputs of the low digits unchanged
    changed = dict(long, a=long["a"][:-1] + [(long["a"][-1] + 1) % 10])
    for t in (1, 3):
        base = model(**task.encode([long]), num_loops=t).logits[0]
        moved = model(**task.encode([changed]), num_loops=t).logits[0]
        far = slice(0, 30 - t - 1)  # tokens more than t positions below the changed one (token 30)
        # attention's "other" bias is soft, so tokens far away are nearly, not exactly, independent
        assert (moved[far] - base[far]).abs().max() < (moved[30] - base[30]).abs().max()


def test_training_run_lowers_the_loss(tmp_path, monkeypatch):
    losses, result = train_tiny(
        tmp_path,
        monkeypatch,
        "addition",
        {"num_loops": 4},
        task_module="implicit_hf.tasks.reasoning.addition",
        task_kwargs={"digits": 4},
        max_steps=60,
    )
    assert len(losses) == 6 and all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < 0.7 * losses[0], losses
    assert result.metrics["eval/loss"] < 0.8 * losses[0]
    assert (tmp_path / "cache" / "addition" / "train-digits1to4-chain0.5-64-seed0").is_dir()
