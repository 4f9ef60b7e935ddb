"""Training batches that know how hard they are: a sampler whose batches hold rows of one difficulty, and a
collate function that hands the loop a batch's difficulty with its inputs.

A task rates a row with ``task.difficulty(example)`` (e.g. the number of state-tracking steps). A loop
schedule tied to it (``above_difficulty``, `implicit_hf.training.schedule`) draws each batch's loop count above
the batch's difficulty; with ``group_by_difficulty`` every batch is one difficulty, so short problems are
trained at short loop counts and long ones at long counts (as transformers' ``group_by_length`` groups by
length, but exactly).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from ..tasks.base import TaskAdapter


class GroupedByDifficulty(torch.utils.data.Sampler[int]):
    """Row indices in an order where every ``batch_size`` consecutive rows share one difficulty.

    Epoch ``e`` shuffles the rows of each difficulty, cuts them into full batches (the rest of a difficulty is
    left out that epoch) and shuffles the batches, all seeded by ``(seed, e)``: the same order on every
    process (accelerate shards whole batches), and a resumed run sees the batches the uninterrupted one saw.
    """

    def __init__(self, difficulties: Sequence[int], batch_size: int, seed: int):
        self.groups = [np.flatnonzero(np.asarray(difficulties) == d) for d in sorted(set(difficulties))]
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(len(group) // self.batch_size for group in self.groups) * self.batch_size

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        batches = []
        for group in self.groups:
            rows = rng.permutation(group)
            full = len(rows) // self.batch_size * self.batch_size
            batches += np.split(rows[:full], full // self.batch_size) if full else []
        for index in rng.permutation(len(batches)):
            yield from batches[index].tolist()


class WithDifficulty:
    """A collate function: ``(task.encode(rows), the hardest row's difficulty)``."""

    def __init__(self, task: TaskAdapter):
        self.task = task

    def __call__(self, rows: list[dict[str, Any]]) -> tuple[dict[str, torch.Tensor], int]:
        return self.task.encode(rows), max(self.task.difficulty(row) for row in rows)


def difficulties(task: TaskAdapter, dataset: Any) -> list[int]:
    """The difficulty of every row of ``dataset``."""
    return [task.difficulty(row) for row in dataset]
