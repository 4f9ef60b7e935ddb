"""Shortest paths in random perfect mazes as a token-classification problem, one token per grid square.

Generation (pure python)
------------------------
A maze of side ``size`` (odd, >= 5) is a ``size x size`` wall grid: the squares with both coordinates
odd are the ``m x m`` cells (``m = (size - 1) / 2``), the border is wall, and the square between two
neighbouring cells is open when the maze joins them. The maze is carved by a randomized depth-first
search (recursive backtracker, iterative) from a random cell, so it is a spanning tree of the cells:
a *perfect* maze, exactly one path between any two squares, so the start -> goal shortest path is
unique. Start and goal are two distinct random cells; the path is found by breadth-first search
(`shortest_path`). Thousands of 9 x 9 mazes take well under a second.

Rows: ``size`` (int), ``grid`` (``size x size`` token ids, see below), ``path`` (``size x size`` 0/1,
1 on the start -> goal path, start and goal included) and ``path_length`` (squares on the path).
Deterministic in ``(split, n, seed)`` (`split_rng`; a smaller ``n`` is a prefix), cached with
`cached_dataset`.

Sequence form
-------------
Square ``(r, c)`` is token ``t = size * r + c`` (row-major). ``input_ids``: ``PAD = 0`` (padding only),
``WALL = 1``, ``OPEN = 2``, ``START = 3``, ``GOAL = 4`` (vocab size 5); bidirectional attention.
``labels[b, t]`` = 1 if the square is on the path else 0, on every square (walls too, trivially 0).
A batch may mix sizes: rows are padded to the longest with ``input_ids = PAD``, ``attention_mask = 0``
and ``labels = -100``. `decode` takes the argmax per token of the first ``size²`` (unpadded) tokens:
one ``(size, size)`` bool path mask per sample.

Geometry (``relations=True``, the default) is given to the model as ``edge_features (B, T, T, 6)``
(float32): a one-hot relation of every pair of real squares, query ``i`` and key ``j``, in the order
``RELATIONS`` = self, up (``j`` is the square above ``i``), down, left, right, other, times
``relation_scale`` (default 10). The model turns them into a learned attention bias per head
(`ImplicitConfig.edge_features`, Graphormer-style): ``bias_h(i, j) = relation_scale * W[h, rel(i, j)]``.
The scale is there for the optimiser: Adam moves ``W`` by about the learning rate per step, and a
bias must reach a few units (the 4 neighbours against the ~T others) before attention is local. In a
500-step probe of the maze recipe (peak learning rate 2e-3, cosine) features of 1 left the loss at the
trivial 0.22; with 10 it fell below that after ~400 steps. ``position_ids`` are all zero (RoPE is then the identity),
so the operator a layer applies is local and the same at every size: a model trained on 9 x 9 mazes
runs unchanged on 13 x 13 or 17 x 17 (at 17 x 17, 289 tokens, the features take 2 MB per maze).
Pairs that involve a padded token have no relation (all zeros; the attention mask removes padded
keys anyway). With ``relations=False`` there are no edge features and ``position_ids = t`` (1-D
RoPE over the flattened grid: vertical neighbours are ``size`` apart, which ties a model to one size).

Metrics (``metrics/maze_metrics.py``): ``exact_match`` (the whole predicted mask equals the path) and
``cell_accuracy`` over the open squares (start and goal included).

Perturbation (Lipschitz probe on discrete inputs): `perturb` opens ONE random interior wall square
that lies between two cells. The maze then has one cycle and the shortest path may change; it is
recomputed by BFS (on a tie the fixed neighbour order up, left, right, down decides). ``||δ|| = 1`` per
row: one token changed (a Hamming distance; ``eps`` only has to be > 0, ``eps = 0`` changes nothing).
"""

from __future__ import annotations

import functools
from collections import deque
from pathlib import Path
from typing import Annotated, Any

import datasets
import numpy as np
import torch

from ...checks import Allowed, Positive
from ..base import Example, TaskAdapter, check_one_per_row, list_feature, row_generators

PAD, WALL, OPEN, START, GOAL = 0, 1, 2, 3, 4
VOCAB_SIZE = 5
RELATIONS = ("self", "up", "down", "left", "right", "other")  # the edge features, in this order
RELATION_SCALE = 10.0  # value of a relation feature (see the module docstring)


class MazeTask(TaskAdapter):
    """Mark the shortest start -> goal path of a random perfect maze, one token per grid square."""

    name = "maze"
    head = "token_classification"
    quality_metric = "exact_match"
    higher_is_better = True
    metric_name = "maze_metrics"

    def __init__(
        self,
        cache_dir: str | Path | None = None,
        size: Annotated[int, Allowed("an odd integer >= 5", lambda value: value >= 5 and value % 2 == 1)] = 9,
        relations: bool = True,
        relation_scale: Positive = RELATION_SCALE,
    ):
        super().__init__(cache_dir)
        self.size = int(size)
        self.relations = relations
        self.relation_scale = float(relation_scale)

    def model_config(self) -> dict[str, Any]:
        config = {
            "problem_type": "single_label_classification",
            "num_labels": 2,
            "vocab_size": VOCAB_SIZE,
            "is_causal": False,
        }
        if self.relations:
            config["edge_features"] = len(RELATIONS)
        return config

    # ------------------------------------------------------------------ data

    def dataset_path(self, split: str, n: int, seed: int) -> Path:
        """Where `build_dataset` caches ``(split, n, seed)``."""
        return self.cache_dir / f"{split}-size{self.size}-{n}-seed{seed}"

    def features(self):
        """The rows of `make_row`: ``size``, ``grid``, ``path``, ``path_length``."""
        square = list_feature(list_feature(datasets.Value("int8")))
        return datasets.Features(
            {
                "size": datasets.Value("int32"),
                "grid": square,
                "path": square,
                "path_length": datasets.Value("int32"),
            }
        )

    def generate(self, rng: np.random.Generator, n: int, split: str) -> list[Example]:
        """``n`` random mazes (`random_maze`) with their shortest paths."""
        return [make_row(random_maze(rng, self.size)) for _ in range(n)]

    # ------------------------------------------------------------------ encode / decode

    def encode(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask``, ``position_ids`` ``(B, T_max)``, with ``relations`` the
        ``edge_features (B, T_max, T_max, 6)``, and, when every row has its ``path``, ``labels``
        (padding: ``PAD`` / 0 / -100 / no relation)."""
        grids = [np.asarray(example["grid"], dtype=np.int64) for example in examples]
        for k, grid in enumerate(grids):
            if grid.ndim != 2 or grid.shape[0] != grid.shape[1]:
                raise ValueError(f"example {k}: grid must be square; got shape {grid.shape}")
        length = max(grid.size for grid in grids)
        batch = len(grids)
        input_ids = torch.full((batch, length), PAD, dtype=torch.long)
        attention_mask = torch.zeros(batch, length, dtype=torch.long)
        for k, grid in enumerate(grids):
            input_ids[k, : grid.size] = torch.from_numpy(grid.reshape(-1))
            attention_mask[k, : grid.size] = 1
        encoded = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.relations:
            edges = torch.zeros(batch, length, length, len(RELATIONS))
            for k, grid in enumerate(grids):
                side = grid.shape[0]
                edges[k, : side * side, : side * side] = grid_relations(side) * self.relation_scale
            encoded["edge_features"] = edges
            encoded["position_ids"] = torch.zeros(batch, length, dtype=torch.long)
        else:
            encoded["position_ids"] = torch.arange(length).expand(batch, -1).clone()
        if all(example.get("path") is not None for example in examples):
            labels = torch.full((batch, length), -100, dtype=torch.long)
            for k, (example, grid) in enumerate(zip(examples, grids, strict=True)):
                path = np.asarray(example["path"], dtype=np.int64)
                if path.shape != grid.shape:
                    raise ValueError(f"example {k}: path has shape {path.shape}, grid {grid.shape}")
                labels[k, : grid.size] = torch.from_numpy(path.reshape(-1))
            encoded["labels"] = labels
        return encoded

    def decode(self, logits: torch.Tensor, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The predicted path mask ``(size, size)`` (bool, on the CPU) of every sample."""
        if logits.ndim != 3 or logits.shape[-1] != 2:
            raise ValueError(f"logits must have shape (B, T, 2); got {tuple(logits.shape)}")
        mask = inputs.get("attention_mask")
        lengths = (
            mask.sum(-1).tolist() if mask is not None else [logits.shape[1]] * logits.shape[0]
        )  # unpadded tokens per row
        predicted = logits.detach().argmax(-1).cpu().bool()
        masks = []
        for k, length in enumerate(lengths):
            side = int(round(length**0.5))
            if side * side != length:
                raise ValueError(f"sample {k}: {length} tokens is not a square grid")
            masks.append(predicted[k, :length].reshape(side, side))
        return masks

    # ------------------------------------------------------------------ metrics

    def compute_metrics(self, predictions: list[torch.Tensor], examples: list[Example]) -> dict[str, float]:
        """``exact_match`` (headline) and ``cell_accuracy`` over the open squares, means over samples."""
        check_one_per_row(predictions, examples)
        return self.load_metric().compute(
            predictions=[np.asarray(torch.as_tensor(p).cpu(), dtype=np.int64).reshape(-1) for p in predictions],
            references=[_reference(example) for example in examples],
        )

    # ------------------------------------------------------------------ perturbations

    def perturb_rows(self, examples: list[Example], eps: float, seed: int) -> tuple[list[Example], torch.Tensor]:
        """Rows with one random interior wall square between two cells opened, path recomputed by BFS;
        ``||δ|| = 1`` per row (``eps = 0``: rows unchanged, ``||δ|| = 0``)."""
        generators = row_generators(seed, len(examples))
        perturbed, norms = [], []
        for k, (example, rng) in enumerate(zip(examples, generators, strict=True)):
            grid = [list(row) for row in example["grid"]]
            side = len(grid)
            walls = [
                (r, c)
                for r in range(1, side - 1)
                for c in range(1, side - 1)
                if (r + c) % 2 == 1 and grid[r][c] == WALL
            ]
            if not walls:
                raise ValueError(f"example {k}: no interior wall left to open")
            r, c = walls[int(rng.integers(len(walls)))]
            grid[r][c] = OPEN
            perturbed.append({**example, **make_row(grid)})
            norms.append(1.0)
        return perturbed, torch.tensor(norms, dtype=torch.float64)


# ---------------------------------------------------------------------- maze generation and search


def random_maze(rng: np.random.Generator, size: int) -> list[list[int]]:
    """A random perfect maze with a random start and goal: ``size x size`` token ids (randomized DFS)."""
    m = (size - 1) // 2
    grid = [[WALL] * size for _ in range(size)]
    visited = [[False] * m for _ in range(m)]
    first = int(rng.integers(m * m))
    stack = [(first // m, first % m)]
    visited[first // m][first % m] = True
    grid[2 * (first // m) + 1][2 * (first % m) + 1] = OPEN
    draws = rng.random(4 * m * m).tolist()  # one uniform per DFS step (at most 2 m² - 1 steps)
    step = 0
    while stack:
        i, j = stack[-1]
        options = [
            (a, b)
            for a, b in ((i - 1, j), (i, j - 1), (i, j + 1), (i + 1, j))
            if 0 <= a < m and 0 <= b < m and not visited[a][b]
        ]
        if not options:
            stack.pop()
            continue
        a, b = options[int(draws[step] * len(options))]
        step += 1
        visited[a][b] = True
        grid[i + a + 1][j + b + 1] = OPEN  # the square between (i, j) and (a, b)
        grid[2 * a + 1][2 * b + 1] = OPEN
        stack.append((a, b))
    start, goal = (int(x) for x in rng.choice(m * m, size=2, replace=False))
    grid[2 * (start // m) + 1][2 * (start % m) + 1] = START
    grid[2 * (goal // m) + 1][2 * (goal % m) + 1] = GOAL
    return grid


def _find(grid: list[list[int]], token: int) -> tuple[int, int]:
    hits = [(r, c) for r, row in enumerate(grid) for c, value in enumerate(row) if value == token]
    if len(hits) != 1:
        raise ValueError(f"the grid must hold exactly one token {token}; found {len(hits)}")
    return hits[0]


def shortest_path(grid: list[list[int]]) -> list[tuple[int, int]]:
    """The squares of a shortest START -> GOAL path through non-wall squares (BFS; neighbours in the
    order up, left, right, down). `ValueError` if the goal cannot be reached."""
    side = len(grid)
    start, goal = _find(grid, START), _find(grid, GOAL)
    parent: dict[tuple[int, int], tuple[int, int] | None] = {start: None}
    queue = deque([start])
    while queue:
        r, c = queue.popleft()
        if (r, c) == goal:
            break
        for a, b in ((r - 1, c), (r, c - 1), (r, c + 1), (r + 1, c)):
            if 0 <= a < side and 0 <= b < side and grid[a][b] not in (WALL, PAD) and (a, b) not in parent:
                parent[(a, b)] = (r, c)
                queue.append((a, b))
    if goal not in parent:
        raise ValueError("the goal cannot be reached from the start")
    path, node = [], goal
    while node is not None:
        path.append(node)
        node = parent[node]
    return path[::-1]


def make_row(grid: list[list[int]]) -> Example:
    """A data-set row of ``grid``: its size, the grid, the shortest-path mask and the path length."""
    side = len(grid)
    path = [[0] * side for _ in range(side)]
    squares = shortest_path(grid)
    for r, c in squares:
        path[r][c] = 1
    return {"size": side, "grid": [list(row) for row in grid], "path": path, "path_length": len(squares)}


# ---------------------------------------------------------------------- helpers


@functools.lru_cache(maxsize=8)
def grid_relations(side: int) -> torch.Tensor:
    """The one-hot relation ``(side², side², 6)`` (float32) of every pair of squares of a ``side x side``
    grid, query square ``i = side * r + c`` and key square ``j``, in the order of `RELATIONS`: self,
    up (``j = (r - 1, c)``), down (``(r + 1, c)``), left (``(r, c - 1)``), right (``(r, c + 1)``), other.
    Cached per side; callers copy it."""
    n = side * side
    r, c = torch.arange(n) // side, torch.arange(n) % side
    dr, dc = r[None, :] - r[:, None], c[None, :] - c[:, None]  # key minus query
    kinds = torch.full((n, n), RELATIONS.index("other"))
    for name, (a, b) in {"self": (0, 0), "up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}.items():
        kinds[(dr == a) & (dc == b)] = RELATIONS.index(name)
    return torch.nn.functional.one_hot(kinds, len(RELATIONS)).float()


def _reference(example: Example) -> np.ndarray:
    """The path mask flattened, with -1 on walls (the metric ignores them for cell accuracy)."""
    grid = np.asarray(example["grid"], dtype=np.int64).reshape(-1)
    path = np.asarray(example["path"], dtype=np.int64).reshape(-1)
    return np.where(grid == WALL, -1, path)
