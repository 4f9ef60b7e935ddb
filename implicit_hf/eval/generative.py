"""The sweep of a generative task (a `GenerativeTask`: a causal LM answering in text), its text Lipschitz probe,
and the one generate loop they run (`greedy_completions`, `complete`).

Such a task cannot be scored from one trajectory: every loop count ``K`` needs its own
``model.generate(..., num_loops=K)``. `generative_sweep` generates once per ``K`` (`complete`)
and scores the generated text (``task.compute_metrics``); for the Lipschitz columns
`text_lipschitz_probe` runs on the task's prompt pairs: ``word edit distance(outputs) / word edit
distance(prompts)`` per pair (`word_edit_distance`), max and mean over pairs.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from ..loop_counts import LoopCounts, normalise_loops
from ..modeling import ImplicitModel
from ..tasks.edit_distance import word_edit_distance
from ..tasks.generation import GenerativeTask
from .records import loop_record, scored_metrics, sweep_summary
from .sweep import device_of, estimate_flops, head_outputs, synchronize
from .width import Width, width_columns


@torch.no_grad()
def greedy_completions(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[str],
    num_loops: int,
    batch_size: int = 64,
    tol: float | None = None,
    max_new_tokens: int = 1,
    use_cache: bool = True,
    width: Mapping[str, Any] | None = None,
    agreement: list[float] | None = None,
) -> list[str]:
    """The text ``model.generate(..., num_loops=num_loops, do_sample=False)`` writes after each prompt: left-padded
    batches of ``batch_size`` (``tokenizer`` pads on the left), at most ``max_new_tokens`` new tokens, halting
    at ``tol`` when given (``None``: the model's own setting), the KV cache as ``use_cache`` says. ``width``: the
    trajectory settings of every forward (`implicit_hf.eval.width.Width.forward_kwargs`; no KV cache); with it,
    ``agreement`` (a list) receives each prompt's agreement between trajectories, the mean over its generated
    tokens of the fraction of trajectories predicting the chosen token."""
    device = next(model.parameters()).device
    texts = []
    width = dict(width or {})
    if width.get("num_trajectories", 1) > 1:
        use_cache = False
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start : start + batch_size], padding=True, return_tensors="pt")
        batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        extra = {} if tol is None else {"tol": tol}
        recording = recorded_trajectory_choices(model) if agreement is not None else contextlib.nullcontext([])
        with recording as choices:  # a hook on the model only when the caller asks for the agreement
            output = model.generate(
                **batch,
                num_loops=num_loops,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                use_cache=use_cache,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **extra,
                **width,
            )
        if choices:  # the last position's agreement at every step: a generated token's
            agreement.extend(torch.stack([c.token_agreement[:, -1] for c in choices]).float().mean(0).tolist())
        new = output[:, batch["input_ids"].shape[1] :].cpu()
        texts.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    return texts


def complete(
    model: torch.nn.Module,
    task: GenerativeTask,
    prompts: list[str],
    num_loops: int,
    batch_size: int = 64,
    tol: float | None = None,
    width: Mapping[str, Any] | None = None,
    agreement: list[float] | None = None,
) -> list[str]:
    """``task``'s answers to ``prompts`` at ``num_loops`` loops: `greedy_completions` with the task's tokenizer,
    ``max_new_tokens`` and ``use_cache`` (and ``width`` / ``agreement``); the new text only."""
    return greedy_completions(
        model,
        task.tokenizer,
        prompts,
        num_loops,
        batch_size,
        tol,
        task.max_new_tokens,
        task.use_cache,
        width,
        agreement,
    )


@torch.no_grad()
def text_lipschitz_probe(
    model: torch.nn.Module,
    task: GenerativeTask,
    pairs: list[dict[str, Any]],
    loops: LoopCounts | list[int] | str,
    batch_size: int = 64,
    tol: float | None = 0,
) -> list[dict[str, Any]]:
    """The text Lipschitz probe of an implicit LM: per loop count ``t``, generate (`complete`) for
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
        outputs_a = complete(model, task, prompts_a, t, batch_size, tol)
        outputs_b = complete(model, task, prompts_b, t, batch_size, tol)
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


@contextlib.contextmanager
def recorded_trajectory_choices(model: torch.nn.Module) -> Iterator[list]:
    """Collect, inside the block, the reduction of K trajectories (``loop_stats.trajectories``) of every forward
    pass of ``model`` (the head, which reduces them), in order."""
    choices: list = []

    def record(module, args, output) -> None:
        stats = getattr(output, "loop_stats", None)
        if stats is not None and stats.trajectories is not None:
            choices.append(stats.trajectories)

    handle = model.register_forward_hook(record)
    try:
        yield choices
    finally:
        handle.remove()


@torch.no_grad()
def generative_sweep(
    model: torch.nn.Module,
    task: GenerativeTask,
    rows: list[dict],
    loops: LoopCounts,
    batch_size: int = 64,
    probe: bool = True,
    seed: int = 0,
    keep_tol: bool = False,
    return_predictions: bool = False,
    warmup: bool = True,
    width: Width | None = None,
) -> dict[str, Any]:
    """The sweep of a generative task: `complete` once per loop count ``t`` (the arguments are
    `implicit_hf.eval.run.sweep`'s, checked there; ``width``: K trajectories per input at every step, uncached,
    and the `width_columns`).

    Records (`loop_record`): ``quality`` and ``metrics`` from the generated text,
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
    wide = None if width is None else width.forward_kwargs(seed)
    prompts = [task.prompt(row) for row in rows]
    device = device_of(model)
    if warmup:  # untimed: lazy initialisation would otherwise land in the first timing
        complete(model, task, prompts[:batch_size], 1, batch_size, tol, wide)
    pairs = task.lipschitz_pairs() if probe else None
    text_probe = (
        {r["loops"]: r for r in text_lipschitz_probe(model, task, pairs, loops, batch_size, tol)} if pairs else {}
    )
    outputs = head_outputs(model)
    copies = 1 if width is None else width.num_trajectories  # every layer runs once per trajectory
    predictions, records = {}, []
    for t in loops:
        synchronize(device)
        began = time.perf_counter()
        agreement: list[float] = []
        with recorded_loop_steps(model) as steps:
            texts = complete(model, task, prompts, t, batch_size, tol, wide, agreement)
        synchronize(device)
        seconds = time.perf_counter() - began
        predictions[t] = texts
        lengths = [len(task.tokenizer(p + c)["input_ids"]) + 1 for p, c in zip(prompts, texts, strict=True)]
        ratios = text_probe.get(t)
        records.append(
            loop_record(
                task,
                t,
                scored_metrics(task, texts, rows),
                lipschitz=ratios["ratio_max"] if ratios else None,
                lipschitz_mean=ratios["ratio_mean"] if ratios else None,
                rel_residual_mean=None,  # generation reports no residuals: not measured, not NaN
                rel_residual_max=None,
                steps_mean=float(torch.cat(steps).double().mean()) if steps else math.nan,
                seconds=seconds,
                flops=copies * sum(estimate_flops(model.config, n, t, outputs) for n in lengths) / len(lengths),
                text_lipschitz=ratios,
                examples=[{"prompt": p, "generated": g} for p, g in list(zip(prompts, texts, strict=True))[:5]],
                **width_columns(width, t, torch.tensor(agreement) if agreement else None, task, texts, rows),
            )
        )
    num_pairs = len(pairs) if pairs else 0
    result = sweep_summary(
        model,
        task,
        loops,
        records,
        num_samples=len(rows),
        perturb_eps=None,
        seed=seed,
        batch_size=batch_size,
        keep_tol=keep_tol,
        seconds_total=sum(r["seconds"] for r in records),
        seconds_perturbed_total=None,
        seq_len_mean=None,
        diverged_fraction=None,
        generative=True,
        use_cache=task.use_cache,
        num_pairs=num_pairs,
        lipschitz_label="word edit distance(outputs) / word edit distance(prompts)",
        lipschitz_title=f"text Lipschitz ratio vs loop count ({num_pairs} prompt pairs)",
    )
    if return_predictions:
        result["predictions"] = predictions
    return result
