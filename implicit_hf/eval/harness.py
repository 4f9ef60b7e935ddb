"""Loop-count sweep: score an implicit model at many loop counts from one trajectory run.

For each batch the model runs once with ``num_loops=max(loops)`` and ``return_trajectory=loops``;
the head output after iteration ``t`` is exactly what a separate run with ``num_loops=t`` returns
(the solvers are deterministic and the trajectory holds the state each of them would return), so
one run scores every requested loop count ``t``:

* quality: ``task.compute_metrics(task.decode(trajectory[t-1], inputs), rows)``;
* convergence: the solver's relative residual ``||f(z) - z|| / ||f(z)||`` at iteration ``t``
  (mean and max over samples);
* robustness: an empirical Lipschitz constant ``max_i ||y_t(x_i + δ_i) - y_t(x_i)|| / ||δ_i||`` from
  a second trajectory run on inputs perturbed by ``task.perturb`` (``y_t`` the decoded prediction);
* cost: wall-clock seconds and estimated FLOPs per sample (`estimate_flops`).

By default halting is disabled (``tol=0``): every sample runs exactly ``max(loops)`` iterations and
row ``t`` of the trajectory is the model at ``num_loops=t``. With ``keep_tol`` the model's own
tolerance applies; a sample that stopped early then repeats its final state in later rows, which
is again what a separate run with that budget returns.

A *generative* task (``task.generative``, a causal LM answering in text) cannot be scored from one
trajectory: every loop count ``K`` needs its own ``model.generate(..., num_loops=K)``. `sweep` then
calls `generative_sweep`, which generates once per ``K`` (``task.complete``), scores the generated
text (``task.compute_metrics``) and, for the Lipschitz columns, runs the text probe
`text_lipschitz_probe` on the task's prompt pairs: ``word edit distance(outputs) / word edit
distance(prompts)`` per pair (`word_edit_distance`), max and mean over pairs.

`run_eval` loads a checkpoint, sweeps it on the task's test split and writes ``results.json``,
``results.csv`` and PNG plots; `main` is the ``implicit-hf eval`` command line.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import json
import math
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..cli import DEFAULT_LOOPS as DEFAULT_LOOPS  # the loop specification is parsed without torch by the cli
from ..cli import UsageError
from ..cli import parse_loops as parse_loops
from ..tasks.base import TASKS, TaskAdapter, feedback_kwargs


def _normalise_loops(loops: str | Sequence[int]) -> list[int]:
    if isinstance(loops, str):
        return parse_loops(loops)
    values = list(loops)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"loops must be a non-empty list of integers >= 1; got {loops!r}")
    return sorted(set(values))


# --------------------------------------------------------------------------------------------------
# Cost model


def estimate_flops(config, seq_len: int, loops: int, head_outputs: int | None = None) -> float:
    """Estimated forward FLOPs for one sample of ``seq_len`` tokens at ``loops`` core iterations.

    Counts the matrix multiplications only (a multiply-add is 2 FLOPs), per token:

    * decoder layer: ``2 * P_layer + 4 * T * d_attn`` with ``P_layer = d*(H*hd) + 2*d*(KV*hd) +
      (H*hd)*d + 3*d*I`` (q, k, v, o projections and the SwiGLU gate/up/down) and the attention
      scores ``QK^T`` plus the weighted sum ``AV`` (``2*T*d_attn`` each, ``d_attn = H*hd``; the full
      ``T x T`` square is counted, causal masking is not discounted);
    * input: ``2 * input_features * d`` for the feature embedding (token lookup is free), plus
      ``2 * T * edge_features * H`` for the edge bias when the model has one;
    * injection: ``2 * 2d * d`` per iteration for ``injection="linear"`` (``"add"`` is free);
    * in-loop feedback (``feedback_features > 0``): per iteration, the coda and the head on the
      current state plus ``2 * feedback_features * d`` for its embedding (the task's own feedback
      function, e.g. an FFT, is not counted);
    * head: ``2 * d * head_outputs`` (``num_labels`` by default; the vocabulary for a causal LM).

    Total: ``T * (input + (prelude + coda) * layer + loops * (core * layer + injection) + head)``.
    Norms, RoPE, softmax and other elementwise work are left out.
    """
    d = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = config.num_key_value_heads or heads
    head_dim = config.head_dim or d // heads
    d_attn = heads * head_dim
    layer_params = d * d_attn + 2 * d * kv_heads * head_dim + d_attn * d + 3 * d * config.intermediate_size
    layer = 2 * layer_params + 4 * seq_len * d_attn
    inputs = 2 * config.input_features * d + 2 * seq_len * config.edge_features * heads
    injection = 4 * d * d if config.injection == "linear" else 0
    outputs = config.num_labels if head_outputs is None else head_outputs
    head = 2 * d * outputs
    feedback = (
        config.num_coda_layers * layer + head + 2 * config.feedback_features * d if config.feedback_features else 0
    )
    per_token = (
        inputs
        + (config.num_prelude_layers + config.num_coda_layers) * layer
        + loops * (config.num_core_layers * layer + injection + feedback)
        + head
    )
    return float(seq_len * per_token)


def _head_outputs(model: torch.nn.Module) -> int:
    for name in ("lm_head", "score"):
        layer = getattr(model, name, None)
        if isinstance(layer, torch.nn.Linear):
            return layer.out_features
    return int(getattr(model.config, "num_labels", 1))


# --------------------------------------------------------------------------------------------------
# The sweep


def _device_of(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _to_device(inputs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def _as_rows(rows) -> list[dict]:
    if isinstance(rows, list):
        return rows
    if hasattr(rows, "to_list"):  # datasets.Dataset
        return rows.to_list()
    return list(rows)


def _trajectory_pass(
    model: torch.nn.Module,
    task: TaskAdapter,
    rows: list[dict],
    loops: list[int],
    batch_size: int,
    tol: float | None,
) -> dict[str, Any]:
    """One trajectory run per batch; per requested ``t``: predictions, residuals, steps."""
    device = _device_of(model)
    max_loops = loops[-1]
    predictions: dict[int, list] = {t: [] for t in loops}
    rel_residual: dict[int, list[torch.Tensor]] = {t: [] for t in loops}
    steps: dict[int, list[torch.Tensor]] = {t: [] for t in loops}
    seconds = 0.0
    batch_lengths: list[tuple[int, int]] = []  # (batch size, padded length) for the FLOPs estimate
    diverged = 0
    for start in range(0, len(rows), batch_size):
        batch_rows = rows[start : start + batch_size]
        inputs = _to_device(task.encode(batch_rows), device)
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        _synchronize(device)
        began = time.perf_counter()
        out = model(
            **model_inputs, num_loops=max_loops, tol=tol, return_trajectory=loops, **feedback_kwargs(task, inputs)
        )
        _synchronize(device)
        seconds += time.perf_counter() - began
        trajectory, stats = out.trajectory, out.loop_stats
        if not trajectory:
            raise RuntimeError("the model returned no trajectory; it must support return_trajectory=True")
        batch_lengths.append((len(batch_rows), int(trajectory[0].shape[1])))
        diverged += int(stats.diverged.sum())
        iterations = stats.rel_residual.shape[0]
        for position, t in enumerate(loops):
            # the model decoded exactly the requested counts (past the last iteration run: the final state)
            batch_predictions = task.decode(trajectory[position], inputs)
            if len(batch_predictions) != len(batch_rows):
                raise ValueError(
                    f"task {task.name!r}: decode returned {len(batch_predictions)} predictions "
                    f"for a batch of {len(batch_rows)} rows"
                )
            predictions[t].extend(batch_predictions)
            if iterations:
                rel_residual[t].append(stats.rel_residual[min(t, iterations) - 1].detach().float().cpu())
            steps[t].append(stats.steps.clamp(max=t).detach().cpu())
        del out, trajectory
    return {
        "predictions": predictions,
        "rel_residual": {t: torch.cat(v) if v else torch.full((len(rows),), math.nan) for t, v in rel_residual.items()},
        "steps": {t: torch.cat(v) for t, v in steps.items()},
        "seconds": seconds,
        "batch_lengths": batch_lengths,
        "diverged": diverged,
    }


def _flat(x) -> torch.Tensor:
    return torch.as_tensor(x).detach().double().cpu().flatten()


def lipschitz_ratios(clean: list, perturbed: list, delta_norms: torch.Tensor) -> torch.Tensor:
    """Per sample ``||pred(x + δ) - pred(x)|| / ||δ||`` (predictions flattened, Euclidean norms)."""
    norms = torch.as_tensor(delta_norms, dtype=torch.float64).flatten().cpu()
    if not (len(clean) == len(perturbed) == len(norms)):
        raise ValueError(
            f"Lipschitz probe: {len(clean)} clean predictions, {len(perturbed)} perturbed, {len(norms)} norms"
        )
    ratios = []
    for i, (a, b) in enumerate(zip(clean, perturbed, strict=True)):
        a, b = _flat(a), _flat(b)
        if a.shape != b.shape:
            raise ValueError(
                f"Lipschitz probe: sample {i} has a prediction of {a.numel()} values for x and {b.numel()} "
                "for x + δ; task.perturb must keep the problem's shape"
            )
        ratios.append(float((b - a).norm()) / float(norms[i]) if float(norms[i]) > 0 else math.nan)
    return torch.tensor(ratios, dtype=torch.float64)


def _finite_stat(values: torch.Tensor, how: str) -> float:
    finite = values[torch.isfinite(values)]
    if finite.numel() == 0:
        return math.nan
    return float(finite.max() if how == "max" else finite.mean())


def _builtin(value: Any) -> Any:
    """Numbers as plain floats/ints (numpy and torch scalars included) so results serialise to JSON."""
    if isinstance(value, dict):
        return {str(k): _builtin(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_builtin(v) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if hasattr(value, "item"):
        try:
            return value.item()
        except (ValueError, TypeError):
            pass
    if isinstance(value, float):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


@torch.no_grad()
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
) -> dict[str, Any]:
    """Score ``model`` on ``rows`` at every loop count in ``loops`` from one trajectory run per batch.

    Args:
        model: an implicit model with a head (`ImplicitForTokenClassification`, `...ForCausalLM`).
        task: the task adapter that encodes ``rows``, decodes head outputs and scores predictions.
        rows: dataset rows (a list of dicts or a ``datasets.Dataset``).
        loops: loop counts to score (a list or a `parse_loops` string); one run with ``max(loops)``.
        batch_size: rows per forward pass.
        perturb_eps: size of the perturbation for the Lipschitz probe (``task.perturb(rows,
            perturb_eps, seed)``); ``None`` or ``0`` skips the probe (and its second run).
        seed: seed passed to ``task.perturb``.
        keep_tol: keep the model's own halting tolerance (``config.tol``) instead of forcing exactly
            ``max(loops)`` iterations (``tol=0``).
        return_predictions: also return the decoded predictions per loop count (``"predictions"``,
            and ``"perturbed_predictions"`` with the probe) for inspection; not JSON-serialisable.
        warmup: run the first batch once at one loop, untimed, before the timed runs.

    Returns a dict with ``records`` (one per loop count, ascending): ``loops``, ``metrics`` (all of
    ``compute_metrics``), ``quality`` (``metrics[task.quality_metric]``), ``lipschitz`` (max over
    samples; ``lipschitz_mean`` the mean), ``rel_residual_mean`` / ``rel_residual_max`` (relative
    residual at iteration ``t``), ``steps_mean`` (iterations actually run within a budget of ``t``),
    ``seconds`` (trajectory-run seconds for all rows scaled linearly to ``t``: ``total * t / K``)
    and ``flops`` (`estimate_flops` per sample, averaged over the padded batch lengths); plus the
    run's summary: ``seconds_total`` (the clean trajectory run), ``max_loops``, ``num_samples``, ...
    """
    loops = _normalise_loops(loops)
    rows = _as_rows(rows)
    if not rows:
        raise ValueError("sweep needs at least one row")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1; got {batch_size!r}")
    if perturb_eps is not None and perturb_eps < 0:
        raise ValueError(f"perturb_eps must be >= 0 (0 or None skips the Lipschitz probe); got {perturb_eps!r}")
    model.eval()
    if task.generative:
        return generative_sweep(
            model,
            task,
            rows,
            loops,
            batch_size=batch_size,
            probe=bool(perturb_eps),
            seed=seed,
            keep_tol=keep_tol,
            return_predictions=return_predictions,
            warmup=warmup,
        )
    tol = None if keep_tol else 0
    max_loops = loops[-1]
    if warmup:  # one untimed call first: lazy initialisation would otherwise land in the timings
        inputs = _to_device(task.encode(rows[:batch_size]), _device_of(model))
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        model(**model_inputs, num_loops=1, tol=tol, return_trajectory=True, **feedback_kwargs(task, inputs))
    clean = _trajectory_pass(model, task, rows, loops, batch_size, tol)

    probe = bool(perturb_eps)
    lipschitz: dict[int, torch.Tensor] = {}
    perturbed = None
    if probe:
        perturbed_rows, delta_norms = task.perturb(rows, perturb_eps, seed)
        perturbed = _trajectory_pass(model, task, _as_rows(perturbed_rows), loops, batch_size, tol)
        for t in loops:
            lipschitz[t] = lipschitz_ratios(clean["predictions"][t], perturbed["predictions"][t], delta_norms)

    head_outputs = _head_outputs(model)
    lengths = clean["batch_lengths"]
    records = []
    for t in loops:
        metrics = _builtin(task.compute_metrics(clean["predictions"][t], rows))
        if task.quality_metric not in metrics:
            raise KeyError(
                f"task {task.name!r}: compute_metrics returned {sorted(metrics)}, "
                f"without its quality_metric {task.quality_metric!r}"
            )
        flops = sum(size * estimate_flops(model.config, length, t, head_outputs) for size, length in lengths)
        residual = clean["rel_residual"][t]
        records.append(
            {
                "loops": t,
                "metrics": metrics,
                "quality": metrics[task.quality_metric],
                "lipschitz": _finite_stat(lipschitz[t], "max") if probe else None,
                "lipschitz_mean": _finite_stat(lipschitz[t], "mean") if probe else None,
                "rel_residual_mean": _finite_stat(residual, "mean"),
                "rel_residual_max": _finite_stat(residual, "max"),
                "steps_mean": float(clean["steps"][t].double().mean()),
                "seconds": clean["seconds"] * t / max_loops,
                "flops": flops / len(rows),
            }
        )
    result = {
        "loops": loops,
        "max_loops": max_loops,
        "num_samples": len(rows),
        "quality_metric": task.quality_metric,
        "higher_is_better": bool(task.higher_is_better),
        "tol": model.config.tol if keep_tol else None,
        "solver": model.config.solver,
        "perturb_eps": perturb_eps if probe else None,
        "seed": seed,
        "batch_size": batch_size,
        "seconds_total": clean["seconds"],
        "seconds_perturbed_total": perturbed["seconds"] if probe else None,
        "seq_len_mean": sum(s * n for s, n in clean["batch_lengths"]) / len(rows),
        "diverged_fraction": clean["diverged"] / len(rows),
        "records": records,
    }
    if return_predictions:
        result["predictions"] = clean["predictions"]
        if probe:
            result["perturbed_predictions"] = perturbed["predictions"]
    return result


# --------------------------------------------------------------------------------------------------
# Generative tasks: one generate per loop count, and the text Lipschitz probe


def word_edit_distance(a: str, b: str) -> int:
    """Levenshtein distance between the whitespace-separated words of ``a`` and ``b`` (inserting,
    deleting or substituting one word costs 1)."""
    x, y = a.split(), b.split()
    previous = list(range(len(y) + 1))
    for i, word in enumerate(x, start=1):
        current = [i]
        for j, other in enumerate(y, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (word != other)))
        previous = current
    return previous[-1]


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
    loops = _normalise_loops(loops)
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
def recorded_loop_steps(model: torch.nn.Module):
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
    residual columns NaN (``generate`` does not return the solver's residuals).
    """
    tol = None if keep_tol else 0
    prompts = [task.prompt(row) for row in rows]
    device = _device_of(model)
    if warmup:  # untimed: lazy initialisation would otherwise land in the first timing
        task.complete(model, prompts[:batch_size], 1, batch_size, tol)
    pairs = task.lipschitz_pairs() if probe and hasattr(task, "lipschitz_pairs") else None
    text_probe = (
        {r["loops"]: r for r in text_lipschitz_probe(model, task, pairs, loops, batch_size, tol)} if pairs else {}
    )
    tokenizer = getattr(task, "tokenizer", None)
    head_outputs = _head_outputs(model)
    predictions, records = {}, []
    for t in loops:
        _synchronize(device)
        began = time.perf_counter()
        with recorded_loop_steps(model) as steps:
            texts = task.complete(model, prompts, t, batch_size, tol)
        _synchronize(device)
        seconds = time.perf_counter() - began
        if len(texts) != len(rows):
            raise ValueError(f"task {task.name!r}: complete returned {len(texts)} texts for {len(rows)} prompts")
        predictions[t] = texts
        metrics = _builtin(task.compute_metrics(texts, rows))
        if task.quality_metric not in metrics:
            raise KeyError(
                f"task {task.name!r}: compute_metrics returned {sorted(metrics)}, "
                f"without its quality_metric {task.quality_metric!r}"
            )
        flops = math.nan
        if tokenizer is not None:
            lengths = [len(tokenizer(p + c)["input_ids"]) + 1 for p, c in zip(prompts, texts, strict=True)]
            flops = sum(estimate_flops(model.config, n, t, head_outputs) for n in lengths) / len(lengths)
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
        "num_pairs": len(pairs) if pairs else 0,
        "lipschitz_label": "word edit distance(outputs) / word edit distance(prompts)",
        "lipschitz_title": f"text Lipschitz ratio vs loop count ({len(pairs) if pairs else 0} prompt pairs)",
        "records": records,
    }
    if return_predictions:
        result["predictions"] = predictions
    return result


# --------------------------------------------------------------------------------------------------
# run_eval: checkpoint -> results.json, results.csv, plots


def recorded_task(model_dir: str | Path) -> dict[str, Any] | None:
    """The task a model was trained on (``implicit_task.json`` written by the training loop), or ``None``."""
    from ..tasks.base import TASK_FILE

    path = Path(model_dir) / TASK_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def task_for_model(
    model_dir: str | Path, task_name: str | TaskAdapter | None, task_kwargs: dict[str, Any] | None
) -> tuple[TaskAdapter, dict[str, Any]]:
    """The task to score ``model_dir`` on, and its constructor arguments: ``task_name`` / ``task_kwargs``
    when given, else what the model was trained on.

    Recorded constructor arguments fill in only for the recorded task, and only when ``task_kwargs`` is
    not given, so a model trained on ``deblur`` with ``blur_sigma: 2.5`` is scored on that blur by default.
    """
    record = recorded_task(model_dir)
    if task_name is None:
        if record is None:
            raise ValueError(
                f"no task given and {str(Path(model_dir) / 'implicit_task.json')!r} does not exist "
                "(it is written by implicit-hf train): pass the task name (--task)"
            )
        task_name = record["task"]
    if record is not None and task_name == record["task"]:
        if record.get("task_module"):
            importlib.import_module(record["task_module"])
        if task_kwargs is None:
            task_kwargs = record.get("task_kwargs") or {}
    task_kwargs = dict(task_kwargs or {})
    return resolve_task(task_name, task_kwargs), task_kwargs


def resolve_task(name: str | TaskAdapter, task_kwargs: dict[str, Any] | None = None) -> TaskAdapter:
    """A task adapter instance: ``name`` itself, a task already registered in `TASKS`, or `get_task`."""
    if isinstance(name, TaskAdapter):
        return name
    kwargs = dict(task_kwargs or {})
    if name in TASKS:  # registered already (also tasks defined outside implicit_hf.tasks)
        return TASKS[name](**kwargs)
    from ..tasks.base import get_task

    return get_task(name, **kwargs)


def load_model(model_dir: str | Path, head: str, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The checkpoint in ``model_dir`` through the Auto class of ``head`` (the task's head type), in eval mode."""
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    import implicit_hf  # noqa: F401  (registers the implicit model type with the Auto classes)

    auto = {
        "causal_lm": AutoModelForCausalLM,
        "token_classification": AutoModelForTokenClassification,
        "token_regression": AutoModelForTokenClassification,
    }
    if head not in auto:
        raise ValueError(f"unknown task head {head!r}; expected one of {sorted(auto)}")
    model = auto[head].from_pretrained(str(model_dir))
    return model.to(device).eval()


def _resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch.cuda.is_available() is False")
    return resolved


def train_loops(config) -> int:
    """The loop count the model was trained with: ``num_loops_train``, else ``num_loops``."""
    value = getattr(config, "num_loops_train", None)
    return int(value if value is not None else config.num_loops)


def run_name(model_dir: str | Path) -> str:
    """A checkpoint's name for tables and legends: its training run's folder when it is that run's ``model/``."""
    path = Path(model_dir)
    return (path.parent.name if path.name == "model" and path.parent.name else path.name) or str(path)


def _model_summary(model: torch.nn.Module, model_dir: str | Path) -> dict[str, Any]:
    config = model.config
    fields = (
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "num_prelude_layers",
        "num_core_layers",
        "num_coda_layers",
        "injection",
        "state_init",
        "core_norm",
        "injection_norm",
        "num_loops",
        "num_loops_train",
        "solver",
        "tol",
        "damping",
        "gradient",
        "is_causal",
        "input_features",
        "edge_features",
        "feedback_features",
        "num_labels",
    )
    summary = {name: getattr(config, name, None) for name in fields}
    summary.update(
        model_dir=str(model_dir),
        architecture=type(model).__name__,
        problem_type=getattr(config, "problem_type", None),
        train_loops=train_loops(config),
        num_parameters=sum(p.numel() for p in model.parameters()),
    )
    return _builtin(summary)


def environment(device: torch.device | None = None) -> dict[str, Any]:
    """Versions of the software stack and the machine the evaluation ran on."""
    import importlib.metadata as metadata

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "torch_num_threads": torch.get_num_threads(),
        "device": str(device) if device is not None else None,
    }
    for package in ("implicit-hf", "torch", "transformers", "datasets", "evaluate", "numpy", "matplotlib"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = None
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


CSV_COLUMNS = (
    "loops",
    "quality",
    "lipschitz",
    "lipschitz_mean",
    "rel_residual_mean",
    "rel_residual_max",
    "steps_mean",
    "seconds",
    "flops",
)


def write_csv(records: list[dict[str, Any]], path: str | Path) -> Path:
    """One row per loop count: the `CSV_COLUMNS`, then every metric as ``metric_<name>``."""
    metric_names = sorted({name for record in records for name in record["metrics"]})
    path = Path(path)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*CSV_COLUMNS, *(f"metric_{name}" for name in metric_names)])
        for record in records:
            values = [record.get(column) for column in CSV_COLUMNS]
            values += [record["metrics"].get(name) for name in metric_names]
            writer.writerow(["" if v is None else v for v in values])
    return path


def run_eval(
    model_dir: str | Path,
    task_name: str | TaskAdapter | None,
    loops: str | Sequence[int],
    out_dir: str | Path,
    n: int = 200,
    seed: int = 0,
    batch_size: int = 64,
    perturb_eps: float | None = 1e-4,
    baseline_dirs: Sequence[str | Path] = (),
    task_kwargs: dict[str, Any] | None = None,
    keep_tol: bool = False,
    tol: float | None = None,
    device: str | None = "auto",
    plots: bool = True,
) -> dict[str, Any]:
    """Sweep the checkpoint in ``model_dir`` over ``loops`` on ``task.build_dataset("test", n, seed)``.

    Writes to ``out_dir``: ``results.json`` (run settings, model and task summary, ``loops``,
    ``records``, ``baselines`` and ``environment``), ``results.csv`` (one row per loop count) and,
    with ``plots``, the PNGs of `implicit_hf.eval.plots.plot_all`. Each of ``baseline_dirs`` is an
    explicit model (e.g. the same layers trained with ``num_loops=1``, or a non-tied stack) evaluated
    once at its own ``config.num_loops`` on the same rows; their records are stored under
    ``baselines`` (each with a ``name``: its run folder) and drawn as dashed lines on the quality plots.
    ``task_name=None`` (and ``task_kwargs=None``) use the task recorded with the model by the
    training loop (`task_for_model`). ``tol`` halts every sample at that relative-residual tolerance
    (the model's ``config.tol`` for this run; implies ``keep_tol``), so ``steps_mean`` is the loops used.
    Returns the content of ``results.json`` plus ``files`` (the paths written).
    """
    loops = _normalise_loops(loops)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch_device = _resolve_device(device)
    task, task_kwargs = task_for_model(model_dir, task_name, task_kwargs)
    try:
        rows = _as_rows(task.build_dataset("test", n, seed))
    except ValueError as err:  # a task refuses a size it cannot provide (e.g. a corpus with fewer windows)
        raise UsageError(f"n={n}: {err}") from err
    model = load_model(model_dir, task.head, torch_device)
    if tol is not None:
        model.config.tol, keep_tol = tol, True
        model.config.validate_loop_settings()
    settings = dict(batch_size=batch_size, perturb_eps=perturb_eps, seed=seed, keep_tol=keep_tol)
    result = sweep(model, task, rows, loops, **settings)
    records = result.pop("records")

    baselines = []
    for baseline_dir in baseline_dirs:
        baseline_model = load_model(baseline_dir, task.head, torch_device)
        baseline_loops = int(baseline_model.config.num_loops)
        baseline_result = sweep(baseline_model, task, rows, [baseline_loops], **settings)
        baselines.append(
            {
                "name": run_name(baseline_dir),
                "model_dir": str(baseline_dir),
                "loops": baseline_loops,
                "record": baseline_result["records"][0],
                "model": _model_summary(baseline_model, baseline_dir),
            }
        )
        del baseline_model

    report = {
        "task": {
            "name": task.name,
            "head": task.head,
            "quality_metric": task.quality_metric,
            "higher_is_better": bool(task.higher_is_better),
            "task_kwargs": _builtin(dict(task_kwargs or {})),
        },
        "run": {
            **{k: v for k, v in result.items() if k != "loops"},
            "n": n,
            "device": str(torch_device),
            "keep_tol": keep_tol,
            "seconds_note": (
                "seconds = measured generate() time for all samples at t loops (one generate per t)"
                if result.get("generative")
                else "seconds = trajectory-run seconds for all samples * t / max_loops (linear cost assumed)"
            ),
            "flops_note": "estimated forward FLOPs per sample at t loops (implicit_hf.eval.harness.estimate_flops)",
        },
        "model": _model_summary(model, model_dir),
        "loops": loops,
        "records": records,
        "baselines": baselines,
        "environment": environment(torch_device),
    }
    report = _builtin(report)
    files = [out_dir / "results.json", out_dir / "results.csv"]
    (out_dir / "results.json").write_text(json.dumps(report, indent=2, allow_nan=True) + "\n")
    write_csv(records, out_dir / "results.csv")
    if plots:
        from .plots import plot_all

        files += plot_all(report, out_dir)
    return {**report, "files": [str(f) for f in files]}


# --------------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``implicit-hf eval`` options to ``parser`` (defined in `implicit_hf.cli`, which parses them
    without importing torch)."""
    from ..cli import add_eval_arguments

    return add_eval_arguments(parser)


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Run `run_eval` from parsed `add_arguments` options and print a table of the records."""
    result = run_eval(
        args.model,
        args.task,
        args.loops,
        args.out,
        n=args.n,
        seed=args.seed,
        batch_size=args.batch_size,
        perturb_eps=args.perturb_eps,
        baseline_dirs=args.baseline,
        task_kwargs=args.task_kwargs,
        keep_tol=args.keep_tol,
        tol=args.tol,
        device=args.device,
        plots=not args.no_plots,
    )
    metric = result["task"]["quality_metric"]
    print(f"{'loops':>5} {metric:>12} {'lipschitz':>11} {'rel.res.mean':>12} {'seconds':>9} {'GFLOPs/sample':>13}")
    for record in result["records"]:
        lipschitz, residual = record["lipschitz"], record["rel_residual_mean"]
        print(
            f"{record['loops']:>5} {record['quality']:>12.5g} "
            f"{(f'{lipschitz:.4g}' if lipschitz is not None else '-'):>11} "
            f"{(f'{residual:.3e}' if residual is not None else '-'):>12} {record['seconds']:>9.3f} "
            f"{record['flops'] / 1e9:>13.4g}"
        )
    for base in result["baselines"]:
        print(f"explicit baseline {base['name']} ({base['loops']} loops): {metric} = {base['record']['quality']:.5g}")
    for path in result["files"]:
        print(f"wrote {path}")
    if args.model_card:
        from ..modeling.model_card import write_model_card

        sweep = {"task": result["task"]["name"], "quality_metric": metric, "records": result["records"]}
        write_model_card(args.model, sweep=sweep)
        print(f"wrote {Path(args.model) / 'README.md'} (loop sweep added)")
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``implicit-hf eval``: sweep a checkpoint over loop counts and write results and plots."""
    parser = argparse.ArgumentParser(
        prog="implicit-hf eval", description="Score an implicit model at many loop counts from one trajectory run."
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    main()
