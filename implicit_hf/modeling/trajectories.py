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
from typing import Any

import torch

from .rules import check, integer, number, one_of
from .solvers import SolverStats

# The selection rules each kind of head takes (a vote needs discrete predictions, a mean continuous outputs);
# ``random`` (a seeded pick, the same trajectory at every loop count) is the baseline the others are measured against.
SELECT_RULES = {  # by head (a task's ``head``, a key of `configuration_implicit.HEADS`)
    "token_classification": ("residual", "vote", "random"),
    "causal_lm": ("residual", "vote", "random"),
    "token_regression": ("residual", "mean", "random"),
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


# Positions per independently seeded block of the starting noise (`seeded_normal`).
NOISE_BLOCK = 64


def seeded_normal(positions: torch.Tensor, rows: int, count: int, width: int, seed: int) -> torch.Tensor:
    """Standard normal draws ``(rows, T, width)`` for ``rows = B * count`` trajectory rows at ``positions``
    (``(rows, T)`` or ``(1, T)``): row ``b * count + k`` takes trajectory ``k``'s draw at each of its positions. The
    draw of trajectory ``k`` at a position comes from a generator seeded by ``(seed, k, position // NOISE_BLOCK)``
    alone, so it is the same in any batch, at any padding (left or right) and sequence length, and for any K >= k + 1
    (K trajectories extend K' < K ones)."""
    device = positions.device
    positions = positions.long().clamp_min(0).expand(rows, -1)
    blocks = int(positions.max()) // NOISE_BLOCK + 1
    table = torch.empty((count, blocks * NOISE_BLOCK, width), device=device)
    for k in range(count):
        for block in range(blocks):
            generator = torch.Generator(device=device).manual_seed(((seed * 1_000_003 + k) * 1_000_033 + block) % 2**63)
            span = slice(block * NOISE_BLOCK, (block + 1) * NOISE_BLOCK)
            table[k, span] = torch.randn((NOISE_BLOCK, width), generator=generator, device=device)
    trajectory = torch.arange(rows, device=device) % count
    return table[trajectory[:, None], positions]


def perturbed_starts(
    state: torch.Tensor,
    injected: torch.Tensor,
    positions: torch.Tensor,
    count: int,
    noise: float,
    seed: int,
    normal_std: float | None = None,
) -> torch.Tensor:
    """The starting states of ``count`` trajectories per input (``state`` has ``B * count`` rows, at ``positions``):
    ``state`` plus Gaussian noise of scale ``noise`` times the state's RMS over the hidden size, per row and position
    (where the state is zero, ``state_init="zeros"``, the RMS of the injected input instead). With ``normal_std``
    (``state_init="normal"``) the state itself is first drawn again, ``normal_std`` times a seeded standard normal,
    so that it too follows ``seed``. Every draw is `seeded_normal`: an input's starts do not depend on the other
    inputs of its batch (a batch in chunks, or another batch, gives it the same answer)."""
    rows, width = state.shape[0], state.shape[-1]
    if normal_std is not None:
        state = (normal_std * seeded_normal(positions, rows, count, width, seed + 1)).to(state.dtype)
    if noise == 0:
        return state
    scale = state.float().pow(2).mean(-1, keepdim=True).sqrt()
    scale = torch.where(scale > 0, scale, injected.float().pow(2).mean(-1, keepdim=True).sqrt())
    return (state.float() + noise * scale * seeded_normal(positions, rows, count, width, seed)).to(state.dtype)


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
    predictions agree most with the vote, ties to the lower residual; ``random``: a seeded pick); ``final_residual``:
    ``(B, K)``; ``residual_min`` / ``residual_max``: their spread; ``agreement``: the fraction of trajectories whose
    decoded prediction equals the output's, averaged over tokens, and ``answer_agreement`` the fraction whose
    prediction equals it at every token (confidences; NaN for regression heads); ``token_agreement``: ``(B, T)``,
    per token (a generated token's confidence is its last position's); ``steps``: the evaluations of all K
    trajectories (the compute spent on the input). ``entries``: with ``return_trajectory``, the same for each
    trajectory entry, reduced by the residual at that entry's loop count (what a run stopped there chooses).
    """

    select: str
    num_trajectories: int
    chosen: torch.Tensor
    final_residual: torch.Tensor
    residual_min: torch.Tensor
    residual_max: torch.Tensor
    agreement: torch.Tensor
    answer_agreement: torch.Tensor
    token_agreement: torch.Tensor | None
    steps: torch.Tensor
    entries: tuple[TrajectoryChoice, ...] | None = None


def _vote(grouped: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """Per input and token, the logits of a trajectory predicting the majority class (among those, the lowest
    residual's); ``grouped`` is ``(B, K, T, C)``, ``rank`` ``(B, K)`` (0: lowest residual)."""
    count = grouped.shape[1]
    predictions = grouped.argmax(-1)  # (B, K, T)
    votes = (predictions[:, :, None] == predictions[:, None]).sum(2)  # trajectories agreeing with each one
    winner = (votes * count + (count - 1 - rank)[:, :, None]).argmax(1)  # (B, T)
    index = winner[:, None, :, None].expand(-1, 1, -1, grouped.shape[-1])
    return grouped.gather(1, index)[:, 0]


@dataclass(frozen=True)
class TrajectoryReduction:
    """A head's request for K trajectories per input and how to reduce them (`trajectory_reduction`)."""

    count: int
    select: str
    discrete: bool  # the head decodes classes (agreement compares argmax predictions)
    seed: int = 0  # of the ``random`` rule's pick

    def reduce(self, logits: torch.Tensor, trajectory: tuple | None, outputs, token_mask: torch.Tensor | None):
        """``(logits, trajectory, loop_stats, hidden_states, attentions)`` of ``B`` inputs from a head's
        ``logits`` / ``trajectory`` and the model's ``outputs`` over ``B * K`` rows. ``loop_stats`` holds the
        chosen trajectory's rows plus `TrajectoryChoice` as ``.trajectories``; hidden states and attentions are
        the chosen trajectory's. Each trajectory entry is reduced by the residuals at its own loop count
        (``outputs.trajectory_loops``)."""
        stats = outputs.loop_stats
        pick = None
        if self.select == "random":
            generator = torch.Generator().manual_seed(self.seed)
            pick = torch.randint(self.count, (logits.shape[0] // self.count,), generator=generator)
            pick = pick.to(logits.device)
        reduced, choice = self._reduce(logits, stats.rel_residual, stats.steps, token_mask, pick)
        if trajectory is not None:
            iterations = len(stats.rel_residual)
            loops = outputs.trajectory_loops or range(1, len(trajectory) + 1)
            entries = [
                self._reduce(x, stats.rel_residual[: min(t, iterations)], stats.steps.clamp(max=t), token_mask, pick)
                for x, t in zip(trajectory, loops, strict=True)
            ]
            trajectory = tuple(x for x, _ in entries)
            choice.entries = tuple(c for _, c in entries)
        rows = torch.arange(len(choice.chosen), device=logits.device) * self.count + choice.chosen
        hidden = None if outputs.hidden_states is None else tuple(h[rows] for h in outputs.hidden_states)
        attentions = None if outputs.attentions is None else tuple(a[rows] for a in outputs.attentions)
        return reduced, trajectory, _rows_of_stats(stats, rows, choice), hidden, attentions

    def _reduce(self, x, rel_residual, steps, token_mask, pick) -> tuple[torch.Tensor, TrajectoryChoice]:
        """``x`` (``B * K`` rows) reduced to ``B`` by the rule, with the residuals and steps it was chosen by."""
        count = self.count
        residual = final_residuals(rel_residual, count)
        rank = residual.argsort(dim=1, stable=True).argsort(dim=1)
        grouped = x.unflatten(0, (-1, count))
        batch = torch.arange(grouped.shape[0], device=x.device)
        chosen = residual.argmin(1) if pick is None else pick  # the first of equal residuals
        if self.select == "mean":
            reduced = grouped.mean(1)
        elif self.select == "vote":
            reduced = _vote(grouped, rank)
        else:
            reduced = grouped[batch, chosen]
        nan = torch.full_like(residual[:, 0], float("nan"))
        agreement, answer_agreement, token_agreement = nan, nan, None
        if self.discrete:
            agrees = grouped.argmax(-1) == reduced.argmax(-1)[:, None]  # (B, K, T)
            if self.select == "vote":  # the trajectory agreeing most with the vote, ties to the lower residual
                chosen = (agrees.sum(-1) * count + (count - 1 - rank)).argmax(1)
            token_agreement = agrees.float().mean(1)
            agreement = _token_mean(token_agreement, token_mask)
            answer_agreement = _every_token(agrees, token_mask).float().mean(1)
        choice = TrajectoryChoice(
            self.select,
            count,
            chosen,
            residual,
            residual.amin(1),
            residual.amax(1),
            agreement,
            answer_agreement,
            token_agreement,
            steps.view(-1, count).sum(1),
        )
        return reduced, choice


def _every_token(agrees: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """``(B, K)``: whether each trajectory agrees at every token (of a 2-D ``token_mask`` when given)."""
    if token_mask is not None and token_mask.ndim == 2:
        agrees = agrees | ~token_mask[:, None, -agrees.shape[-1] :].bool()
    return agrees.all(-1)


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


def trajectory_reduction(settings: dict[str, Any], head: str) -> TrajectoryReduction | None:
    """The reduction a head of kind ``head`` (a key of `SELECT_RULES`) applies to a call's trajectory ``settings``,
    checked; ``select`` is taken out of ``settings``, leaving what the model's forward takes. ``None`` for one
    trajectory, the plain forward."""
    select = settings.pop("select")
    count = check_width(settings["num_trajectories"], settings["trajectory_noise"], settings["trajectory_seed"])
    check_select(select, head)
    discrete = head != "token_regression"
    return None if count == 1 else TrajectoryReduction(count, select, discrete, settings["trajectory_seed"])


def check_select(select: str, head: str) -> str:
    """``select`` if it is a rule the head ``head`` (a key of `SELECT_RULES`) takes, else a ``ValueError`` naming the
    rules it takes."""
    check("select", select, one_of(("residual", "vote", "mean", "random")))
    if select not in SELECT_RULES[head]:
        allowed = " or ".join(repr(rule) for rule in SELECT_RULES[head])
        kind = head.removeprefix("token_").replace("_", " ")
        raise ValueError(f"select={select!r} does not apply to a {kind} head: it takes {allowed}")
    return select


def input_chunks(batch: int, count: int, trajectory_batch_size: int | None) -> list[slice] | None:
    """Slices of a batch of ``batch`` inputs, each of whose ``count`` trajectories per input fit in
    ``trajectory_batch_size`` rows (at least one input per slice); ``None`` when the whole batch fits (or no size
    is given). An integer >= 1 or ``None``, else a ``ValueError`` naming it."""
    if trajectory_batch_size is None:
        return None
    size = check("trajectory_batch_size", trajectory_batch_size, integer(minimum=1))
    if count == 1 or batch * count <= size:
        return None
    inputs = max(1, size // count)
    return [slice(start, start + inputs) for start in range(0, batch, inputs)]


def solve_in_chunks(forward: Callable, chunks: list[slice], batch: int, per_row: dict[str, Any], **settings: Any):
    """``forward`` (a model's) on each chunk of inputs, the ``per_row`` tensors of ``batch`` rows narrowed to it and
    ``settings`` as given, and their outputs joined (`join_chunks`)."""
    narrowed = ({k: v[rows] if v is not None and len(v) == batch else v for k, v in per_row.items()} for rows in chunks)
    return join_chunks([forward(**inputs, **settings) for inputs in narrowed])


def join_chunks(parts: list):
    """One output of the whole batch from the outputs of its chunks (`input_chunks`), of the class of the parts:
    tensors and tuples of tensors joined along the batch, solver statistics by `join_stats`."""
    first, joined = parts[0], {}
    for key, value in first.items():
        values = [part[key] for part in parts]
        if isinstance(value, torch.Tensor):
            joined[key] = torch.cat(values)
        elif isinstance(value, SolverStats):
            joined[key] = join_stats(values)
        elif isinstance(value, tuple) and value and isinstance(value[0], torch.Tensor):
            joined[key] = tuple(torch.cat(entry) for entry in zip(*values, strict=True))
        else:  # the same in every chunk (trajectory_loops)
            joined[key] = value
    return type(first)(**joined)


def join_stats(parts: list[SolverStats]) -> SolverStats:
    """The statistics of a batch solved in chunks: per-sample tensors joined; residual traces, ``(iterations, rows)``,
    padded to the longest by repeating a chunk's last iteration (what a halted sample's trace does)."""
    iterations = max(len(part.rel_residual) for part in parts)

    def trace(name: str) -> torch.Tensor:
        traces = [getattr(part, name) for part in parts]
        return torch.cat([torch.cat([x, x[-1:].expand(iterations - len(x), -1)]) for x in traces], 1)

    def rows(name: str) -> torch.Tensor:
        return torch.cat([getattr(part, name) for part in parts])

    return SolverStats(
        parts[0].solver,
        rows("steps"),
        trace("abs_residual"),
        trace("rel_residual"),
        rows("converged"),
        rows("diverged"),
        rows("fallbacks"),
    )


def refuse_in_chunks(loop_feedback, penalties, output_attentions, output_hidden_states) -> None:
    """A ``ValueError`` naming the first argument a batch solved in chunks cannot honour: a task's feedback holds
    per-input tensors of the whole batch, penalties are one number per solve, and attentions and per-iteration
    hidden states are collected per call."""
    given = {
        "loop_feedback": loop_feedback is not None,
        "penalties": bool(penalties),
        "output_attentions": bool(output_attentions),
        "output_hidden_states": bool(output_hidden_states),
    }
    for name, present in given.items():
        if present:
            raise ValueError(
                f"{name} cannot be used when the trajectories are solved in chunks (num_trajectories x batch > "
                "trajectory_batch_size): raise trajectory_batch_size or leave it out"
            )
