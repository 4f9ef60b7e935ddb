"""Stabilising penalties of a fixed-point map at its last iterate, for training.

Both keep the map well behaved near its fixed point, so that more iterations than were trained
settle instead of drifting:

* ``"jacobian"``: a Hutchinson estimate of ``||∂f/∂z||_F² / d`` at ``z`` (one vector-Jacobian product
  ``vᵀJ`` with ``v ~ N(0, I)`` per sample, ``d`` the per-sample size of ``z``, so an isometry scores 1):
  the DEQ Jacobian regulariser (Bai et al. 2021), pushing the map towards a contraction;
* ``"fixed_point"``: the squared relative residual ``||f(z) - z||² / ||z||²``: how far ``z`` is from
  being a fixed point.

Both evaluate ``f`` once more at ``z`` (detached: they shape the map's parameters, not the path that
led to ``z``) and return the mean over the batch, differentiable in the parameters of ``f``. Under
``torch.no_grad`` they are measured all the same (the Jacobian builds its own graph).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .solvers import FixedPointMap

PENALTIES = ("jacobian", "fixed_point")


def check_penalties(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` as a tuple, or ``ValueError`` naming an unknown penalty (or a bare name, not a list of them)."""
    if isinstance(names, str) or not isinstance(names, Iterable):
        raise ValueError(
            f"penalties must be a list or tuple of names from {PENALTIES} (e.g. ['jacobian']); got {names!r}"
        )
    names = tuple(names)
    unknown = [name for name in names if name not in PENALTIES]
    if unknown:
        raise ValueError(f"penalties must be a subset of {PENALTIES}; got {list(names)!r}")
    return names


def fixed_point_penalties(f: FixedPointMap, z: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The penalties ``names`` of the map ``f`` (the solvers' ``f(z, index)``) at the iterate ``z``."""
    names = check_penalties(names)
    penalties, differentiable = {}, torch.is_grad_enabled()
    # The Jacobian needs a graph even when measured under torch.no_grad, and a double backward through
    # attention, which only sdpa's math kernel has (the fused CPU and CUDA kernels have no second derivative).
    kernel = sdpa_kernel(SDPBackend.MATH) if "jacobian" in names else contextlib.nullcontext()
    with torch.enable_grad(), kernel:
        z = z.detach().requires_grad_("jacobian" in names)
        fz = f(z, torch.arange(z.shape[0], device=z.device))
        if "fixed_point" in names:
            residual = (fz - z).flatten(1).float().pow(2).sum(1)
            penalties["fixed_point"] = (residual / z.detach().flatten(1).float().pow(2).sum(1).clamp_min(1e-12)).mean()
        if "jacobian" in names:
            probe = torch.randn_like(fz)
            (vjp,) = torch.autograd.grad(fz, z, probe, create_graph=differentiable)
            penalties["jacobian"] = (vjp.flatten(1).float().pow(2).sum(1) / z[0].numel()).mean()
    return penalties
