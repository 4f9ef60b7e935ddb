"""The command line end to end: the demo trains, sweeps and writes plots; train and eval subcommands."""

import json

import pytest

from implicit_hf.cli import main


@pytest.fixture(autouse=True)
def _local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IMPLICIT_HF_CACHE", str(tmp_path / "cache"))


def test_demo_trains_sweeps_and_writes_plots(tmp_path, capsys):
    main(["demo", "--out", str(tmp_path / "demo"), "--max-steps", "3"])
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "demo" / "eval" / "results.json").read_text())
    assert [r["loops"] for r in results["records"]] == [1, 2, 4, 8, 16, 32]
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


def test_eval_without_a_task_needs_a_recorded_one(tmp_path):
    (tmp_path / "model").mkdir()
    with pytest.raises(ValueError, match="pass the task name"):
        main(["eval", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "out")])


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
