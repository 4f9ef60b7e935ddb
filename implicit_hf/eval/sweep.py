"""Loop-count sweep: score an implicit model at many loop counts from one trajectory run.

For each batch the model runs once with ``num_loops=max(loops)`` and ``trajectory_loops=loops``;
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

`trajectory_sweep` is that sweep; a generative task cannot be scored from one trajectory (its sweep is
`implicit_hf.eval.generative.generative_sweep`), and `implicit_hf.eval.run.sweep` chooses between the two.
"""

from __future__ import annotations

import math
import time
from types import SimpleNamespace
from typing import Any

import torch

from ..loop_counts import LoopCounts
from ..tasks.base import TaskAdapter, feedback_kwargs
from .records import loop_record, scored_metrics, sweep_summary
from .width import Width, width_columns

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
    * loop shift (``loop_shift > 0``): ``2 * d * d`` per iteration for its projection (the taps are
      elementwise);
    * in-loop feedback (``feedback_features > 0``): per iteration, the coda and the head on the
      current state plus ``2 * feedback_features * d`` for its embedding (the task's own feedback
      function, e.g. an FFT, is not counted);
    * head: ``2 * d * head_outputs`` (``num_labels`` by default; the vocabulary for a causal LM).

    Total: ``T * (input + (prelude + coda) * layer + loops * (core * layer + injection) + head)``.
    Norms, RoPE, softmax and other elementwise work are left out. A plain transformers decoder config (e.g. a
    ``LlamaConfig`` baseline, without the loop fields) counts as its ``num_hidden_layers`` run once.
    """
    if not is_implicit_config(config):
        config = _as_stack(config)
    d = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = config.num_key_value_heads or heads
    head_dim = config.head_dim or d // heads
    d_attn = heads * head_dim
    layer_params = d * d_attn + 2 * d * kv_heads * head_dim + d_attn * d + 3 * d * config.intermediate_size
    layer = 2 * layer_params + 4 * seq_len * d_attn
    inputs = 2 * config.input_features * d + 2 * seq_len * config.edge_features * heads
    injection = 4 * d * d if config.injection == "linear" else 0
    injection += 2 * d * d if config.loop_shift else 0
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


def is_implicit_config(config) -> bool:
    """Whether ``config`` is an implicit model's (else a plain transformers model, e.g. an explicit baseline)."""
    return getattr(config, "model_type", None) == "implicit"


def _as_stack(config):
    """The fields `estimate_flops` reads, for a plain decoder: its layers run once, no loop."""
    fields = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size")
    return SimpleNamespace(
        **{name: getattr(config, name, None) for name in fields},
        num_prelude_layers=config.num_hidden_layers,
        num_core_layers=0,
        num_coda_layers=0,
        injection="add",
        loop_shift=0,
        input_features=0,
        edge_features=0,
        feedback_features=0,
        num_labels=getattr(config, "num_labels", 1),
    )


def head_outputs(model: torch.nn.Module) -> int:
    """The width of the model's head (``lm_head`` or ``score``), the ``head_outputs`` of `estimate_flops`."""
    for name in ("lm_head", "score"):
        layer = getattr(model, name, None)
        if isinstance(layer, torch.nn.Linear):
            return layer.out_features
    return int(getattr(model.config, "num_labels", 1))


# --------------------------------------------------------------------------------------------------
# Helpers shared with the generative sweep and the run


def device_of(model: torch.nn.Module) -> torch.device:
    """The device of the model's parameters (CPU for a model without any)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a wall-clock timing covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _to_device(inputs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def as_rows(rows) -> list[dict]:
    """Dataset rows as a list of dicts (from a list, a ``datasets.Dataset`` or any iterable)."""
    if isinstance(rows, list):
        return rows
    if hasattr(rows, "to_list"):  # datasets.Dataset
        return rows.to_list()
    return list(rows)


# --------------------------------------------------------------------------------------------------
# The sweep


def _trajectory_pass(
    model: torch.nn.Module,
    task: TaskAdapter,
    rows: list[dict],
    loops: LoopCounts | list[int],
    batch_size: int,
    tol: float | None,
    width: Width | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """One trajectory run per batch; per requested ``t``: predictions, residuals, steps (and, with ``width``, each
    input's agreement between its trajectories). A plain transformers model (an explicit baseline) runs once per
    batch: the same predictions at every ``t``, no residuals or steps."""
    implicit = is_implicit_config(model.config)
    device = device_of(model)
    max_loops = loops[-1]
    predictions: dict[int, list] = {t: [] for t in loops}
    rel_residual: dict[int, list[torch.Tensor]] = {t: [] for t in loops}
    steps: dict[int, list[torch.Tensor]] = {t: [] for t in loops}
    agreement: dict[int, list[torch.Tensor]] = {t: [] for t in loops}
    wide = {} if width is None else width.forward_kwargs(seed)
    seconds = 0.0
    batch_lengths: list[tuple[int, int]] = []  # (batch size, padded length) for the FLOPs estimate
    diverged = 0
    for start in range(0, len(rows), batch_size):
        batch_rows = rows[start : start + batch_size]
        inputs = _to_device(task.encode(batch_rows), device)
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        synchronize(device)
        began = time.perf_counter()
        if implicit:
            out = model(
                **model_inputs,
                num_loops=max_loops,
                tol=tol,
                return_trajectory=True,
                trajectory_loops=loops,
                **feedback_kwargs(task, inputs),
                **wide,
            )
            trajectory, stats = out.trajectory, out.loop_stats
            del out
        else:
            trajectory, stats = (model(**model_inputs).logits,) * len(loops), None
        synchronize(device)
        seconds += time.perf_counter() - began
        if not trajectory:
            raise RuntimeError("the model returned no trajectory; it must support return_trajectory=True")
        batch_lengths.append((len(batch_rows), int(trajectory[0].shape[1])))
        diverged += 0 if stats is None else int(stats.diverged.sum())
        iterations = 0 if stats is None else stats.rel_residual.shape[0]
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
            steps[t].append(
                torch.full((len(batch_rows),), math.nan) if stats is None else stats.steps.clamp(max=t).detach().cpu()
            )
            if stats is not None and stats.trajectories is not None:
                agreement[t].append(stats.trajectories.entries[position].answer_agreement.detach().float().cpu())
        del trajectory
    return {
        "predictions": predictions,
        "rel_residual": {t: torch.cat(v) if v else torch.full((len(rows),), math.nan) for t, v in rel_residual.items()},
        "steps": {t: torch.cat(v) for t, v in steps.items()},
        "agreement": {t: torch.cat(v) if v else None for t, v in agreement.items()},
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


@torch.no_grad()
def trajectory_sweep(
    model: torch.nn.Module,
    task: TaskAdapter,
    rows: list[dict],
    loops: LoopCounts,
    batch_size: int = 64,
    perturb_eps: float | None = 1e-4,
    seed: int = 0,
    keep_tol: bool = False,
    return_predictions: bool = False,
    warmup: bool = True,
    width: Width | None = None,
) -> dict[str, Any]:
    """Score ``model`` on ``rows`` at every loop count in ``loops`` from one trajectory run per batch (the
    arguments are `implicit_hf.eval.run.sweep`'s, checked there; with ``width``, K trajectories per input reduced
    at every ``t`` by the residuals at ``t``, and the `width_columns`).

    Records (`loop_record`): ``quality`` and ``metrics`` of ``task.decode`` at each count, ``lipschitz`` (max
    over samples; ``lipschitz_mean`` the mean) of the probe on ``task.perturb(rows, perturb_eps, seed)`` (``None``
    without it), ``rel_residual_mean`` / ``rel_residual_max`` (relative residual at iteration ``t``),
    ``steps_mean`` (iterations actually run within a budget of ``t``), ``seconds`` (trajectory-run seconds for all
    rows scaled linearly to ``t``: ``total * t / K``) and ``flops`` (`estimate_flops` per sample, averaged over the
    padded batch lengths).
    """
    tol = None if keep_tol else 0
    max_loops = loops[-1]
    if warmup:  # one untimed call first: lazy initialisation would otherwise land in the timings
        _trajectory_pass(model, task, rows[:batch_size], [1], batch_size, tol, width, seed)
    clean = _trajectory_pass(model, task, rows, loops, batch_size, tol, width, seed)

    probe = bool(perturb_eps)
    lipschitz: dict[int, torch.Tensor] = {}
    perturbed = None
    if probe:
        perturbed_rows, delta_norms = task.perturb(rows, perturb_eps, seed)
        perturbed = _trajectory_pass(model, task, as_rows(perturbed_rows), loops, batch_size, tol, width, seed)
        for t in loops:
            lipschitz[t] = lipschitz_ratios(clean["predictions"][t], perturbed["predictions"][t], delta_norms)

    outputs = head_outputs(model)
    lengths = clean["batch_lengths"]
    copies = 1 if width is None else width.num_trajectories  # every layer runs once per trajectory
    records = []
    for t in loops:
        flops = copies * sum(size * estimate_flops(model.config, length, t, outputs) for size, length in lengths)
        residual, predictions = clean["rel_residual"][t], clean["predictions"][t]
        records.append(
            loop_record(
                task,
                t,
                scored_metrics(task, predictions, rows),
                lipschitz=_finite_stat(lipschitz[t], "max") if probe else None,
                lipschitz_mean=_finite_stat(lipschitz[t], "mean") if probe else None,
                rel_residual_mean=_finite_stat(residual, "mean"),
                rel_residual_max=_finite_stat(residual, "max"),
                steps_mean=float(clean["steps"][t].double().mean()),
                seconds=clean["seconds"] * t / max_loops,
                flops=flops / len(rows),
                **width_columns(width, t, clean["agreement"][t], task, predictions, rows),
            )
        )
    result = sweep_summary(
        model,
        task,
        loops,
        records,
        num_samples=len(rows),
        perturb_eps=perturb_eps if probe else None,
        seed=seed,
        batch_size=batch_size,
        keep_tol=keep_tol,
        seconds_total=clean["seconds"],
        seconds_perturbed_total=perturbed["seconds"] if probe else None,
        seq_len_mean=sum(s * n for s, n in clean["batch_lengths"]) / len(rows),
        diverged_fraction=clean["diverged"] / len(rows),
    )
    if return_predictions:
        result["predictions"] = clean["predictions"]
        if probe:
            result["perturbed_predictions"] = perturbed["predictions"]
    return result
