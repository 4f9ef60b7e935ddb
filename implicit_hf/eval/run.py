"""`sweep`: score a model in memory at many loop counts. It checks its arguments once and picks the kind of
sweep: from one trajectory run per batch (`implicit_hf.eval.sweep.trajectory_sweep`), or, for a `GenerativeTask`,
by generating at every count (`implicit_hf.eval.generative.generative_sweep`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..checks import check_integer
from ..loop_counts import normalise_loops
from ..tasks.base import TaskAdapter
from ..tasks.generation import GenerativeTask
from .generative import generative_sweep
from .sweep import as_rows, trajectory_sweep
from .width import Width


def sweep(
    model: torch.nn.Module,
    task: TaskAdapter,
    rows,
    loops: Sequence[int] | str,
    batch_size: int = 64,
    perturb_eps: float | None = 1e-4,
    seed: int = 0,
    keep_tol: bool = False,
    return_predictions: bool = False,
    warmup: bool = True,
    width: Width | None = None,
) -> dict[str, Any]:
    """Score ``model`` on ``rows`` at every loop count in ``loops``.

    Args:
        model: an implicit model with a head (`ImplicitForTokenClassification`, `...ForCausalLM`), or a plain
            transformers model (an explicit baseline, run once).
        task: the task adapter that encodes ``rows``, decodes head outputs and scores predictions.
        rows: dataset rows (a list of dicts or a ``datasets.Dataset``).
        loops: loop counts to score (a list, a `parse_loops` string or checked `LoopCounts`).
        batch_size: rows per forward pass (or per ``generate`` call).
        perturb_eps: size of the perturbation for the Lipschitz probe (``task.perturb(rows,
            perturb_eps, seed)``; a generative task's probe uses its prompt pairs); ``None`` or ``0`` skips it.
        seed: seed passed to ``task.perturb``.
        keep_tol: keep the model's own halting tolerance (``config.tol``) instead of forcing exactly
            ``t`` iterations (``tol=0``).
        return_predictions: also return the decoded predictions per loop count (``"predictions"``,
            and ``"perturbed_predictions"`` with the probe) for inspection; not JSON-serialisable.
        warmup: run once at one loop, untimed, before the timed runs.
        width: K trajectories per input (`implicit_hf.eval.width.Width`, seeded with ``seed``), reduced at every
            loop count; ``None`` (or K = 1) runs one trajectory per input.

    Returns a dict with ``records`` (one per loop count, ascending; `implicit_hf.eval.records.loop_record`) and the
    run's summary (`implicit_hf.eval.records.sweep_summary`): ``seconds_total``, ``max_loops``, ``num_samples``, ...
    """
    loops = normalise_loops(loops)
    rows = as_rows(rows)
    if not rows:
        raise ValueError("sweep needs at least one row")
    batch_size = check_integer("batch_size", batch_size)
    if perturb_eps is not None and perturb_eps < 0:
        raise ValueError(f"perturb_eps must be >= 0 (0 or None skips the Lipschitz probe); got {perturb_eps!r}")
    model.eval()
    if width is not None and width.num_trajectories == 1:
        width = None
    settings = dict(seed=seed, keep_tol=keep_tol, return_predictions=return_predictions, warmup=warmup, width=width)
    if isinstance(task, GenerativeTask):
        return generative_sweep(model, task, rows, loops, batch_size, probe=bool(perturb_eps), **settings)
    return trajectory_sweep(model, task, rows, loops, batch_size, perturb_eps, **settings)
