"""Backward modes of ``implicit_hf.modeling.gradients.fixed_point`` and of the models built on it.

Checked against ground truth rather than against themselves:

* on a contractive toy block ``f(z) = tanh(W z + U x + b)`` (float64) the ``ift`` gradient equals the
  gradient of a long unrolled solve, ``truncated`` converges to it as its window grows, ``jfb`` and
  ``phantom`` point the same way;
* the autograd graph (tensors saved for backward, ``grad_fn`` nodes) of every mode but ``unroll`` has
  a size independent of the iteration count, while ``unroll``'s grows with it;
* forward values, evaluation counts and trajectories are those of plain Picard looping;
* every mode trains a tiny real model on a fixed synthetic batch.
"""

from __future__ import annotations

import gc
import logging
import weakref
from functools import partial

import pytest
import torch
from tiny_models import tiny_model_of

from implicit_hf import ImplicitForCausalLM, ImplicitForTokenClassification
from implicit_hf.modeling.gradients import fixed_point
from implicit_hf.modeling.solvers import get_solver

F64 = torch.float64
MODES = ["unroll", "truncated", "jfb", "phantom", "ift"]
CONSTANT_MEMORY = ["truncated", "jfb", "phantom", "ift"]  # truncated with a fixed window
SOLVERS = ["picard", "anderson", "broyden"]


# --------------------------------------------------------------------------------------------------
# A contractive toy block with known-good reference gradients
# --------------------------------------------------------------------------------------------------


class Block:
    """``f(z) = tanh(z W^T + x U^T + b)`` with ``||W||_2 = norm``; W, U, b and x require grad."""

    def __init__(self, dim: int = 8, batch: int = 4, norm: float = 0.6, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(dim, dim, dtype=F64, generator=gen)
        self.W = (norm * w / torch.linalg.matrix_norm(w, ord=2)).requires_grad_()
        self.U = (0.5 * torch.randn(dim, dim, dtype=F64, generator=gen)).requires_grad_()
        self.b = (0.1 * torch.randn(dim, dtype=F64, generator=gen)).requires_grad_()
        self.x = torch.randn(batch, dim, dtype=F64, generator=gen).requires_grad_()
        self.target = torch.randn(batch, dim, dtype=F64, generator=gen)
        self.calls: list[int] = []  # rows evaluated per call of f

    @property
    def params(self) -> list[torch.Tensor]:
        return [self.W, self.U, self.b, self.x]

    def f(self, z: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        self.calls.append(int(index.shape[0]))
        return torch.tanh(z @ self.W.T + (self.x @ self.U.T)[index] + self.b)

    def z0(self) -> torch.Tensor:
        return torch.zeros_like(self.target)

    def loss(self, z: torch.Tensor) -> torch.Tensor:
        return ((z - self.target) ** 2).sum() + z.sin().sum()

    def solve(self, mode: str, max_iter: int, **options) -> tuple[torch.Tensor, object]:
        return fixed_point(self.f, self.z0(), max_iter=max_iter, gradient=mode, **options)

    def grad(self, mode: str, max_iter: int, **options) -> torch.Tensor:
        z, _ = self.solve(mode, max_iter, **options)
        grads = torch.autograd.grad(self.loss(z), self.params)
        return torch.cat([g.flatten() for g in grads])

    def picard_applications(self, k: int, start: torch.Tensor | None = None, damping: float = 1.0) -> torch.Tensor:
        """``k`` hand-written Picard steps (the ground truth for forward values)."""
        with torch.no_grad():
            z = self.z0() if start is None else start
            rows = torch.arange(z.shape[0])
            for _ in range(k):
                z = z + damping * (torch.tanh(z @ self.W.T + (self.x @ self.U.T)[rows] + self.b) - z)
        return z


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def _reference_gradient(block: Block) -> torch.Tensor:
    """Backprop through 200 Picard steps: 0.6^200 leaves nothing of the truncation."""
    return block.grad("unroll", 200)


# --------------------------------------------------------------------------------------------------
# Gradient accuracy
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("seed", [0, 1])
def test_ift_gradient_matches_long_unroll(solver, seed):
    block = Block(seed=seed)
    reference = _reference_gradient(block)
    # 30 forward evaluations reach the fixed point to ~1e-7; the adjoint solve is what must be exact.
    ift = block.grad("ift", 30, solver=solver, backward_tol=1e-10, backward_max_iter=200)
    assert _rel_err(ift, reference) < 1e-3
    # With a looser forward solve the ift gradient is still much closer than one-step jfb.
    jfb = block.grad("jfb", 30, solver=solver)
    assert _rel_err(jfb, reference) > 10 * _rel_err(ift, reference)


def test_ift_gradient_reaches_the_injected_input():
    block = Block(seed=3)
    reference = _reference_gradient(block)
    ift = block.grad("ift", 40, backward_tol=1e-10)
    dim = block.x.numel()
    # the last block of the flat gradient is d loss / d x (through the injection only)
    assert _rel_err(ift[-dim:], reference[-dim:]) < 1e-3
    assert float(reference[-dim:].norm()) > 0


@pytest.mark.parametrize("mode", ["jfb", "phantom"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_jfb_and_phantom_are_descent_directions(mode, seed):
    block = Block(seed=seed)
    reference = _reference_gradient(block)
    approx = block.grad(mode, 40, steps=4, tau=0.5)
    assert _cosine(approx, reference) > 0.5
    # ...but not the exact gradient (the test would be vacuous on a map with zero Jacobian)
    assert _rel_err(approx, reference) > 1e-3


def test_phantom_with_more_steps_is_closer_than_jfb():
    block = Block(seed=0)
    reference = _reference_gradient(block)
    jfb = _rel_err(block.grad("jfb", 60), reference)
    phantom = _rel_err(block.grad("phantom", 60, steps=8, tau=0.5), reference)
    assert phantom < jfb


def test_truncated_approaches_unroll_as_the_window_grows():
    block = Block(seed=0)
    reference = _reference_gradient(block)
    errors = [_rel_err(block.grad("truncated", 80, steps=k), reference) for k in (1, 4, 16, 60)]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:], strict=False)), errors
    assert errors[0] > 1e-2  # one step is jfb: visibly off
    assert errors[-1] < 1e-8  # 0.6^60: exact up to round-off


def test_truncated_with_the_whole_budget_is_unroll():
    block = Block(seed=1)
    unrolled = block.grad("unroll", 7)
    assert torch.allclose(block.grad("truncated", 7, steps=7), unrolled, rtol=1e-12, atol=1e-14)
    assert torch.allclose(block.grad("truncated", 7, steps=50), unrolled, rtol=1e-12, atol=1e-14)


def test_window_covering_the_budget_reaches_a_parameter_dependent_start():
    """With state_init="prelude" the start depends on parameters: a full window must see it."""
    block = Block(seed=2)

    def grads(mode: str, steps: int) -> torch.Tensor:
        start = block.x @ block.U.T  # depends on x and U
        z, _ = fixed_point(block.f, start, max_iter=5, gradient=mode, steps=steps)
        return torch.cat([g.flatten() for g in torch.autograd.grad(block.loss(z), [block.U, block.x])])

    unrolled = grads("unroll", 1)
    assert torch.allclose(grads("truncated", 5), unrolled, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(grads("truncated", 2), unrolled, rtol=1e-6)  # a shorter window drops z0's path


def test_unroll_of_few_steps_is_not_the_equilibrium_gradient():
    """Guards the comparisons above: a short unroll differs from the long one."""
    block = Block(seed=0)
    assert _rel_err(block.grad("unroll", 3), _reference_gradient(block)) > 1e-2


# --------------------------------------------------------------------------------------------------
# Memory: the autograd graph does not grow with the iteration count
# --------------------------------------------------------------------------------------------------


def _saved_for_backward(run) -> tuple[int, int]:
    """(count, bytes) of distinct storages autograd saves for backward while ``run()`` executes."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = run()
    assert output.requires_grad
    return len(storages), sum(storages.values())


def _graph_nodes(output: torch.Tensor) -> int:
    """Number of distinct ``grad_fn`` nodes reachable from ``output``."""
    seen, stack = set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return len(seen)


@pytest.mark.parametrize("mode", CONSTANT_MEMORY)
@pytest.mark.parametrize("solver", SOLVERS)
def test_graph_size_does_not_grow_with_iterations(mode, solver):
    block = Block(seed=0)

    def run(max_iter):
        return lambda: block.solve(mode, max_iter, solver=solver, steps=2)[0]

    small, large = _saved_for_backward(run(5)), _saved_for_backward(run(60))
    assert small == large
    assert small[0] > 0
    assert _graph_nodes(run(5)()) == _graph_nodes(run(60)())


@pytest.mark.parametrize("solver", SOLVERS)
def test_unroll_graph_grows_with_iterations(solver):
    block = Block(seed=0)

    def run(max_iter):
        return lambda: block.solve("unroll", max_iter, solver=solver)[0]

    (count_small, bytes_small), (count_large, bytes_large) = _saved_for_backward(run(5)), _saved_for_backward(run(60))
    assert count_large > 5 * count_small
    assert bytes_large > 5 * bytes_small
    assert _graph_nodes(run(60)()) > 5 * _graph_nodes(run(5)())


def test_truncated_graph_grows_with_its_window_only():
    block = Block(seed=0)
    window = [_saved_for_backward(lambda k=k: block.solve("truncated", 60, steps=k)[0])[1] for k in (1, 4, 16)]
    assert window[0] < window[1] < window[2]


@pytest.mark.parametrize("mode", MODES)
def test_model_graph_size_against_loop_count(mode):
    model = gradient_model(ImplicitForCausalLM, gradient=mode, gradient_steps=2, vocab_size=32).train()
    input_ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))
    saved = [_saved_for_backward(lambda k=k: model(input_ids, num_loops=k).logits) for k in (3, 6, 12)]
    if mode == "unroll":
        # prelude, coda and head are a fixed cost; every extra loop adds the same activations
        per_loop = (saved[1][1] - saved[0][1]) / 3
        assert per_loop > 0
        assert saved[2][1] - saved[1][1] == pytest.approx(6 * per_loop, rel=0.01)
    else:
        assert saved[0] == saved[1] == saved[2]


# --------------------------------------------------------------------------------------------------
# Forward semantics: values, evaluation counts, statistics
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("solver", SOLVERS)
def test_no_grad_is_a_plain_solve(mode, solver):
    block = Block(seed=2)
    with torch.no_grad():
        z, stats = block.solve(mode, 9, solver=solver, steps=3, tau=0.5)
        plain, plain_stats = get_solver(solver)(block.f, block.z0(), 9)
    assert torch.equal(z, plain)
    assert torch.equal(stats.steps, plain_stats.steps)
    assert not z.requires_grad


@pytest.mark.parametrize("mode", ["unroll", "truncated", "jfb", "ift"])
@pytest.mark.parametrize("k", [1, 2, 7])
def test_forward_value_is_k_picard_applications(mode, k):
    block = Block(seed=1)
    z, stats = block.solve(mode, k, steps=3)
    assert z.requires_grad
    assert torch.allclose(z, block.picard_applications(k), rtol=0, atol=1e-14)
    assert stats.steps.tolist() == [k] * z.shape[0]
    assert stats.rel_residual.shape == (k, z.shape[0])


def test_phantom_forward_value_is_damped_tail_near_the_fixed_point():
    block = Block(seed=1)
    k, steps, tau = 40, 3, 0.5
    z, stats = block.solve("phantom", k, steps=steps, tau=tau)
    head = block.picard_applications(k - steps)
    assert torch.allclose(z, block.picard_applications(steps, start=head, damping=tau), rtol=0, atol=1e-14)
    # Damping changes the value, but at the fixed point it is a fixed point too.
    fixed = block.picard_applications(200)
    assert float((z.detach() - fixed).norm()) < 1e-6
    assert stats.steps.tolist() == [k] * z.shape[0]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("solver", SOLVERS)
def test_every_mode_evaluates_f_exactly_max_iter_times(mode, solver):
    block = Block(seed=0)
    block.calls.clear()
    _, stats = block.solve(mode, 12, solver=solver, steps=3)
    rows = block.x.shape[0]
    assert sum(block.calls) == 12 * rows
    assert stats.num_evaluations == 12 * rows


@pytest.mark.parametrize("mode", MODES)
def test_tolerance_halts_in_every_mode(mode):
    block = Block(seed=0)
    z, stats = block.solve(mode, 200, tol=1e-6, steps=2)
    assert bool(stats.converged.all())
    assert int(stats.steps.max()) < 200
    assert float((z.detach() - block.picard_applications(300)).norm()) < 1e-4


@pytest.mark.parametrize("mode", MODES)
def test_trajectory_under_autograd_has_one_state_per_iteration(mode):
    block = Block(seed=0)
    z, stats = block.solve(mode, 6, steps=2, keep=range(1, 7))
    assert stats.states is not None and sorted(stats.states) == [1, 2, 3, 4, 5, 6]
    assert torch.equal(stats.states[6], z)
    _, only = block.solve(mode, 6, steps=2, keep=[2, 6])  # only the counts asked for are kept
    assert sorted(only.states) == [2, 6]
    torch.testing.assert_close(only.states[2], stats.states[2])


def test_unknown_gradient_mode_is_refused():
    block = Block()
    with pytest.raises(ValueError, match="gradient must be one of"):
        block.solve("backprop", 3)


def test_ift_every_backward_through_a_retained_graph_is_implicit():
    """Two losses backpropagated separately (retain_graph) both get the equilibrium gradient."""
    block = Block(seed=0)
    reference = _reference_gradient(block)
    z, _ = block.solve("ift", 30, backward_tol=1e-10)
    loss = block.loss(z)
    first = torch.cat([g.flatten() for g in torch.autograd.grad(loss, block.params, retain_graph=True)])
    second = torch.cat([g.flatten() for g in torch.autograd.grad(loss, block.params)])
    assert _rel_err(first, reference) < 1e-3
    assert _rel_err(second, reference) < 1e-3


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backward", [False, True])
def test_solution_and_its_graph_are_freed_when_dropped(mode, backward):
    """No reference cycle (e.g. a tensor hook whose closure holds its own tensor) keeps the output alive."""
    block = Block(seed=0)
    z, _ = block.solve(mode, 6, steps=2)
    alive = weakref.ref(z)
    if backward:
        block.loss(z).backward()
    del z
    gc.collect()
    assert alive() is None


# --------------------------------------------------------------------------------------------------
# Implicit differentiation on a non-contractive map
# --------------------------------------------------------------------------------------------------


def test_ift_divergent_adjoint_logs_a_warning_instead_of_raising(caplog):
    dim, batch = 4, 3
    a = (1.5 * torch.eye(dim, dtype=F64)).requires_grad_()  # spectral radius 1.5: adjoint iteration blows up
    b = torch.ones(batch, dim, dtype=F64)

    def f(z, index):
        return z @ a.T + b[index]

    z, _ = fixed_point(f, torch.zeros(batch, dim, dtype=F64), max_iter=3, gradient="ift", backward_max_iter=100)
    with caplog.at_level(logging.WARNING, logger="implicit_hf.modeling.gradients"):
        z.sum().backward()
    messages = [r.getMessage() for r in caplog.records if r.name == "implicit_hf.modeling.gradients"]
    assert any("diverged" in m and f"of {batch} samples" in m for m in messages), messages
    assert a.grad is not None and bool(torch.isfinite(a.grad).all())


def test_ift_contractive_adjoint_logs_nothing(caplog):
    block = Block(seed=0)
    with caplog.at_level(logging.WARNING, logger="implicit_hf.modeling.gradients"):
        block.grad("ift", 30)
    assert not [r for r in caplog.records if r.name == "implicit_hf.modeling.gradients"]


# --------------------------------------------------------------------------------------------------
# The real model
# --------------------------------------------------------------------------------------------------


# The gradient tests' model (`tiny_model_of(model_class, seed=0, **overrides)`): two heads, a narrow MLP, 16 tokens.
gradient_model = partial(
    tiny_model_of, vocab_size=16, intermediate_size=64, num_attention_heads=2, num_loops=3, max_position_embeddings=64
)


def test_model_ift_gradient_matches_long_unroll():
    """End to end in float64: the equilibrium gradient of every parameter, prelude and head included."""

    def gradient(mode: str) -> torch.Tensor:
        settings = dict(gradient=mode, num_labels=4, num_loops=60, ift_tol=1e-10, ift_max_iter=200)
        model = gradient_model(ImplicitForTokenClassification, **settings).double().train()
        input_ids = torch.randint(0, 16, (2, 6), generator=torch.Generator().manual_seed(1))
        output = model(input_ids, labels=input_ids % 4)
        assert float(output.loop_stats.final_rel_residual.max()) < 1e-6  # at the fixed point
        output.loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    reference = gradient("unroll")
    assert _rel_err(gradient("ift"), reference) < 1e-3
    jfb = gradient("jfb")
    assert _rel_err(jfb, reference) > 1e-2 and _cosine(jfb, reference) > 0


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_trains_a_tiny_model(mode):
    model = gradient_model(ImplicitForTokenClassification, gradient=mode, gradient_steps=2, num_labels=8).train()
    # Per-token target that needs attention: (x_t + x_{t-1}) mod 8, a fixed batch.
    input_ids = torch.randint(0, 16, (8, 12), generator=torch.Generator().manual_seed(1))
    previous = torch.cat([torch.zeros_like(input_ids[:, :1]), input_ids[:, :-1]], dim=1)
    labels = (input_ids + previous) % 8
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(50):
        loss = model(input_ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        if step == 0:  # the looped core itself receives a gradient in every mode
            for name, parameter in model.model.core.named_parameters():
                assert parameter.grad is not None and bool(torch.isfinite(parameter.grad).all()), name
                assert float(parameter.grad.abs().sum()) > 0, name
        optimizer.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        final = float(model(input_ids, labels=labels).loss)
    assert losses[0] > 1.5  # ~ln(8) at initialisation
    assert final < 0.25 * losses[0], (losses[0], final)


def test_model_trajectory_with_ift_in_training_mode():
    model = gradient_model(ImplicitForCausalLM, gradient="ift").train()
    input_ids = torch.randint(0, 16, (2, 5), generator=torch.Generator().manual_seed(0))
    output = model(input_ids, num_loops=4, return_trajectory=True)
    assert len(output.trajectory) == 4
    assert torch.allclose(output.trajectory[-1], output.logits)
