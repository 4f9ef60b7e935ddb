"""Bad input gets a clear error naming what is wrong, on every path the value can enter: the config, forward,
generate, from_pretrained, conversion. Each case asserts the error type and that the message names the
offending field or argument (and, where there is one, what to use instead)."""

import pytest
import torch
from test_convert import tiny_source
from transformers import AutoModelForCausalLM, GenerationConfig

from implicit_hf import ImplicitConfig, ImplicitForCausalLM
from implicit_hf.modeling.convert import convert_model

VOCAB = 61


def tiny_config(**overrides) -> ImplicitConfig:
    settings = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_attention_heads=4,
        num_prelude_layers=1,
        num_core_layers=1,
        num_coda_layers=1,
        num_loops=2,
    )
    return ImplicitConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def model() -> ImplicitForCausalLM:
    torch.manual_seed(0)
    return ImplicitForCausalLM(tiny_config()).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model):
    folder = tmp_path_factory.mktemp("bad_inputs") / "ckpt"
    model.save_pretrained(folder)
    return folder


def ids(batch: int = 2, length: int = 5) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(0))


CONFIG_CASES = [
    ({"num_loops": 0}, ValueError, "num_loops must be an integer >= 1"),
    ({"num_loops": 2.5}, ValueError, "num_loops must be an integer"),
    ({"num_loops": "4"}, ValueError, "num_loops must be an integer"),
    ({"solver": "newton"}, ValueError, "solver"),
    ({"gradient": "backprop"}, ValueError, "gradient"),
    ({"injection": "concat"}, ValueError, "injection"),
    ({"tol": -1.0}, ValueError, "tol"),
    ({"damping": 1.5}, ValueError, r"damping must be a number in \(0, 1\]"),
    ({"num_core_layers": 0}, ValueError, "num_core_layers"),
    ({"hidden_size": 30}, ValueError, "hidden_size \\(30\\) must be a multiple of num_attention_heads"),
    ({"num_key_value_heads": 3}, ValueError, "num_key_value_heads"),
    ({"num_loop": 3}, ValueError, "did you mean 'num_loops'"),
    ({"loop_shift": -1}, ValueError, r"loop_shift must be an integer in \[0, 4\]"),
    ({"loop_shift": 5}, ValueError, r"loop_shift must be an integer in \[0, 4\]"),
    ({"loop_shift": 1.0}, ValueError, "loop_shift must be an integer"),
    ({"position_encoding": "alibi"}, ValueError, "position_encoding must be one of 'rope', 'none'"),
]


@pytest.mark.parametrize(("overrides", "error", "message"), CONFIG_CASES, ids=[str(c[0]) for c in CONFIG_CASES])
def test_bad_config_fields(overrides, error, message):
    with pytest.raises(error, match=message):
        tiny_config(**overrides)


def test_a_bad_field_set_on_a_loaded_config_is_refused_and_the_old_value_kept(model):
    with pytest.raises(ValueError, match="num_loops must be an integer >= 1"):
        model.config.num_loops = 0
    assert model.config.num_loops == 2


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"num_loops": 0}, ValueError, "num_loops must be an integer >= 1"),
        ({"num_loop": 3}, ValueError, "did you mean 'num_loops'"),
        ({"solver": "newton"}, ValueError, "solver"),
        ({"loop_shift": 7}, ValueError, "loop_shift must be an integer in"),
    ],
)
def test_bad_from_pretrained_keywords(checkpoint, kwargs, error, message):
    with pytest.raises(error, match=message):
        AutoModelForCausalLM.from_pretrained(checkpoint, **kwargs)


FORWARD_CASES = [
    ({"num_loop": 1}, TypeError, "unexpected keyword argument 'num_loop'; did you mean 'num_loops'"),
    ({"label": ids()}, TypeError, "did you mean 'labels'"),
    ({"return_trajectorys": True}, TypeError, "did you mean 'return_trajectory'"),
    ({"num_loops": 0}, ValueError, "num_loops must be an integer >= 1"),
    ({"num_loops": True}, ValueError, "num_loops must be an integer"),
    ({"solver": "newton"}, ValueError, "solver"),
    ({"return_trajectory": [0]}, ValueError, "return_trajectory"),
    ({"penalties": ["lipschitz"]}, ValueError, "penalties"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), FORWARD_CASES, ids=[str(c[0])[:40] for c in FORWARD_CASES])
def test_bad_forward_arguments(model, kwargs, error, message):
    with pytest.raises(error, match=message):
        model(ids(), use_cache=False, **kwargs)


def test_forward_needs_exactly_one_input(model):
    with pytest.raises(ValueError, match="exactly one of input_ids, inputs_embeds"):
        model(ids(), inputs_embeds=torch.zeros(2, 5, 32))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"num_loops": 0}, ValueError, "num_loops must be an integer >= 1"),
        ({"generation_config": GenerationConfig(num_loops=0, max_new_tokens=2)}, ValueError, "num_loops"),
        ({"num_loop": 2}, ValueError, "num_loop"),
    ],
)
def test_bad_generate_arguments(model, kwargs, error, message):
    with pytest.raises(error, match=message):
        model.generate(ids(1, 3), max_new_tokens=2, do_sample=False, pad_token_id=0, **kwargs)


@pytest.mark.parametrize(
    ("plan", "settings", "error", "message"),
    [
        (([0], [], [3]), {}, ValueError, "core_layers must name at least one layer"),
        (([0], [1, 9], [3]), {}, ValueError, r"core_layers 1,9 must lie in 0-3"),
        (([0, 1], [1, 2], [3]), {}, ValueError, r"prelude 0-1, core 1-2 and coda 3 must not overlap"),
        (([0], [2], [3]), {"keep_all_layers": True}, ValueError, r"leave source layers 1 out"),
        ((None, [1], [3]), {"keep_all_layers": True}, ValueError, r"core 1 and coda 3 leave source layers 2 out"),
        ((None, [4], None), {"keep_all_layers": True}, ValueError, r"core_layers 4 must lie in 0-3"),
        ((None, [1], None), {"keep_all_layers": True, "loop_shift": 5}, ValueError, "loop_shift"),
        (([0], [1], [3]), {"state_weight": 1.0}, ValueError, r"state_weight must be a number in \[0, 1\)"),
        (([0], [1], [3]), {"state_weight": 0.5, "injection": "add"}, ValueError, "state_weight needs injection"),
        (([0], [1], [3]), {"num_loops": 0}, ValueError, "num_loops must be an integer >= 1"),
    ],
)
def test_bad_conversions(plan, settings, error, message):
    with pytest.raises(error, match=message):
        convert_model(tiny_source("llama", num_hidden_layers=4), *plan, **settings)


SHAPE_CASES = [
    (
        {"attention_mask": torch.ones(2, 7)},
        r"attention_mask has shape \(2, 7\); with input_ids \(2, 5\) it must be \(2, 5\)",
    ),
    ({"attention_mask": torch.ones(3, 5)}, r"attention_mask has shape \(3, 5\)"),
    ({"attention_mask": torch.ones(5)}, r"attention_mask has shape \(5,\)"),
    ({"attention_mask": torch.ones(2, 1, 5, 6)}, r"attention_mask has shape \(2, 1, 5, 6\)"),
    ({"position_ids": torch.arange(4)[None]}, r"position_ids has shape \(1, 4\); .* must be \(2 or 1, 5\)"),
    ({"position_ids": torch.arange(5)}, r"position_ids has shape \(5,\)"),
]


@pytest.mark.parametrize(("kwargs", "message"), SHAPE_CASES, ids=[str(i) for i in range(len(SHAPE_CASES))])
def test_input_shapes_are_checked_against_each_other(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model(ids(), use_cache=False, **kwargs)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"input_ids": torch.tensor([[1, 2, VOCAB]])}, rf"token id {VOCAB}, outside the vocabulary \[0, {VOCAB}\)"),
        ({"input_ids": torch.tensor([[1, -1, 2]])}, "token id -1, outside the vocabulary"),
        ({"input_ids": torch.ones(2, 5)}, "input_ids must be integer token ids"),
        ({"input_ids": torch.ones(5, dtype=torch.long)}, r"input_ids must be .* of shape \(batch, length\)"),
        ({"inputs_embeds": torch.zeros(2, 5, 16)}, r"inputs_embeds must have shape \(batch, length, 32\)"),
    ],
)
def test_bad_token_ids_and_embeddings(model, inputs, message):
    with pytest.raises(ValueError, match=message):
        model(**inputs, use_cache=False)


def test_attention_mask_must_cover_the_cached_tokens(model):
    prompt = ids(1, 4)
    out = model(prompt, use_cache=True)
    with pytest.raises(ValueError, match=r"after 4 cached tokens it must be \(1, 5\)"):
        model(ids(1, 1), attention_mask=torch.ones(1, 1), cache=out.cache)


def test_a_corrupted_weights_file_is_named(checkpoint, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(OSError, match=f"cannot read the weights in {weights}"):
        AutoModelForCausalLM.from_pretrained(broken)


def cli_error(argv, capsys) -> str:
    from implicit_hf.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_cli_user_errors_are_one_line_and_name_what_is_wrong(tmp_path, capsys, checkpoint):
    missing = str(tmp_path / "no-such-model")
    assert missing in cli_error(["eval", "--model", missing, "--out", str(tmp_path / "o")], capsys)
    assert missing in cli_error(["lm-eval", "--model", missing, "--tasks", "x", "--out", str(tmp_path / "o")], capsys)
    assert "--loops" in cli_error(
        ["eval", "--model", str(checkpoint), "--loops", "0,2", "--out", str(tmp_path)], capsys
    )
    assert "--max-steps: must be an integer >= 1" in cli_error(["demo", "--max-steps", "0"], capsys)
    not_llama = tmp_path / "gpt2"
    not_llama.mkdir()
    (not_llama / "config.json").write_text('{"model_type": "gpt2"}')
    err = cli_error(["convert", str(not_llama), str(tmp_path / "out"), "--core", "0"], capsys)
    assert "gpt2" in err and "llama" in err
    tiny_source("llama", num_hidden_layers=4).save_pretrained(tmp_path / "llama")
    llama = ["convert", str(tmp_path / "llama"), str(tmp_path / "out"), "--core", "1"]
    assert "state_weight must be a number in [0, 1)" in cli_error([*llama, "--state-weight", "2"], capsys)
    assert "state_weight needs injection='linear'" in cli_error([*llama, "--state-weight", "0.5"], capsys)
    gap = cli_error([*llama, "--prelude", "0", "--coda", "3", "--no-drop"], capsys)
    assert "prelude 0, core 1 and coda 3 leave source layers 2 out" in gap
    assert "loop_shift" in cli_error([*llama, "--loop-shift", "7"], capsys)
    assert not (tmp_path / "out").exists()  # refused before anything is written


@pytest.mark.parametrize(
    ("recipe", "named"),
    [
        ({"task": "lp", "learning_rat": 1e-3}, "learning_rat"),
        ({"task": "lp", "model": {"intermediate_size": "64"}}, "intermediate_size"),
        ({"task": "lp", "model": {"num_loops": 0}}, "num_loops"),
        ({"task": "lp", "lora": {"rank": 4}}, "unknown entries"),
        ({"task": "lp", "loop_schedule": {"distribution": "zipf", "min": 1, "max": 4}}, "loop_schedule.distribution"),
        ({"task": "nosuchtask"}, "nosuchtask"),
        ({"task": "lp", "model": {"loop_shift": 9}}, "loop_shift must be an integer in [0, 4]"),
        ({"task": "state_tracking", "task_kwargs": {"objects": 4}}, "objects must be one of (3, 5, 7)"),
        ({"task": "state_tracking", "task_kwargs": {"group": "dihedral"}}, "group must be one of"),
        ({"task": "state_tracking", "task_kwargs": {"group": "cyclic", "cyclic": 1}}, "cyclic (the modulus m)"),
        ({"task": "state_tracking", "task_kwargs": {"steps": [9, 2]}}, "steps [min, max] needs min <= max"),
        ({"task": "state_tracking", "task_kwargs": {"supervision": "every"}}, "supervision must be one of"),
        ({"task": "state_tracking", "task_kwargs": {"tokenizer": "/no/such/dir"}}, "tokenizer must be a tokenizer"),
        ({"task": "lp", "group_by_difficulty": True}, "'group_by_difficulty' needs the difficulty of a row"),
        (
            {"task": "state_tracking", "loop_schedule": {"distribution": "above_difficulty", "extra": -1}},
            "loop_schedule.extra must be a number >= 0",
        ),
        (
            {"task": "state_tracking", "loop_schedule": {"distribution": "uniform", "extra": 1}},
            "loop_schedule.extra applies to above_difficulty only",
        ),
    ],
)
def test_bad_recipes_are_refused_by_the_train_command(tmp_path, capsys, monkeypatch, recipe, named):
    import yaml

    monkeypatch.setenv("IMPLICIT_HF_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**recipe, "output_dir": str(tmp_path / "out")}))
    assert named in cli_error(["train", str(path)], capsys)
    assert not (tmp_path / "out" / "checkpoints").exists()
    assert not (tmp_path / "cache").exists()  # refused before any data is written
