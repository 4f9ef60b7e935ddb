"""The sweep of a generative task (``task.generative``, a causal LM answering in text), and its text Lipschitz probe.

Such a task cannot be scored from one trajectory: every loop count ``K`` needs its own
``model.generate(..., num_loops=K)``. `generative_sweep` generates once per ``K`` (``task.complete``)
and scores the generated text (``task.compute_metrics``); for the Lipschitz columns
`text_lipschitz_probe` runs on the task's prompt pairs: ``word edit distance(outputs) / word edit
distance(prompts)`` per pair (`word_edit_distance`), max and mean over pairs.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ..loop_counts import normalise_loops
from ..tasks.base import TaskAdapter
from ..tasks.edit_distance import word_edit_distance
from .sweep import device_of, estimate_flops, head_outputs, scored_metrics, synchronize


@torch.no_grad()
def text_lipschitz_probe(
    model: torch.nn.Module,
    task: TaskAdapter,
    pairs: list[dict[str, Any]],
    loops: Sequence[int] | str,
    batch_size: int = 64,
    tol: float | None = 0,
) -> list[dict[str, Any]]:
    """The text Lipschitz probe of an implicit LM: per loop count ``t``, generate (``task.complete``) for
    both prompts of every pair and take ``word_edit_distance(outputs) / word_edit_distance(prompts)``.

    ``pairs`` are ``{"prompt_a": ..., "prompt_b": ...}`` whose prompts differ (pairs with equal
    prompts are refused). Returns one record per loop count (ascending): ``loops``, ``ratio_max``,
    ``ratio_mean``, ``output_distance_mean``, ``changed_fraction`` (pairs whose outputs differ),
    ``num_pairs`` and ``ratios`` (per pair).
    """
    loops = normalise_loops(loops)
    if not pairs:
        raise ValueError("the text Lipschitz probe needs at least one prompt pair")
    prompts_a = [pair["prompt_a"] for pair in pairs]
    prompts_b = [pair["prompt_b"] for pair in pairs]
    prompt_distances = [word_edit_distance(a, b) for a, b in zip(prompts_a, prompts_b, strict=True)]
    if min(prompt_distances) == 0:
        raise ValueError(f"prompt pair {prompt_distances.index(0)} has two identical prompts (no perturbation)")
    records = []
    for t in loops:
        outputs_a = task.complete(model, prompts_a, t, batch_size, tol)
        outputs_b = task.complete(model, prompts_b, t, batch_size, tol)
        distances = [word_edit_distance(a, b) for a, b in zip(outputs_a, outputs_b, strict=True)]
        ratios = [d / p for d, p in zip(distances, prompt_distances, strict=True)]
        records.append(
            {
                "loops": t,
                "ratio_max": max(ratios),
                "ratio_mean": sum(ratios) / len(ratios),
                "output_distance_mean": sum(distances) / len(distances),
                "changed_fraction": sum(d > 0 for d in distances) / len(distances),
                "num_pairs": len(pairs),
                "ratios": ratios,
            }
        )
    return records


@contextlib.contextmanager
def recorded_loop_steps(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect, inside the block, the per-sample solver steps of every forward pass of ``model``'s implicit
    body (`ImplicitModel`), e.g. the loops each generated token took under halting."""
    from ..modeling import ImplicitModel

    steps: list[torch.Tensor] = []

    def record(module, args, output) -> None:
        if output.loop_stats is not None:
            steps.append(output.loop_stats.steps.detach().cpu())

    handles = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, ImplicitModel)]
    try:
        yield steps
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def generative_sweep(
    model: torch.nn.Module,
    task: TaskAdapter,
    rows: list[dict],
    loops: list[int],
    batch_size: int = 64,
    probe: bool = True,
    seed: int = 0,
    keep_tol: bool = False,
    return_predictions: bool = False,
    warmup: bool = True,
) -> dict[str, Any]:
    """`sweep` for a generative task: ``task.complete(model, prompts, t, ...)`` once per loop count ``t``.

    Records have the keys of `sweep`'s: ``quality`` and ``metrics`` from the generated text,
    ``lipschitz`` / ``lipschitz_mean`` the max / mean text ratio of `text_lipschitz_probe` on
    ``task.lipschitz_pairs()`` (``None`` without ``probe`` or pairs; the per-pair details under
    ``text_lipschitz``), ``seconds`` the measured generation time for all rows at ``t``, ``flops``
    `estimate_flops` of one forward pass over the mean generated sequence (with a KV cache every
    token is computed once; without it generation costs more), ``steps_mean`` the mean loops per
    generated token (measured: every forward pass generate makes yields one token per sequence, and its
    per-sequence solver steps are recorded; ``t`` without halting, fewer with ``keep_tol``) and the
    residual columns ``None`` (``generate`` does not return the solver's residuals).
    """
    tol = None if keep_tol else 0
    prompts = [task.prompt(row) for row in rows]
    device = device_of(model)
    if warmup:  # untimed: lazy initialisation would otherwise land in the first timing
        task.complete(model, prompts[:batch_size], 1, batch_size, tol)
    pairs = task.lipschitz_pairs() if probe and hasattr(task, "lipschitz_pairs") else None
    text_probe = (
        {r["loops"]: r for r in text_lipschitz_probe(model, task, pairs, loops, batch_size, tol)} if pairs else {}
    )
    tokenizer = getattr(task, "tokenizer", None)
    outputs = head_outputs(model)
    predictions, records = {}, []
    for t in loops:
        synchronize(device)
        began = time.perf_counter()
        with recorded_loop_steps(model) as steps:
            texts = task.complete(model, prompts, t, batch_size, tol)
        synchronize(device)
        seconds = time.perf_counter() - began
        if len(texts) != len(rows):
            raise ValueError(f"task {task.name!r}: complete returned {len(texts)} texts for {len(rows)} prompts")
        predictions[t] = texts
        metrics = scored_metrics(task, texts, rows)
        flops = math.nan
        if tokenizer is not None:
            lengths = [len(tokenizer(p + c)["input_ids"]) + 1 for p, c in zip(prompts, texts, strict=True)]
            flops = sum(estimate_flops(model.config, n, t, outputs) for n in lengths) / len(lengths)
        ratios = text_probe.get(t)
        records.append(
            {
                "loops": t,
                "metrics": metrics,
                "quality": metrics[task.quality_metric],
                "lipschitz": ratios["ratio_max"] if ratios else None,
                "lipschitz_mean": ratios["ratio_mean"] if ratios else None,
                "rel_residual_mean": None,  # generation reports no residuals: not measured, not NaN
                "rel_residual_max": None,
                "steps_mean": float(torch.cat(steps).double().mean()) if steps else math.nan,
                "seconds": seconds,
                "flops": flops,
                "text_lipschitz": ratios,
                "examples": [{"prompt": p, "generated": g} for p, g in list(zip(prompts, texts, strict=True))[:5]],
            }
        )
    num_pairs = len(pairs) if pairs else 0
    result = {
        "loops": loops,
        "max_loops": loops[-1],
        "num_samples": len(rows),
        "quality_metric": task.quality_metric,
        "higher_is_better": bool(task.higher_is_better),
        "tol": model.config.tol if keep_tol else None,
        "solver": model.config.solver,
        "perturb_eps": None,
        "seed": seed,
        "batch_size": batch_size,
        "seconds_total": sum(r["seconds"] for r in records),
        "seconds_perturbed_total": None,
        "seq_len_mean": None,
        "diverged_fraction": None,
        "generative": True,
        "use_cache": getattr(task, "use_cache", None),
        "num_pairs": num_pairs,
        "lipschitz_label": "word edit distance(outputs) / word edit distance(prompts)",
        "lipschitz_title": f"text Lipschitz ratio vs loop count ({num_pairs} prompt pairs)",
        "records": records,
    }
    if return_predictions:
        result["predictions"] = predictions
    return result
