"""Batched fixed-point solvers with per-sample stopping and honest statistics.

Every solver has the signature ``solve(f, z0, max_iter, tol=None, *, keep=(), **options) -> (z, SolverStats)``,
its options keyword-only (``damping``, ``memory``, ...: what `ImplicitConfig.solver_options` holds per solver):

* ``f(z, index)`` evaluates the map on the rows ``index`` of the batch (``z`` holds exactly those
  rows). Solvers only evaluate samples that are still running, so samples that stopped cost no
  compute; ``f`` uses ``index`` to pick the matching rows of anything it closes over (the injected
  input, the attention mask).
* ``z0`` is a batched tensor of any shape ``(B, ...)``; norms are taken per sample over all other
  dimensions.
* ``max_iter`` is the number of evaluations of ``f`` per sample; with ``tol`` a sample stops as soon
  as its relative residual ``||f(z) - z|| / ||f(z)||`` drops below ``tol``.
* Picard returns its last iterate: with ``damping=1``, ``max_iter=K`` and no ``tol`` that is
  exactly ``K`` applications of the block. Anderson and Broyden return, per sample, the image
  ``f(x)`` of their lowest-residual iterate.
* ``keep`` (keyword) names evaluation counts whose state to keep in ``SolverStats.states`` (the
  state each solver would return had it stopped there); only those are held in memory.

The state keeps its dtype (the iterates handed to ``f`` are in ``z0``'s dtype), but the solvers' own
arithmetic (residual norms, Anderson's least-squares weights, Broyden's low-rank inverse) runs in at
least float32 and outside any ``torch.autocast`` region; ``f`` itself still runs under the caller's
autocast. Done in bfloat16, that arithmetic put a floor of about 1e-3 under the relative residual
(Anderson under autocast never halted at ``tol=1e-4``). A bfloat16 or float16 *state* is still
rounded at every step: tolerances below its resolution (about 4e-3 and 5e-4 of a value) are reached
when the iteration lands on an exact fixed point of the rounded map, which Picard usually does.

A non-finite value or a residual that grows ``divergence_factor`` times above the best residual a
sample has reached marks that sample as diverged: it stops, keeps its last finite state, and is
flagged in ``SolverStats.diverged``. Anderson and Broyden never raise on a singular system: the
affected samples take a damped Picard step instead, counted in ``SolverStats.fallbacks``.

`SOLVERS` is where solver names are declared: the config's ``solver`` and a forward's ``solver=`` take its
keys, and `register_solver` adds one.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .rules import Rule, check, integer, number

if TYPE_CHECKING:
    from .trajectories import TrajectoryChoice

FixedPointMap = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

EPS = 1e-8  # added to a norm before dividing by it
DIVERGENCE_FACTOR = 1e3  # a residual this many times its best so far has diverged


@dataclass
class SolverStats:
    """What a solve did, per sample.

    ``abs_residual`` and ``rel_residual`` have shape ``(iterations, batch)``: entry ``[k, b]`` is
    the residual of sample ``b`` measured at its ``k+1``-th evaluation of ``f``; after a sample
    stopped, its entries repeat the last value it measured.
    """

    solver: str
    steps: torch.Tensor  # (B,) evaluations of f per sample
    abs_residual: torch.Tensor  # (T, B)
    rel_residual: torch.Tensor  # (T, B)
    converged: torch.Tensor  # (B,) bool: relative residual reached tol
    diverged: torch.Tensor  # (B,) bool: non-finite or blown-up residual
    fallbacks: torch.Tensor  # (B,) damped-Picard steps taken instead of an Anderson/Broyden step
    states: dict[int, torch.Tensor] | None = None  # the state after the evaluation counts asked for (``keep``)
    trajectories: TrajectoryChoice | None = None  # with num_trajectories > 1, the reduction per input

    @property
    def num_evaluations(self) -> int:
        """Total sample-evaluations of ``f`` (what a batch costs when stopped samples are skipped)."""
        return int(self.steps.sum())

    @property
    def final_rel_residual(self) -> torch.Tensor:
        """Relative residual each sample last measured, shape ``(B,)``."""
        return (
            self.rel_residual[-1]
            if len(self.rel_residual)
            else torch.full_like(self.steps, float("nan"), dtype=torch.float)
        )


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the solvers' own arithmetic: float32 for bfloat16 / float16 states, else the state's."""
    return torch.promote_types(dtype, torch.float32)


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Leave any autocast region for the solvers' algebra (``f`` is called outside this context)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _residual_norms(fz: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``||f(z) - z||`` and ``||f(z)||`` in float32, the difference taken in ``_work_dtype``."""
    with _no_autocast(fz.device):
        fz = fz.detach().flatten(1).to(_work_dtype(fz.dtype))
        residual = fz - z.detach().flatten(1)
        return residual.norm(dim=1).float(), fz.norm(dim=1).float()


class _Progress:
    """Book-keeping shared by the solvers: which samples still run, residual traces, flags."""

    def __init__(self, z0: torch.Tensor, name: str, tol: float | None, divergence_factor: float, keep: Collection[int]):
        batch = z0.shape[0]
        device = z0.device
        self.name = name
        self.tol = tol
        self.divergence_factor = divergence_factor
        self.active = torch.ones(batch, dtype=torch.bool, device=device)
        self.steps = torch.zeros(batch, dtype=torch.long, device=device)
        self.converged = torch.zeros(batch, dtype=torch.bool, device=device)
        self.diverged = torch.zeros(batch, dtype=torch.bool, device=device)
        self.fallbacks = torch.zeros(batch, dtype=torch.long, device=device)
        self.best_abs = torch.full((batch,), float("inf"), device=device)
        self.last_abs = torch.full((batch,), float("nan"), device=device)
        self.last_rel = torch.full((batch,), float("nan"), device=device)
        self.abs_trace: list[torch.Tensor] = []
        self.rel_trace: list[torch.Tensor] = []
        self.keep = frozenset(keep)
        self.states: dict[int, torch.Tensor] = {}
        self.all_index = torch.arange(batch, device=device)

    def running(self) -> torch.Tensor:
        """Indices of the samples still running (all of them while none has stopped)."""
        if bool(self.active.all()):
            return self.all_index
        return self.active.nonzero().squeeze(1)

    def record(
        self, index: torch.Tensor, fz: torch.Tensor, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Record the residual ``f(z) - z`` of the samples ``index``.

        Returns, per sample of ``index``: ``healthy`` (finite and not blown up: unhealthy samples
        are flagged diverged and stopped, and the caller must not overwrite their state),
        ``improved`` (lowest residual so far) and ``growth`` (residual / best residual before).
        """
        abs_res, fz_norm = _residual_norms(fz, z)
        rel_res = abs_res / (fz_norm + EPS)
        # A NaN or inf anywhere in a sample makes its norms non-finite: no separate element-wise scan.
        finite = torch.isfinite(abs_res) & torch.isfinite(fz_norm)
        rows = _all_or(index, self.steps.shape[0])
        best_before = self.best_abs[rows]
        growth = abs_res / best_before.clamp_min(EPS)
        healthy = finite & ~(growth > self.divergence_factor)
        improved = finite & (abs_res < best_before)
        self.steps[rows] += 1
        self.last_abs[rows] = abs_res
        self.last_rel[rows] = rel_res
        self.best_abs[rows] = torch.where(improved, abs_res, best_before)
        self.diverged[rows] |= ~healthy
        if self.tol is not None:
            self.converged[rows] |= healthy & (rel_res < self.tol)
        self.active[rows] &= healthy & ~self.converged[rows]
        self.abs_trace.append(self.last_abs.clone())
        self.rel_trace.append(self.last_rel.clone())
        return healthy, improved, growth

    def kept(self, state: torch.Tensor) -> None:
        """Keep ``state``, the iterate after the evaluation just recorded, if its count is asked for."""
        if len(self.abs_trace) in self.keep:
            self.states[len(self.abs_trace)] = state

    def stats(self) -> SolverStats:
        batch = self.steps.shape[0]
        empty = torch.empty(0, batch, device=self.steps.device)
        return SolverStats(
            solver=self.name,
            steps=self.steps,
            abs_residual=torch.stack(self.abs_trace) if self.abs_trace else empty,
            rel_residual=torch.stack(self.rel_trace) if self.rel_trace else empty,
            converged=self.converged,
            diverged=self.diverged,
            fallbacks=self.fallbacks,
            states=self.states if self.keep else None,
        )


def _all_or(index: torch.Tensor, batch: int) -> torch.Tensor | slice:
    """``index`` as a key for ``tensor[key]``: a plain slice (a view, no gather) when it is every row."""
    return slice(None) if index.shape[0] == batch else index


def _scatter_rows(full: torch.Tensor, index: torch.Tensor, rows: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``full`` with ``full[index[keep]] = rows[keep]``, out of place (autograd-safe)."""
    if index.shape[0] == full.shape[0] and bool(keep.all()):
        return rows
    return full.index_copy(0, index[keep], rows[keep])


# What each argument of the solvers allows: one table for all of them (their options share these names), enforced
# by `check_arguments` when a solver is called and when ``config.solver_options`` is set.
ARGUMENT_RULES: dict[str, Rule] = {
    "max_iter": integer(1),
    "tol": number("> 0", lambda value: value > 0, allow_none=True),
    "damping": number("in (0, 1]", lambda value: 0 < value <= 1),
    "memory": integer(1),
    "regularization": number(">= 0", lambda value: value >= 0),
    "restart_factor": number("> 1", lambda value: value > 1),
    "divergence_factor": number("> 1", lambda value: value > 1),
}


def check_arguments(where: str, arguments: Mapping[str, Any]) -> None:
    """Refuse an argument that its rule in `ARGUMENT_RULES` does not take: a ``ValueError`` naming ``where``, the
    argument and what it allows (arguments the table does not know, a registered solver's own, pass)."""
    for name, value in arguments.items():
        if name in ARGUMENT_RULES:
            check(f"{where}: {name}", value, ARGUMENT_RULES[name])


def _check_batch(name: str, z0: torch.Tensor) -> None:
    if z0.dim() < 1 or z0.shape[0] == 0:
        raise ValueError(f"{name}: z0 must be a batched tensor (B, ...) with B >= 1, got shape {tuple(z0.shape)}")


def picard(
    f: FixedPointMap,
    z0: torch.Tensor,
    max_iter: int,
    tol: float | None = None,
    *,
    damping: float = 1.0,
    divergence_factor: float = DIVERGENCE_FACTOR,
    keep: Collection[int] = (),
) -> tuple[torch.Tensor, SolverStats]:
    """Fixed-point iteration ``z <- z + damping * (f(z) - z)`` (plain looping when ``damping=1``)."""
    _check_batch("picard", z0)
    check_arguments("picard", dict(max_iter=max_iter, tol=tol, damping=damping, divergence_factor=divergence_factor))
    progress = _Progress(z0, "picard", tol, divergence_factor, keep)
    z = z0
    for _ in range(max_iter):
        index = progress.running()
        if index.numel() == 0:
            break
        z_run = z if index.shape[0] == z.shape[0] else z[index]
        fz = f(z_run, index)
        new_z = fz if damping == 1.0 else z_run + damping * (fz - z_run)
        healthy, _, _ = progress.record(index, fz, z_run)
        z = _scatter_rows(z, index, new_z, healthy)
        progress.kept(z)
    return z, progress.stats()


def anderson(
    f: FixedPointMap,
    z0: torch.Tensor,
    max_iter: int,
    tol: float | None = None,
    *,
    memory: int = 5,
    damping: float = 1.0,
    regularization: float = 1e-4,
    restart_factor: float = 10.0,
    divergence_factor: float = DIVERGENCE_FACTOR,
    keep: Collection[int] = (),
) -> tuple[torch.Tensor, SolverStats]:
    """Anderson acceleration (type II) with a bounded history of ``memory`` iterates per sample.

    Each step mixes the stored evaluations with weights from a regularised least-squares problem
    on their residuals. A sample whose system is singular, or whose residual grows above
    ``restart_factor`` times its best, falls back: its history is cleared and it takes a damped
    Picard step from its best iterate (counted in ``stats.fallbacks``). Returns, per sample, the
    image ``f(x)`` of its lowest-residual iterate.
    """
    _check_batch("anderson", z0)
    check_arguments(
        "anderson",
        dict(
            max_iter=max_iter,
            tol=tol,
            memory=memory,
            damping=damping,
            regularization=regularization,
            restart_factor=restart_factor,
            divergence_factor=divergence_factor,
        ),
    )
    memory = int(memory)
    progress = _Progress(z0, "anderson", tol, divergence_factor, keep)
    batch, shape = z0.shape[0], z0.shape
    x_next = z0.reshape(batch, -1)  # next point to evaluate, per sample
    dim = x_next.shape[1]
    xs = x_next.new_zeros(batch, memory, dim)  # ring buffers of iterates and their images
    fs = x_next.new_zeros(batch, memory, dim)
    filled = torch.zeros(batch, dtype=torch.long, device=z0.device)
    best_x, best_fx = x_next, x_next
    for step in range(max_iter):
        index = progress.running()
        if index.numel() == 0:
            break
        rows = _all_or(index, batch)
        x_run = x_next[rows]
        fx_run = f(x_run.view(-1, *shape[1:]), index).reshape(index.shape[0], -1)
        healthy, improved, growth = progress.record(index, fx_run, x_run)
        best_x = _scatter_rows(best_x, index, x_run, improved)
        best_fx = _scatter_rows(best_fx, index, fx_run, improved)
        progress.kept(best_fx.view(shape))
        slot = step % memory
        xs = _write_slot(xs, rows, slot, x_run)
        fs = _write_slot(fs, rows, slot, fx_run)
        filled[rows] = torch.clamp(filled[rows] + 1, max=memory)
        mixed, solvable = _anderson_mix(xs[rows], fs[rows], filled[rows], slot, damping, regularization)
        restart = growth > restart_factor
        fell_back = restart | (~solvable & (filled[rows] > 1))
        progress.fallbacks[rows] += fell_back.long()
        filled[rows] = torch.where(restart, 0, filled[rows])
        best_x_run, best_fx_run = best_x[rows], best_fx[rows]
        picard_step = best_x_run + damping * (best_fx_run - best_x_run)
        new_x = torch.where((solvable & ~restart)[:, None], mixed, picard_step)
        x_next = _scatter_rows(x_next, index, new_x, healthy)
    return best_fx.view(shape), progress.stats()


def _set_slot(history: torch.Tensor, slot: int, rows: torch.Tensor) -> torch.Tensor:
    return torch.cat([history[:, :slot], rows[:, None], history[:, slot + 1 :]], dim=1)


def _write_slot(history: torch.Tensor, rows: torch.Tensor | slice, slot: int, values: torch.Tensor) -> torch.Tensor:
    """``history[rows, slot] = values``: in place without autograd, out of place under it (unroll)."""
    if torch.is_grad_enabled():
        if isinstance(rows, slice):
            return _set_slot(history, slot, values)
        return history.index_copy(0, rows, _set_slot(history[rows], slot, values))
    history[rows, slot] = values
    return history


def _anderson_mix(
    xs: torch.Tensor, fs: torch.Tensor, filled: torch.Tensor, slot: int, damping: float, regularization: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anderson weights per sample: min ||sum a_i g_i|| subject to sum a_i = 1, g_i = f(x_i) - x_i.

    ``slot`` is the ring-buffer slot written last; a sample's ``filled`` valid entries are the ones
    written most recently (``slot``, ``slot - 1``, ... modulo ``memory``), so entries stored before
    a restart stay excluded. Returns the mixed next iterates and a flag per sample saying the solve
    was usable (finite and with at least two stored iterates). Unused slots get weight zero through
    the constraint rows. The algebra runs in ``_work_dtype`` outside autocast; the mixed iterates
    come back in the history's dtype.
    """
    with _no_autocast(xs.device):
        mixed, ok = _anderson_weights_and_mix(
            xs.to(_work_dtype(xs.dtype)), fs.to(_work_dtype(fs.dtype)), filled, slot, damping, regularization
        )
    return mixed.to(xs.dtype), ok


def _anderson_weights_and_mix(
    xs: torch.Tensor, fs: torch.Tensor, filled: torch.Tensor, slot: int, damping: float, regularization: float
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, memory, _ = xs.shape
    valid = (slot - torch.arange(memory, device=xs.device))[None, :] % memory < filled[:, None]  # (B, m)
    g = (fs - xs) * valid[:, :, None]
    gram = g @ g.transpose(1, 2)  # (B, m, m)
    scale = gram.diagonal(dim1=1, dim2=2).amax(dim=1).clamp_min(EPS)
    eye = torch.eye(memory, device=xs.device, dtype=xs.dtype)
    # Unused slots: identity rows/cols and no constraint weight, so their weight solves to 0.
    gram = gram + regularization * scale[:, None, None] * eye + (~valid).to(xs.dtype)[:, :, None] * eye
    system = xs.new_zeros(batch, memory + 1, memory + 1)
    system[:, 0, 1:] = valid.to(xs.dtype)
    system[:, 1:, 0] = valid.to(xs.dtype)
    system[:, 1:, 1:] = gram
    rhs = xs.new_zeros(batch, memory + 1)
    rhs[:, 0] = 1.0
    solution, info = torch.linalg.solve_ex(system, rhs)
    alpha = solution[:, 1:]
    ok = (info == 0) & torch.isfinite(alpha).all(dim=1) & (filled > 1)
    alpha = torch.where(ok[:, None], alpha, torch.zeros_like(alpha))
    mixed_f = torch.einsum("bm,bmd->bd", alpha, fs)
    mixed_x = torch.einsum("bm,bmd->bd", alpha, xs)
    return damping * mixed_f + (1 - damping) * mixed_x, ok


def broyden(
    f: FixedPointMap,
    z0: torch.Tensor,
    max_iter: int,
    tol: float | None = None,
    *,
    memory: int = 16,
    restart_factor: float = 10.0,
    divergence_factor: float = DIVERGENCE_FACTOR,
    keep: Collection[int] = (),
) -> tuple[torch.Tensor, SolverStats]:
    """Limited-memory (good) Broyden's method on ``g(z) = f(z) - z``, one low-rank inverse per sample.

    The inverse Jacobian of ``g`` starts at ``-I`` (so the first step is a Picard step) and receives
    one rank-one update per evaluation; after ``memory`` updates it restarts from ``-I`` (dropping
    only the oldest update instead breaks the secant conditions the later ones were built on).
    A sample whose update is degenerate, or whose residual grows above ``restart_factor`` times its
    best, falls back: its updates are cleared and it takes a Picard step from its best iterate
    (counted in ``stats.fallbacks``). Returns, per sample, the image ``f(x)`` of its
    lowest-residual iterate. Residuals, updates and steps are kept in ``_work_dtype`` (float32 for a
    half-precision state); the iterates handed to ``f`` are cast back to the state's dtype.
    """
    _check_batch("broyden", z0)
    check_arguments(
        "broyden",
        dict(
            max_iter=max_iter,
            tol=tol,
            memory=memory,
            restart_factor=restart_factor,
            divergence_factor=divergence_factor,
        ),
    )
    memory = int(memory)
    progress = _Progress(z0, "broyden", tol, divergence_factor, keep)
    batch, shape = z0.shape[0], z0.shape
    x = z0.reshape(batch, -1)
    dim, work = x.shape[1], _work_dtype(x.dtype)
    us = x.new_zeros(batch, memory, dim, dtype=work)  # inverse Jacobian = -I + sum_i u_i v_i^T
    vs = x.new_zeros(batch, memory, dim, dtype=work)
    updates = torch.zeros(batch, dtype=torch.long, device=z0.device)  # rank-one updates stored
    x_prev, g_prev = x, torch.zeros_like(x, dtype=work)
    best_x, best_fx = x, x
    for _ in range(max_iter):
        index = progress.running()
        if index.numel() == 0:
            break
        rows = _all_or(index, batch)
        x_run = x[rows]
        fx_run = f(x_run.view(-1, *shape[1:]), index).reshape(index.shape[0], -1)
        g_run = fx_run.to(work) - x_run
        healthy, improved, growth = progress.record(index, fx_run, x_run)
        best_x = _scatter_rows(best_x, index, x_run, improved)
        best_fx = _scatter_rows(best_fx, index, fx_run, improved)
        progress.kept(best_fx.view(shape))
        u_run, v_run, count = us[rows], vs[rows], updates[rows]
        has_prev = progress.steps[rows] > 1
        dx = x_run.to(work) - x_prev[rows]
        dg = g_run - g_prev[rows]
        inv_dg = _inverse_jacobian_apply(u_run, v_run, dg)  # J^-1 dg
        dx_inv = _inverse_jacobian_apply_transposed(u_run, v_run, dx)  # dx^T J^-1
        denom = (dx_inv * dg).sum(dim=1)
        usable = has_prev & torch.isfinite(denom) & (denom.abs() > EPS * (dx.norm(dim=1) * dg.norm(dim=1) + EPS))
        restart = (growth > restart_factor) | (has_prev & ~usable)
        reset = restart | (count >= memory)  # restart, or history full: start again from -I
        write = usable & ~restart  # store the secant update in the next free slot
        count = torch.where(reset, 0, count)
        u_new = dx - inv_dg
        v_new = dx_inv / torch.where(write, denom, 1.0)[:, None]
        us = _put_rows(us, rows, _update_history(u_run, reset, write, count, u_new))
        vs = _put_rows(vs, rows, _update_history(v_run, reset, write, count, v_new))
        u_run, v_run = us[rows], vs[rows]
        updates[rows] = count + write.long()
        progress.fallbacks[rows] += restart.long()
        direction = -_inverse_jacobian_apply(u_run, v_run, g_run)  # quasi-Newton step: -J^-1 g
        take_newton = torch.isfinite(direction).all(dim=1) & ~restart
        new_x = torch.where(take_newton[:, None], x_run + direction, best_fx[rows]).to(x.dtype)
        x_prev = _scatter_rows(x_prev, index, torch.where(restart[:, None], best_x[rows], x_run), healthy)
        g_prev = _scatter_rows(
            g_prev, index, torch.where(restart[:, None], best_fx[rows].to(work) - best_x[rows], g_run), healthy
        )
        x = _scatter_rows(x, index, new_x, healthy)
    return best_fx.view(shape), progress.stats()


def _update_history(
    history: torch.Tensor, reset: torch.Tensor, write: torch.Tensor, slot: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """Clear the rows ``reset`` of ``history`` (B, m, d), then write ``values[b]`` at ``slot[b]`` for
    the rows ``write``. In place without autograd; out of place under it (unroll)."""
    if torch.is_grad_enabled():
        one_hot = torch.nn.functional.one_hot(slot, history.shape[1]).to(history.dtype) * write[:, None]
        keep = (~reset).to(history.dtype)[:, None, None] * (1 - one_hot[:, :, None])
        return history * keep + one_hot[:, :, None] * values[:, None]
    if bool(reset.any()):
        history[reset] = 0
    written = write.nonzero().squeeze(1)
    history[written, slot[written]] = values[written]
    return history


def _put_rows(full: torch.Tensor, rows: torch.Tensor | slice, part: torch.Tensor) -> torch.Tensor:
    """``full`` with ``full[rows] = part`` (``part`` already is the whole tensor when ``rows`` is a slice)."""
    if isinstance(rows, slice):
        return part
    return full.index_copy(0, rows, part)


def _inverse_jacobian_apply(us: torch.Tensor, vs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(-I + U^T V) x with U, V of shape (B, m, d), outside autocast."""
    with _no_autocast(x.device):
        return -x + torch.einsum("bmd,bm->bd", us, torch.einsum("bmd,bd->bm", vs, x))


def _inverse_jacobian_apply_transposed(us: torch.Tensor, vs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x^T (-I + U^T V), as a row vector per sample, outside autocast."""
    with _no_autocast(x.device):
        return -x + torch.einsum("bmd,bm->bd", vs, torch.einsum("bmd,bd->bm", us, x))


Solver = Callable[..., tuple[torch.Tensor, SolverStats]]

# The solvers by name, in the order error messages list them.
SOLVERS: dict[str, Solver] = {"picard": picard, "anderson": anderson, "broyden": broyden}


def register_solver(name: str, solve: Solver) -> None:
    """Make ``solve`` available as ``solver=name`` (config, forward, generate). It has the signature of the
    solvers here, ``solve(f, z0, max_iter, tol=None, *, keep=(), **options)``; its keyword-only options are what
    ``config.solver_options[name]`` may set."""
    if "keep" not in inspect.signature(solve).parameters:
        raise ValueError(f"solver {name!r} must take the keyword argument keep (the evaluation counts to keep)")
    SOLVERS[name] = solve


def get_solver(name: str) -> Solver:
    """The solver registered under ``name``; a clear error listing the choices otherwise."""
    if name not in SOLVERS:
        raise ValueError(f"solver must be one of {sorted(SOLVERS)}, got {name!r}")
    return SOLVERS[name]


def options_of(name: str) -> dict[str, Any]:
    """The options solver ``name`` takes (its keyword-only arguments other than ``keep``) and their defaults."""
    parameters = inspect.signature(SOLVERS[name]).parameters.values()
    return {p.name: p.default for p in parameters if p.kind is p.KEYWORD_ONLY and p.name != "keep"}


def check_solver_options(options: Any) -> None:
    """Refuse ``options`` unless it maps solver names to the options each takes (`options_of`), with values
    `ARGUMENT_RULES` allows: a ``ValueError`` naming the first wrong entry. (`ImplicitConfig.solver_options`' rule:
    options are checked here, where they enter, and reach the solver checked.)"""
    if not isinstance(options, Mapping) or not all(isinstance(given, Mapping) for given in options.values()):
        raise ValueError(f"solver_options must map solver names to mappings of their options; got {options!r}")
    for name, given in options.items():
        if name not in SOLVERS:
            raise ValueError(f"solver_options names no solver {name!r}; solvers: {', '.join(SOLVERS)}")
        known = options_of(name)
        for option in given:
            if option not in known:
                close = difflib.get_close_matches(str(option), known, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"it takes: {', '.join(known)}"
                raise ValueError(f"solver_options gives {name!r} the option {option!r}, which it does not take; {hint}")
        check_arguments(f"solver_options[{name!r}]", given)
