"""The multihop task: data, tokenizer, labels, metric, perturbations, generation, and its lm-eval tasks."""

import copy
import json

import pytest
import torch

from implicit_hf import ImplicitForCausalLM
from implicit_hf.eval.generative import complete
from implicit_hf.tasks.base import get_task
from implicit_hf.tasks.generation import GenerativeTask
from implicit_hf.tasks.reasoning.multihop import (
    LM_EVAL_DIR,
    NAMES,
    MultiHopTask,
    evaluate_statements,
    lm_eval_hops,
    parse_statements,
    write_lm_eval_data,
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("multihop_cache")


@pytest.fixture(scope="module")
def task(cache):
    return get_task("multihop", cache_dir=cache, hops=[1, 5], distractors=2)


@pytest.fixture(scope="module")
def rows(task):
    return list(task.build_dataset("train", 64, 0))


@pytest.fixture(scope="module")
def tiny_model(task, tiny_task_model):
    return tiny_task_model(task, num_loops=3, initializer_range=0.2)


def chains_of(statements: str) -> list[list[str]]:
    """The chains of a problem, each as its variables in chain order."""
    rules = parse_statements(statements)
    followers = {source: target for target, (source, _) in rules.items()}
    chains = []
    for root in (target for target, (source, _) in rules.items() if source.isdigit()):
        chain = [root]
        while chain[-1] in followers:
            chain.append(followers[chain[-1]])
        chains.append(chain)
    return chains


def statement_order(statements: str) -> list[str]:
    return [s.strip().partition(">")[2] for s in statements.split(";")]


def test_registered_and_model_config(task):
    assert isinstance(task, MultiHopTask) and isinstance(task, GenerativeTask) and task.head == "causal_lm"
    config = task.model_config()
    assert config["vocab_size"] == len(task.tokenizer) == 4 + 10 + 4 + len(NAMES) and config["is_causal"]


def test_every_name_digit_and_symbol_is_one_token(task, rows, tmp_path):
    prompt = rows[0]["prompt"]
    tokens = task.tokenizer.convert_ids_to_tokens(task.tokenizer(prompt)["input_ids"])
    assert tokens[0] == "[BOS]" and "".join(tokens[1:]) == prompt.replace(" ", "")
    assert task.tokenizer.unk_token_id not in task.tokenizer(prompt)["input_ids"]
    task.save_artifacts(tmp_path)
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(prompt)["input_ids"] == task.tokenizer(prompt)["input_ids"] and loaded.padding_side == "left"


def test_problems_are_right_and_deterministic(task, rows, cache):
    again = list(MultiHopTask(cache_dir=cache / "other", hops=[1, 5], distractors=2).build_dataset("train", 64, 0))
    assert again == rows
    assert list(task.build_dataset("train", 8, 0)) != list(task.build_dataset("train", 8, 1))
    hops_seen = set()
    for row in rows:
        values = evaluate_statements(row["statements"])
        assert row["answers"] == [values[q] for q in row["questions"]] and row["answer"] == row["answers"][0]
        chains = chains_of(row["statements"])
        assert len(chains) == 3 and sum(len(c) for c in chains) == len(row["statements"].split(";"))
        assert all(1 <= len(chain) <= 5 for chain in chains)
        assert sorted(row["questions"]) == sorted(values)  # questions="all": every variable is asked once
        asked = next(chain for chain in chains if chain[-1] == row["questions"][0])  # the prompt asks a chain's last
        assert row["hops"] == len(asked) and row["prompt"] == f"{row['statements']}; ?{row['questions'][0]}"
        order = statement_order(row["statements"])
        for chain in chains:  # interleaved: every chain keeps its order
            assert [order.index(v) for v in chain] == sorted(order.index(v) for v in chain)
        hops_seen.add(row["hops"])
    assert hops_seen == {1, 2, 3, 4, 5}
    last = list(MultiHopTask(cache_dir=cache, hops=3, distractors=2, questions="last").build_dataset("test", 5, 0))
    for row in last:
        assert sorted(row["questions"]) == sorted(chain[-1] for chain in chains_of(row["statements"]))


def test_add_update_and_shuffled_order(cache):
    task = MultiHopTask(cache_dir=cache, hops=4, distractors=1, update="add", order="shuffled")
    rows = list(task.build_dataset("test", 40, 0))
    assert all("+" in row["statements"] and row["hops"] == 4 for row in rows)
    for row in rows:
        assert row["answers"] == [evaluate_statements(row["statements"])[q] for q in row["questions"]]
    in_order = 0
    for row in rows:
        order = statement_order(row["statements"])
        in_order += all(
            [order.index(v) for v in chain] == sorted(order.index(v) for v in chain)
            for chain in chains_of(row["statements"])
        )
    assert in_order < len(rows) // 2  # shuffled: chains are mostly out of order
    assert evaluate_statements("a+3>b; 9>a; b+5>c") == {"b": 2, "a": 9, "c": 7}


def test_training_questions_see_the_assignments_and_themselves_only(task, rows):
    batch = task.encode(rows[:4])
    ids, mask, positions, labels = (batch[k] for k in ("input_ids", "attention_mask", "position_ids", "labels"))
    assert mask.shape == (4, 1, ids.shape[1], ids.shape[1]) and mask.dtype == torch.bool
    tokens = task.tokenizer.convert_ids_to_tokens
    for k, row in enumerate(rows[:4]):
        prefix = len(task.tokenizer(row["statements"] + ";")["input_ids"])
        assert tokens(ids[k, :prefix].tolist())[1:] == task.tokenizer.tokenize(row["statements"] + ";")
        assert torch.equal(mask[k, 0, :prefix, :prefix], torch.ones(prefix, prefix, dtype=torch.bool).tril())
        for q, (name, answer) in enumerate(zip(row["questions"], row["answers"], strict=True)):
            at = prefix + 3 * q
            assert tokens(ids[k, at : at + 3].tolist()) == ["?", name, str(answer)]
            assert positions[k, at : at + 3].tolist() == [prefix, prefix + 1, prefix + 2]  # as if right after
            seen = mask[k, 0, at + 1].nonzero().squeeze(1).tolist()
            assert seen == [*range(prefix), at, at + 1]  # the assignments and this question, nothing else
            assert labels[k, at + 2] == ids[k, at + 2] and (labels[k, at : at + 2] == -100).all()
        assert int((labels[k] != -100).sum()) == len(row["questions"])
        end = prefix + 3 * len(row["questions"])
        assert (ids[k, end:] == 0).all() and all(mask[k, 0, t].nonzero().squeeze(1).tolist() == [t] for t in
                                                 range(end, ids.shape[1]))  # fmt: skip
    prompts = task.encode([{"prompt": row["prompt"]} for row in rows[:2]])
    assert "labels" not in prompts and prompts["attention_mask"].ndim == 2


def test_a_question_alone_in_training_is_the_prompt_at_evaluation(task, rows, tiny_model):
    """The logits at a training question equal the logits of the same prompt run on its own."""
    row = rows[3]
    batch = task.encode([row])
    with torch.no_grad():
        trained = tiny_model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
        for q, name in enumerate(row["questions"][:3]):
            prompt = task.tokenizer(f"{row['statements']}; ?{name}", return_tensors="pt")
            alone = tiny_model(**prompt, use_cache=False).logits[0, -1]
            at = len(task.tokenizer(row["statements"] + ";")["input_ids"]) + 3 * q + 1
            torch.testing.assert_close(trained[0, at], alone, atol=1e-5, rtol=1e-5)


def test_eager_attention_reads_the_four_dimensional_mask_like_sdpa(task, rows, tiny_model):
    batch = {k: v for k, v in task.encode(rows[:3]).items() if k != "labels"}
    eager = ImplicitForCausalLM._from_config(copy.deepcopy(tiny_model.config), attn_implementation="eager")
    eager.load_state_dict(tiny_model.state_dict())
    assert eager.config._attn_implementation == "eager" and tiny_model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        expected = tiny_model(**batch, use_cache=False).logits
        got = eager.eval()(**batch, use_cache=False).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_decode_reads_the_digit_at_the_first_question(task, rows):
    batch = task.encode(rows[:3])
    logits = torch.zeros(*batch["input_ids"].shape, len(task.tokenizer))
    question = task.tokenizer.convert_tokens_to_ids("?")
    for k in range(3):
        name = int((batch["input_ids"][k] == question).nonzero()[0]) + 1
        logits[k, name, task.tokenizer.convert_tokens_to_ids(str(rows[k]["answer"]))] = 5.0
    assert task.decode(logits, batch) == [str(row["answer"]) for row in rows[:3]]
    metrics = task.compute_metrics(task.decode(logits, batch), rows[:3])
    assert metrics == {"exact_match": 1.0}
    references = [{"completion": "9"}, {"completion": "1"}, {"completion": "3"}]
    assert task.compute_metrics(["9 ", "x", " 3"], references) == {"exact_match": pytest.approx(2 / 3)}


def test_perturb_and_lipschitz_pairs_differ_by_one_token(task, rows):
    perturbed, norms = task.perturb(rows[:10], 1.0, seed=0)
    for row, other, norm in zip(rows[:10], perturbed, norms, strict=True):
        a, b = task.tokenizer(row["prompt"])["input_ids"], task.tokenizer(other["prompt"])["input_ids"]
        assert len(a) == len(b) and sum(x != y for x, y in zip(a, b, strict=True)) == 1 and norm == 1
        assert other["answers"] == [evaluate_statements(other["statements"])[q] for q in other["questions"]]
    pairs = task.lipschitz_pairs()
    assert len(pairs) == 150
    changed = 0
    for pair in pairs:
        a, b = task.tokenizer(pair["prompt_a"])["input_ids"], task.tokenizer(pair["prompt_b"])["input_ids"]
        assert len(a) == len(b) and sum(x != y for x, y in zip(a, b, strict=True)) == 1
        changed += pair["answer_a"] != pair["answer_b"]
    assert changed == 75  # every other pair edits the asked chain (a new first digit changes its answer)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"hops": 0}, "hops must be an integer >= 1"),
        ({"hops": [5, 2]}, "min <= max"),
        ({"hops": "many"}, "hops must be"),
        ({"distractors": -1}, "distractors must be an integer >= 0"),
        ({"update": "mul"}, "update must be one of"),
        ({"order": "sorted"}, "order must be one of"),
        ({"questions": "some"}, "questions must be one of"),
        ({"hops": 40, "distractors": 20}, "need 840 distinct variables"),
        ({"num_variables": 1000}, "num_variables must be an integer in"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message, cache):
    with pytest.raises(ValueError, match=message):
        MultiHopTask(cache_dir=cache, **kwargs)


def test_batched_generation_equals_per_sample_and_halting_runs(task, rows, tiny_model):
    prompts = [row["prompt"] for row in rows[:5]]
    batched = complete(tiny_model, task, prompts, num_loops=3, batch_size=5)
    alone = [complete(tiny_model, task, [p], num_loops=3, batch_size=1)[0] for p in prompts]
    assert batched == alone and all(len(task.tokenizer.tokenize(text)) == 1 for text in batched)  # one new token
    halted = complete(tiny_model, task, prompts, num_loops=30, batch_size=5, tol=1e-3)
    assert len(halted) == 5


# --------------------------------------------------------------------------------------------------
# lm-evaluation-harness tasks


def test_shipped_lm_eval_tasks_and_their_data(tmp_path, task):
    assert lm_eval_hops() == [1, 2, 4, 8, 16, 32]
    paths = write_lm_eval_data(tmp_path, [2, 16], n=12, distractors=2)
    assert [p.name for p in paths] == ["multihop_hops2.jsonl", "multihop_hops16.jsonl"]
    docs = [json.loads(line) for line in paths[1].read_text().splitlines()]
    assert len(docs) == 12 and all(doc["hops"] == 16 for doc in docs)
    test_split = list(MultiHopTask(cache_dir=tmp_path / "c", hops=16, distractors=2).build_dataset("test", 12, 0))
    assert [d["prompt"] for d in docs] == [row["prompt"] for row in test_split]  # the task's own test split
    settings = json.loads((tmp_path / "multihop_settings.json").read_text())
    assert settings == {"hops": [2, 16], "n": 12, "seed": 0, "task_kwargs": {"distractors": 2}}
    with pytest.raises(ValueError, match="no lm-eval task for hops \\[3\\]"):
        write_lm_eval_data(tmp_path, [3])


def test_lm_eval_data_command(tmp_path, capsys, monkeypatch):
    from implicit_hf import cli

    cli.main(["lm-eval-data", "multihop", "--hops", "1,4", "--n", "5", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "wrote 2 files" in printed and f"--include_path {LM_EVAL_DIR}" in printed
    assert "--tasks multihop_hops1,multihop_hops4" in printed and str(tmp_path) in printed
    assert len((tmp_path / "multihop_hops4.jsonl").read_text().splitlines()) == 5
    monkeypatch.setenv("IMPLICIT_HF_LM_EVAL_DATA", str(tmp_path / "default"))
    cli.main(["lm-eval-data", "multihop", "--hops", "2", "--n", "3"])
    assert (tmp_path / "default" / "multihop_hops2.jsonl").is_file() and "--metadata" not in capsys.readouterr().out
    for argv, message in (
        (["--hops", "5"], "no lm-eval task for hops"),
        (["--task-kwargs", '{"colour": 1}'], "unexpected keyword argument 'colour'"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["lm-eval-data", "multihop", *argv, "--out", str(tmp_path)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("implicit-hf lm-eval-data: error: ") and message in err


@pytest.fixture(scope="module")
def lm_eval_setup(tmp_path_factory, task, tiny_model):
    root = tmp_path_factory.mktemp("multihop_lm_eval")
    tiny_model.save_pretrained(root / "model")
    task.save_artifacts(root / "model")
    write_lm_eval_data(root / "data", [2, 4], n=16, distractors=2)
    return root


def test_missing_data_names_the_command(tmp_path):
    from implicit_hf.tasks.reasoning.lm_eval_tasks.multihop_data import load

    with pytest.raises(FileNotFoundError, match="implicit-hf lm-eval-data multihop"):
        load(hops=4, data_dir=str(tmp_path))


def test_one_trajectory_sweep_equals_one_pass_per_loop_count(lm_eval_setup, tmp_path):
    from implicit_hf.eval.lm_eval_bridge import lm_eval_sweep

    settings = dict(
        tasks=["multihop_hops2", "multihop_hops4"], loops="1,2,5", include_path=LM_EVAL_DIR, batch_size=4,
        metadata={"data_dir": str(lm_eval_setup / "data")}, log_samples=True,
    )  # fmt: skip
    shared = lm_eval_sweep(lm_eval_setup / "model", out_dir=tmp_path / "shared", **settings)
    separate = lm_eval_sweep(lm_eval_setup / "model", out_dir=tmp_path / "separate", share_trajectory=False, **settings)
    for a, b in zip(shared["runs"], separate["runs"], strict=True):
        assert a["tasks"] == b["tasks"]
        for name in ("multihop_hops2", "multihop_hops4"):
            scores_a = [r[0][0] for s in a["samples"][name] for r in s["resps"]]
            scores_b = [r[0][0] for s in b["samples"][name] for r in s["resps"]]
            assert len(scores_a) == 16 * 10 and scores_a == pytest.approx(scores_b, abs=1e-5)
    first, last = (shared["runs"][i]["samples"]["multihop_hops4"][0]["resps"] for i in (0, -1))
    assert [r[0][0] for r in first] != pytest.approx([r[0][0] for r in last], abs=1e-4)  # the counts differ
    assert (tmp_path / "shared" / "lm_eval_acc_vs_loops.png").stat().st_size > 1000  # both hop counts, one plot
    assert shared["run"]["share_trajectory"] and not separate["run"]["share_trajectory"]


def test_lm_eval_model_args_path_on_a_shipped_task(lm_eval_setup):
    """What a user types: --model hf --model_args pretrained=DIR,num_loops=K,trust_remote_code=True."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(LM_EVAL_DIR), metadata={"data_dir": str(lm_eval_setup / "data")})
    output = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={lm_eval_setup / 'model'},num_loops=2,trust_remote_code=True",
        tasks=["multihop_hops2"],
        task_manager=manager,
        batch_size=4,
        device="cpu",
        limit=4,
    )
    assert 0.0 <= output["results"]["multihop_hops2"]["acc,none"] <= 1.0


def save_tokenizer(backend, path) -> str:
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>").save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def bpe_tokenizer(tmp_path_factory, rows):
    """A byte-level BPE tokenizer (digits split, like Llama-family tokenizers) trained on multihop text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>", "<unk>"], show_progress=False)
    backend.train_from_iterator([row["prompt"] + row["completion"] for row in rows], trainer)
    return save_tokenizer(backend, tmp_path_factory.mktemp("bpe_tokenizer"))


def test_a_pretrained_tokenizer_gets_the_same_questions_and_labels(cache, rows, bpe_tokenizer):
    task = get_task("multihop", cache_dir=cache, hops=[1, 5], distractors=2, tokenizer=bpe_tokenizer)
    assert task.model_config() == {"vocab_size": len(task.tokenizer), "is_causal": True}
    assert task.tokenizer.padding_side == "left" and task.tokenizer.pad_token == "<eos>"
    batch = task.encode(rows[:4])
    for k, row in enumerate(rows[:4]):
        labelled = (batch["labels"][k] != -100).nonzero().flatten()
        assert [task.tokenizer.decode(int(batch["labels"][k, i])) for i in labelled] == [str(a) for a in row["answers"]]
        # every question sees the assignments and itself: its tokens are those of the prompt it is asked as
        prompt = task.tokenizer(f"{row['statements']}; ?{row['questions'][0]}")["input_ids"]
        first = int(labelled[0])
        visible = batch["attention_mask"][k, 0, first - 1].nonzero().flatten()
        assert batch["input_ids"][k, visible].tolist() == prompt
        assert batch["position_ids"][k, visible].tolist() == list(range(len(prompt)))
    one_hot = torch.nn.functional.one_hot(batch["labels"].clamp(min=0), len(task.tokenizer)).float()
    shifted = torch.cat([one_hot[:, 1:], one_hot[:, :1]], dim=1)  # the logits at t predict token t + 1
    assert task.decode(shifted, batch) == [row["completion"] for row in rows[:4]]


def test_a_tokenizer_that_merges_the_answer_with_the_name_is_refused(cache, rows, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted({word for row in rows for word in (row["prompt"] + row["completion"]).split()} | set("0123456789"))
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<eos>", "<unk>", *words])}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # "?xb4" is one word: the answer is not its own token
    tokenizer = save_tokenizer(backend, tmp_path)
    task = get_task("multihop", cache_dir=cache, hops=[1, 5], distractors=2, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="one answer-digit token"):
        task.encode(rows[:1])
