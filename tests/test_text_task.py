"""The local-text language-modelling task (healing data for converted LLMs; perplexity vs loops)."""

import math

import pytest
import torch
from test_convert import character_tokenizer

import implicit_hf.tasks.text  # noqa: F401  (registers the task)
from implicit_hf.eval import sweep
from implicit_hf.tasks.models import build_model
from implicit_hf.tasks.text import TextTask, corpus_text


@pytest.fixture
def task(tmp_path):
    character_tokenizer().save_pretrained(tmp_path / "tokenizer")
    return TextTask(cache_dir=tmp_path / "cache", tokenizer=str(tmp_path / "tokenizer"), seq_len=32)


def test_splits_are_disjoint_deterministic_and_cached(task):
    train = task.build_dataset("train", 200, seed=0)
    test = task.build_dataset("test", 50, seed=0)
    assert len(train) == 200 and len(test) == 50 and len(train[0]["input_ids"]) == 32
    assert not {tuple(r) for r in train["input_ids"]} & {tuple(r) for r in test["input_ids"]}
    assert task.build_dataset("train", 200, seed=0)["input_ids"] == train["input_ids"]
    assert task.build_dataset("train", 200, seed=1)["input_ids"] != train["input_ids"]
    corpus = task.tokenizer(corpus_text("pydoc"), add_special_tokens=False).input_ids
    windows = {tuple(corpus[i : i + 32]) for i in range(0, len(corpus) - 31, 32)}
    assert all(tuple(row) in windows for row in train["input_ids"])  # contiguous windows of the corpus


def test_default_character_tokenizer_round_trips_the_corpus(tmp_path):
    task = TextTask(cache_dir=tmp_path / "cache", seq_len=48)
    row = task.build_dataset("validation", 3, seed=0)[0]["input_ids"]
    text = "".join(task.tokenizer.convert_ids_to_tokens(row))
    assert len(row) == 48 and text in corpus_text("pydoc")  # every character is in the vocabulary
    task.save_artifacts(tmp_path / "model")
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "model").convert_ids_to_tokens(row) == list(text)


def test_bad_arguments_are_refused(task, tmp_path):
    with pytest.raises(ValueError, match="seq_len must be an integer >= 2"):
        TextTask(cache_dir=tmp_path, seq_len=1)
    with pytest.raises(ValueError, match="corpus must be 'pydoc' or the path"):
        TextTask(cache_dir=tmp_path, tokenizer=task.tokenizer_path, corpus="/nonexistent.txt").build_dataset(
            "test", 1, 0
        )
    with pytest.raises(ValueError, match="asked for 100000"):
        task.build_dataset("test", 100000, seed=0)


def test_perplexity_is_computed_from_the_model_logits(task):
    rows = task.build_dataset("test", 4, seed=0).to_list()
    inputs = task.encode(rows)
    logits = torch.zeros(4, 32, len(task.tokenizer))  # a uniform model
    metrics = task.compute_metrics(task.decode(logits, inputs), rows)
    assert metrics["perplexity"] == pytest.approx(len(task.tokenizer), rel=1e-6)
    assert metrics["nll"] == pytest.approx(math.log(len(task.tokenizer)), rel=1e-6)


def test_perturb_changes_one_token(task):
    rows = task.build_dataset("test", 8, seed=0).to_list()
    perturbed, norms = task.perturb(rows, eps=1.0, seed=0)
    for row, other in zip(rows, perturbed, strict=True):
        assert sum(a != b for a, b in zip(row["input_ids"], other["input_ids"], strict=True)) == 1
    assert torch.equal(norms, torch.ones(8))


def test_sweep_scores_perplexity_at_every_loop_count(task):
    torch.manual_seed(0)
    model = build_model(
        task, hidden_size=32, num_attention_heads=4, num_prelude_layers=1, num_core_layers=1, num_coda_layers=1
    ).eval()
    rows = task.build_dataset("test", 8, seed=0).to_list()
    result = sweep(model, task, rows, loops=[1, 2, 4], batch_size=4)
    assert [r["loops"] for r in result["records"]] == [1, 2, 4]
    for record in result["records"]:
        with torch.no_grad():
            direct = model(**{k: v for k, v in task.encode(rows).items() if k != "labels"}, num_loops=record["loops"])
        expected = task.compute_metrics(task.decode(direct.logits, task.encode(rows)), rows)["perplexity"]
        assert record["quality"] == pytest.approx(expected, rel=1e-5)


def test_copy_fraction_writes_half_windows_twice(task, tmp_path):
    kwargs = {"cache_dir": tmp_path / "cache", "tokenizer": task.tokenizer_path, "seq_len": 31}
    copying, plain = TextTask(**kwargs, copy_fraction=0.5), TextTask(**kwargs)
    rows = copying.build_dataset("train", 200, seed=0)["input_ids"]
    originals = plain.build_dataset("train", 200, seed=0)["input_ids"]
    copied = [row[:16] == old[:16] and row[16:] == row[:15] for row, old in zip(rows, originals, strict=True)]
    untouched = [row == old for row, old in zip(rows, originals, strict=True)]
    assert all(c or u for c, u in zip(copied, untouched, strict=True)) and all(len(row) == 31 for row in rows)
    assert 70 <= sum(copied) <= 130  # about half, drawn from the seed
    assert copying.build_dataset("train", 200, seed=0)["input_ids"] == rows
    assert copying.dataset_path("train", 200, 0) != plain.dataset_path("train", 200, 0)
    every_row = TextTask(cache_dir=tmp_path, seq_len=64, copy_fraction=1).build_dataset("test", 4, 0)["input_ids"]
    assert all(row[:32] == row[32:] for row in every_row)
    for bad in (-0.1, 1.5, True, "half"):
        with pytest.raises(ValueError, match="copy_fraction must be a number in \\[0, 1\\]"):
            TextTask(cache_dir=tmp_path, copy_fraction=bad)
