"""The maze task: generator (perfect mazes, BFS paths), cache, encoding with mixed sizes, metrics,
perturbations and a tiny training run."""

import math
from collections import deque

import numpy as np
import pytest
import torch
from tiny_training import train_tiny

from implicit_hf.tasks import get_task
from implicit_hf.tasks.reasoning import maze as maze_module
from implicit_hf.tasks.reasoning.maze import GOAL, OPEN, PAD, START, WALL, MazeTask


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("maze-cache")


@pytest.fixture(scope="module")
def task(cache):
    return MazeTask(cache_dir=cache, size=9)


@pytest.fixture(scope="module")
def rows(task):
    return list(task.build_dataset("train", 200, seed=0))


def neighbours(grid, r, c):
    side = len(grid)
    for a, b in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
        if 0 <= a < side and 0 <= b < side and grid[a][b] != WALL:
            yield a, b


def bfs_distances(grid, source):
    distance = {source: 0}
    queue = deque([source])
    while queue:
        node = queue.popleft()
        for nb in neighbours(grid, *node):
            if nb not in distance:
                distance[nb] = distance[node] + 1
                queue.append(nb)
    return distance


def check_path(grid, path):
    """``path`` (mask) is a simple start -> goal path of shortest length; returns its length."""
    squares = [(r, c) for r, row in enumerate(path) for c, v in enumerate(row) if v]
    start = next((r, c) for r, row in enumerate(grid) for c, v in enumerate(row) if v == START)
    goal = next((r, c) for r, row in enumerate(grid) for c, v in enumerate(row) if v == GOAL)
    on = set(squares)
    assert start in on and goal in on
    assert all(grid[r][c] != WALL for r, c in on)
    # a simple path: start and goal have one neighbour on the path, every other square two
    for node in on:
        degree = sum(nb in on for nb in neighbours(grid, *node))
        assert degree == (1 if node in (start, goal) else 2), node
    assert len(on) == bfs_distances(grid, start)[goal] + 1  # as short as BFS says
    return len(on)


# ---------------------------------------------------------------------- the task


def test_registered_and_model_config(task):
    assert isinstance(get_task("maze", cache_dir=task.cache_dir, size=13), MazeTask)
    assert task.model_config() == {
        "problem_type": "single_label_classification",
        "num_labels": 2,
        "vocab_size": 5,
        "is_causal": False,
        "edge_features": 6,
    }
    assert "edge_features" not in MazeTask(size=9, relations=False).model_config()
    for bad in (8, 3, 9.0, True):
        with pytest.raises(ValueError, match="odd integer"):
            MazeTask(size=bad)
    for bad in (0, -1.0, True, "10"):
        with pytest.raises(ValueError, match="relation_scale"):
            MazeTask(relation_scale=bad)
    with pytest.raises(ValueError, match="relations"):
        MazeTask(relations=1)


def test_generator_deterministic_and_split_dependent(rows, tmp_path):
    other_cache = MazeTask(cache_dir=tmp_path, size=9)
    assert list(other_cache.build_dataset("train", 200, seed=0)) == rows  # regenerated, not the cached copy
    assert list(other_cache.build_dataset("train", 20, seed=0)) == rows[:20]  # a prefix of the same stream
    for other in (other_cache.build_dataset("train", 20, seed=1), other_cache.build_dataset("test", 20, seed=0)):
        assert sum(a["grid"] == b["grid"] for a, b in zip(rows[:20], other, strict=True)) <= 2
    with pytest.raises(ValueError):
        other_cache.build_dataset("train", -1, seed=0)


@pytest.mark.parametrize("size", [5, 9, 13, 17])
def test_mazes_are_perfect_and_paths_are_shortest(task, rows, size):
    sample = (
        rows
        if size == 9
        else [maze_module.make_row(maze_module.random_maze(np.random.default_rng(s), size)) for s in range(30)]
    )
    lengths = []
    for row in sample:
        grid = row["grid"]
        assert row["size"] == len(grid) == size and all(len(line) == size for line in grid)
        values = [v for line in grid for v in line]
        assert values.count(START) == 1 and values.count(GOAL) == 1 and set(values) <= {WALL, OPEN, START, GOAL}
        assert all(v == WALL for v in grid[0] + grid[-1] + [line[0] for line in grid] + [line[-1] for line in grid])
        cells = [(r, c) for r in range(1, size, 2) for c in range(1, size, 2)]
        assert all(grid[r][c] != WALL for r, c in cells)  # every cell open
        assert all(grid[r][c] == WALL for r in range(0, size, 2) for c in range(0, size, 2))  # every corner wall
        open_squares = [(r, c) for r in range(size) for c in range(size) if grid[r][c] != WALL]
        edges = sum(1 for r, c in open_squares for nb in neighbours(grid, r, c)) // 2
        assert edges == len(open_squares) - 1  # a tree ...
        assert len(bfs_distances(grid, open_squares[0])) == len(open_squares)  # ... that is connected
        assert row["path_length"] == check_path(grid, row["path"])
        lengths.append(row["path_length"])
    assert max(lengths) > min(lengths)


def test_generation_is_fast():
    import time

    rng = np.random.default_rng(0)
    begin = time.perf_counter()
    for _ in range(1000):
        maze_module.make_row(maze_module.random_maze(rng, 9))
    assert time.perf_counter() - begin < 2.0


def test_shortest_path_rejects_unreachable_goal():
    grid = [[WALL] * 5 for _ in range(5)]
    grid[1][1], grid[3][3] = START, GOAL
    with pytest.raises(ValueError, match="cannot be reached"):
        maze_module.shortest_path(grid)


def test_encode_mixed_sizes_and_decode_round_trip(task, rows):
    small = maze_module.make_row(maze_module.random_maze(np.random.default_rng(1), 5))
    batch = [rows[0], small, rows[1]]
    enc = task.encode(batch)
    assert set(enc) == {"input_ids", "attention_mask", "position_ids", "edge_features", "labels"}
    assert enc["input_ids"].shape == enc["labels"].shape == (3, 81)
    assert enc["edge_features"].shape == (3, 81, 81, 6) and enc["edge_features"].dtype == torch.float32
    assert enc["attention_mask"][1].tolist() == [1] * 25 + [0] * 56
    assert enc["attention_mask"][0].sum() == 81 and enc["attention_mask"][2].sum() == 81
    assert torch.equal(enc["input_ids"][1, 25:], torch.full((56,), PAD))
    assert torch.equal(enc["labels"][1, 25:], torch.full((56,), -100))
    assert torch.equal(enc["position_ids"], torch.zeros(3, 81, dtype=torch.long))  # no absolute positions
    assert enc["input_ids"][0].reshape(9, 9).tolist() == rows[0]["grid"]  # row-major
    assert enc["labels"][0].reshape(9, 9).tolist() == rows[0]["path"]
    assert enc["labels"][1, :25].reshape(5, 5).tolist() == small["path"]
    assert "labels" not in task.encode([{"grid": rows[0]["grid"]}])
    # one-hot logits of the labels decode to the paths
    logits = torch.nn.functional.one_hot(enc["labels"].clamp(min=0), 2).float()
    logits[enc["labels"] < 0] = torch.tensor([0.0, 5.0])  # padding must be ignored
    decoded = task.decode(logits, enc)
    assert [tuple(d.shape) for d in decoded] == [(9, 9), (5, 5), (9, 9)]
    assert all(d.dtype == torch.bool for d in decoded)
    for d, row in zip(decoded, batch, strict=True):
        assert d.int().tolist() == row["path"]
    assert task.compute_metrics(decoded, batch) == {"exact_match": 1.0, "cell_accuracy": 1.0}
    with pytest.raises(ValueError, match="logits must have shape"):
        task.decode(logits[..., :1], enc)
    with pytest.raises(ValueError, match="encode needs"):
        task.encode([])


def test_relations_mark_exactly_the_four_neighbours(task, rows):
    small = maze_module.make_row(maze_module.random_maze(np.random.default_rng(1), 5))
    enc = task.encode([rows[0], small])
    edges = enc["edge_features"] / maze_module.RELATION_SCALE
    kind = {name: k for k, name in enumerate(maze_module.RELATIONS)}
    for b, side in ((0, 9), (1, 5)):
        n = side * side
        real = edges[b, :n, :n]
        assert torch.equal(real.sum(-1), torch.ones(n, n))  # exactly one relation per pair of real squares
        assert set(real.unique().tolist()) == {0.0, 1.0}
        for i in range(n):
            r, c = divmod(i, side)
            expected = {
                "self": [i],
                "up": [(r - 1) * side + c] if r > 0 else [],
                "down": [(r + 1) * side + c] if r < side - 1 else [],
                "left": [r * side + c - 1] if c > 0 else [],  # no wrap-around to the previous row
                "right": [r * side + c + 1] if c < side - 1 else [],
            }
            for name, keys in expected.items():
                assert real[i, :, kind[name]].nonzero().flatten().tolist() == keys, (side, i, name)
            others = n - sum(len(keys) for keys in expected.values())
            assert int(real[i, :, kind["other"]].sum()) == others
    # the padded rows and columns of the 5 x 5 maze have no relation at all
    assert not edges[1, 25:].any() and not edges[1, :, 25:].any()
    # the relation of two squares depends on their offset only: a 9 x 9 block of the 13 x 13 grid is the 9 x 9 grid
    big = maze_module.grid_relations(13).reshape(13, 13, 13, 13, 6)
    assert torch.equal(big[2:11, 3:12, 2:11, 3:12].reshape(81, 81, 6), maze_module.grid_relations(9))
    # relation_scale sets the feature value; relations=False restores the 1-D positions and drops the features
    scaled = MazeTask(cache_dir=task.cache_dir, relation_scale=2.5).encode([rows[0]])["edge_features"]
    assert torch.equal(scaled, 2.5 * edges[:1])
    plain = MazeTask(cache_dir=task.cache_dir, relations=False).encode([rows[0], small])
    assert "edge_features" not in plain and torch.equal(plain["position_ids"], torch.arange(81).expand(2, -1))
    assert torch.equal(plain["input_ids"], enc["input_ids"]) and torch.equal(plain["labels"], enc["labels"])


def test_metrics_hand_computed(task):
    # 5 x 5 maze: cells (1,1) (1,3) (3,1) (3,3); open squares: 4 cells + 3 joins = 7
    grid = [
        [1, 1, 1, 1, 1],
        [1, 3, 2, 2, 1],
        [1, 2, 1, 2, 1],
        [1, 2, 1, 4, 1],
        [1, 1, 1, 1, 1],
    ]
    row = maze_module.make_row(grid)
    path = torch.tensor(row["path"], dtype=torch.bool)
    assert row["path_length"] == 5 and path.sum() == 5
    wrong_open = path.clone()
    wrong_open[2, 1] = True  # an open square off the path marked: 6 of 7 open squares right
    wrong_wall = path.clone()
    wrong_wall[0, 0] = True  # a wall marked: open squares all right, but not an exact match
    scores = task.compute_metrics([path, wrong_open, wrong_wall], [row, row, row])
    assert scores["exact_match"] == pytest.approx(1 / 3)
    assert scores["cell_accuracy"] == pytest.approx((1 + 6 / 7 + 1) / 3)
    empty = torch.zeros(5, 5, dtype=torch.bool)
    assert task.compute_metrics([empty], [row]) == {"exact_match": 0.0, "cell_accuracy": pytest.approx(2 / 7)}


def test_metric_module_loads_by_path_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    metric = maze_module.MazeTask.load_metric()
    assert metric.compute(predictions=[[0, 1, 1], [1, 0, 0, 0]], references=[[-1, 1, 1], [1, 1, 0, -1]]) == {
        "exact_match": 0.5,
        "cell_accuracy": pytest.approx((1 + 2 / 3) / 2),
    }
    with pytest.raises(ValueError, match="no open square"):
        metric.compute(predictions=[[0]], references=[[-1]])


# ---------------------------------------------------------------------- perturbations


def test_perturb(task, rows):
    perturbed, delta = task.perturb(rows[:20], 1.0, seed=0)
    assert torch.equal(delta, torch.ones(20, dtype=torch.float64))
    changed_path = 0
    for before, after in zip(rows[:20], perturbed, strict=True):
        diff = [(r, c) for r in range(9) for c in range(9) if before["grid"][r][c] != after["grid"][r][c]]
        assert len(diff) == 1
        (r, c) = diff[0]
        assert before["grid"][r][c] == WALL and after["grid"][r][c] == OPEN
        assert 0 < r < 8 and 0 < c < 8 and (r + c) % 2 == 1  # an interior wall between two cells
        assert after["path_length"] == check_path(after["grid"], after["path"])  # recomputed, still shortest
        assert after["path_length"] <= before["path_length"]
        changed_path += after["path"] != before["path"]
    assert changed_path > 0
    again, _ = task.perturb(rows[:20], 1.0, seed=0)
    other, _ = task.perturb(rows[:20], 1.0, seed=1)
    assert again == perturbed and other != perturbed
    unchanged, zero = task.perturb(rows[:2], 0.0, seed=0)
    assert unchanged == rows[:2] and torch.equal(zero, torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="eps"):
        task.perturb(rows[:2], -1.0, seed=0)


# ---------------------------------------------------------------------- training


def test_training_run_lowers_the_loss(tmp_path, monkeypatch):
    losses, result = train_tiny(
        tmp_path,
        monkeypatch,
        "maze",
        {"num_loops": 4},
        task_module="implicit_hf.tasks.reasoning.maze",
        task_kwargs={"size": 7},
        max_steps=60,
    )
    assert len(losses) == 6 and all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < 0.5 * losses[0], losses
    assert result.metrics["eval/loss"] < 0.6 * losses[0]
    assert (tmp_path / "cache" / "maze" / "train-size7-64-seed0").is_dir()  # generated into IMPLICIT_HF_CACHE
    # the model trained on 7 x 7 mazes is scored on 11 x 11 ones through the eval harness (--task-kwargs)
    from implicit_hf.eval import run_eval

    report = run_eval(
        tmp_path / "out" / "model", None, [1, 4], tmp_path / "eval11", n=6, task_kwargs={"size": 11}, plots=False
    )
    assert report["task"]["task_kwargs"] == {"size": 11}
    assert report["run"]["seq_len_mean"] == 121  # the edge features followed the size
    assert [record["loops"] for record in report["records"]] == [1, 4]
    assert all(0.0 <= record["quality"] <= 1.0 for record in report["records"])


def test_model_forward_on_a_mixed_size_batch(task, rows):
    from implicit_hf.tasks.models import build_model

    torch.manual_seed(0)
    model = build_model(
        task, hidden_size=32, num_attention_heads=4, num_prelude_layers=0, num_core_layers=1, num_coda_layers=0
    )
    small = maze_module.make_row(maze_module.random_maze(np.random.default_rng(2), 5))
    big = maze_module.make_row(maze_module.random_maze(np.random.default_rng(3), 17))
    enc = task.encode([small, rows[0], big])
    assert enc["input_ids"].shape == (3, 289) and enc["edge_features"].shape == (3, 289, 289, 6)
    out = model(**enc)
    assert out.logits.shape == (3, 289, 2) and torch.isfinite(out.loss)
    assert [tuple(d.shape) for d in task.decode(out.logits, enc)] == [(5, 5), (9, 9), (17, 17)]
    # padding does not change a row's outputs
    alone = model(**task.encode([small]))
    assert torch.allclose(alone.logits[0], out.logits[0, :25], atol=1e-4)
