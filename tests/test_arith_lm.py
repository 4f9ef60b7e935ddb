"""The arith_lm task (a causal implicit LM writing running totals): tokenizer, data, label masking, a tiny
training run with the tokenizer saved next to the model, batched generation, the generate-based sweep and the
text Lipschitz probe."""

import json
import math
from pathlib import Path

import pytest
import torch
from tiny_training import train_tiny

from implicit_hf.eval import generative, run_eval, sweep
from implicit_hf.eval.generative import complete, text_lipschitz_probe
from implicit_hf.tasks import get_task
from implicit_hf.tasks.edit_distance import word_edit_distance
from implicit_hf.tasks.generation import BOS_ID, EOS_ID, PAD_ID
from implicit_hf.tasks.reasoning import arith_lm
from implicit_hf.tasks.reasoning.arith_lm import ArithLMTask


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("arith-cache")


@pytest.fixture(scope="module")
def task(cache):
    return ArithLMTask(cache_dir=cache)


@pytest.fixture(scope="module")
def rows(task):
    return list(task.build_dataset("train", 200, seed=0))


@pytest.fixture(scope="module")
def tiny_model(task, tiny_task_model):
    return tiny_task_model(task, num_loops=8)  # the config's default


def test_registered_and_model_config(task):
    assert isinstance(get_task("arith_lm", cache_dir=task.cache_dir, max_terms=4), ArithLMTask)
    assert task.model_config() == {
        "vocab_size": 18,
        "is_causal": True,
        "pad_token_id": PAD_ID,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
    }
    with pytest.raises(ValueError, match="min_terms"):
        ArithLMTask(min_terms=4, max_terms=3)
    with pytest.raises(ValueError, match="max_operand"):
        ArithLMTask(max_operand=0)
    with pytest.raises(ValueError, match="use_cache"):
        ArithLMTask(use_cache="yes")


def test_tokenizer_round_trip_and_save_load(task, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = task.tokenizer
    text = "12 + 7 - 3 = 19 16"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == BOS_ID and len(ids) == len(text) + 1  # one token per character, after [BOS]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.convert_ids_to_tokens(ids[1:3]) == ["1", "2"]
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id) == (PAD_ID, EOS_ID, BOS_ID)
    assert tokenizer.padding_side == "left"
    batch = tokenizer(["1 + 2 =", "12 + 17 ="], padding=True)
    assert batch["input_ids"][0][:2] == [PAD_ID, PAD_ID] and batch["attention_mask"][0][:3] == [0, 0, 1]
    task.save_artifacts(tmp_path)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert loaded(text)["input_ids"] == ids and loaded.decode(ids, skip_special_tokens=True) == text
    assert loaded.padding_side == "left" and loaded.pad_token == "[PAD]" and loaded.eos_token == "[EOS]"
    assert len(loaded) == len(tokenizer) == 18


def test_dataset_deterministic_and_right(task, rows, tmp_path):
    other = ArithLMTask(cache_dir=tmp_path)
    assert list(other.build_dataset("train", 200, seed=0)) == rows  # regenerated, not the cached copy
    assert list(other.build_dataset("train", 20, seed=0)) == rows[:20]  # a prefix
    assert sum(a == b for a, b in zip(rows[:20], other.build_dataset("test", 20, seed=0), strict=True)) <= 2
    assert {row["terms"] for row in rows} == {2, 3}
    for row in rows:
        words = row["prompt"].split()
        assert words[-1] == "=" and len(words) == 2 * row["terms"]
        total = int(words[0])
        totals = []
        for op, value in zip(words[1:-1:2], words[2:-1:2], strict=True):
            total = total + int(value) if op == "+" else total - int(value)
            totals.append(total)
        assert row["completion"] == "".join(f" {t}" for t in totals) and row["answer"] == totals[-1]
        assert min(totals) >= 0 and max(row["operands"]) <= 29
    assert any("-" in row["ops"] for row in rows) and any("+" in row["ops"] for row in rows)


def test_labels_mask_prompt_and_padding(task, rows):
    batch = [rows[0], rows[3]]  # 2 and 3 terms: different lengths
    enc = task.encode(batch)
    assert set(enc) == {"input_ids", "attention_mask", "labels"}
    for k, row in enumerate(batch):
        prompt = task.tokenizer(row["prompt"])["input_ids"]
        completion = task.tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [EOS_ID]
        length = len(prompt) + len(completion)
        assert enc["input_ids"][k, :length].tolist() == prompt + completion  # right-padded for training
        assert enc["attention_mask"][k].tolist() == [1] * length + [0] * (enc["input_ids"].shape[1] - length)
        labels = enc["labels"][k].tolist()
        assert labels[: len(prompt)] == [-100] * len(prompt)  # [BOS] and the prompt
        assert labels[len(prompt) : length] == completion  # the completion and [EOS]
        assert labels[length:] == [-100] * (len(labels) - length)  # padding
        assert all(i == PAD_ID for i in enc["input_ids"][k, length:].tolist())
    assert "labels" not in task.encode([{"prompt": "1 + 2 ="}])
    # decode: one-hot logits of the next token give the completion back (teacher forcing)
    logits = torch.nn.functional.one_hot(enc["input_ids"].roll(-1, dims=1), 18).float()
    assert task.decode(logits, enc) == [batch[0]["completion"], batch[1]["completion"]]


def test_metrics_and_edit_distance(task, rows):
    assert word_edit_distance("12 + 7 =", "12 + 7 =") == 0
    assert word_edit_distance("12 + 7 =", "12 - 7 =") == 1
    assert word_edit_distance("12 + 7 =", "13 + 8 =") == 2
    assert word_edit_distance("a b c", "a c") == 1 and word_edit_distance("", "a b") == 2
    assert word_edit_distance("a b c d", "b c d a") == 2  # delete the first word, append it
    assert word_edit_distance("kitten sat", "sitting sat on") == 2
    row = arith_lm.make_row([12, 7, 3], ["+", "-"])
    assert row["prompt"] == "12 + 7 - 3 =" and row["completion"] == " 19 16" and row["answer"] == 16
    scores = task.compute_metrics([" 19 16", " 18 16", " 19 15", ""], [row] * 4)
    assert scores == {"answer_accuracy": 0.5, "exact_match": 0.25}


def test_perturb_changes_words(task, rows):
    for words in (1, 2):
        perturbed, delta = task.perturb(rows[:30], float(words), seed=0)
        for before, after, d in zip(rows[:30], perturbed, delta.tolist(), strict=True):
            assert d == word_edit_distance(before["prompt"], after["prompt"])
            assert 1 <= d <= words and after["ops"] == before["ops"]
            assert after == {**before, **arith_lm.make_row(after["operands"], after["ops"])}  # recomputed
        assert sum(delta.tolist()) > (1.5 * 30 if words == 2 else 29)
    unchanged, zero = task.perturb(rows[:2], 0.0, seed=0)
    assert unchanged == rows[:2] and zero.tolist() == [0.0, 0.0]


def test_pairs_file_committed_and_valid(task):
    pairs = task.lipschitz_pairs()
    assert 100 <= len(pairs) <= 200
    distances = [word_edit_distance(p["prompt_a"], p["prompt_b"]) for p in pairs]
    assert set(distances) == {1, 2} and distances == [p["prompt_distance"] for p in pairs]
    for pair in pairs:  # the recorded answers are right
        for side in "ab":
            words = pair[f"prompt_{side}"].split()
            total = int(words[0])
            for op, value in zip(words[1:-1:2], words[2:-1:2], strict=True):
                total = total + int(value) if op == "+" else total - int(value)
            assert total == pair[f"answer_{side}"]


def test_batched_left_padded_generation_equals_per_sample(task, rows, tiny_model):
    prompts = [row["prompt"] for row in rows[:6]]
    batched = complete(tiny_model, task, prompts, num_loops=3, batch_size=6)
    alone = [complete(tiny_model, task, [p], num_loops=3, batch_size=1)[0] for p in prompts]
    assert batched == alone
    assert all(isinstance(text, str) and len(text) <= task.max_new_tokens for text in batched)
    uncached = ArithLMTask(cache_dir=task.cache_dir, use_cache=False)
    assert complete(tiny_model, uncached, prompts, num_loops=3, batch_size=6) == batched


def test_generative_sweep_scores_generated_text(task, rows, tiny_model, tmp_path, monkeypatch):
    pairs = task.lipschitz_pairs()[:6]
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    small = ArithLMTask(cache_dir=task.cache_dir, pairs_file=str(pairs_file))
    result = sweep(tiny_model, small, rows[:8], [1, 2, 4], batch_size=4, return_predictions=True)
    assert result["generative"] is True and result["loops"] == [1, 2, 4] and result["num_pairs"] == 6
    assert [r["loops"] for r in result["records"]] == [1, 2, 4]
    for record in result["records"]:
        texts = result["predictions"][record["loops"]]
        assert texts == complete(tiny_model, small, [r["prompt"] for r in rows[:8]], record["loops"], 4)
        assert record["metrics"] == small.compute_metrics(texts, rows[:8])  # scored from the generated text
        assert record["quality"] == record["metrics"]["answer_accuracy"]
        assert record["seconds"] > 0 and record["flops"] > 0 and record["rel_residual_mean"] is None
        assert record["lipschitz"] == record["text_lipschitz"]["ratio_max"] >= record["lipschitz_mean"] >= 0
    # the same rows with a "model" that writes the right answers: the sweep's accuracy follows the text
    oracle = ArithLMTask(cache_dir=task.cache_dir, pairs_file=str(pairs_file))
    answers = {row["prompt"]: row["completion"] for row in rows[:8]}
    monkeypatch.setattr(
        generative,
        "complete",
        lambda model, task, prompts, num_loops, batch_size=64, tol=None, width=None, agreement=None: [
            answers.get(p, "") if num_loops > 1 else " 0" for p in prompts
        ],
    )
    scored = sweep(tiny_model, oracle, rows[:8], [1, 2], perturb_eps=0)
    assert [r["quality"] for r in scored["records"]] == [
        sum(row["answer"] == 0 for row in rows[:8]) / 8,
        1.0,
    ]
    assert scored["records"][1]["metrics"]["exact_match"] == 1.0 and scored["records"][0]["lipschitz"] is None


def test_text_lipschitz_probe_ratios(task, tiny_model, monkeypatch):
    pairs = [
        {"prompt_a": "1 + 2 =", "prompt_b": "1 + 3 ="},  # 1 word apart
        {"prompt_a": "5 + 5 =", "prompt_b": "6 + 4 ="},  # 2 words apart
    ]
    fake = ArithLMTask(cache_dir=task.cache_dir)
    outputs = {"1 + 2 =": " 3", "1 + 3 =": " 4", "5 + 5 =": " 10", "6 + 4 =": " 10"}
    monkeypatch.setattr(
        generative,
        "complete",
        lambda model, task, prompts, num_loops, batch_size=64, tol=None, width=None, agreement=None: [
            outputs[p] + (" x" * num_loops if p == "1 + 3 =" else "") for p in prompts
        ],
    )
    records = text_lipschitz_probe(tiny_model, fake, pairs, [1, 2])
    # loops 1: outputs " 3" vs " 4 x" -> 2 words apart / 1; " 10" vs " 10" -> 0 / 2
    assert records[0]["ratios"] == [2.0, 0.0] and records[0]["ratio_max"] == 2.0 and records[0]["ratio_mean"] == 1.0
    assert records[1]["ratios"] == [3.0, 0.0] and records[1]["changed_fraction"] == 0.5
    with pytest.raises(ValueError, match="identical"):
        text_lipschitz_probe(tiny_model, fake, [{"prompt_a": "1 + 2 =", "prompt_b": "1 + 2 ="}], [1])


def test_training_saves_tokenizer_and_lowers_the_loss(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import implicit_hf  # noqa: F401  (registers the Auto classes)

    losses, result = train_tiny(
        tmp_path,
        monkeypatch,
        "arith_lm",
        {"num_loops": 2},
        task_module="implicit_hf.tasks.reasoning.arith_lm",
        max_steps=60,
    )
    assert len(losses) == 6 and all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < 0.7 * losses[0], losses
    model_dir = tmp_path / "out" / "model"
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    assert tokenizer("3 + 4 =")["input_ids"] == ArithLMTask().tokenizer("3 + 4 =")["input_ids"]
    batch = tokenizer(["3 + 4 =", "12 + 17 - 3 ="], padding=True, return_tensors="pt")
    out = model.generate(**batch, num_loops=2, do_sample=False, max_new_tokens=4, pad_token_id=PAD_ID)
    assert out.shape[0] == 2 and out.shape[1] <= batch["input_ids"].shape[1] + 4
    # implicit-hf eval on the trained model: one generate per loop count, the text probe, results and plots
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps(p) + "\n" for p in ArithLMTask().lipschitz_pairs()[:4]))
    report = run_eval(
        model_dir, None, "1,2", tmp_path / "eval", n=6, batch_size=6, task_kwargs={"pairs_file": str(pairs_file)}
    )
    assert report["task"]["name"] == "arith_lm" and report["run"]["generative"] is True
    assert [r["loops"] for r in report["records"]] == [1, 2] and report["run"]["num_pairs"] == 4
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert [r["quality"] for r in saved["records"]] == [r["quality"] for r in report["records"]]
    names = {Path(f).name for f in report["files"]}
    assert {"results.csv", "quality_vs_loops.png", "lipschitz_vs_loops.png"} <= names
    assert all((tmp_path / "eval" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in names if ".png" in name)
