"""Test-time compute in width for a sweep: K trajectories per input (`Width`), and how well their agreement
predicts a right answer (`calibration`).

A sweep with a `Width` passes its settings to every forward (``num_trajectories``, ``trajectory_noise``,
``select``, ``trajectory_seed``, ``trajectory_batch_size``; ``implicit_hf/modeling/trajectories.py``) and scores
each loop count ``t`` of the reduced outputs as it scores one trajectory. Its records add ``trajectories`` (K),
``compute`` (``t * K``: core evaluations per input), the mean agreement between trajectories and the calibration
table: the inputs grouped by agreement, with the quality of each group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..tasks.base import TaskAdapter
from .records import scored_metrics

# Agreement buckets of the calibration table: [0, 0.25), [0.25, 0.5), [0.5, 0.75), [0.75, 1) and exactly 1.
AGREEMENT_EDGES = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class Width:
    """K trajectories per input from noisy starts, reduced by ``select`` (checked by the model's forward)."""

    num_trajectories: int
    trajectory_noise: float = 0.0
    select: str = "residual"
    trajectory_batch_size: int | None = None

    def forward_kwargs(self, seed: int) -> dict[str, Any]:
        """The keyword arguments of a forward (or ``generate``) that solves this width, with ``seed``."""
        return {
            "num_trajectories": self.num_trajectories,
            "trajectory_noise": self.trajectory_noise,
            "select": self.select,
            "trajectory_seed": seed,
            "trajectory_batch_size": self.trajectory_batch_size,
        }


def width_columns(
    width: Width | None,
    loops: int,
    agreement: torch.Tensor | None,
    task: TaskAdapter,
    predictions: list,
    rows: list[dict],
) -> dict[str, Any]:
    """A record's width columns: none for one trajectory per input (``width`` ``None``), else ``trajectories``,
    ``compute``, ``agreement_mean`` (per input: the fraction of trajectories whose answer equals the output's) and
    ``calibration`` (`calibration`)."""
    if width is None:
        return {}
    finite = agreement is not None and bool(torch.isfinite(agreement).any())
    return {
        "trajectories": width.num_trajectories,
        "compute": loops * width.num_trajectories,
        "agreement_mean": float(agreement[torch.isfinite(agreement)].mean()) if finite else None,
        "calibration": calibration(agreement, task, predictions, rows) if finite else None,
    }


def calibration(agreement: torch.Tensor, task: TaskAdapter, predictions: list, rows: list[dict]) -> list[dict]:
    """The inputs grouped by ``agreement`` (`AGREEMENT_EDGES`), each group's size and quality (``task``'s quality
    metric on its rows; NaN for an empty group): whether more agreement means more right answers."""
    table = []
    bounds = list(zip(AGREEMENT_EDGES[:-1], AGREEMENT_EDGES[1:], strict=True)) + [(1.0, None)]
    for low, high in bounds:
        members = (agreement == low) if high is None else (agreement >= low) & (agreement < high)
        index = members.nonzero().flatten().tolist()
        quality = math.nan
        if index:
            metrics = scored_metrics(task, [predictions[i] for i in index], [rows[i] for i in index])
            quality = metrics[task.quality_metric]
        label = "1" if high is None else f"[{low:g}, {high:g})"
        table.append({"agreement": label, "n": len(index), "quality": quality})
    return table


def trajectory_counts(counts) -> list[int]:
    """The trajectory counts K of a sweep, checked: a non-empty list of distinct integers >= 1 (a ``ValueError``
    naming ``trajectories`` otherwise), in the order given."""
    values = [counts] if isinstance(counts, int) else list(counts)
    valid = values and all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in values)
    if not valid or len(set(values)) != len(values):
        raise ValueError(f"trajectories must be a non-empty list of distinct integers >= 1; got {counts!r}")
    return values


def width_report(width: Width, counts: list[int], records: list[list[dict]], results: list[dict]) -> dict:
    """The ``width`` section of a results.json: the settings, each K's measured seconds (``seconds_total``, keyed by
    K) and every (loops, K) record, with ``trajectories`` and ``compute`` also on the records of K = 1."""
    flat = []
    for count, run in zip(counts, records, strict=True):
        for record in run:
            flat.append({"trajectories": count, "compute": record["loops"] * count, **record})
    return {
        "trajectories": counts,
        "trajectory_noise": width.trajectory_noise,
        "select": width.select,
        "trajectory_batch_size": width.trajectory_batch_size,
        "seconds_total": {str(k): r["seconds_total"] for k, r in zip(counts, results, strict=True)},
        "records": flat,
    }
