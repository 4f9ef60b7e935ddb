"""The linear-program task: generator, cache, encoding, metrics, perturbations and a tiny training run."""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linprog

from implicit_hf.tasks import get_task
from implicit_hf.tasks import lp as lp_module
from implicit_hf.tasks.lp import Y_SCALE, LinearProgramTask, solve_lp
from implicit_hf.tasks.models import build_model


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("lp-cache")


@pytest.fixture(scope="module")
def task(cache):
    return LinearProgramTask(cache_dir=cache)


@pytest.fixture(scope="module")
def small(cache):
    return LinearProgramTask(cache_dir=cache / "small", num_constraints=3, num_variables=6)


@pytest.fixture(scope="module")
def rows(task):
    return list(task.build_dataset("train", 20, seed=0))


def _check_optimal(row, tol=1e-6):
    A = np.asarray(row["A"])
    b, c = np.asarray(row["b"]), np.asarray(row["c"])
    lower, upper = np.asarray(row["lower"]), np.asarray(row["upper"])
    eq = np.asarray(row["is_equality"], dtype=bool)
    y = np.asarray(row["solution"])
    residual = A @ y - b
    assert np.all(residual[~eq] <= tol)
    assert np.all(np.abs(residual[eq]) <= tol)
    assert np.all(y >= lower - tol) and np.all(y <= upper + tol)
    assert np.all(lower <= upper)
    assert row["objective"] == pytest.approx(float(c @ y), abs=1e-9)
    fresh = linprog(
        c,
        A_ub=A[~eq] if (~eq).any() else None,
        b_ub=b[~eq] if (~eq).any() else None,
        A_eq=A[eq] if eq.any() else None,
        b_eq=b[eq] if eq.any() else None,
        bounds=np.stack([lower, upper], axis=1),
        method="highs",
    )
    assert fresh.status == 0
    assert row["objective"] == pytest.approx(fresh.fun, abs=1e-7, rel=1e-7)


def test_registered_and_model_config(task):
    assert isinstance(get_task("lp", cache_dir=task.cache_dir), LinearProgramTask)
    assert task.model_config() == {
        "problem_type": "regression",
        "num_labels": 1,
        "is_causal": False,
        "input_features": 10,
        "edge_features": 2,
    }
    assert LinearProgramTask(cache_dir=task.cache_dir, derived_features=False).model_config()["input_features"] == 8
    with pytest.raises(ValueError, match="nonzeros"):
        LinearProgramTask(num_constraints=2, num_variables=3, nonzeros=7)


def test_generator_deterministic_and_seed_dependent(task, rows, tmp_path):
    other_cache = LinearProgramTask(cache_dir=tmp_path)
    assert list(other_cache.build_dataset("train", 20, seed=0)) == rows  # regenerated, not the cached copy
    assert list(other_cache.build_dataset("train", 5, seed=0)) == rows[:5]  # a prefix of the same stream
    different_seed = list(other_cache.build_dataset("train", 5, seed=1))
    different_split = list(other_cache.build_dataset("test", 5, seed=0))
    for other in (different_seed, different_split):
        assert all(a["A"] != b["A"] for a, b in zip(rows[:5], other, strict=True))


def test_rows_feasible_optimal_and_distributed_as_specified(task, rows):
    assert len(rows) == 20
    equality = []
    for row in rows:
        A = np.asarray(row["A"])
        assert A.shape == (10, 50)
        assert np.count_nonzero(A) == 100
        assert len(row["solution"]) == 50 and len(row["is_equality"]) == 10
        assert np.all(np.abs(row["c"]) <= 0.01) and np.all(np.abs(row["b"]) <= 1)
        _check_optimal(row)
        equality += row["is_equality"]
    # 200 rows, p = 0.3 (feasibility filtering lowers it a little): well inside a wide band
    assert 0.1 < np.mean(equality) < 0.45
    bounds = np.concatenate([np.asarray(r["lower"]) for r in rows] + [np.asarray(r["upper"]) for r in rows])
    assert 7 < bounds.std() < 13  # N(0, 10²) draws


def test_small_sizes_and_custom_nonzeros(cache):
    task = LinearProgramTask(cache_dir=cache / "custom", num_constraints=4, num_variables=7, nonzeros=9)
    data = task.build_dataset("train", 8, seed=3)
    assert task.dataset_path("train", 8, 3).name == "train-m4-n7-nnz9-8-seed3"
    for row in data:
        assert np.count_nonzero(row["A"]) == 9
        _check_optimal(row)


def test_cache_is_reused(task, rows, monkeypatch):
    assert task.dataset_path("train", 20, 0).is_dir()
    calls = []
    monkeypatch.setattr(lp_module, "linprog", lambda *a, **k: calls.append(1) or linprog(*a, **k))
    assert list(task.build_dataset("train", 20, seed=0)) == rows
    assert calls == []
    task.build_dataset("train", 2, seed=7)  # a new key does generate
    assert len(calls) >= 2


def test_encode_layout(task, small, rows):
    mixed = rows[:2] + list(small.build_dataset("train", 2, seed=0))
    enc = task.encode(mixed)
    B, T = 4, 60
    assert enc["input_features"].shape == (B, T, 10) and enc["input_features"].dtype == torch.float32
    assert enc["edge_features"].shape == (B, T, T, 2) and enc["edge_features"].dtype == torch.float32
    assert enc["attention_mask"].dtype == torch.long and enc["position_ids"].dtype == torch.long
    assert enc["labels"].shape == (B, T, 1)
    assert torch.equal(enc["position_ids"], torch.zeros(B, T, dtype=torch.long))
    assert enc["attention_mask"].sum(1).tolist() == [60, 60, 9, 9]

    features, edges, labels = enc["input_features"], enc["edge_features"], enc["labels"][..., 0]
    assert torch.equal(edges, edges.transpose(1, 2))  # i->j and j->i carry the same entry
    for k, row in enumerate(mixed):
        m, n = len(row["b"]), len(row["c"])
        A = torch.tensor(row["A"], dtype=torch.float32)
        assert torch.equal(edges[k, :m, m : m + n, 0], A)
        assert torch.equal(edges[k, :m, m : m + n, 1], (A != 0).float())
        assert not edges[k, :m, :m].any() and not edges[k, m:, m:].any() and not edges[k, m + n :].any()
        assert torch.all(features[k, :m, 0] == 1) and torch.all(features[k, m : m + n, 1] == 1)
        assert not features[k, m + n :].any()
        assert torch.allclose(features[k, :m, 2], torch.tensor(row["b"], dtype=torch.float32))
        assert torch.equal(features[k, :m, 3], torch.tensor(row["is_equality"], dtype=torch.float32))
        assert torch.equal(features[k, :m, 3] + features[k, :m, 4], torch.ones(m))
        assert torch.allclose(features[k, m : m + n, 5], torch.tensor(row["c"], dtype=torch.float32) * 100)
        assert torch.allclose(features[k, m : m + n, 6], torch.tensor(row["lower"], dtype=torch.float32) / 10)
        assert torch.allclose(features[k, m : m + n, 7], torch.tensor(row["upper"], dtype=torch.float32) / 10)
        assert torch.isnan(labels[k, :m]).all() and torch.isnan(labels[k, m + n :]).all()
        assert torch.allclose(labels[k, m : m + n], torch.tensor(row["solution"], dtype=torch.float32) / Y_SCALE)
    # inputs are O(1): the features the model sees and its targets are not tiny or huge
    real = enc["attention_mask"].bool()
    assert features[real].abs().max() < 10 and labels[torch.isfinite(labels)].abs().max() < 10

    unlabelled = [{k: v for k, v in row.items() if k != "solution"} for row in rows[:2]]
    assert "labels" not in task.encode(unlabelled)


def test_decode_round_trip_with_mixed_sizes(task, small, rows):
    mixed = [rows[0], *small.build_dataset("train", 2, seed=0), rows[1]]
    enc = task.encode(mixed)
    decoded = task.decode(enc["labels"], enc)
    for prediction, row in zip(decoded, mixed, strict=True):
        assert prediction.shape == (len(row["c"]),)
        assert torch.allclose(prediction.double(), torch.tensor(row["solution"], dtype=torch.float64), atol=1e-5)
    # logits at constraint and padding positions are ignored
    garbage = torch.where(torch.isnan(enc["labels"]), torch.full_like(enc["labels"], 123.0), enc["labels"])
    assert all(torch.equal(a, b) for a, b in zip(task.decode(garbage, enc), decoded, strict=True))


def test_metrics_exact_and_hand_computed(task, rows):
    exact = [torch.tensor(row["solution"], dtype=torch.float64) for row in rows[:4]]
    scores = task.compute_metrics(exact, rows[:4])
    assert set(scores) == {"relative_error", "relative_error_max", "objective_gap", "constraint_violation"}
    assert scores["relative_error"] == 0 and scores["relative_error_max"] == 0 and scores["objective_gap"] == 0
    assert scores["constraint_violation"] < 1e-6

    # a 2-variable problem: min y1 + y2 s.t. y1 + y2 <= 1 (ineq), y1 - y2 = 0 (eq), 0 <= y <= 2; y* = (0, 0)
    row = {
        "A": [[1.0, 1.0], [1.0, -1.0]],
        "b": [1.0, 0.0],
        "c": [1.0, 1.0],
        "lower": [0.0, 0.0],
        "upper": [2.0, 2.0],
        "is_equality": [False, True],
        "solution": [0.0, 0.0],
        "objective": 0.0,
    }
    wrong = torch.tensor([3.0, -1.0])  # A_ub y - b = 1 (violated by 1), A_eq y = 4, bounds: 3 > 2 by 1, -1 < 0 by 1
    scores = task.compute_metrics([wrong, torch.zeros(2)], [row, row])
    assert scores["relative_error"] == pytest.approx((math.sqrt(10) / 1 + 0) / 2)
    assert scores["relative_error_max"] == pytest.approx(math.sqrt(10))
    assert scores["objective_gap"] == pytest.approx((2 / 1 + 0) / 2)
    assert scores["constraint_violation"] == pytest.approx((1 + 4 + math.sqrt(2) + 0) / 2)


def test_metric_module_loads_by_path_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    metric = lp_module.LinearProgramTask.load_metric()
    assert metric.compute(predictions=[[1.0, 2.0]], references=[[1.0, 1.0]]) == {
        "relative_error": pytest.approx(1 / (math.sqrt(2) + 1)),
        "relative_error_max": pytest.approx(1 / (math.sqrt(2) + 1)),
    }


def test_perturb(task, rows):
    eps = 0.05
    perturbed, delta = task.perturb(rows[:5], eps, seed=0)
    assert delta.shape == (5,) and torch.allclose(delta, torch.full((5,), eps, dtype=delta.dtype))
    for before, after in zip(rows[:5], perturbed, strict=True):
        A0, A1 = np.asarray(before["A"]), np.asarray(after["A"])
        assert np.array_equal(A0 != 0, A1 != 0)
        assert after["is_equality"] == before["is_equality"]
        noise = np.concatenate(
            [
                (A1 - A0)[A0 != 0],
                np.subtract(after["b"], before["b"]),
                np.subtract(after["c"], before["c"]),
                np.subtract(after["lower"], before["lower"]),
                np.subtract(after["upper"], before["upper"]),
            ]
        )
        assert np.linalg.norm(noise) == pytest.approx(eps, rel=1e-9)
        assert np.all(np.asarray(after["lower"]) <= np.asarray(after["upper"]))
        _check_optimal(after)  # targets re-solved for the perturbed problem
    again, _ = task.perturb(rows[:5], eps, seed=0)
    other, _ = task.perturb(rows[:5], eps, seed=1)
    assert again == perturbed and other != perturbed
    unchanged, zero = task.perturb(rows[:2], 0.0, seed=0)
    assert torch.equal(zero, torch.zeros(2, dtype=zero.dtype))
    for before, after in zip(rows[:2], unchanged, strict=True):
        assert after["A"] == before["A"] and after["c"] == before["c"]
        np.testing.assert_allclose(after["solution"], before["solution"], atol=1e-9)


def test_perturb_gives_up_with_a_clear_error(task, rows, monkeypatch):
    monkeypatch.setattr(lp_module, "solve_lp", lambda *args: None)
    with pytest.raises(RuntimeError, match="no feasible perturbation"):
        task.perturb(rows[:1], 0.1, seed=0)


def test_solve_lp_reports_infeasible():
    A = np.array([[1.0], [1.0]])
    b = np.array([-1.0, 0.0])
    assert solve_lp(A, b, np.ones(1), np.zeros(1), np.ones(1), np.array([True, False])) is None


def test_tiny_model_learns(task, rows):
    torch.manual_seed(0)
    model = build_model(
        task,
        hidden_size=32,
        num_attention_heads=4,
        num_prelude_layers=1,
        num_core_layers=1,
        num_coda_layers=1,
        num_loops=4,
    )
    batch = task.encode(rows[:16])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(40):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert math.isfinite(losses[-1])
    assert losses[-1] < 0.5 * losses[0], losses

    model.eval()
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "labels"}, return_trajectory=True)
    assert len(out.trajectory) == 4
    predictions = task.decode(out.logits, batch)
    assert [p.shape[0] for p in predictions] == [50] * 16
    assert task.compute_metrics(predictions, rows[:16])["relative_error"] < 1.0
