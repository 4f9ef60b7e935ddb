"""Test-time compute in width: K trajectories per input, solved as one batch and reduced to one answer.

A forward with ``num_trajectories=K > 1`` repeats every batch row K times (row ``b * K + k`` is trajectory ``k``
of input ``b``), starts each trajectory from the configured ``state_init`` plus Gaussian noise (`perturbed_starts`)
and solves the ``B * K`` rows together, halting per row. A head then reduces the K answers of each input
(`TrajectoryReduction`): ``residual`` keeps the trajectory with the lowest final relative residual (the fixed
point that best satisfies the model's own equation), ``vote`` the majority of the decoded predictions per token,
``mean`` the average of regression outputs. Copied beside checkpoints with the model code: it imports only torch
and sibling modules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .rules import check, integer, number, one_of
from .solvers import SolverStats

# The selection rules each kind of head takes (a vote needs discrete predictions, a mean continuous outputs).
SELECT_RULES = {
    "classification": ("residual", "vote"),
    "causal_lm": ("residual", "vote"),
    "regression": ("residual", "mean"),
}


def check_width(num_trajectories: int, trajectory_noise: float, trajectory_seed: int) -> int:
    """``num_trajectories`` as an ``int`` after checking it (an integer >= 1), ``trajectory_noise`` (a finite
    number >= 0) and ``trajectory_seed`` (an integer >= 0); a ``ValueError`` names the argument otherwise."""
    check("trajectory_noise", trajectory_noise, number(">= 0", lambda value: value >= 0))
    check("trajectory_seed", trajectory_seed, integer(minimum=0))
    return check("num_trajectories", num_trajectories, integer(minimum=1))


def repeat_rows(count: int, batch: int, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Each of ``tensors`` with every one of its ``batch`` rows repeated ``count`` times in place (trajectory ``k``
    of input ``b`` at row ``b * count + k``); ``None`` and tensors broadcast over the batch pass unchanged."""
    return [x if x is None or x.shape[0] != batch else x.repeat_interleave(count, dim=0) for x in tensors]


def per_trajectory(loop_feedback: Callable[[torch.Tensor], torch.Tensor], count: int) -> Callable:
    """``loop_feedback`` (written for the input's batch) applied to each trajectory's rows on their own: a task's
    feedback may hold per-input tensors (measurements) of the input's batch size."""

    def feedback(hidden: torch.Tensor) -> torch.Tensor:
        parts = [loop_feedback(hidden[k::count]) for k in range(count)]
        return torch.stack(parts, dim=1).flatten(0, 1)

    return feedback


def perturbed_starts(state: torch.Tensor, injected: torch.Tensor, noise: float, seed: int) -> torch.Tensor:
    """The starting states: ``state`` plus Gaussian noise of scale ``noise`` times the state's RMS over the hidden
    size, per row and position (where the state is zero, ``state_init="zeros"``, the RMS of the injected input
    instead), drawn from a generator seeded with ``seed``: the same inputs and seed give the same starts."""
    if noise == 0:
        return state
    scale = state.float().pow(2).mean(-1, keepdim=True).sqrt()
    scale = torch.where(scale > 0, scale, injected.float().pow(2).mean(-1, keepdim=True).sqrt())
    generator = torch.Generator(device=state.device).manual_seed(seed)
    draw = torch.randn(state.shape, generator=generator, device=state.device, dtype=torch.float32)
    return (state.float() + noise * scale * draw).to(state.dtype)


def final_residuals(rel_residual: torch.Tensor, count: int) -> torch.Tensor:
    """Each row's last finite relative residual (``inf`` where it has none), shape ``(B, count)``."""
    if not len(rel_residual):
        return rel_residual.new_full((rel_residual.shape[1] // count, count), float("inf"))
    finite = torch.isfinite(rel_residual)
    iteration = torch.arange(len(rel_residual), device=rel_residual.device)[:, None]
    last = torch.where(finite, iteration, -1).amax(0)
    values = rel_residual.gather(0, last.clamp_min(0)[None])[0]
    return torch.where(last >= 0, values, float("inf")).view(-1, count)


@dataclass
class TrajectoryChoice:
    """What the reduction of K trajectories per input did, per input (``loop_stats.trajectories``).

    ``chosen``: the trajectory kept (``residual``, ``mean``: the lowest final residual; ``vote``: the one whose
    predictions agree most with the vote, ties to the lower residual); ``final_residual``: ``(B, K)``;
    ``residual_min`` / ``residual_max``: their spread; ``agreement``: the fraction of trajectories whose decoded
    prediction equals the output's, averaged over tokens (a confidence; NaN for regression heads);
    ``steps``: the evaluations of all K trajectories (the compute spent on the input).
    """

    select: str
    num_trajectories: int
    chosen: torch.Tensor
    final_residual: torch.Tensor
    residual_min: torch.Tensor
    residual_max: torch.Tensor
    agreement: torch.Tensor
    steps: torch.Tensor


def _vote(grouped: torch.Tensor, rank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per input and token, the logits of a trajectory predicting the majority class (among those, the lowest
    residual's); ``grouped`` is ``(B, K, T, C)``, ``rank`` ``(B, K)`` (0: lowest residual). Also the winning
    trajectory per token, ``(B, T)``."""
    count = grouped.shape[1]
    predictions = grouped.argmax(-1)  # (B, K, T)
    votes = (predictions[:, :, None] == predictions[:, None]).sum(2)  # trajectories agreeing with each one
    winner = (votes * count + (count - 1 - rank)[:, :, None]).argmax(1)  # (B, T)
    index = winner[:, None, :, None].expand(-1, 1, -1, grouped.shape[-1])
    return grouped.gather(1, index)[:, 0], winner


@dataclass(frozen=True)
class TrajectoryReduction:
    """A head's request for K trajectories per input and how to reduce them (`trajectory_reduction`)."""

    count: int
    select: str
    discrete: bool  # the head decodes classes (agreement compares argmax predictions)

    def reduce(self, logits: torch.Tensor, trajectory: tuple | None, outputs, token_mask: torch.Tensor | None):
        """``(logits, trajectory, loop_stats, hidden_states, attentions)`` of ``B`` inputs from a head's
        ``logits`` / ``trajectory`` and the model's ``outputs`` over ``B * K`` rows. ``loop_stats`` holds the
        chosen trajectory's rows plus `TrajectoryChoice` as ``.trajectories``; hidden states and attentions are
        the chosen trajectory's."""
        count, stats = self.count, outputs.loop_stats
        residual = final_residuals(stats.rel_residual, count)
        rank = residual.argsort(dim=1, stable=True).argsort(dim=1)
        batch = torch.arange(residual.shape[0], device=residual.device)
        chosen = residual.argmin(1)  # the first of equal residuals

        def reduce(x: torch.Tensor) -> torch.Tensor:
            grouped = x.unflatten(0, (-1, count))
            if self.select == "mean":
                return grouped.mean(1)
            if self.select == "vote":
                return _vote(grouped, rank)[0]
            return grouped[batch, chosen]

        reduced = reduce(logits)
        agreement = torch.full_like(residual[:, 0], float("nan"))
        if self.discrete:
            agrees = (logits.unflatten(0, (-1, count)).argmax(-1) == reduced.argmax(-1)[:, None]).float()  # (B,K,T)
            if self.select == "vote":  # the trajectory agreeing most with the vote, ties to the lower residual
                chosen = (agrees.sum(-1) * count + (count - 1 - rank)).argmax(1)
            agreement = _token_mean(agrees.mean(1), token_mask)
        rows = batch * count + chosen
        choice = TrajectoryChoice(
            self.select,
            count,
            chosen,
            residual,
            residual.amin(1),
            residual.amax(1),
            agreement,
            stats.steps.view(-1, count).sum(1),
        )
        pick = None if outputs.hidden_states is None else tuple(h[rows] for h in outputs.hidden_states)
        attentions = None if outputs.attentions is None else tuple(a[rows] for a in outputs.attentions)
        trajectory = None if trajectory is None else tuple(reduce(x) for x in trajectory)
        return reduced, trajectory, _rows_of_stats(stats, rows, choice), pick, attentions


def _token_mean(values: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """``values`` ``(B, T)`` averaged over each input's tokens (those of a 2-D ``token_mask`` when given)."""
    if token_mask is None or token_mask.ndim != 2:
        return values.mean(1)
    mask = token_mask[:, -values.shape[1] :].to(values.dtype)
    return (values * mask).sum(1) / mask.sum(1).clamp_min(1)


def _rows_of_stats(stats: SolverStats, rows: torch.Tensor, choice: TrajectoryChoice) -> SolverStats:
    """``stats`` of the batch rows ``rows`` (one per input), with ``choice`` as ``.trajectories``."""
    return SolverStats(
        solver=stats.solver,
        steps=stats.steps[rows],
        abs_residual=stats.abs_residual[:, rows],
        rel_residual=stats.rel_residual[:, rows],
        converged=stats.converged[rows],
        diverged=stats.diverged[rows],
        fallbacks=stats.fallbacks[rows],
        trajectories=choice,
    )


def trajectory_reduction(
    num_trajectories: int, trajectory_noise: float, trajectory_seed: int, select: str, head: str
) -> TrajectoryReduction | None:
    """A head's trajectory arguments, checked (``select`` against the rules of ``head``, a key of
    `SELECT_RULES`); ``None`` for one trajectory, the plain forward."""
    count = check_width(num_trajectories, trajectory_noise, trajectory_seed)
    check("select", select, one_of(("residual", "vote", "mean")))
    if select not in SELECT_RULES[head]:
        allowed = " or ".join(repr(rule) for rule in SELECT_RULES[head])
        raise ValueError(f"select={select!r} does not apply to a {head.replace('_', ' ')} head: it takes {allowed}")
    return None if count == 1 else TrajectoryReduction(count, select, head != "regression")
