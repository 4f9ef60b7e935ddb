"""9x9 sudoku as a token-classification problem: puzzle grid -> solution grid, one token per cell.

Generation (pure python, bitmasks)
----------------------------------
1. A random full solution: the base pattern ``g[r][c] = (3 (r mod 3) + r // 3 + c) mod 9 + 1`` with
   random validity-preserving symmetries applied: a permutation of the three bands, of the rows
   inside each band, of the three stacks, of the columns inside each stack, of the digits, and a
   transpose with probability 1/2.
2. Givens are removed one at a time, cells in a random order, and a removal is kept only if the
   puzzle still has a UNIQUE solution; removal stops at ``min_givens`` givens. A removal is
   accepted without search when the removed cell is a naked single (its row, column and box leave
   one candidate) or a hidden single (its digit fits no other blank cell of its row, column or
   box): then the remaining givens force it and the solution set does not change. Otherwise
   `count_solutions` (depth-first search over bitmasks, the fewest-candidates cell first) counts
   solutions up to 2. If the pass over all 81 cells ends above ``min_givens`` (the puzzle became
   minimal), the attempt is dropped and a new solution is drawn.
3. ``needs_search`` records whether naked + hidden singles alone leave blanks (`solve_by_singles`).
   With ``require_search=True`` puzzles that singles solve are redrawn (the "hard" setting).

Settings: ``min_givens=30`` ("easy", the default: ~13% of puzzles need search) and e.g.
``min_givens=25, require_search=True`` ("hard": every puzzle needs search; at 25 givens without
the requirement ~40% do). Speed on one core (pure python): ~390 puzzles/s easy, ~75/s at 25 givens,
~30/s at 25 givens with ``require_search`` (1000 / 200 / 100 puzzles timed).

Rows: ``puzzle`` (81 ints, row-major, 0 = blank), ``solution`` (81 ints 1-9), ``givens`` (int),
``needs_search`` (bool). Deterministic in ``(split, n, seed)`` (`split_rng`; a smaller ``n`` is a
prefix), cached with `cached_dataset`.

Sequence form
-------------
81 tokens, cell ``(r, c)`` at ``t = 9 r + c``: ``input_ids`` = the puzzle (0 blank, 1-9 given; vocab
size 10), bidirectional attention. With ``relations=True`` (the default) the rules' geometry is given
as ``edge_features (B, 81, 81, 4)`` (float32), for query cell ``i`` and key cell ``j`` in the order
``RELATIONS`` = self (``i = j``), same row, same column, same box (``j != i``; a cell in the same row
and box has both), all zeros for cells that share no unit, times ``relation_scale`` (default 10, so
that Adam's steps of about the learning rate move the attention bias ten times as fast, as for
mazes); the model turns them into a learned attention bias per head (`ImplicitConfig.edge_features`),
and ``position_ids`` are all zero (RoPE is the identity, so the operator is the same at every cell,
as the rules are). With ``relations=False``
there are no edge features and ``position_ids`` = ``t`` (1-D RoPE over the flattened grid).
``labels[b, t]`` = solution digit - 1 on every cell (9 classes; givens too: the model must copy
them). `decode` takes the argmax per cell, + 1, and copies the givens from ``input_ids``: one
``(9, 9)`` grid of digits per sample. Metrics (``metrics/sudoku_metrics.py``): ``exact_match``
(the whole grid right) and ``cell_accuracy`` over the blank cells.

Perturbation (Lipschitz probe on discrete inputs): `perturb` blanks ONE random given of each row.
The puzzle may then have several solutions; the stored solution stays a valid target (it still
agrees with every remaining given), so the target is kept unchanged. ``||δ|| = 1`` per row: one
token of the input changed (a Hamming distance; ``eps`` only has to be > 0 and sets nothing else).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Any

import datasets
import numpy as np
import torch

from ...checks import Allowed, Positive
from ..base import Example, TaskAdapter, check_one_per_row, list_feature, row_generators

CELLS = 81
ALL = (1 << 9) - 1  # candidate bitmask: bit d-1 <-> digit d

ROW = [i // 9 for i in range(CELLS)]
COL = [i % 9 for i in range(CELLS)]
BOX = [(i // 27) * 3 + (i % 9) // 3 for i in range(CELLS)]
POPCOUNT = [bin(m).count("1") for m in range(1 << 9)]
DIGIT = {1 << d: d + 1 for d in range(9)}  # single-bit mask -> digit
UNITS = [[r * 9 + c for c in range(9)] for r in range(9)]
UNITS += [[r * 9 + c for r in range(9)] for c in range(9)]
UNITS += [[(b // 3) * 27 + (b % 3) * 3 + (k // 3) * 9 + k % 3 for k in range(9)] for b in range(9)]
RELATIONS = ("self", "row", "column", "box")  # the edge features, in this order
RELATION_SCALE = 10.0  # value of a relation feature (see the module docstring)
PEERS = [sorted({j for unit in UNITS if i in unit for j in unit} - {i}) for i in range(CELLS)]
CELL_UNITS = [[unit for unit in UNITS if i in unit] for i in range(CELLS)]

_MAX_ATTEMPTS = 1000  # solutions drawn per puzzle before giving up (unreachable settings)


# ---------------------------------------------------------------------- solver


def _masks(grid: list[int]) -> tuple[list[int], list[int], list[int]] | None:
    """Row, column and box bitmasks of the digits placed in ``grid``, or None if a digit repeats."""
    rows, cols, boxes = [0] * 9, [0] * 9, [0] * 9
    for i, v in enumerate(grid):
        if v:
            bit = 1 << (v - 1)
            r, c, b = ROW[i], COL[i], BOX[i]
            if (rows[r] | cols[c] | boxes[b]) & bit:
                return None
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
    return rows, cols, boxes


def solve(grid: list[int], limit: int = 2) -> list[list[int]]:
    """Up to ``limit`` solutions of the 81-cell ``grid`` (0 = blank), each a list of 81 digits."""
    masks = _masks(list(grid))
    if masks is None:
        return []
    rows, cols, boxes = masks
    cells = list(grid)
    empties = [i for i in range(CELLS) if not cells[i]]
    found: list[list[int]] = []

    def search(n: int) -> bool:  # fills empties[:n]; True when ``limit`` solutions are found
        if n == 0:
            found.append(list(cells))
            return len(found) >= limit
        best, best_count, best_mask = -1, 10, 0
        for k in range(n):
            i = empties[k]
            mask = ALL & ~(rows[ROW[i]] | cols[COL[i]] | boxes[BOX[i]])
            count = POPCOUNT[mask]
            if count < best_count:
                best, best_count, best_mask = k, count, mask
                if count <= 1:
                    break
        if best_count == 0:
            return False
        i = empties[best]
        empties[best], empties[n - 1] = empties[n - 1], i
        r, c, b = ROW[i], COL[i], BOX[i]
        mask = best_mask
        stop = False
        while mask:
            bit = mask & -mask
            mask ^= bit
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
            cells[i] = DIGIT[bit]
            stop = search(n - 1)
            rows[r] ^= bit
            cols[c] ^= bit
            boxes[b] ^= bit
            if stop:
                break
        cells[i] = 0
        empties[best], empties[n - 1] = empties[n - 1], empties[best]
        return stop

    search(len(empties))
    return found


def count_solutions(grid: list[int], limit: int = 2) -> int:
    """The number of solutions of ``grid``, counted up to ``limit``."""
    return len(solve(grid, limit))


def solve_by_singles(grid: list[int]) -> list[int]:
    """``grid`` filled by naked and hidden singles only, until neither applies (blanks may remain)."""
    cells = list(grid)
    masks = _masks(cells)
    if masks is None:
        return cells
    rows, cols, boxes = masks

    def place(i: int, bit: int) -> None:
        cells[i] = DIGIT[bit]
        rows[ROW[i]] |= bit
        cols[COL[i]] |= bit
        boxes[BOX[i]] |= bit

    progress = True
    while progress:
        progress = False
        for i in range(CELLS):  # naked singles
            if not cells[i]:
                mask = ALL & ~(rows[ROW[i]] | cols[COL[i]] | boxes[BOX[i]])
                if POPCOUNT[mask] == 1:
                    place(i, mask)
                    progress = True
        for unit in UNITS:  # hidden singles
            for d in range(9):
                bit = 1 << d
                spots = [i for i in unit if not cells[i] and not (rows[ROW[i]] | cols[COL[i]] | boxes[BOX[i]]) & bit]
                if len(spots) == 1 and not any(cells[j] == d + 1 for j in unit):
                    place(spots[0], bit)
                    progress = True
    return cells


def is_valid_solution(grid: list[int]) -> bool:
    """Whether the 81 cells hold 1-9 once in every row, column and box."""
    return len(grid) == CELLS and all(sorted(grid[i] for i in unit) == list(range(1, 10)) for unit in UNITS)


# ---------------------------------------------------------------------- generator


def random_solution(rng: np.random.Generator) -> list[int]:
    """A random full grid: the base pattern under random band/row/stack/column/digit permutations and transpose."""
    bands, stacks = rng.permutation(3), rng.permutation(3)
    row_order = [3 * int(band) + int(r) for band in bands for r in rng.permutation(3)]
    col_order = [3 * int(stack) + int(c) for stack in stacks for c in rng.permutation(3)]
    digits = [int(d) + 1 for d in rng.permutation(9)]
    transpose = bool(rng.integers(2))
    grid = [0] * CELLS
    for r in range(9):
        for c in range(9):
            rr, cc = row_order[r], col_order[c]
            grid[r * 9 + c] = digits[(3 * (rr % 3) + rr // 3 + cc) % 9]
    if transpose:
        grid = [grid[(i % 9) * 9 + i // 9] for i in range(CELLS)]
    return grid


def _forced(puzzle: list[int], i: int, digit: int) -> bool:
    """Whether blank cell ``i`` is forced to ``digit`` by the other cells as a naked or hidden single."""
    seen = 0
    for j in PEERS[i]:
        if puzzle[j]:
            seen |= 1 << (puzzle[j] - 1)
    if POPCOUNT[ALL & ~seen] == 1:
        return True
    for unit in CELL_UNITS[i]:
        # hidden single in `unit`: every other blank cell of the unit sees `digit` among its peers
        if all(puzzle[j] or any(puzzle[k] == digit for k in PEERS[j]) for j in unit if j != i):
            return True
    return False


def make_puzzle(rng: np.random.Generator, min_givens: int, require_search: bool = False) -> Example:
    """One row: a puzzle with a unique solution and ``min_givens`` givens (see the module docstring)."""
    if not 17 <= min_givens <= CELLS:
        raise ValueError(f"min_givens must be in [17, 81]; got {min_givens!r}")
    for _ in range(_MAX_ATTEMPTS):
        solution = random_solution(rng)
        puzzle = list(solution)
        givens = CELLS
        for i in rng.permutation(CELLS).tolist():
            if givens == min_givens:
                break
            digit = puzzle[i]
            puzzle[i] = 0
            if _forced(puzzle, i, digit) or count_solutions(puzzle, 2) == 1:
                givens -= 1
            else:
                puzzle[i] = digit
        if givens != min_givens:
            continue
        needs_search = 0 in solve_by_singles(puzzle)
        if require_search and not needs_search:
            continue
        return {"puzzle": puzzle, "solution": solution, "givens": givens, "needs_search": needs_search}
    raise RuntimeError(
        f"no puzzle with {min_givens} givens{' that needs search' if require_search else ''} "
        f"in {_MAX_ATTEMPTS} attempts; raise min_givens"
    )


# ---------------------------------------------------------------------- the task


class SudokuTask(TaskAdapter):
    """Fill in a 9x9 sudoku, one token per cell: input digit (0 blank) -> solution digit (9 classes)."""

    name = "sudoku"
    head = "token_classification"
    quality_metric = "exact_match"
    higher_is_better = True
    metric_name = "sudoku_metrics"

    def __init__(
        self,
        cache_dir: str | Path | None = None,
        min_givens: Annotated[int, Allowed(f"an integer in [17, {CELLS}]", lambda value: 17 <= value <= CELLS)] = 30,
        require_search: bool = False,
        relations: bool = True,
        relation_scale: Positive = RELATION_SCALE,
    ):
        super().__init__(cache_dir)
        self.min_givens = int(min_givens)
        self.require_search = require_search
        self.relations = relations
        self.relation_scale = float(relation_scale)

    num_tokens = CELLS

    def model_config(self) -> dict[str, Any]:
        config = {"problem_type": "single_label_classification", "num_labels": 9, "vocab_size": 10, "is_causal": False}
        if self.relations:
            config["edge_features"] = len(RELATIONS)
        return config

    # ------------------------------------------------------------------ data

    def dataset_path(self, split: str, n: int, seed: int) -> Path:
        """Where `build_dataset` caches ``(split, n, seed)``."""
        search = "-search" if self.require_search else ""
        return self.cache_dir / f"{split}-givens{self.min_givens}{search}-{n}-seed{seed}"

    def features(self):
        """The rows of `make_puzzle`: ``puzzle``, ``solution``, ``givens``, ``needs_search``."""
        return datasets.Features(
            {
                "puzzle": list_feature(datasets.Value("int8")),
                "solution": list_feature(datasets.Value("int8")),
                "givens": datasets.Value("int32"),
                "needs_search": datasets.Value("bool"),
            }
        )

    def generate(self, rng: np.random.Generator, n: int, split: str) -> list[Example]:
        """``n`` random puzzles (`make_puzzle`)."""
        return [make_puzzle(rng, self.min_givens, self.require_search) for _ in range(n)]

    # ------------------------------------------------------------------ encode / decode

    def encode(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        """``input_ids (B, 81)`` (0 blank, 1-9 given), ``attention_mask``, ``position_ids``, with ``relations``
        ``edge_features (B, 81, 81, 4)``, and, when every row has its ``solution``, ``labels (B, 81)`` =
        solution digit - 1 on every cell."""
        puzzles = torch.stack([_cells(example, "puzzle", k, low=0) for k, example in enumerate(examples)])
        batch = puzzles.shape[0]
        encoded = {
            "input_ids": puzzles,
            "attention_mask": torch.ones(batch, CELLS, dtype=torch.long),
        }
        if self.relations:
            encoded["edge_features"] = (cell_relations() * self.relation_scale).expand(batch, -1, -1, -1).clone()
            encoded["position_ids"] = torch.zeros(batch, CELLS, dtype=torch.long)
        else:
            encoded["position_ids"] = torch.arange(CELLS).expand(batch, -1).clone()
        if all(example.get("solution") is not None for example in examples):
            solutions = torch.stack([_cells(example, "solution", k, low=1) for k, example in enumerate(examples)])
            encoded["labels"] = solutions - 1
        return encoded

    def decode(self, logits: torch.Tensor, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The predicted ``(9, 9)`` grid of digits 1-9 (long, CPU) of every sample; givens copied from the input."""
        if logits.ndim != 3 or tuple(logits.shape[1:]) != (CELLS, 9):
            raise ValueError(f"logits must have shape (B, 81, 9); got {tuple(logits.shape)}")
        digits = logits.detach().float().cpu().argmax(-1) + 1
        given = inputs["input_ids"].detach().cpu().long()
        digits = torch.where(given > 0, given, digits)
        return list(digits.reshape(-1, 9, 9))

    # ------------------------------------------------------------------ metrics

    def compute_metrics(self, predictions: list[torch.Tensor], examples: list[Example]) -> dict[str, float]:
        """``exact_match`` (headline: the share of grids entirely right) and ``cell_accuracy`` over blank cells."""
        check_one_per_row(predictions, examples)
        return self.load_metric().compute(
            predictions=[torch.as_tensor(p).reshape(-1).tolist() for p in predictions],
            references=[list(example["solution"]) for example in examples],
            puzzles=[list(example["puzzle"]) for example in examples],
        )

    # ------------------------------------------------------------------ perturbations

    def perturb_rows(self, examples: list[Example], eps: float, seed: int) -> tuple[list[Example], torch.Tensor]:
        """Each row with ONE random given blanked; ``||δ|| = 1`` per row (one input token changed).

        Discrete inputs have no small perturbation: ``eps`` must be > 0 and is otherwise unused
        (``eps = 0`` returns the rows unchanged with ``||δ|| = 0``). The puzzle may now have several
        solutions; the stored solution still agrees with every remaining given, so it is kept as the
        target. ``givens`` and ``needs_search`` are updated. Deterministic in ``(examples, seed)``.
        """
        generators = row_generators(seed, len(examples))
        perturbed = []
        for k, (example, rng) in enumerate(zip(examples, generators, strict=True)):
            puzzle = list(example["puzzle"])
            filled = [i for i, v in enumerate(puzzle) if v]
            if not filled:
                raise ValueError(f"example {k}: the puzzle has no given to remove")
            puzzle[filled[int(rng.integers(len(filled)))]] = 0
            needs_search = 0 in solve_by_singles(puzzle)
            perturbed.append({**example, "puzzle": puzzle, "givens": len(filled) - 1, "needs_search": needs_search})
        return perturbed, torch.ones(len(examples), dtype=torch.float64)


# ---------------------------------------------------------------------- helpers


@functools.cache
def cell_relations() -> torch.Tensor:
    """The relations ``(81, 81, 4)`` (float32) of query cell ``i`` and key cell ``j``, in the order of
    `RELATIONS`: ``i = j``; same row, same column, same box (for ``j != i``). Cached; callers copy it."""
    index = torch.arange(CELLS)
    row, col, box = (torch.tensor(unit) for unit in (ROW, COL, BOX))
    self_ = index[:, None] == index[None, :]
    units = [unit[:, None] == unit[None, :] for unit in (row, col, box)]
    return torch.stack([self_] + [same & ~self_ for same in units], dim=-1).float()


def _cells(example: Example, key: str, index: int, low: int) -> torch.Tensor:
    cells = torch.as_tensor(np.asarray(example[key], dtype=np.int64)).reshape(-1)
    if cells.numel() != CELLS or cells.min() < low or cells.max() > 9:
        raise ValueError(f"example {index}: {key} must hold 81 digits in [{low}, 9]")
    return cells
