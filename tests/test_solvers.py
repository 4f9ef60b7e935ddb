"""Behavioural tests for the batched fixed-point solvers in ``implicit_hf.modeling.solvers``."""

from __future__ import annotations

import pytest
import torch

from implicit_hf.modeling.solvers import SOLVERS, SolverStats, anderson, broyden, get_solver, picard

ALL = ["picard", "anderson", "broyden"]
ACCELERATED = ["anderson", "broyden"]
F64 = torch.float64


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _symmetric(dim: int, eigenvalues: torch.Tensor, seed: int) -> torch.Tensor:
    """Symmetric matrix with the given eigenvalues and a random orthogonal basis."""
    q, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=F64, generator=_generator(seed)))
    return q @ torch.diag(eigenvalues.to(F64)) @ q.T


def _contraction(dim: int, norm: float, seed: int) -> torch.Tensor:
    w = torch.randn(dim, dim, dtype=F64, generator=_generator(seed))
    return norm * w / torch.linalg.matrix_norm(w, ord=2)


def _linear_map(a: torch.Tensor, b: torch.Tensor):
    """f(z) = A z + b_i with one A for the whole batch (rows of b are per sample)."""

    def f(z: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return z @ a.T + b[index]

    return f


def _per_sample_linear_map(a: torch.Tensor, b: torch.Tensor, calls: list[int] | None = None):
    """f(z) = A_i z + b_i with one matrix per sample; optionally records how many rows each call saw."""

    def f(z: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        assert z.shape[0] == index.shape[0]
        if calls is not None:
            calls.append(int(index.shape[0]))
        return torch.einsum("bij,bj->bi", a[index], z) + b[index]

    return f


def _all_rows(batch: int) -> torch.Tensor:
    return torch.arange(batch)


# --------------------------------------------------------------------------------------------------
# Reaching known fixed points
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_tanh_contraction_reaches_fixed_point(name):
    dim, batch = 32, 4
    w = _contraction(dim, 0.9, seed=0)
    x = torch.randn(batch, dim, dtype=F64, generator=_generator(1))

    def f(z, index):
        return torch.tanh(z @ w.T + x[index])

    z, stats = get_solver(name)(f, torch.zeros(batch, dim, dtype=F64), 500, tol=1e-9)

    assert isinstance(stats, SolverStats) and stats.solver == name
    assert stats.converged.all() and not stats.diverged.any()
    residual = (f(z, _all_rows(batch)) - z).norm(dim=1) / z.norm(dim=1)
    assert residual.max() < 1e-7
    assert (stats.final_rel_residual < 1e-9).all()
    assert stats.num_evaluations == int(stats.steps.sum())
    assert (stats.steps < 500).all()


@pytest.mark.parametrize("name", ALL)
def test_linear_map_matches_direct_solve(name):
    dim, batch = 32, 3
    a = _symmetric(dim, torch.linspace(-0.5, 0.9, dim), seed=2)
    b = torch.randn(batch, dim, dtype=F64, generator=_generator(3))
    expected = torch.linalg.solve(torch.eye(dim, dtype=F64) - a, b.T).T

    z, stats = get_solver(name)(_linear_map(a, b), torch.zeros(batch, dim, dtype=F64), 1000, tol=1e-10)

    assert stats.converged.all() and not stats.diverged.any()
    rel_err = (z - expected).norm(dim=1) / expected.norm(dim=1)
    assert rel_err.max() < 1e-7


@pytest.mark.parametrize("name", ALL)
def test_float32_state_keeps_dtype_and_converges(name):
    dim, batch = 16, 2
    a = _contraction(dim, 0.7, seed=4).float()
    b = torch.randn(batch, dim, generator=_generator(5))
    z, stats = get_solver(name)(_linear_map(a, b), torch.zeros(batch, dim), 200, tol=1e-5)
    expected = torch.linalg.solve(torch.eye(dim) - a, b.T).T
    assert z.dtype == torch.float32 and z.shape == (batch, dim)
    assert stats.converged.all()
    assert ((z - expected).norm(dim=1) / expected.norm(dim=1)).max() < 1e-4


def test_multi_dimensional_state_uses_per_sample_norms():
    batch, seq, hidden = 3, 4, 8
    w = _contraction(hidden, 0.8, seed=6)
    x = torch.randn(batch, seq, hidden, dtype=F64, generator=_generator(7))

    def f(z, index):
        return torch.tanh(z @ w.T + x[index])

    for name in ALL:
        z, stats = get_solver(name)(f, torch.zeros_like(x), 300, tol=1e-9)
        assert z.shape == x.shape
        assert stats.converged.all()
        assert (f(z, _all_rows(batch)) - z).abs().max() < 1e-7


# --------------------------------------------------------------------------------------------------
# Acceleration
# --------------------------------------------------------------------------------------------------


def test_anderson_and_broyden_need_far_fewer_evaluations_than_picard():
    dim, batch = 64, 4
    a = _symmetric(dim, torch.linspace(-0.5, 0.98, dim), seed=8)
    b = torch.randn(batch, dim, dtype=F64, generator=_generator(9))
    f = _linear_map(a, b)
    z0 = torch.zeros(batch, dim, dtype=F64)
    expected = torch.linalg.solve(torch.eye(dim, dtype=F64) - a, b.T).T

    evaluations = {}
    for name in ALL:
        z, stats = get_solver(name)(f, z0, 2000, tol=1e-5)
        assert stats.converged.all(), name
        assert ((z - expected).norm(dim=1) / expected.norm(dim=1)).max() < 1e-2, name
        evaluations[name] = stats.num_evaluations

    # Picard contracts at 0.98 per step: a few hundred evaluations per sample to reach 1e-5.
    assert evaluations["picard"] > 200 * batch
    assert evaluations["anderson"] <= 0.5 * evaluations["picard"]
    assert evaluations["broyden"] <= 0.5 * evaluations["picard"]


# --------------------------------------------------------------------------------------------------
# Per-sample stopping
# --------------------------------------------------------------------------------------------------


def _mixed_rate_problem():
    """Four samples whose linear maps contract at very different rates (0.1 ... 0.97)."""
    dim = 16
    base = _symmetric(dim, torch.linspace(-1.0, 1.0, dim), seed=10)
    scales = torch.tensor([0.1, 0.97, 0.5, 0.85], dtype=F64)
    a = scales[:, None, None] * base
    b = torch.randn(len(scales), dim, dtype=F64, generator=_generator(11))
    return a, b


@pytest.mark.parametrize("name", ALL)
def test_per_sample_stopping_skips_stopped_rows_and_freezes_them(name):
    a, b = _mixed_rate_problem()
    batch, dim = b.shape
    calls: list[int] = []
    f = _per_sample_linear_map(a, b, calls)
    z, stats = get_solver(name)(f, torch.zeros(batch, dim, dtype=F64), 1000, tol=1e-8, keep=range(1, 1001))

    assert stats.converged.all() and not stats.diverged.any()
    steps = stats.steps.tolist()
    assert len(set(steps)) > 1, steps
    assert steps[0] < steps[1]  # the 0.1-contraction stops long before the 0.97 one

    # f only ever sees the running rows: the batch it receives shrinks as samples stop.
    assert calls[0] == batch
    assert all(later <= earlier for earlier, later in zip(calls, calls[1:], strict=False))
    assert calls[-1] < batch
    assert sum(calls) == stats.num_evaluations == sum(steps)
    assert len(calls) == max(steps)

    # After a sample stopped its state never changes again.
    assert stats.states is not None and sorted(stats.states) == list(range(1, max(steps) + 1))
    trajectory = [stats.states[count] for count in sorted(stats.states)]
    for sample, n in enumerate(steps):
        frozen = trajectory[n - 1][sample]
        for state in trajectory[n:]:
            assert torch.equal(state[sample], frozen)
        assert torch.equal(z[sample], frozen)
        # The residual trace repeats the last measured value after the sample stopped.
        assert (stats.rel_residual[n - 1 :, sample] == stats.rel_residual[n - 1, sample]).all()
        assert stats.rel_residual[n - 1, sample] < 1e-8
        if n > 1:
            assert stats.rel_residual[n - 2, sample] >= 1e-8  # it stopped at the first step below tol


@pytest.mark.parametrize("name", ALL)
def test_batched_solve_equals_solving_each_sample_alone(name):
    a, b = _mixed_rate_problem()
    batch, dim = b.shape
    solve = get_solver(name)
    z_batch, stats_batch = solve(_per_sample_linear_map(a, b), torch.zeros(batch, dim, dtype=F64), 1000, tol=1e-8)

    for sample in range(batch):
        z_one, stats_one = solve(
            _per_sample_linear_map(a[sample : sample + 1], b[sample : sample + 1]),
            torch.zeros(1, dim, dtype=F64),
            1000,
            tol=1e-8,
        )
        assert int(stats_one.steps[0]) == int(stats_batch.steps[sample])
        assert bool(stats_one.converged[0]) == bool(stats_batch.converged[sample])
        assert int(stats_one.fallbacks[0]) == int(stats_batch.fallbacks[sample])
        torch.testing.assert_close(z_one[0], z_batch[sample], rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# Fixed iteration count (no tol)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_without_tol_every_sample_runs_exactly_max_iter(name):
    a, b = _mixed_rate_problem()
    batch, dim = b.shape
    calls: list[int] = []
    z, stats = get_solver(name)(_per_sample_linear_map(a, b, calls), torch.zeros(batch, dim, dtype=F64), 7)
    assert stats.steps.tolist() == [7] * batch
    assert calls == [batch] * 7
    assert stats.num_evaluations == 7 * batch
    assert stats.abs_residual.shape == stats.rel_residual.shape == (7, batch)
    assert not stats.converged.any() and not stats.diverged.any()
    assert stats.states is None
    assert torch.isfinite(z).all()


def test_picard_without_tol_is_k_applications_of_f():
    dim, batch, k = 12, 3, 9
    w = _contraction(dim, 1.5, seed=12)  # need not contract: no tol, no divergence within 9 steps
    x = torch.randn(batch, dim, dtype=F64, generator=_generator(13))

    def f(z, index):
        return torch.tanh(z @ w.T + x[index])

    z0 = torch.randn(batch, dim, dtype=F64, generator=_generator(14))
    z, stats = picard(f, z0, k, keep=range(1, k + 1))

    expected, states, residuals = z0, [], []
    for _ in range(k):
        nxt = f(expected, _all_rows(batch))
        residuals.append((nxt - expected).norm(dim=1))
        expected = nxt
        states.append(expected)
    assert torch.equal(z, expected)
    assert sorted(stats.states) == list(range(1, k + 1))
    for got, want in zip((stats.states[count] for count in range(1, k + 1)), states, strict=True):
        assert torch.equal(got, want)
    torch.testing.assert_close(stats.abs_residual, torch.stack(residuals).float())
    torch.testing.assert_close(stats.final_rel_residual, (residuals[-1] / expected.norm(dim=1)).float())


def test_picard_damping_mixes_old_and_new_state():
    dim, batch, k, damping = 8, 2, 5, 0.3
    w = _contraction(dim, 0.9, seed=15)
    x = torch.randn(batch, dim, dtype=F64, generator=_generator(16))

    def f(z, index):
        return torch.tanh(z @ w.T + x[index])

    z, _ = picard(f, torch.zeros(batch, dim, dtype=F64), k, damping=damping)
    expected = torch.zeros(batch, dim, dtype=F64)
    for _ in range(k):
        expected = expected + damping * (f(expected, _all_rows(batch)) - expected)
    torch.testing.assert_close(z, expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# Divergence and non-finite values
# --------------------------------------------------------------------------------------------------


def _healthy_plus(bad_map):
    """Sample 0 follows ``bad_map``; sample 1 follows a healthy contraction."""
    dim = 8
    a = _contraction(dim, 0.5, seed=17)
    b = torch.randn(2, dim, dtype=F64, generator=_generator(18))

    def f(z, index):
        good = z @ a.T + b[index]
        return torch.where((index == 0)[:, None], bad_map(z), good)

    return f, torch.ones(2, dim, dtype=F64)


def _assert_flags_consistent(stats: SolverStats) -> None:
    assert not (stats.converged & stats.diverged).any()


@pytest.mark.parametrize("name", ALL)
def test_nan_map_is_flagged_diverged_and_healthy_sample_converges(name):
    f, z0 = _healthy_plus(lambda z: z * float("nan"))
    z, stats = get_solver(name)(f, z0, 200, tol=1e-8)
    _assert_flags_consistent(stats)
    assert stats.diverged.tolist() == [True, False]
    assert stats.converged.tolist() == [False, True]
    assert int(stats.steps[0]) == 1  # stopped at the first non-finite evaluation
    assert torch.isfinite(z).all()
    torch.testing.assert_close(z[0], z0[0])  # keeps its last finite state
    assert (f(z, torch.arange(2))[1] - z[1]).norm() < 1e-6


@pytest.mark.parametrize("name", ALL)
def test_map_leaving_its_domain_is_flagged_diverged(name):
    # z -> 3 z + 1 is repelling and undefined (NaN) outside |z| <= 2: every solver's first step
    # from z0 = 1 is the Picard step to 4, where the map has no value.
    f, z0 = _healthy_plus(lambda z: torch.where(z.abs() <= 2, 3 * z + 1, float("nan")))
    z, stats = get_solver(name)(f, z0, 200, tol=1e-8)
    _assert_flags_consistent(stats)
    assert stats.diverged.tolist() == [True, False]
    assert stats.converged.tolist() == [False, True]
    assert torch.isfinite(z).all()


def test_picard_flags_exploding_linear_map():
    f, z0 = _healthy_plus(lambda z: 3 * z + 1)
    z, stats = picard(f, z0, 200, tol=1e-8)
    _assert_flags_consistent(stats)
    assert stats.diverged.tolist() == [True, False]
    assert stats.converged.tolist() == [False, True]
    assert int(stats.steps[0]) < 200  # stopped as soon as the residual blew up
    assert torch.isfinite(z).all()


@pytest.mark.parametrize("name", ACCELERATED)
def test_accelerated_solvers_never_claim_a_false_fixed_point_of_exploding_map(name):
    # z -> 3 z + 1 has the (repelling) fixed point -1/2, which secant methods may legitimately find.
    f, z0 = _healthy_plus(lambda z: 3 * z + 1)
    z, stats = get_solver(name)(f, z0, 200, tol=1e-8)
    _assert_flags_consistent(stats)
    assert torch.isfinite(z).all()
    assert stats.converged[1] and not stats.diverged[1]
    if stats.converged[0]:
        torch.testing.assert_close(z[0], torch.full_like(z[0], -0.5), rtol=0, atol=1e-6)
    else:
        assert stats.diverged[0] or int(stats.steps[0]) == 200


@pytest.mark.parametrize("name", ALL)
def test_map_without_fixed_point_is_never_reported_converged(name):
    # z -> z + 1 + z^2 has no real fixed point (the residual 1 + z^2 >= 1).
    f, z0 = _healthy_plus(lambda z: z + 1 + z * z)
    z, stats = get_solver(name)(f, z0, 100, tol=1e-6)
    _assert_flags_consistent(stats)
    assert not stats.converged[0]
    assert stats.converged[1]
    assert torch.isfinite(z).all()
    if name == "picard":
        assert stats.diverged[0]


# --------------------------------------------------------------------------------------------------
# Degenerate systems and fallbacks
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("regularization", [1e-4, 0.0])
def test_anderson_constant_map_does_not_raise_and_returns_constant(regularization):
    batch, dim = 3, 6
    c = torch.randn(batch, dim, dtype=F64, generator=_generator(19))
    z, stats = anderson(
        lambda z, index: c[index].clone(), torch.zeros(batch, dim, dtype=F64), 8, regularization=regularization
    )
    torch.testing.assert_close(z, c, rtol=0, atol=1e-12)
    assert stats.steps.tolist() == [8] * batch
    assert not stats.diverged.any()
    if regularization == 0.0:
        # From the third evaluation on every stored residual is exactly zero: the unregularised
        # least-squares system is singular, so each of those steps must fall back.
        assert (stats.fallbacks > 0).all()


@pytest.mark.parametrize("name", ACCELERATED)
def test_identity_map_duplicate_iterates(name):
    # Every point is a fixed point: all residuals are zero and all stored iterates coincide.
    z0 = torch.randn(2, 5, dtype=F64, generator=_generator(20))
    opts = {"regularization": 0.0} if name == "anderson" else {}
    z, stats = get_solver(name)(lambda z, index: z.clone(), z0, 6, **opts)
    torch.testing.assert_close(z, z0, rtol=0, atol=0)
    assert not stats.diverged.any()
    z, stats = get_solver(name)(lambda z, index: z.clone(), z0, 6, tol=1e-6, **opts)
    assert stats.converged.all() and stats.steps.tolist() == [1, 1]


class _SpikedLinearMap:
    """f(z) = 0.5 z + 1 (fixed point 2), except evaluation number ``spike_at`` adds ``spike``."""

    def __init__(self, spike_at: int, spike: float = 50.0):
        self.spike_at = spike_at
        self.spike = spike
        self.points: list[torch.Tensor] = []

    def __call__(self, z, index):
        self.points.append(z.detach().clone())
        out = 0.5 * z + 1
        if len(self.points) == self.spike_at + 1:
            out = out + self.spike
        return out


@pytest.mark.parametrize("name", ACCELERATED)
def test_residual_growth_triggers_counted_fallback_and_solver_recovers(name):
    f = _SpikedLinearMap(spike_at=1)  # residual jumps from 1 to 50: growth 50 > restart_factor 10
    z, stats = get_solver(name)(f, torch.zeros(1, 1, dtype=F64), 50, tol=1e-10)
    assert int(stats.fallbacks[0]) >= 1
    assert stats.converged[0] and not stats.diverged[0]
    torch.testing.assert_close(z, torch.full_like(z, 2.0), rtol=0, atol=1e-8)


def test_anderson_restart_discards_history_before_the_restart():
    # memory=3: the spiked pair (x=1, f=51.5) is stored in ring slot 1. After the restart the next
    # two evaluations (slots 2 and 0) form the new history; on a 1-D linear map two clean points
    # give the exact fixed point. A stale history would mix in the spiked pair instead.
    f = _SpikedLinearMap(spike_at=1)
    z, stats = anderson(f, torch.zeros(1, 1, dtype=F64), 12, tol=1e-10, memory=3, regularization=1e-12)
    points = [p.item() for p in f.points]
    assert points[:4] == [0.0, 1.0, 1.0, 1.5]  # z0, Picard step, restart from best, Picard step
    assert points[4] == pytest.approx(2.0, abs=1e-9)
    assert int(stats.fallbacks[0]) == 1
    assert stats.converged[0] and int(stats.steps[0]) == 5


# --------------------------------------------------------------------------------------------------
# Argument validation
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kwargs", "argument"),
    [
        ("picard", {"max_iter": 0}, "max_iter"),
        ("anderson", {"max_iter": 0}, "max_iter"),
        ("broyden", {"max_iter": 0}, "max_iter"),
        ("picard", {"max_iter": 2.5}, "max_iter"),
        ("picard", {"tol": -1.0}, "tol"),
        ("anderson", {"tol": 0.0}, "tol"),
        ("broyden", {"tol": -1.0}, "tol"),
        ("picard", {"damping": 0.0}, "damping"),
        ("picard", {"damping": 1.5}, "damping"),
        ("anderson", {"damping": 0.0}, "damping"),
        ("anderson", {"memory": 0}, "memory"),
        ("broyden", {"memory": 0}, "memory"),
    ],
)
def test_invalid_arguments_raise_value_error_naming_the_argument(name, kwargs, argument):
    calls = []

    def f(z, index):
        calls.append(index)
        return z

    call = {"max_iter": 5, **kwargs}
    with pytest.raises(ValueError, match=argument):
        get_solver(name)(f, torch.zeros(2, 3), **call)
    assert not calls  # validation happens before any evaluation


@pytest.mark.parametrize("name", ALL)
def test_unbatched_or_empty_z0_is_rejected(name):
    with pytest.raises(ValueError, match="z0"):
        get_solver(name)(lambda z, index: z, torch.zeros(0, 3), 5)


def test_get_solver_known_and_unknown_names():
    assert get_solver("picard") is picard
    assert get_solver("anderson") is anderson
    assert get_solver("broyden") is broyden
    assert set(SOLVERS) == set(ALL)
    with pytest.raises(ValueError, match="solver") as info:
        get_solver("newton")
    assert "newton" in str(info.value)


# --------------------------------------------------------------------------------------------------
# Differentiating through the unrolled solve
# --------------------------------------------------------------------------------------------------


def _parametrised_tanh_map(seed: int, dim: int = 4, batch: int = 2):
    w = _contraction(dim, 0.6, seed=seed).requires_grad_()
    x = torch.randn(batch, dim, dtype=F64, generator=_generator(seed + 1)).requires_grad_()

    def f(z, index):
        return torch.tanh(z @ w.T + x[index])

    return f, w, x


@pytest.mark.parametrize("name", ALL)
def test_gradients_flow_through_unrolled_solver(name):
    f, w, x = _parametrised_tanh_map(seed=21)
    z, stats = get_solver(name)(f, torch.zeros(2, 4, dtype=F64), 30, tol=1e-6)
    assert stats.converged.all()
    assert z.requires_grad
    z.sum().backward()
    for p in (w, x):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0

    # At the fixed point the implicit-function-theorem gradient of sum(z*) w.r.t. x is
    # (I - J^T)^-1 J_x^T 1; the unrolled gradient of a well-converged solve is close to it.
    with torch.no_grad():
        zs = z.detach()
        d = 1 - torch.tanh(zs @ w.T + x) ** 2  # (B, dim): derivative of tanh per row
    for row in range(2):
        jac = d[row][:, None] * w.detach()  # df/dz for this sample
        v = torch.linalg.solve(torch.eye(4, dtype=F64) - jac.T, torch.ones(4, dtype=F64))
        torch.testing.assert_close(x.grad[row], d[row] * v, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", ALL)
def test_unrolled_gradient_matches_finite_differences(name):
    w = _contraction(3, 0.6, seed=23)
    solve = get_solver(name)

    def run(x):
        def f(z, index):
            return torch.tanh(z @ w.T + x[index])

        z, _ = solve(f, torch.zeros_like(x), 6)
        return z

    x = torch.randn(2, 3, dtype=F64, generator=_generator(24)).requires_grad_()
    assert torch.autograd.gradcheck(run, (x,), eps=1e-6, atol=1e-6)


def test_picard_gradient_equals_manual_unroll():
    f, w, x = _parametrised_tanh_map(seed=25)
    z, _ = picard(f, torch.zeros(2, 4, dtype=F64), 8)
    grad_w, grad_x = torch.autograd.grad(z.sum(), (w, x))

    manual = torch.zeros(2, 4, dtype=F64)
    for _ in range(8):
        manual = f(manual, _all_rows(2))
    want_w, want_x = torch.autograd.grad(manual.sum(), (w, x))
    torch.testing.assert_close(grad_w, want_w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_x, want_x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("solver", "option", "value"),
    [
        ("picard", "divergence_factor", 0.5),
        ("anderson", "restart_factor", 1.0),
        ("anderson", "regularization", -1e-3),
        ("broyden", "restart_factor", -2.0),
        ("broyden", "divergence_factor", 1.0),
    ],
)
def test_safeguard_options_are_validated(solver, option, value):
    with pytest.raises(ValueError, match=option):
        get_solver(solver)(lambda z, index: z, torch.zeros(2, 3), 3, **{option: value})


def test_bool_is_not_an_iteration_count():
    with pytest.raises(ValueError, match="max_iter"):
        picard(lambda z, index: z, torch.zeros(2, 3), True)
