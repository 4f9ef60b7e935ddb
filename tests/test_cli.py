"""The command line end to end: the demo trains, sweeps and writes plots; train and eval subcommands."""

import argparse
import dataclasses
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import yaml

from implicit_hf.cli import build_parser, main
from implicit_hf.commands.demo import demo_recipe
from implicit_hf.tasks import BUILTIN_TASK_MODULES
from implicit_hf.training import loop as train_mod


@pytest.fixture(autouse=True)
def _local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IMPLICIT_HF_CACHE", str(tmp_path / "cache"))


def test_demo_trains_sweeps_and_writes_plots(tmp_path, capsys):
    main(["demo", "--out", str(tmp_path / "demo"), "--max-steps", "3"])
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "demo" / "eval" / "results.json").read_text())
    assert [r["loops"] for r in results["records"]] == [1, 2, 4, 8, 16, 32]
    assert "(lower is better)" in printed and "Lipschitz max" in printed
    # the zero prediction's error, ||x*|| / (||x*|| + 1) on average, from the held-out solutions themselves
    from implicit_hf.tasks.lp import LinearProgramTask

    solutions = [np.asarray(row["solution"]) for row in LinearProgramTask().build_dataset("test", 200, 1).to_list()]
    zero_error = np.mean([np.linalg.norm(x) / (np.linalg.norm(x) + 1) for x in solutions])
    assert f"reference: predicting x = 0 has relative error {zero_error:.4f}" in printed
    plots = sorted(p.name for p in (tmp_path / "demo" / "eval").glob("*.png"))
    assert len(plots) == 4
    for name in plots:
        assert name in printed
    model_dir = tmp_path / "demo" / "train" / "model"
    assert (model_dir / "config.json").exists()

    # the model records its task: eval needs no --task
    recorded = json.loads((model_dir / "implicit_task.json").read_text())
    assert recorded["task"] == "lp"
    out = tmp_path / "eval_again"
    main(["eval", "--model", str(model_dir), "--loops", "1,2", "--out", str(out), "--n", "4", "--no-plots"])
    again = json.loads((out / "results.json").read_text())
    assert again["task"]["name"] == "lp"
    assert again["task"]["task_kwargs"] == recorded["task_kwargs"]

    # --model-card: the sweep goes into the model's card
    assert "## Loop sweep" not in (model_dir / "README.md").read_text()
    main(
        [
            "eval",
            "--model",
            str(model_dir),
            "--loops",
            "1,2",
            "--out",
            str(out),
            "--n",
            "4",
            "--no-plots",
            "--model-card",
        ]
    )
    card = (model_dir / "README.md").read_text()
    assert "## Loop sweep (lp)" in card and "| loops | relative_error |" in card
    assert f"| 2 | {json.loads((out / 'results.json').read_text())['records'][1]['quality']:.4g} |" in card


def test_eval_without_a_task_needs_a_recorded_one(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model_type": "implicit"}')
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("implicit-hf eval: error: ") and "pass the task name" in err and str(tmp_path) in err


def test_unknown_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--model", "x", "--task", "lp", "--loops", "1,2", "--out", "y", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_train_subcommand_reports_a_bad_recipe(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("task: lp\nlearning_rat: 0.1\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(recipe)])
    assert exit_info.value.code == 2
    assert "learning_rat" in capsys.readouterr().err


# ------------------------------------------------------------------------------- parse first, import after

HELP_CHECK = """
import sys
import implicit_hf_command  # the console script's module
sys.argv = ["implicit-hf", *sys.argv[1:], "--help"]
try:
    implicit_hf_command.main()
except SystemExit as exit:
    code = exit.code
print("EXIT", code, "torch" in sys.modules, "transformers" in sys.modules)
"""


@pytest.mark.parametrize("command", [[], ["train"], ["eval"], ["lm-eval"], ["lm-eval-data"], ["convert"], ["demo"]])
def test_help_imports_neither_torch_nor_transformers(command):
    done = subprocess.run(
        [sys.executable, "-c", HELP_CHECK, *command], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "EXIT 0 False False", done.stdout + done.stderr
    assert f"usage: {' '.join(['implicit-hf', *command])}" in done.stdout


def test_the_command_imports_the_package_without_the_model_code():
    code = "import os, sys; os.environ['IMPLICIT_HF_DEFER_MODELING'] = '1'\n"
    code += "import implicit_hf, implicit_hf.cli, implicit_hf.training.recipe\n"
    code += "print('torch' in sys.modules, 'transformers' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.split() == ["False", "False"]


def test_the_console_script_registers_the_auto_classes_when_a_command_needs_the_model(tmp_path):
    """Deferred, the model code (and the registration with it) is imported by the first command that needs it."""
    command = ["demo", "--out", str(tmp_path / "demo"), "--max-steps", "2"]
    code = "import sys, implicit_hf_command; sys.argv[1:] = " + repr(command) + "; implicit_hf_command.main()"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "demo" / "eval" / "results.json").is_file()


def test_the_package_still_registers_the_auto_classes():
    code = (
        "import implicit_hf\n"
        "from transformers import AutoConfig\n"
        "from transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
        "print('implicit' in CONFIG_MAPPING, type(AutoConfig.for_model('implicit')).__name__)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert done.stdout.split() == ["True", "ImplicitConfig"]


def test_train_help_names_the_command_and_every_recipe_key(capsys):
    from implicit_hf.training.recipe import TrainConfig

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert printed.startswith("usage: implicit-hf train RECIPE.yaml")
    assert all(f"  {f.name} (" in printed for f in dataclasses.fields(TrainConfig))


def test_eval_help_lists_the_registered_tasks(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--help"])
    assert exit_info.value.code == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert ", ".join(sorted(BUILTIN_TASK_MODULES)) in printed


def test_every_option_has_help():
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert {c.dest for c in commands._choices_actions} == set(commands.choices)
    assert all(c.help for c in commands._choices_actions)
    for name, subparser in commands.choices.items():
        for action in subparser._actions:
            assert action.help and action.help != argparse.SUPPRESS, f"implicit-hf {name} {action.dest}"


@pytest.mark.parametrize("spelling", ["--max-steps", "--max_steps"])
def test_options_take_dashes_and_underscores(spelling, tmp_path):
    parser = build_parser()
    assert parser.parse_args(["demo", spelling, "3"]).max_steps == 3
    assert parser.parse_args(["demo", f"{spelling}=4"]).max_steps == 4
    args = parser.parse_args(["eval", "--model", "m", "--out", "o", "--batch_size", "5", "--no_plots"])
    assert args.batch_size == 5 and args.no_plots
    config = train_mod.parse_args([str(demo_recipe()), spelling, "7", "--output-dir", str(tmp_path)])
    assert config.max_steps == 7 and config.output_dir == str(tmp_path)


# --------------------------------------------------------------------------------- one-line user errors


def run_main(capsys, *argv: str) -> str:
    """``main(argv)`` must exit with status 2 and one line on stderr: ``implicit-hf CMD: error: ...``."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"implicit-hf {argv[0]}: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def implicit_config(folder, architecture: str, **fields):
    """A checkpoint folder that holds only the config.json of a tiny ``architecture`` with ``fields``."""
    from tiny_models import tiny_config

    config = tiny_config(**fields)
    config.architectures = [architecture]
    config.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("command", ["eval", "lm-eval", "convert"])
def test_a_missing_model_path_is_named_and_not_looked_up_on_the_hub(command, tmp_path, capsys, monkeypatch):
    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was asked about a local path")

    monkeypatch.setattr("implicit_hf.commands.edge.saved_config", no_hub)
    for missing in (str(tmp_path / "runs" / "model"), "./no-such-model", "~/no-such-model", "outputs_x/a/b"):
        argv = {
            "eval": ["eval", "--model", missing, "--task", "lp", "--out", str(tmp_path / "out")],
            "lm-eval": ["lm-eval", "--model", missing, "--tasks", "x"],
            "convert": ["convert", missing, str(tmp_path / "out"), "--core", "0"],
        }[command]
        err = run_main(capsys, *argv)
        assert f"{missing!r} does not exist" in err


def test_eval_refuses_a_folder_that_is_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    err = run_main(capsys, "eval", "--model", str(tmp_path / "empty"), "--task", "lp", "--out", str(tmp_path / "o"))
    assert str(tmp_path / "empty") in err and "no config.json" in err
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text('{"model_type": "llama"}')
    err = run_main(capsys, "eval", "--model", str(llama), "--task", "lp", "--out", str(tmp_path / "o"))
    assert str(llama) in err and "not an implicit checkpoint" in err and "'llama'" in err
    # a plain causal LM is a baseline of a causal-LM task (not --model), if it covers the task's vocabulary
    lm = implicit_config(tmp_path / "lm", "ImplicitForCausalLM", vocab_size=80)
    for architecture, message in (
        ("LlamaForCausalLM", "vocab_size: task needs >= 70, checkpoint has 8"),
        ("LlamaModel", "neither an implicit checkpoint nor a causal LM"),
    ):
        config = {"model_type": "llama", "architectures": [architecture], "vocab_size": 8}
        (llama / "config.json").write_text(json.dumps(config))
        argv = ["--task", "state_tracking", "--baseline", str(llama), "--out", str(tmp_path / "o")]
        err = run_main(capsys, "eval", "--model", str(lm), *argv)
        assert str(llama) in err and message in err


def test_eval_refuses_a_task_that_does_not_fit_the_model(tmp_path, capsys):
    lm = implicit_config(tmp_path / "lm", "ImplicitForCausalLM", vocab_size=16)
    err = run_main(capsys, "eval", "--model", str(lm), "--task", "lp", "--out", str(tmp_path / "o"))
    assert "task 'lp' does not fit" in err and str(lm) in err and "ImplicitForTokenRegression" in err
    regression = implicit_config(
        tmp_path / "reg", "ImplicitForTokenRegression", num_labels=1, is_causal=False, input_features=3
    )
    err = run_main(capsys, "eval", "--model", str(regression), "--task", "lp", "--out", str(tmp_path / "o"))
    assert "does not fit" in err and "input_features: task needs" in err and "checkpoint has 3" in err
    baseline = ["--baseline", str(lm), "--task", "lp", "--out", str(tmp_path / "o")]
    err = run_main(capsys, "eval", "--model", str(tmp_path / "lm"), *baseline)
    assert "does not fit --model" in err  # the model first, then each baseline
    err = run_main(capsys, "eval", "--model", str(lm), "--task", "bogus", "--out", str(tmp_path / "o"))
    assert "--task 'bogus'" in err and "task must be one of" in err


def test_eval_refuses_a_device_this_machine_lacks(tmp_path, capsys):
    lm = implicit_config(tmp_path / "lm", "ImplicitForCausalLM")
    err = run_main(capsys, "eval", "--model", str(lm), "--task", "lp", "--out", "o", "--device", "gpu")
    assert "--device 'gpu'" in err


def test_convert_checks_the_model_type_before_the_weights(tmp_path, capsys):
    source = tmp_path / "gpt2"
    source.mkdir()
    (source / "config.json").write_text('{"model_type": "gpt2", "n_layer": 2}')
    err = run_main(capsys, "convert", str(source), str(tmp_path / "out"), "--core", "0")
    assert str(source) in err and "'gpt2'" in err and "llama" in err and "weight" not in err
    assert not (tmp_path / "out").exists()


def test_convert_checks_the_layer_split_before_the_weights(tmp_path, capsys):
    from transformers import LlamaConfig

    source = tmp_path / "llama"
    LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64).save_pretrained(
        source
    )  # a config without weights
    err = run_main(capsys, "convert", str(source), str(tmp_path / "out"), "--core", "0-5")
    assert "core_layers 0-5 must lie in 0-1" in err
    err = run_main(capsys, "convert", str(source), str(tmp_path / "out"), "--core", "1-0")
    assert "--core: layer range '1-0' runs backwards" in err
    err = run_main(capsys, "convert", str(source), str(tmp_path / "out"), "--core", "0-1")
    assert str(source) in err  # no weights: transformers' OSError, on one line


def write_recipe(tmp_path, **recipe) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"tracker": "none", "output_dir": str(tmp_path / "out"), **recipe}))
    return str(path)


@pytest.mark.parametrize(
    ("field", "value"),
    [("intermediate_size", "64"), ("hidden_size", "64"), ("rms_norm_eps", "small"), ("attention_bias", "no")],
)
def test_a_model_field_of_the_wrong_type_is_named(field, value, tmp_path, capsys):
    recipe = write_recipe(tmp_path, task="lp", model={field: value}, train_size=32, eval_size=0, max_steps=1)
    err = run_main(capsys, "train", recipe)
    assert f"recipe key 'model': {field} must be" in err and repr(value) in err


def test_a_text_corpus_too_small_for_train_size_is_a_recipe_error(tmp_path, capsys):
    recipe = write_recipe(
        tmp_path,
        task="text",
        task_kwargs={"seq_len": 64},
        model={"hidden_size": 32, "num_attention_heads": 4},
        train_size=10**6,
        eval_size=0,
        max_steps=1,
    )
    err = run_main(capsys, "train", recipe)
    assert "recipe key 'train_size' (1000000)" in err and "windows of 64 tokens" in err


def test_resuming_a_finished_run_reports_its_last_loss(tmp_path, capsys):
    recipe = write_recipe(
        tmp_path,
        task="lp",
        model={"hidden_size": 32, "num_attention_heads": 4, "num_prelude_layers": 0, "num_coda_layers": 0},
        train_size=32,
        eval_size=0,
        per_device_batch_size=16,
        max_steps=2,
        log_every=1,
        checkpoint_every=2,
    )
    main(["train", recipe])
    first = json.loads((tmp_path / "out" / "metrics.json").read_text())
    capsys.readouterr()
    main(["train", recipe, "--resume"])
    assert "already completed 2 of max_steps 2 steps" in capsys.readouterr().out
    again = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert again["resumed_from"] == 2 and again["train_loss"] == first["train_loss"]
    assert math.isfinite(again["train_loss"])


def test_eval_refuses_more_test_rows_than_the_task_has(tmp_path, capsys):
    lm = implicit_config(tmp_path / "lm", "ImplicitForCausalLM", vocab_size=512)
    argv = ["--task", "text", "--task-kwargs", '{"seq_len": 64}', "--n", "1000000", "--out", str(tmp_path / "o")]
    err = run_main(capsys, "eval", "--model", str(lm), *argv)
    assert "n=1000000: the test split of 'pydoc' has" in err
