"""Every solver in float32, bfloat16 and float16, and halting under autocast (issue 13 §1).

The state and the model stay in their dtype; the solvers' own algebra (residual norms, Anderson's
least squares, Broyden's low-rank inverse) runs in float32 outside autocast.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from tiny_models import TINY_VOCAB, tiny_causal_lm

from implicit_hf import ImplicitForCausalLM
from implicit_hf.modeling.solvers import SOLVERS

VOCAB = TINY_VOCAB
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Relative logits error against the float32 solve allowed per dtype (measured: bfloat16 7e-3, float16 1e-3).
LOGITS_TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 3e-2, torch.float16: 5e-3}
SOLVER_NAMES = sorted(SOLVERS)


# The dtype tests' model: 64 wide, grouped-query attention, two core layers, sixteen loops.
causal_lm = partial(tiny_causal_lm, hidden_size=64, num_key_value_heads=2, num_core_layers=2, num_loops=16)


def input_ids(batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


def core_input_dtypes(model: ImplicitForCausalLM) -> tuple[list[torch.dtype], torch.utils.hooks.RemovableHandle]:
    """Record the dtype of every state the solver hands to the core."""
    seen: list[torch.dtype] = []
    handle = model.model.core[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    return seen, handle


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_forward_runs_in_every_dtype_with_every_solver(solver, dtype):
    """16 iterations without halting, so every step of each solver's algebra runs in ``dtype``."""
    with torch.no_grad():
        reference = causal_lm()(input_ids(), solver=solver, num_loops=16, tol=0).logits
    model = causal_lm().to(dtype)
    seen, handle = core_input_dtypes(model)
    with torch.no_grad():
        out = model(input_ids(), solver=solver, num_loops=16, tol=0)
    handle.remove()
    stats = out.loop_stats
    assert out.logits.dtype == dtype
    assert torch.isfinite(out.logits).all()
    assert len(seen) == 16 and set(seen) == {dtype}  # the state stays in the model's dtype
    assert stats.abs_residual.dtype == stats.rel_residual.dtype == torch.float32
    assert torch.isfinite(stats.rel_residual).all()
    assert not stats.diverged.any()
    assert (stats.steps == 16).all()
    # The solve in low precision lands where float32's does (up to the dtype's resolution).
    error = (out.logits.float() - reference).norm() / reference.norm()
    assert error < LOGITS_TOLERANCE[dtype], (
        f"{solver} in {dtype}: relative logits error {float(error):.3g} against float32"
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_solver_on_half_precision_map_keeps_dtype_and_reduces_residual(solver, dtype):
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(24, 24, generator=generator)
    a = (0.5 * a / torch.linalg.matrix_norm(a, 2)).to(dtype)
    b = torch.randn(3, 24, generator=generator).to(dtype)
    z, stats = SOLVERS[solver](lambda z, index: torch.tanh(z @ a.T + b[index]), torch.zeros_like(b), 30)
    assert z.dtype == dtype and z.shape == b.shape
    assert torch.isfinite(z).all()
    assert stats.rel_residual.dtype == torch.float32
    # float16 / bfloat16 resolve about 1e-3 / 4e-3 of a value: the residual falls well below 1.
    assert (stats.rel_residual.min(dim=0).values < 2e-2).all()
    assert not stats.diverged.any()


def test_generate_in_bfloat16_with_anderson():
    model = causal_lm(solver="anderson", tol=1e-3).to(torch.bfloat16)
    prompt = input_ids(batch=2, length=4)
    generated = model.generate(prompt, max_new_tokens=5, num_loops=8, do_sample=False)
    assert generated.shape == (2, 9)
    assert torch.equal(generated[:, :4], prompt)
    assert ((generated >= 0) & (generated < VOCAB)).all()


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_halting_fires_under_bfloat16_autocast(solver):
    """A tolerance float32 reaches is reached under autocast too, in about as many steps.

    Before the solvers' algebra left autocast, Anderson's mixing ran in bfloat16 and its relative
    residual stalled near 1e-3: at tol 1e-4 it ran all 32 steps (float32: 7).
    """
    model = causal_lm()
    max_iter, tol = 32, 1e-4
    with torch.no_grad():
        full = model(input_ids(), solver=solver, num_loops=max_iter, tol=tol).loop_stats
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            mixed = model(input_ids(), solver=solver, num_loops=max_iter, tol=tol).loop_stats
    assert full.converged.all() and (full.steps < max_iter).all()
    assert mixed.converged.all(), f"{solver} under autocast: final residuals {mixed.final_rel_residual.tolist()}"
    assert (mixed.steps < max_iter).all()
    assert (mixed.steps <= full.steps + 3).all(), (mixed.steps.tolist(), full.steps.tolist())
    assert (mixed.final_rel_residual < tol).all()
