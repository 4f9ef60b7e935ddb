"""Sweeps with several trajectories per input (``implicit-hf eval --trajectories``, `implicit_hf.eval.width`): every
(loops, K) pair scored from one run per K, as separate runs at that count score it; the agreement, the calibration
table and the plot; the generative sweep of a causal LM; bad counts refused."""

import json

import pytest
import torch
from matplotlib.image import imread

from implicit_hf.cli import main
from implicit_hf.eval import run_eval, sweep
from implicit_hf.eval.generative import complete, greedy_completions
from implicit_hf.eval.plots import WIDTH_FILE
from implicit_hf.eval.width import Width, calibration, trajectory_counts
from implicit_hf.tasks.base import get_task

WIDTH = Width(4, trajectory_noise=0.5)


@pytest.fixture(scope="module")
def sudoku(tmp_path_factory):
    task = get_task("sudoku", cache_dir=tmp_path_factory.mktemp("sudoku-cache"))
    return task, task.build_dataset("test", 10, 0).to_list()


@pytest.fixture(scope="module")
def sudoku_model(sudoku, tiny_task_model):
    return tiny_task_model(sudoku[0], num_loops=4, initializer_range=0.2)


def test_every_loop_count_is_scored_as_a_run_stopped_there(sudoku, sudoku_model):
    task, rows = sudoku
    result = sweep(sudoku_model, task, rows, [1, 3, 6], batch_size=4, perturb_eps=0, width=WIDTH, seed=2)
    for record in result["records"]:
        assert record["trajectories"] == 4 and record["compute"] == 4 * record["loops"]
        predictions = []
        with torch.no_grad():
            for start in range(0, len(rows), 4):
                inputs = task.encode(rows[start : start + 4])
                model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
                out = sudoku_model(**model_inputs, num_loops=record["loops"], tol=0, **WIDTH.forward_kwargs(2))
                predictions += task.decode(out.logits, inputs)
        assert record["metrics"] == task.compute_metrics(predictions, rows)
        table = record["calibration"]
        assert sum(bucket["n"] for bucket in table) == len(rows)
        assert 0.25 <= record["agreement_mean"] <= 1  # at least the chosen trajectory agrees with itself


def test_k_trajectories_cost_k_times_the_flops(sudoku, sudoku_model):
    task, rows = sudoku
    one = sweep(sudoku_model, task, rows, [2], batch_size=5, perturb_eps=0)["records"][0]
    wide = sweep(sudoku_model, task, rows, [2], batch_size=5, perturb_eps=0, width=WIDTH)["records"][0]
    assert wide["flops"] == pytest.approx(4 * one["flops"])
    assert "trajectories" not in one and "calibration" not in one  # one trajectory: the records of before


def test_calibration_groups_inputs_by_agreement(sudoku):
    task, rows = sudoku
    solutions = [torch.tensor(row["solution"]).view(9, 9) for row in rows[:4]]
    wrong = [torch.tensor(row["solution"]).view(9, 9) % 9 + 1 for row in rows[4:6]]
    agreement = torch.tensor([1.0, 1.0, 0.8, 0.3, 0.3, 0.8])
    table = {b["agreement"]: b for b in calibration(agreement, task, solutions + wrong, rows[:6])}
    assert table["1"]["n"] == 2 and table["1"]["quality"] == 1.0
    assert table["[0.75, 1)"]["n"] == 2 and table["[0.75, 1)"]["quality"] == 0.5
    assert table["[0.25, 0.5)"]["n"] == 2 and table["[0.25, 0.5)"]["quality"] == 0.5
    assert table["[0, 0.25)"]["n"] == 0


def test_run_eval_writes_every_pair_each_ks_seconds_and_the_plot(sudoku, sudoku_model, tmp_path):
    task, _ = sudoku
    sudoku_model.save_pretrained(tmp_path / "model")
    settings = dict(n=6, batch_size=3, perturb_eps=0, task_kwargs={"cache_dir": str(task.cache_dir)}, device="cpu")
    result = run_eval(
        tmp_path / "model", "sudoku", "1,4", tmp_path / "out", trajectories=[1, 2], trajectory_noise=0.3, **settings
    )
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    width = report["width"]
    assert width["trajectories"] == [1, 2] and width["select"] == "residual" and width["trajectory_noise"] == 0.3
    assert [(r["trajectories"], r["loops"], r["compute"]) for r in width["records"]] == [
        (1, 1, 1),
        (1, 4, 4),
        (2, 1, 2),
        (2, 4, 8),
    ]
    assert [r["quality"] for r in report["records"]] == [r["quality"] for r in width["records"][:2]]
    assert set(width["seconds_total"]) == {"1", "2"}
    image = imread(tmp_path / "out" / WIDTH_FILE)
    assert str(tmp_path / "out" / WIDTH_FILE) in result["files"] and image[..., :3].std() > 0.02
    plain = run_eval(tmp_path / "model", "sudoku", "1,4", tmp_path / "plain", **settings)
    assert "width" not in plain and not (tmp_path / "plain" / WIDTH_FILE).exists()


def test_a_generative_sweep_generates_with_k_trajectories(tmp_path, tiny_task_model):
    task = get_task("arith_lm", cache_dir=tmp_path)
    rows = task.build_dataset("test", 6, 0).to_list()
    model = tiny_task_model(task, num_loops=3, initializer_range=0.2)
    width = Width(3, trajectory_noise=0.5, select="vote")
    prompts = [task.prompt(row) for row in rows]
    wide = width.forward_kwargs(0)
    first = greedy_completions(model, task.tokenizer, prompts, 2, 6, 0, 1, True, wide)
    alone = [greedy_completions(model, task.tokenizer, [p], 2, 1, 0, 1, True, wide)[0] for p in prompts]
    assert first == alone  # left padding moves no trajectory's noise: it follows the positions
    with torch.no_grad():  # one greedy step by hand: the argmax of the reduced logits at the last position
        ids = task.tokenizer(prompts[0], return_tensors="pt").input_ids
        out = model(ids, num_loops=2, tol=0, use_cache=False, **wide)
    assert first[0] == task.tokenizer.decode(out.logits[0, -1].argmax(-1), skip_special_tokens=True)

    result = sweep(model, task, rows, [2, 5], batch_size=4, perturb_eps=0, width=width, return_predictions=True)
    for record in result["records"]:
        agreement = []
        texts = complete(model, task, prompts, record["loops"], 4, 0, width.forward_kwargs(0), agreement)
        assert result["predictions"][record["loops"]] == texts
        assert record["trajectories"] == 3 and record["compute"] == 3 * record["loops"]
        assert record["agreement_mean"] == pytest.approx(sum(agreement) / len(agreement))
        assert 1 / 3 <= record["agreement_mean"] <= 1
        assert sum(bucket["n"] for bucket in record["calibration"]) == len(rows)


@pytest.mark.parametrize("counts", [[], [0], [2, 2], [1.5], [True], "4"])
def test_bad_trajectory_counts_are_refused(counts):
    with pytest.raises(ValueError, match="trajectories must be a non-empty list of distinct integers >= 1"):
        trajectory_counts(counts)


def test_the_eval_command_refuses_a_rule_the_tasks_head_cannot_take(sudoku, sudoku_model, tmp_path, capsys):
    task, _ = sudoku
    sudoku_model.save_pretrained(tmp_path / "model")
    argv = ["eval", "--model", str(tmp_path / "model"), "--task", "sudoku", "--out", str(tmp_path / "out")]
    argv += ["--task-kwargs", json.dumps({"cache_dir": str(task.cache_dir)}), "--trajectories", "4", "--select", "mean"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == (
        "implicit-hf eval: error: --select: select='mean' does not apply to a classification head: "
        "it takes 'residual' or 'vote' or 'random'"
    )
    assert not (tmp_path / "out").exists()
