"""The sudoku task: solver, generator (uniqueness, givens, determinism), cache, encoding, metrics, perturbations
and a tiny training run."""

import math

import numpy as np
import pytest
import torch
from tiny_training import train_tiny

from implicit_hf.tasks import get_task
from implicit_hf.tasks.reasoning import sudoku as sudoku_module
from implicit_hf.tasks.reasoning.sudoku import (
    SudokuTask,
    count_solutions,
    is_valid_solution,
    make_puzzle,
    solve,
    solve_by_singles,
)

# Arto Inkala's "hardest sudoku": unique, and naked + hidden singles alone make no full grid
HARD = [int(c) for c in "800000000003600000070090200050007000000045700000100030001000068008500010090000400"]
# Project Euler 96, grid 01: solved by singles alone
EASY = [int(c) for c in "003020600900305001001806400008102900700000008006708200002609500800203009005010300"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return SudokuTask(cache_dir=tmp_path_factory.mktemp("sudoku-cache"))


@pytest.fixture(scope="module")
def rows(task):
    return list(task.build_dataset("train", 40, seed=0))


def brute_force_valid(grid):
    """Independent check: every row, column and box holds 1..9 once."""
    g = np.asarray(grid).reshape(9, 9)
    units = [g[r] for r in range(9)] + [g[:, c] for c in range(9)]
    units += [g[3 * (b // 3) : 3 * (b // 3) + 3, 3 * (b % 3) : 3 * (b % 3) + 3].ravel() for b in range(9)]
    return all(sorted(unit.tolist()) == list(range(1, 10)) for unit in units)


def test_registered_and_model_config(task):
    assert isinstance(get_task("sudoku", cache_dir=task.cache_dir), SudokuTask)
    assert task.model_config() == {
        "problem_type": "single_label_classification",
        "num_labels": 9,
        "vocab_size": 10,
        "is_causal": False,
        "edge_features": 4,
    }
    assert "edge_features" not in SudokuTask(relations=False).model_config()
    for bad in (0, -2, False, None):
        with pytest.raises(ValueError, match="relation_scale"):
            SudokuTask(relation_scale=bad)
    assert (task.head, task.quality_metric, task.higher_is_better) == ("token_classification", "exact_match", True)
    for bad in (16, 82, 30.0, True):
        with pytest.raises(ValueError, match="min_givens"):
            SudokuTask(min_givens=bad)


def test_solver_on_known_puzzles():
    for puzzle in (HARD, EASY):
        (solution,) = solve(puzzle, limit=2)
        assert brute_force_valid(solution) and is_valid_solution(solution)
        assert all(v == 0 or v == s for v, s in zip(puzzle, solution, strict=True))
    assert count_solutions([0] * 81, limit=2) == 2
    two = list(HARD)
    two[0] = 0  # Inkala's puzzle is minimal: any removal gives several solutions
    assert count_solutions(two, limit=5) >= 2
    clash = list(EASY)
    clash[0] = 3  # 3 already sits in row 0
    assert count_solutions(clash) == 0
    assert not is_valid_solution(list(range(81)))


def test_needs_search_flag_on_known_examples():
    assert 0 in solve_by_singles(HARD)  # needs search
    assert solve_by_singles(EASY) == solve(EASY)[0]  # singles alone solve it


def test_rows_unique_valid_and_respect_givens(task, rows):
    assert len(rows) == 40
    for row in rows:
        puzzle, solution = list(row["puzzle"]), list(row["solution"])
        assert len(puzzle) == len(solution) == 81
        assert brute_force_valid(solution)
        assert row["givens"] == sum(v > 0 for v in puzzle) == task.min_givens
        assert all(v == 0 or v == s for v, s in zip(puzzle, solution, strict=True))
        assert solve(puzzle, limit=2) == [solution]  # exactly one solution, the stored one
        assert row["needs_search"] == (0 in solve_by_singles(puzzle))


def test_hard_setting_needs_search():
    rng = np.random.default_rng(0)
    for _ in range(3):
        row = make_puzzle(rng, 25, require_search=True)
        assert row["givens"] == 25 and row["needs_search"]
        assert 0 in solve_by_singles(row["puzzle"])
        assert solve(row["puzzle"], limit=2) == [row["solution"]]


def test_generator_deterministic_and_split_dependent(task, rows, tmp_path):
    other_cache = SudokuTask(cache_dir=tmp_path)
    assert list(other_cache.build_dataset("train", 40, seed=0)) == rows  # regenerated, not the cached copy
    assert list(other_cache.build_dataset("train", 5, seed=0)) == rows[:5]  # a prefix of the same stream
    for other in (other_cache.build_dataset("train", 5, seed=1), other_cache.build_dataset("test", 5, seed=0)):
        assert all(a["puzzle"] != b["puzzle"] for a, b in zip(rows[:5], other, strict=True))
    assert len(other_cache.build_dataset("train", 0, seed=0)) == 0
    with pytest.raises(ValueError, match="seed"):
        other_cache.build_dataset("train", 3, seed=-1)


def test_cache_is_reused(task, rows, monkeypatch):
    monkeypatch.setattr(sudoku_module, "make_puzzle", lambda *a, **k: pytest.fail("regenerated"))
    assert list(task.build_dataset("train", 40, seed=0)) == rows


def test_encode_layout_and_decode_round_trip(task, rows):
    enc = task.encode(rows[:4])
    assert enc["input_ids"].shape == enc["labels"].shape == enc["position_ids"].shape == (4, 81)
    assert torch.equal(enc["input_ids"][1], torch.tensor(rows[1]["puzzle"]))
    assert torch.equal(enc["labels"][2] + 1, torch.tensor(rows[2]["solution"]))
    assert enc["labels"].min() >= 0 and enc["labels"].max() <= 8
    assert torch.equal(enc["position_ids"], torch.zeros(4, 81, dtype=torch.long)) and bool(enc["attention_mask"].all())
    assert enc["edge_features"].shape == (4, 81, 81, 4) and enc["edge_features"].dtype == torch.float32
    logits = torch.nn.functional.one_hot(enc["labels"], 9).float()
    grids = task.decode(logits, enc)
    for grid, row in zip(grids, rows[:4], strict=True):
        assert grid.shape == (9, 9) and grid.reshape(-1).tolist() == row["solution"]
    # givens are copied from the input whatever the logits say
    wrong = task.decode(torch.zeros(4, 81, 9), enc)[0].reshape(-1)
    given = enc["input_ids"][0] > 0
    assert torch.equal(wrong[given], enc["input_ids"][0][given]) and bool((wrong[~given] == 1).all())
    assert task.compute_metrics(grids, rows[:4]) == {"exact_match": 1.0, "cell_accuracy": 1.0}
    assert "labels" not in task.encode([{"puzzle": rows[0]["puzzle"]}])
    with pytest.raises(ValueError, match="logits must have shape"):
        task.decode(logits[..., :4], enc)
    with pytest.raises(ValueError, match="81 digits"):
        task.encode([{"puzzle": [0] * 80}])


def test_relations_are_the_rules_units(task, rows):
    enc = task.encode(rows[:2])
    edges = enc["edge_features"] / sudoku_module.RELATION_SCALE
    assert torch.equal(edges[0], edges[1])  # the same for every puzzle
    rel = edges[0]
    assert set(rel.unique().tolist()) == {0.0, 1.0}
    for i in range(81):
        r, c = divmod(i, 9)
        for j in range(81):
            a, b = divmod(j, 9)
            same_box = (r // 3, c // 3) == (a // 3, b // 3)
            expected = [i == j, i != j and r == a, i != j and c == b, i != j and same_box]
            assert rel[i, j].tolist() == [float(e) for e in expected], (i, j)
    # every cell: itself, 8 in its row, 8 in its column, 8 in its box; 20 distinct peers; 60 unrelated cells
    assert rel.sum(1).tolist() == [[1.0, 8.0, 8.0, 8.0]] * 81
    assert (rel[:, :, 1:].sum(-1) > 0).sum(1).tolist() == [20] * 81
    assert (rel.sum(-1) == 0).sum(1).tolist() == [60] * 81
    plain = SudokuTask(cache_dir=task.cache_dir, relations=False).encode(rows[:2])
    assert "edge_features" not in plain and torch.equal(plain["position_ids"], torch.arange(81).expand(2, -1))
    assert torch.equal(plain["input_ids"], enc["input_ids"]) and torch.equal(plain["labels"], enc["labels"])
    scaled = SudokuTask(cache_dir=task.cache_dir, relation_scale=3).encode(rows[:1])["edge_features"]
    assert torch.equal(scaled, 3 * edges[:1])


def test_metrics_hand_computed(task, rows):
    a, b = rows[0], rows[1]
    sol_a, sol_b = torch.tensor(a["solution"]), torch.tensor(b["solution"])
    blanks_a = [i for i, v in enumerate(a["puzzle"]) if v == 0]
    bad = sol_a.clone()
    for i in blanks_a[:3]:  # three blank cells wrong
        bad[i] = bad[i] % 9 + 1
    scores = task.compute_metrics([bad.reshape(9, 9), sol_b.reshape(9, 9)], [a, b])
    blanks = 81 - a["givens"] + 81 - b["givens"]
    assert scores["exact_match"] == pytest.approx(0.5)
    assert scores["cell_accuracy"] == pytest.approx((blanks - 3) / blanks)
    metric = sudoku_module.SudokuTask.load_metric()
    assert metric.compute(predictions=[[1, 2, 3], [4, 5, 6]], references=[[1, 2, 3], [4, 0, 6]]) == {
        "exact_match": 0.5,
        "cell_accuracy": pytest.approx(5 / 6),  # no puzzles: every cell counts
    }
    assert metric.compute(predictions=[[1, 2, 3]], references=[[1, 2, 4]], puzzles=[[0, 2, 0]]) == {
        "exact_match": 0.0,
        "cell_accuracy": 0.5,
    }


def test_perturb(task, rows):
    perturbed, delta = task.perturb(rows[:5], 1.0, seed=0)
    assert torch.equal(delta, torch.ones(5, dtype=delta.dtype))
    for before, after in zip(rows[:5], perturbed, strict=True):
        changed = [i for i in range(81) if before["puzzle"][i] != after["puzzle"][i]]
        assert len(changed) == 1 and after["puzzle"][changed[0]] == 0  # one given blanked
        assert after["solution"] == before["solution"] and after["givens"] == before["givens"] - 1
        assert after["needs_search"] == (0 in solve_by_singles(after["puzzle"]))
        assert all(v == 0 or v == s for v, s in zip(after["puzzle"], after["solution"], strict=True))  # still valid
    again, _ = task.perturb(rows[:5], 1.0, seed=0)
    other, _ = task.perturb(rows[:5], 1.0, seed=1)
    assert again == perturbed and other != perturbed
    unchanged, zero = task.perturb(rows[:2], 0.0, seed=0)
    assert torch.equal(zero, torch.zeros(2, dtype=zero.dtype)) and unchanged == rows[:2]
    with pytest.raises(ValueError, match="eps"):
        task.perturb(rows[:1], -1.0, seed=0)


def test_training_run_lowers_the_loss(tmp_path, monkeypatch):
    losses, result = train_tiny(
        tmp_path,
        monkeypatch,
        "sudoku",
        {"num_loops": 2},
        task_module="implicit_hf.tasks.reasoning.sudoku",
        max_steps=40,
    )
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < 0.9 * losses[0], losses
    assert result.metrics["eval/loss"] < losses[0]
    assert (tmp_path / "cache" / "sudoku" / "train-givens30-64-seed0").is_dir()  # generated into IMPLICIT_HF_CACHE
