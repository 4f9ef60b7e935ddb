"""The Navier–Stokes task: solver (checked independently in numpy), generator, cache, encoding, metrics,
perturbations and a tiny training run."""

import math

import numpy as np
import pytest
import torch
from tiny_training import train_tiny

from implicit_hf.tasks import get_task
from implicit_hf.tasks import pde as pde_module
from implicit_hf.tasks.pde import (
    DRAG,
    FORCING_RMS,
    NU,
    TOL,
    W_SCALE,
    NavierStokesTask,
    linear_solution,
    solve_steady,
    steady_residual,
)

N = 16  # a small grid keeps the tests fast; the solver and the encoding do not care


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("ns-cache")


@pytest.fixture(scope="module")
def task(cache):
    return NavierStokesTask(cache_dir=cache, grid_size=N)


@pytest.fixture(scope="module")
def rows(task):
    return list(task.build_dataset("train", 6, seed=0))


# ---------------------------------------------------------------------- an independent numpy reference


def wavenumbers(n):
    k = np.fft.fftfreq(n, 1.0 / n)
    return np.meshgrid(k, k, indexing="ij")  # (k_y, k_x): arrays are indexed [y, x]


def numpy_residual(w, f, nu=NU, drag=DRAG):
    """||u·∇w - νΔw + αw - f|| / ||f|| with the advection product computed exactly on a 2n grid, then
    truncated to the 2/3-rule band |k_x|, |k_y| < n/3 (full complex FFTs; nothing shared with the solver)."""
    n, m = w.shape[-1], 2 * w.shape[-1]
    ky, kx = wavenumbers(n)
    k2 = kx**2 + ky**2
    index = np.round(np.fft.fftfreq(n, 1.0 / n)).astype(int) % m  # where each mode of the n grid sits on the 2n grid
    w_hat = np.fft.fft2(w)
    psi_hat = np.divide(w_hat, k2, out=np.zeros_like(w_hat), where=k2 > 0)

    def on_fine_grid(spectrum):
        padded = np.zeros((m, m), dtype=complex)
        padded[np.ix_(index, index)] = spectrum * (m / n) ** 2
        return np.fft.ifft2(padded).real

    u, v = on_fine_grid(1j * ky * psi_hat), on_fine_grid(-1j * kx * psi_hat)
    w_x, w_y = on_fine_grid(1j * kx * w_hat), on_fine_grid(1j * ky * w_hat)
    product = np.fft.fft2(u * w_x + v * w_y)[np.ix_(index, index)] * (n / m) ** 2
    advection = product * ((np.abs(kx) < n / 3) & (np.abs(ky) < n / 3))
    residual = np.fft.ifft2(advection + (nu * k2 + drag) * w_hat - np.fft.fft2(f)).real
    return np.linalg.norm(residual) / np.linalg.norm(f)


def numpy_linear_solution(f, nu=NU, drag=DRAG):
    ky, kx = wavenumbers(f.shape[-1])
    return np.fft.ifft2(np.fft.fft2(f) / (nu * (kx**2 + ky**2) + drag)).real


def relative(a, b):
    return np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b))


# ---------------------------------------------------------------------- the task


def test_registered_and_model_config(task):
    assert isinstance(get_task("ns", cache_dir=task.cache_dir), NavierStokesTask)
    assert task.model_config() == {
        "problem_type": "regression",
        "num_labels": 16,
        "is_causal": False,
        "input_features": 16 + 8,
    }
    assert NavierStokesTask(cache_dir=task.cache_dir).num_tokens == 64  # 32 x 32 grid, 4 x 4 patches
    assert NavierStokesTask(cache_dir=task.cache_dir, grid_size=16, patch_size=2).model_config()["num_labels"] == 4
    with pytest.raises(ValueError, match="multiple of patch_size"):
        NavierStokesTask(grid_size=30, patch_size=4)
    with pytest.raises(ValueError, match="dealiased band"):
        NavierStokesTask(grid_size=8, patch_size=4)


def test_generator_deterministic_and_split_dependent(task, rows, tmp_path):
    other_cache = NavierStokesTask(cache_dir=tmp_path, grid_size=N)
    assert list(other_cache.build_dataset("train", 6, seed=0)) == rows  # regenerated, not the cached copy
    assert list(other_cache.build_dataset("train", 3, seed=0)) == rows[:3]  # a prefix of the same stream
    for other in (other_cache.build_dataset("train", 3, seed=1), other_cache.build_dataset("test", 3, seed=0)):
        assert all(a["forcing"] != b["forcing"] for a, b in zip(rows[:3], other, strict=True))


def test_rows_are_steady_states_of_the_stated_forcing(rows):
    ky, kx = wavenumbers(N)
    for row in rows:
        f, w = np.asarray(row["forcing"]), np.asarray(row["vorticity"])
        assert f.shape == w.shape == (N, N)
        # the residual recomputed independently is below the tolerance and matches the recorded one
        residual = numpy_residual(w, f)
        assert residual < TOL
        assert row["residual"] == pytest.approx(residual, rel=1e-6, abs=1e-12)
        assert 0 < row["steps"] <= pde_module.MAX_STEPS
        # forcing: rms 0.05, only modes 1 <= |k| <= 3
        assert np.sqrt(np.mean(f**2)) == pytest.approx(FORCING_RMS, rel=1e-12)
        spectrum = np.abs(np.fft.fft2(f))
        band = (kx**2 + ky**2 >= 1) & (kx**2 + ky**2 <= 9)
        assert spectrum[~band].max() < 1e-12 * spectrum.max()
        # the advection term matters: w* is far from the linear (no-advection) solution
        nonlinearity = np.linalg.norm(w - numpy_linear_solution(f)) / np.linalg.norm(w)
        assert row["nonlinearity"] == pytest.approx(nonlinearity, rel=1e-9)
        assert nonlinearity > 0.2


def test_cache_is_reused(task, rows, monkeypatch):
    assert task.dataset_path("train", 6, 0).is_dir()
    calls = []
    solve = pde_module.solve_steady
    monkeypatch.setattr(pde_module, "solve_steady", lambda *a, **k: calls.append(1) or solve(*a, **k))
    assert list(task.build_dataset("train", 6, seed=0)) == rows
    assert calls == []
    assert len(task.build_dataset("train", 2, seed=7)) == 2  # a new key does generate
    assert calls


# ---------------------------------------------------------------------- the solver


def test_kolmogorov_flows_have_the_exact_solution():
    """For a forcing whose modes share one |k|, w = f / (ν|k|² + α) is exact: ψ ∝ w, so u·∇w = 0."""
    x = 2 * np.pi * np.arange(N) / N
    y, x = np.meshgrid(x, x, indexing="ij")
    kolmogorov = 0.2 * np.sin(4 * y)  # |k| = 4
    oblique = 0.1 * (np.sin(3 * x + 4 * y) + np.cos(5 * y))  # |k| = 5 twice
    exact = np.stack([kolmogorov / (16 * NU + DRAG), oblique / (25 * NU + DRAG)])
    forcing = torch.tensor(np.stack([kolmogorov, oblique]))
    assert steady_residual(torch.tensor(exact), forcing).max() < 1e-13
    assert max(numpy_residual(w, f) for w, f in zip(exact, forcing.numpy(), strict=True)) < 1e-13
    state = solve_steady(forcing)
    assert state.converged.all() and (state.residual < TOL).all()
    for w, w_exact in zip(state.vorticity.numpy(), exact, strict=True):
        assert relative(w, w_exact) < 1e-5


def test_manufactured_nonlinear_steady_state_is_recovered():
    """Pick w, compute its forcing f = u·∇w - νΔw + αw exactly, solve: the solver must return w."""
    rng = np.random.default_rng(0)
    ky, kx = wavenumbers(N)
    k2 = kx**2 + ky**2
    spectrum = (rng.standard_normal((N, N)) + 1j * rng.standard_normal((N, N))) * ((k2 >= 1) & (k2 <= 4))
    w = np.fft.ifft2(spectrum).real
    w *= W_SCALE / np.sqrt(np.mean(w**2))  # the data set's typical size
    w_hat = np.fft.fft2(w)
    psi_hat = np.divide(w_hat, k2, out=np.zeros_like(w_hat), where=k2 > 0)
    u, v = np.fft.ifft2(1j * ky * psi_hat).real, np.fft.ifft2(-1j * kx * psi_hat).real
    w_x, w_y = np.fft.ifft2(1j * kx * w_hat).real, np.fft.ifft2(1j * ky * w_hat).real
    # modes |k_i| <= 2 multiply into |k_i| <= 4 < N/3: the product on this grid is exact and unaliased
    f = u * w_x + v * w_y + np.fft.ifft2((NU * k2 + DRAG) * w_hat).real
    assert numpy_residual(w, f) < 1e-13
    assert relative(numpy_linear_solution(f), w) > 0.3  # genuinely nonlinear
    state = solve_steady(torch.tensor(f).unsqueeze(0))
    assert state.converged.item() and state.residual.item() < TOL
    assert relative(state.vorticity[0].numpy(), w) < 1e-5
    assert numpy_residual(state.vorticity[0].numpy(), f) < TOL


def test_unconverged_and_blown_up_samples_are_reported_and_redrawn(task, monkeypatch, tmp_path):
    forcing = pde_module.random_forcing(np.random.default_rng(0), 2, N)
    state = solve_steady(forcing, max_steps=20)
    assert not state.converged.any()
    assert state.steps.tolist() == [20, 20] and (state.residual > TOL).all()
    assert torch.allclose(steady_residual(state.vorticity, forcing), state.residual, rtol=1e-9)
    # forty times the forcing: the explicit advection blows up, which is detected long before the budget
    blown = solve_steady(40 * forcing, max_steps=3000)
    assert not blown.converged.any() and (blown.steps < 3000).all()
    # no steady state within the step budget: the generator gives up with a clear error
    monkeypatch.setattr(pde_module, "MAX_STEPS", 20)
    with pytest.raises(RuntimeError, match="steady residual"):
        NavierStokesTask(cache_dir=tmp_path, grid_size=N).build_dataset("train", 2, seed=0)


def test_linear_solution_and_residual_shapes():
    forcing = pde_module.random_forcing(np.random.default_rng(1), 3, N)
    w_lin = linear_solution(forcing)
    assert w_lin.shape == (3, N, N) and w_lin.dtype == torch.float64
    assert np.allclose(w_lin.numpy(), np.stack([numpy_linear_solution(f) for f in forcing.numpy()]))
    # the module's residual agrees with the numpy reference on fields that are not steady states
    residuals = steady_residual(w_lin, forcing)
    assert residuals.shape == (3,) and (residuals > 0.01).all()
    expected = [numpy_residual(w, f) for w, f in zip(w_lin.numpy(), forcing.numpy(), strict=True)]
    assert np.allclose(residuals.numpy(), expected, rtol=1e-10)
    with pytest.raises(ValueError, match="shape"):
        steady_residual(w_lin[0], forcing[0])


# ---------------------------------------------------------------------- encode / decode / metrics


def test_encode_layout_and_decode_round_trip(task, rows):
    enc = task.encode(rows[:3])
    B, T = 3, 16
    assert enc["input_features"].shape == (B, T, 24) and enc["input_features"].dtype == torch.float32
    assert enc["labels"].shape == (B, T, 16) and enc["labels"].dtype == torch.float32
    assert torch.equal(enc["attention_mask"], torch.ones(B, T, dtype=torch.long))
    assert torch.equal(enc["position_ids"], torch.arange(T).repeat(B, 1))
    features = enc["input_features"]
    for k, row in enumerate(rows[:3]):
        f = torch.tensor(row["forcing"], dtype=torch.float64)
        # token t = p_y * 4 + p_x holds the 4 x 4 patch at rows 4 p_y.., columns 4 p_x.., row-major
        for t, (p_y, p_x) in enumerate((a, b) for a in range(4) for b in range(4)):
            patch = f[4 * p_y : 4 * p_y + 4, 4 * p_x : 4 * p_x + 4].reshape(-1) / FORCING_RMS
            assert torch.allclose(features[k, t, :16], patch.float())
            x_c, y_c = 2 * math.pi * (4 * p_x + 1.5) / N, 2 * math.pi * (4 * p_y + 1.5) / N
            expected = [math.sin(x_c), math.cos(x_c), math.sin(y_c), math.cos(y_c)]
            expected += [math.sin(2 * x_c), math.cos(2 * x_c), math.sin(2 * y_c), math.cos(2 * y_c)]
            assert torch.allclose(features[k, t, 16:], torch.tensor(expected, dtype=torch.float32), atol=1e-6)
    # inputs and targets are O(1)
    assert 0.5 < features[..., :16].pow(2).mean().sqrt() < 2 and 0.3 < enc["labels"].pow(2).mean().sqrt() < 3

    decoded = task.decode(enc["labels"], enc)
    for prediction, row in zip(decoded, rows[:3], strict=True):
        assert prediction.shape == (N, N)
        assert torch.allclose(
            prediction.double(), torch.tensor(row["vorticity"], dtype=torch.float64), rtol=1e-6, atol=1e-7
        )
    assert task.compute_metrics(decoded, rows[:3])["relative_l2"] < 1e-6

    unlabelled = [{k: v for k, v in row.items() if k != "vorticity"} for row in rows[:2]]
    assert "labels" not in task.encode(unlabelled)
    with pytest.raises(ValueError, match="grid is 32 x 32"):
        NavierStokesTask(grid_size=32).encode(rows[:1])
    with pytest.raises(ValueError, match="logits must have shape"):
        task.decode(enc["labels"][..., :4], enc)


def test_metrics_exact_and_hand_computed(task, rows):
    exact = [torch.tensor(row["vorticity"], dtype=torch.float64) for row in rows[:3]]
    assert task.compute_metrics(exact, rows[:3]) == {"relative_l2": 0.0, "relative_l2_max": 0.0}
    w = [torch.tensor(row["vorticity"], dtype=torch.float64) for row in rows[:2]]
    # errors 0.5 w and a constant field of norm 0.1 ||w|| (N² values of 0.1 ||w|| / N)
    scores = task.compute_metrics([1.5 * w[0], w[1] + 0.1 * w[1].norm() / N], rows[:2])
    assert scores["relative_l2"] == pytest.approx((0.5 + 0.1) / 2)
    assert scores["relative_l2_max"] == pytest.approx(0.5)


def test_metric_module_loads_by_path_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    metric = pde_module.NavierStokesTask.load_metric()
    assert metric.compute(predictions=[[1.0, 2.0], [0.0, 0.0]], references=[[1.0, 1.0], [3.0, 4.0]]) == {
        "relative_l2": pytest.approx((1 / math.sqrt(2) + 1) / 2),
        "relative_l2_max": pytest.approx(1.0),
    }
    with pytest.raises(ValueError, match="reference field is zero"):
        metric.compute(predictions=[[1.0]], references=[[0.0]])


# ---------------------------------------------------------------------- perturbations


def test_perturb(task, rows):
    eps = 1e-3
    perturbed, delta = task.perturb(rows[:3], eps, seed=0)
    assert delta.shape == (3,) and torch.allclose(delta, torch.full((3,), eps, dtype=delta.dtype))
    ky, kx = wavenumbers(N)
    band = (kx**2 + ky**2 >= 1) & (kx**2 + ky**2 <= 9)
    changes = []
    for before, after in zip(rows[:3], perturbed, strict=True):
        change = np.subtract(after["forcing"], before["forcing"])
        assert np.linalg.norm(change) == pytest.approx(eps, rel=1e-9)
        spectrum = np.abs(np.fft.fft2(change))
        assert spectrum[~band].max() < 1e-9 * spectrum.max()  # a smooth low-mode change
        assert numpy_residual(np.asarray(after["vorticity"]), np.asarray(after["forcing"])) < 1e-10  # re-solved
        changes.append(np.subtract(after["vorticity"], before["vorticity"]))
    again, _ = task.perturb(rows[:3], eps, seed=0)
    other, _ = task.perturb(rows[:3], eps, seed=1)
    assert again == perturbed and other != perturbed
    # the target change is resolved (well below the data's tolerance): it is linear in a small eps
    doubled, _ = task.perturb(rows[:3], 2 * eps, seed=0)
    for change, before, after in zip(changes, rows[:3], doubled, strict=True):
        change2 = np.subtract(after["vorticity"], before["vorticity"])
        assert 0 < np.linalg.norm(change) / eps < 100
        assert relative(change2, 2 * change) < 0.01
    unchanged, zero = task.perturb(rows[:2], 0.0, seed=0)
    assert torch.equal(zero, torch.zeros(2, dtype=zero.dtype))
    for before, after in zip(rows[:2], unchanged, strict=True):
        assert after["forcing"] == before["forcing"]
        assert relative(after["vorticity"], before["vorticity"]) < 1e-5


def test_perturb_gives_up_with_a_clear_error(task, rows, monkeypatch):
    monkeypatch.setattr(pde_module, "MAX_STEPS", 1)
    with pytest.raises(RuntimeError, match="use a smaller eps"):
        task.perturb(rows[:1], 0.1, seed=0)


# ---------------------------------------------------------------------- training


def test_training_run_lowers_the_loss(tmp_path, monkeypatch):
    losses, result = train_tiny(
        tmp_path, monkeypatch, "ns", {"num_loops": 4}, task_kwargs={"grid_size": N}, max_steps=60
    )
    assert len(losses) == 6 and all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < 0.5 * losses[0], losses
    assert result.metrics["eval/loss"] < 0.6 * losses[0]
    assert (tmp_path / "cache" / "ns" / f"train-grid{N}-64-seed0").is_dir()  # generated into IMPLICIT_HF_CACHE
