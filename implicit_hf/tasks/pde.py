"""Steady 2D incompressible Navier–Stokes as a token-regression problem: forcing field -> steady vorticity.

The problem
-----------
On the periodic domain ``[0, 2π)²``, in vorticity–streamfunction form (``w = ∂x v - ∂y u``,
``-Δψ = w``, ``u = ∂y ψ``, ``v = -∂x ψ``), the steady state ``w*`` solves

    u·∇w = ν Δw - α w + f,     ν = NU = 0.02,  α = DRAG = 0.1.

The linear drag ``α w`` (Ekman friction) is what gives a reliably steady state at this much
nonlinearity: it damps every mode (the slowest at rate ``α + ν``) without damping the small scales
as hard as viscosity does. Without it, at ``ν = 0.02`` time stepping settled for none of 32 draws
(6000 steps of dt = 0.1), and a viscosity damping the forced scales as much (``ν = 0.12``) leaves
the flow steady but only ~19% away from the linear solution.

Forcing: ``f(x, y) = Σ_k a_k cos(k·x) + b_k sin(k·x)`` over the 14 wave vectors of the half plane
with ``1 <= |k| <= FORCING_MAX_WAVENUMBER = 3``, ``a_k, b_k ~ N(0, 1)`` independently, the whole field
then scaled to root-mean-square ``FORCING_RMS = 0.05`` (so each draw has the same strength and a
random shape). The forcing is a continuous field: the same seed gives the same ``f`` on any grid.

The solver (torch, float64, `solve_steady`): pseudo-spectral on an ``n x n`` grid (``grid_size``,
default 32, points ``x_j = 2πj/n``; arrays are indexed ``[y, x]``), advection ``u·∇w`` evaluated in
physical space and dealiased with the 2/3 rule (Fourier modes with ``|k_x| < n/3`` and
``|k_y| < n/3`` kept), semi-implicit time stepping from ``w = 0`` with step ``DT = 0.15``: viscosity
and drag implicit (backward Euler), advection explicit (forward Euler),

    (1/dt + ν|k|² + α) ŵ_{m+1} = ŵ_m / dt - (u·∇w)^_m + f̂,

whose fixed points are exactly the steady states. Every ``_CHECK_EVERY = 10`` steps each sample's
relative steady residual

    ||u·∇w - νΔw + αw - f|| / ||f||        (grid L2 norms; u·∇w dealiased; `steady_residual`)

is computed, and a sample stops at the first check below ``TOL = 1e-6``; a sample that has not
converged within ``MAX_STEPS = 4000`` steps (or blew up) is dropped and a new forcing is drawn.
Every row records its residual and step count. At the defaults a forcing converges in a median of
~890 steps (99th percentile ~1160, max ~1500): 3072 of 3072 test draws converged, so drops are rare
(at dt = 0.25, 0.2% of draws blew up through the explicit advection; they converge at dt = 0.15). ``w*``
lives in ``|k| <= 10`` (99.5% of its norm in ``|k| <= 3``), and a 64 x 64 solve of the same forcing
agrees with the 32 x 32 one to ~4e-5 (relative), so the grid resolves the flow. Generation takes
~21 ms of CPU per sample on one thread (64 forcings are solved as one batch): 2000 rows in ~45 s.

Nonlinearity: the linear (Stokes-with-drag) solution ``w_lin = f̂ / (ν|k|² + α)`` differs from
``w*`` by ``||w* - w_lin|| / ||w*|| ≈ 0.52`` on average (0.23 to 0.72 over 4000 samples; stored per row as
``nonlinearity``): the advection term shapes the answer, so the map ``f -> w*`` is not a linear filter.

Sequence form
-------------
The grid is cut into ``patch_size x patch_size`` patches (default 4: 64 tokens for 32 x 32), one
token per patch in row-major order (token ``t = p_y * (n/patch) + p_x``), bidirectional attention,
no padding. The position enters twice: ``position_ids`` are the token index ``t`` (RoPE then gives
attention the relative raster offset ``(n/patch) Δp_y + Δp_x``), and the features carry sines and
cosines of the patch centre ``(x_c, y_c)`` at harmonics 1 and 2, from whose products attention can
form ``cos(h(x_i - x_j))``, the relative position on the torus. Both help: in 500-step runs of the
``ns_implicit`` recipe the held-out loss was 0.119 with zero ``position_ids`` (RoPE off), 0.097 with
the raster ``position_ids`` but no coordinate features, 0.065 with both (0.084 with harmonics 1-4).

Token features (``input_features``, ``F = patch² + 8``):

=================  ===================================================  ==================================
columns            value                                                 scale
=================  ===================================================  ==================================
0 .. patch²-1      forcing values of the patch (row-major) / F_SCALE     F_SCALE = FORCING_RMS: rms 1
patch² ..          sin(h x_c), cos(h x_c), sin(h y_c), cos(h y_c),        in [-1, 1]
                   for h = 1, 2
=================  ===================================================  ==================================

Targets: ``labels[b, t] = w*`` on patch ``t`` (row-major) / ``W_SCALE``, ``W_SCALE = 0.25`` (the rms
of ``w*`` over the distribution, so labels are O(1): rms ~1, max ~4); `decode` multiplies by
``W_SCALE`` and reassembles the ``n x n`` field. Metric: relative L2 error ``||ŵ - w*|| / ||w*||``
(``metrics/pde_metrics.py``). `perturb` adds a random smooth forcing change (same low-mode family)
of grid L2 norm ``eps`` and re-solves from ``w*`` to the tighter residual ``_PERTURB_TOL = 1e-12``, so
the change of the target is resolved even for ``eps`` far below ``TOL * ||f||``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import datasets
import numpy as np
import torch

from ..checks import at_least, multiple_of
from .base import Example, TaskAdapter, check_one_per_row, list_feature, row_generators, single_threaded

NU = 0.02  # viscosity ν
DRAG = 0.1  # linear drag α
FORCING_MAX_WAVENUMBER = 3  # forcing modes 1 <= |k| <= 3
FORCING_RMS = 0.05  # root-mean-square of every forcing field
DT = 0.15  # time step of the semi-implicit scheme (0.25 lets 0.2% of draws blow up)
TOL = 1e-6  # relative steady residual at which a sample counts as converged
MAX_STEPS = 4000  # step budget per sample; a sample not converged by then is redrawn

F_SCALE = FORCING_RMS  # forcing / F_SCALE has rms 1
W_SCALE = 0.25  # rms of w* over the forcing distribution: w* / W_SCALE is O(1)
COORD_HARMONICS = (1, 2)  # sin / cos of h * (patch centre) for these h

_CHECK_EVERY = 10  # steps between residual checks
_DIVERGED = 1e3  # a relative residual above this (or not finite) marks a sample as blown up
_CHUNK = 64  # forcings drawn and solved together (fixed, so the data do not depend on n)
_PERTURB_TOL = 1e-12  # residual of re-solved perturbed rows


class NavierStokesTask(TaskAdapter):
    """Predict the steady vorticity of 2D Navier–Stokes flow from the forcing, one token per grid patch."""

    name = "ns"
    head = "token_regression"
    quality_metric = "relative_l2"
    higher_is_better = False
    metric_name = "pde_metrics"

    def __init__(
        self,
        cache_dir: str | Path | None = None,
        grid_size: Annotated[int, at_least(1), multiple_of("patch_size")] = 32,
        patch_size: Annotated[int, at_least(1)] = 4,
    ):
        super().__init__(cache_dir)
        if grid_size <= 3 * FORCING_MAX_WAVENUMBER:
            raise ValueError(
                f"grid_size must be > {3 * FORCING_MAX_WAVENUMBER} so the forcing modes (|k| <= "
                f"{FORCING_MAX_WAVENUMBER}) lie inside the dealiased band |k| < grid_size/3; got {grid_size}"
            )
        self.grid_size = int(grid_size)
        self.patch_size = int(patch_size)

    # ------------------------------------------------------------------ model

    @property
    def num_tokens(self) -> int:
        return (self.grid_size // self.patch_size) ** 2

    @property
    def num_features(self) -> int:
        """Token feature size ``F``: the patch's forcing values plus the coordinate encoding."""
        return self.patch_size**2 + 4 * len(COORD_HARMONICS)

    def model_config(self) -> dict[str, Any]:
        return {
            "problem_type": "regression",
            "num_labels": self.patch_size**2,
            "is_causal": False,
            "input_features": self.num_features,
        }

    # ------------------------------------------------------------------ data

    def dataset_path(self, split: str, n: int, seed: int) -> Path:
        """Where `build_dataset` caches ``(split, n, seed)``."""
        return self.cache_dir / f"{split}-grid{self.grid_size}-{n}-seed{seed}"

    def features(self):
        """The ``forcing`` and steady ``vorticity`` fields, the final ``residual``, the ``steps`` taken and the
        ``nonlinearity`` (see the module docstring)."""
        field = list_feature(list_feature(datasets.Value("float64")))
        return datasets.Features(
            {
                "forcing": field,
                "vorticity": field,
                "residual": datasets.Value("float64"),
                "steps": datasets.Value("int32"),
                "nonlinearity": datasets.Value("float64"),
            }
        )

    def generate(self, rng: np.random.Generator, n: int, split: str) -> list[Example]:
        """``n`` solved forcings, drawn and solved in fixed chunks of 64 (so a smaller ``n`` gives a prefix of a
        larger one); `RuntimeError` if a whole chunk fails to converge (broken settings)."""
        rows: list[Example] = []
        while len(rows) < n:
            forcing = random_forcing(rng, _CHUNK, self.grid_size, rms=FORCING_RMS)
            with single_threaded():
                state = solve_steady(forcing, max_steps=MAX_STEPS)
            if not state.converged.any():
                raise RuntimeError(
                    f"none of {_CHUNK} forcings reached a steady residual below {TOL} within {MAX_STEPS} steps "
                    f"(grid {self.grid_size}, ν={NU}, α={DRAG}, dt={DT})"
                )
            for k in torch.nonzero(state.converged).flatten().tolist():
                rows.append(_row(forcing[k], state.vorticity[k], int(state.steps[k])))
        return rows[:n]

    # ------------------------------------------------------------------ encode / decode

    def encode(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        """Model inputs for rows on this task's grid.

        Returns ``input_features (B, T, F)`` (float32), ``attention_mask (B, T)`` (ones),
        ``position_ids (B, T)`` (the token index) and, when every row has its ``vorticity``, ``labels (B, T, patch²)``.
        """
        forcing = torch.stack([self._field(example, "forcing", k) for k, example in enumerate(examples)])
        batch = forcing.shape[0]
        coords = self._coordinate_features().expand(batch, -1, -1)
        features = torch.cat([_patchify(forcing, self.patch_size) / F_SCALE, coords], dim=-1)
        encoded = {
            "input_features": features.float(),
            "attention_mask": torch.ones(batch, self.num_tokens, dtype=torch.long),
            "position_ids": torch.arange(self.num_tokens).expand(batch, -1).clone(),
        }
        if all(example.get("vorticity") is not None for example in examples):
            vorticity = torch.stack([self._field(example, "vorticity", k) for k, example in enumerate(examples)])
            encoded["labels"] = (_patchify(vorticity, self.patch_size) / W_SCALE).float()
        return encoded

    def decode(self, logits: torch.Tensor, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The predicted vorticity field ``(n, n)`` (float32, on the CPU) of every sample."""
        expected = (self.num_tokens, self.patch_size**2)
        if tuple(logits.shape[1:]) != expected:
            raise ValueError(f"logits must have shape (B, {expected[0]}, {expected[1]}); got {tuple(logits.shape)}")
        fields = _unpatchify(logits.detach().float().cpu() * W_SCALE, self.grid_size, self.patch_size)
        return list(fields)

    def _field(self, example: Example, key: str, index: int) -> torch.Tensor:
        field = torch.as_tensor(np.asarray(example[key], dtype=np.float64))
        if field.shape != (self.grid_size, self.grid_size):
            raise ValueError(
                f"example {index}: {key} has shape {tuple(field.shape)}, this task's grid is "
                f"{self.grid_size} x {self.grid_size}"
            )
        return field

    def _coordinate_features(self) -> torch.Tensor:
        """``(1, T, 4 * len(COORD_HARMONICS))``: sin / cos of the harmonics of every patch centre."""
        side = self.grid_size // self.patch_size
        centre = 2 * math.pi * (torch.arange(side, dtype=torch.float64) * self.patch_size + (self.patch_size - 1) / 2)
        centre = centre / self.grid_size
        y_c, x_c = (c.flatten() for c in torch.meshgrid(centre, centre, indexing="ij"))
        columns = []
        for h in COORD_HARMONICS:
            columns += [torch.sin(h * x_c), torch.cos(h * x_c), torch.sin(h * y_c), torch.cos(h * y_c)]
        return torch.stack(columns, dim=-1).unsqueeze(0)

    # ------------------------------------------------------------------ metrics

    def compute_metrics(self, predictions: list[torch.Tensor], examples: list[Example]) -> dict[str, float]:
        """``relative_l2`` (headline, mean over samples) and ``relative_l2_max``."""
        check_one_per_row(predictions, examples)
        return self.load_metric().compute(
            predictions=[_numpy(p).reshape(-1) for p in predictions],
            references=[np.asarray(example["vorticity"], dtype=np.float64).reshape(-1) for example in examples],
        )

    # ------------------------------------------------------------------ perturbations

    def perturb_rows(self, examples: list[Example], eps: float, seed: int) -> tuple[list[Example], torch.Tensor]:
        """Rows whose forcing changes by a random smooth field ``δ`` of grid L2 norm ``eps``, re-solved.

        ``δ`` is drawn like a forcing (modes ``1 <= |k| <= 3``) and scaled to ``||δ|| = eps`` over the
        grid values (the units of the decoded fields). The new targets are solved from the old ``w*``
        to a residual below 1e-12. Deterministic in ``(examples, eps, seed)``; `RuntimeError` if a
        perturbed problem does not converge (use a smaller ``eps``).
        """
        forcing = torch.stack([self._field(example, "forcing", k) for k, example in enumerate(examples)])
        vorticity = torch.stack([self._field(example, "vorticity", k) for k, example in enumerate(examples)])
        generators = row_generators(seed, len(examples))
        delta = torch.cat([random_forcing(rng, 1, self.grid_size, rms=1.0) for rng in generators])
        delta *= eps / torch.linalg.vector_norm(delta, dim=(-2, -1), keepdim=True)
        with single_threaded():
            state = solve_steady(forcing + delta, tol=_PERTURB_TOL, max_steps=MAX_STEPS, initial=vorticity)
        if not state.converged.all():
            failed = torch.nonzero(~state.converged).flatten().tolist()
            raise RuntimeError(
                f"examples {failed}: the problem perturbed by eps={eps} did not reach a steady residual below "
                f"{_PERTURB_TOL} within {MAX_STEPS} steps; use a smaller eps"
            )
        perturbed = [
            {**example, **_row(forcing[k] + delta[k], state.vorticity[k], int(state.steps[k]))}
            for k, example in enumerate(examples)
        ]
        return perturbed, torch.linalg.vector_norm(delta, dim=(-2, -1))


# ---------------------------------------------------------------------- the solver


@dataclass
class SteadyState:
    """What `solve_steady` returns, per sample: the final vorticity ``(B, n, n)``, its relative steady
    residual, the steps taken and whether the residual fell below the tolerance."""

    vorticity: torch.Tensor
    residual: torch.Tensor
    steps: torch.Tensor
    converged: torch.Tensor


@functools.lru_cache(maxsize=8)
def _spectral(n: int) -> dict[str, torch.Tensor]:
    """Wave numbers of the ``rfft2`` layout of an ``n x n`` grid (float64)."""
    ky = torch.fft.fftfreq(n, 1.0 / n, dtype=torch.float64).reshape(n, 1)
    kx = torch.fft.rfftfreq(n, 1.0 / n, dtype=torch.float64).reshape(1, n // 2 + 1)
    k2 = kx**2 + ky**2
    inverse_laplacian = torch.where(k2 > 0, 1.0 / torch.where(k2 > 0, k2, 1.0), 0.0)  # ψ̂ = ŵ / |k|², ψ̂(0) = 0
    keep = ((kx.abs() < n / 3) & (ky.abs() < n / 3)).to(torch.float64)  # the 2/3 rule
    # ŵ -> (û, v̂, ∂x ŵ, ∂y ŵ): u = ∂y ψ, v = -∂x ψ
    ones = torch.ones_like(k2)
    gradients = torch.stack([1j * ky * inverse_laplacian, -1j * kx * inverse_laplacian, 1j * kx * ones, 1j * ky * ones])
    return {"k2": k2, "keep": keep, "gradients": gradients}


def _advection(w_hat: torch.Tensor, n: int) -> torch.Tensor:
    """Dealiased ``(u·∇w)^`` of the (band-limited) ``ŵ`` in the ``rfft2`` layout."""
    spectral = _spectral(n)
    # four transforms of (B, n, m), not one of (B, 4, n, m): several times faster with torch's CPU FFT
    u, v, w_x, w_y = (torch.fft.irfft2(w_hat * gradient, s=(n, n)) for gradient in spectral["gradients"])
    return torch.fft.rfft2(u * w_x + v * w_y) * spectral["keep"]


def _check_fields(*fields: torch.Tensor) -> int:
    shape = fields[0].shape
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ValueError(f"fields must have shape (B, n, n); got {tuple(shape)}")
    for field in fields[1:]:
        if field.shape != shape:
            raise ValueError(f"fields of shapes {tuple(shape)} and {tuple(field.shape)} do not match")
    return shape[-1]


def steady_residual(
    vorticity: torch.Tensor, forcing: torch.Tensor, viscosity: float = NU, drag: float = DRAG
) -> torch.Tensor:
    """``||u·∇w - νΔw + αw - f|| / ||f||`` per sample (grid L2 norms, advection dealiased), float64."""
    n = _check_fields(vorticity, forcing)
    w_hat = torch.fft.rfft2(vorticity.double())
    forcing = forcing.double()
    damping = viscosity * _spectral(n)["k2"] + drag
    residual = torch.fft.irfft2(_advection(w_hat, n) + damping * w_hat - torch.fft.rfft2(forcing), s=(n, n))
    return torch.linalg.vector_norm(residual, dim=(-2, -1)) / torch.linalg.vector_norm(forcing, dim=(-2, -1))


def linear_solution(forcing: torch.Tensor, viscosity: float = NU, drag: float = DRAG) -> torch.Tensor:
    """The steady state without advection, ``(ν|k|² + α)⁻¹ f``, of every field ``(B, n, n)`` (float64)."""
    n = _check_fields(forcing)
    spectral = _spectral(n)
    return torch.fft.irfft2(torch.fft.rfft2(forcing.double()) / (viscosity * spectral["k2"] + drag), s=(n, n))


def solve_steady(
    forcing: torch.Tensor,
    *,
    viscosity: float = NU,
    drag: float = DRAG,
    dt: float = DT,
    tol: float = TOL,
    max_steps: int = MAX_STEPS,
    initial: torch.Tensor | None = None,
) -> SteadyState:
    """Time-step ``∂w/∂t + u·∇w = νΔw - αw + f`` to its steady state, every forcing ``(B, n, n)`` at once.

    Semi-implicit (implicit viscosity and drag, explicit dealiased advection) from ``initial`` (default
    ``w = 0``). The residual is checked every 10 steps; a sample stops at the first check where it is
    below ``tol`` (its ``steps`` then say when), or where it is above 1e3 or not finite (blown up). A
    sample still running after ``max_steps`` keeps its last state, ``converged`` False. The forcing
    should lie in the dealiased band ``|k_x|, |k_y| < n/3`` (every forcing of this task does).
    """
    if not (dt > 0 and tol > 0) or isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 0:
        raise ValueError(f"need dt > 0, tol > 0 and an integer max_steps >= 0; got {dt!r}, {tol!r}, {max_steps!r}")
    n = _check_fields(forcing)
    if initial is not None:
        _check_fields(forcing, initial)
    spectral = _spectral(n)
    forcing = forcing.double()
    f_hat = torch.fft.rfft2(forcing)
    f_norm = torch.linalg.vector_norm(forcing, dim=(-2, -1))
    damping = viscosity * spectral["k2"] + drag
    implicit = 1.0 / dt + damping
    batch = forcing.shape[0]
    w_hat = torch.zeros_like(f_hat) if initial is None else torch.fft.rfft2(initial.double()) * spectral["keep"]
    result = torch.empty_like(f_hat)
    residual = torch.full((batch,), math.inf, dtype=torch.float64)
    steps = torch.full((batch,), max_steps, dtype=torch.long)
    converged = torch.zeros(batch, dtype=torch.bool)

    active = torch.arange(batch)  # samples still stepping; w_hat, f_act, norm_act hold their rows
    f_act, norm_act = f_hat, f_norm
    for step in range(max_steps + 1):
        r_hat = _advection(w_hat, n) + damping * w_hat - f_act  # the steady residual of w_hat
        if step % _CHECK_EVERY == 0 or step == max_steps:
            r = torch.linalg.vector_norm(torch.fft.irfft2(r_hat, s=(n, n)), dim=(-2, -1)) / norm_act
            done = r < tol
            stop = done | ~torch.isfinite(r) | (r > _DIVERGED) | (step == max_steps)
            if stop.any():
                finished = active[stop]
                result[finished], residual[finished], steps[finished] = w_hat[stop], r[stop], step
                converged[finished] = done[stop]
                go = ~stop
                active, w_hat, f_act, norm_act, r_hat = active[go], w_hat[go], f_act[go], norm_act[go], r_hat[go]
                if active.numel() == 0:
                    break
        # (1/dt + L) ŵ' = ŵ/dt - N(ŵ) + f̂, i.e. ŵ' = ŵ - R̂ / (1/dt + L)
        w_hat = w_hat - r_hat / implicit
    vorticity = torch.fft.irfft2(result, s=(n, n))
    return SteadyState(vorticity=vorticity, residual=residual, steps=steps, converged=converged)


def forcing_modes() -> torch.Tensor:
    """The forcing's wave vectors ``(k_x, k_y)`` ``(M, 2)``: the half plane's ``1 <= |k| <= FORCING_MAX_WAVENUMBER``."""
    r = FORCING_MAX_WAVENUMBER
    modes = [
        (kx, ky)
        for kx in range(0, r + 1)
        for ky in range(-r, r + 1)
        if 1 <= kx * kx + ky * ky <= r * r and (kx > 0 or ky > 0)
    ]
    return torch.tensor(modes, dtype=torch.long)


def random_forcing(rng: np.random.Generator, count: int, n: int, rms: float = FORCING_RMS) -> torch.Tensor:
    """``count`` random smooth fields ``(count, n, n)`` (float64): Gaussian cos/sin amplitudes on
    `forcing_modes`, scaled to root-mean-square ``rms`` (exact on any grid with ``n > 6``)."""
    modes = forcing_modes().to(torch.float64)
    amplitudes = torch.from_numpy(rng.standard_normal((count, 2, modes.shape[0])))
    grid = 2 * math.pi * torch.arange(n, dtype=torch.float64) / n
    y, x = torch.meshgrid(grid, grid, indexing="ij")
    phase = modes[:, 0, None, None] * x + modes[:, 1, None, None] * y  # (M, n, n)
    fields = torch.einsum("bm,mij->bij", amplitudes[:, 0], torch.cos(phase))
    fields += torch.einsum("bm,mij->bij", amplitudes[:, 1], torch.sin(phase))
    field_rms = torch.sqrt(amplitudes.pow(2).sum((1, 2)) / 2)  # Parseval: each cos / sin mode has mean square 1/2
    return fields * (rms / field_rms)[:, None, None]


# ---------------------------------------------------------------------- helpers


def _patchify(fields: torch.Tensor, patch: int) -> torch.Tensor:
    """``(B, n, n)`` -> ``(B, (n/patch)², patch²)``: patches in row-major order, values row-major inside."""
    batch, n = fields.shape[0], fields.shape[-1]
    side = n // patch
    return fields.reshape(batch, side, patch, side, patch).permute(0, 1, 3, 2, 4).reshape(batch, side * side, -1)


def _unpatchify(tokens: torch.Tensor, n: int, patch: int) -> torch.Tensor:
    """The inverse of `_patchify`."""
    batch, side = tokens.shape[0], n // patch
    return tokens.reshape(batch, side, side, patch, patch).permute(0, 1, 3, 2, 4).reshape(batch, n, n)


def _row(forcing: torch.Tensor, vorticity: torch.Tensor, steps: int) -> Example:
    f, w = forcing.unsqueeze(0), vorticity.unsqueeze(0)
    w_lin = linear_solution(f)
    return {
        "forcing": forcing.tolist(),
        "vorticity": vorticity.tolist(),
        "residual": float(steady_residual(w, f)[0]),
        "steps": steps,
        "nonlinearity": float(torch.linalg.vector_norm(w - w_lin) / torch.linalg.vector_norm(w)),
    }


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().double().cpu().numpy()
    return np.asarray(x, dtype=np.float64)
