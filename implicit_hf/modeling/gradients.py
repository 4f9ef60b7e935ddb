"""Backward modes for fixed-point layers: how gradients reach the parameters of ``f``.

``fixed_point(f, z0, ...)`` runs a solver for ``max_iter`` evaluations of ``f`` in total and
returns ``(z, SolverStats)``; the gradient mode decides which of those evaluations autograd sees:

* ``unroll``: all of them (backprop through time; memory grows with the iteration count);
* ``truncated``: the last ``steps`` Picard steps, after a solve without autograd;
* ``jfb``: one step at the fixed point (Jacobian-free backprop);
* ``phantom``: ``steps`` Picard steps damped by ``tau`` after a solve without autograd;
* ``ift``: one step at the fixed point whose backward solves the adjoint fixed point
  ``g = J_f(z*)^T g + dL/dz`` with the same solver (implicit differentiation).

Only ``unroll`` keeps more than a constant number of evaluations in memory. Under
``torch.no_grad`` every mode is a plain solve. When the differentiable window covers every
evaluation (``steps >= max_iter``), gradients also reach ``z0`` (e.g. ``state_init="prelude"``).
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Any

import torch

from .solvers import FixedPointMap, SolverStats, get_solver, picard

logger = logging.getLogger(__name__)

GRADIENTS = ("unroll", "truncated", "jfb", "phantom", "ift")


def gradient_options(config: Any) -> dict[str, Any]:
    """An `ImplicitConfig`'s gradient-mode settings (``gradient``, ``gradient_steps``, ``phantom_tau``,
    ``ift_max_iter``, ``ift_tol``) as `fixed_point` keywords."""
    return {
        "gradient": config.gradient,
        "steps": config.gradient_steps,
        "tau": config.phantom_tau,
        "backward_max_iter": config.ift_max_iter,
        "backward_tol": config.ift_tol,
    }


def fixed_point(
    f: FixedPointMap,
    z0: torch.Tensor,
    *,
    solver: str = "picard",
    max_iter: int,
    tol: float | None = None,
    gradient: str = "jfb",
    steps: int = 1,
    tau: float = 0.5,
    backward_max_iter: int | None = None,
    backward_tol: float = 1e-5,
    keep: Collection[int] = (),
    **solver_options,
) -> tuple[torch.Tensor, SolverStats]:
    """Solve ``z = f(z)`` from ``z0`` with ``solver`` (given ``solver_options``, its own keywords) and attach
    gradients according to ``gradient``; ``keep``: evaluation counts (over the whole solve) whose states
    ``stats.states`` holds, passed to the solver as its ``keep``."""
    solve = get_solver(solver)
    if not torch.is_grad_enabled() or gradient == "unroll":
        return solve(f, z0, max_iter, tol, keep=keep, **solver_options)
    if gradient in ("truncated", "phantom"):
        differentiable_steps = min(steps, max_iter)
    elif gradient in ("jfb", "ift"):
        differentiable_steps = 1
    else:
        raise ValueError(f"gradient must be one of {', '.join(map(repr, GRADIENTS))}; got {gradient!r}")

    z, stats = z0, None  # a solve without autograd below detaches; otherwise z0 stays in the graph
    if max_iter > differentiable_steps:
        with torch.no_grad():
            z, stats = solve(f, z, max_iter - differentiable_steps, tol, keep=keep, **solver_options)
    ran = 0 if stats is None else len(stats.rel_residual)  # evaluations before the differentiable tail
    tail_keep = [count - ran for count in keep if count > ran]
    if gradient == "ift":
        z, tail = _implicit_step(f, z, solve, backward_max_iter or max_iter, backward_tol, solver_options)
        if keep:
            tail.states = {1: z} if 1 in tail_keep else {}
    else:
        damping = tau if gradient == "phantom" else 1.0
        z, tail = picard(f, z, differentiable_steps, None, damping=damping, keep=tail_keep)
    return z, tail if stats is None else merge_stats(stats, tail, tol)


def _implicit_step(
    f: FixedPointMap,
    z_star: torch.Tensor,
    solve,
    backward_max_iter: int,
    backward_tol: float,
    solver_options: dict,
) -> tuple[torch.Tensor, SolverStats]:
    """One differentiable step ``f(z*)`` whose gradient is corrected by implicit differentiation."""
    z_star = z_star.detach().requires_grad_()
    all_rows = torch.arange(z_star.shape[0], device=z_star.device)
    f_star = f(z_star, all_rows)
    _, stats = picard(lambda z, index: f_star.detach()[index], z_star.detach(), 1)  # residual of this step
    if not f_star.requires_grad:
        return f_star, stats

    def vector_jacobian(g: torch.Tensor, index: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        full = torch.zeros_like(grad)
        full[index] = g
        (vjp,) = torch.autograd.grad(f_star, z_star, full, retain_graph=True)
        return vjp[index] + grad[index]

    def adjoint_hook(grad: torch.Tensor) -> torch.Tensor:
        g, backward_stats = solve(
            lambda g, index: vector_jacobian(g, index, grad),
            grad,
            backward_max_iter,
            backward_tol,
            **solver_options,
        )
        if bool(backward_stats.diverged.any()):
            logger.warning(
                "implicit differentiation: the adjoint fixed point diverged for %d of %d samples; "
                "their gradients are unreliable",
                int(backward_stats.diverged.sum()),
                len(backward_stats.diverged),
            )
        return g

    # The hook sits on an alias of f_star, not on f_star itself: the adjoint solve differentiates
    # f_star without re-entering the hook (so the hook never has to remove itself and every
    # backward through a retained graph is implicit), and the closure holding f_star is owned by
    # the alias only, so no reference cycle keeps f_star and its graph alive.
    output = f_star.view_as(f_star)
    output.register_hook(adjoint_hook)
    return output, stats


def merge_stats(first: SolverStats, second: SolverStats, tol: float | None) -> SolverStats:
    """Statistics of running ``first`` and then ``second`` on the same batch."""
    converged = first.converged | second.converged
    if tol is not None and second.rel_residual.numel():
        converged = converged | (second.rel_residual[-1] < tol)
    states = None
    if first.states is not None or second.states is not None:  # counts of ``second`` continue those of ``first``
        ran = len(first.rel_residual)
        later = {ran + count: state for count, state in (second.states or {}).items()}
        states = {**(first.states or {}), **later}
    return SolverStats(
        solver=first.solver,
        steps=first.steps + second.steps,
        abs_residual=torch.cat([first.abs_residual, second.abs_residual]),
        rel_residual=torch.cat([first.rel_residual, second.rel_residual]),
        converged=converged,
        diverged=first.diverged | second.diverged,
        fallbacks=first.fallbacks + second.fallbacks,
        states=states,
    )
