"""Solver options as the solver's own keywords (``config.solver_options``), the legacy flat keys of older configs,
``register_solver``, ``trajectory_loops`` and a forward pass that reads no token id values."""

import json
from functools import partial

import pytest
import torch
from tiny_models import tiny_causal_lm

from implicit_hf.modeling import ImplicitForCausalLM, register_solver
from implicit_hf.modeling.solvers import SOLVERS, picard

# The solver tests' model: 50 tokens and the config's default of eight loops.
tiny = partial(tiny_causal_lm, vocab_size=50, num_loops=8)


IDS = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(1))


def logits(model: ImplicitForCausalLM, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS, use_cache=False, **kwargs).logits


def test_legacy_solver_keys_load_as_solver_options_and_run_identically(tmp_path):
    legacy = tiny(solver="anderson", damping=0.5, anderson_memory=3)
    assert legacy.config.solver_options == {"picard": {"damping": 0.5}, "anderson": {"damping": 0.5, "memory": 3}}
    assert (legacy.config.damping, legacy.config.anderson_memory) == (0.5, 3)
    current = tiny(solver="anderson", solver_options={"anderson": {"damping": 0.5, "memory": 3}})
    torch.testing.assert_close(logits(legacy), logits(current), rtol=0, atol=0)
    assert not torch.equal(logits(legacy), logits(tiny(solver="anderson")))  # the options took effect
    legacy.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "damping" not in saved and saved["solver_options"]["anderson"] == {"damping": 0.5, "memory": 3}
    torch.testing.assert_close(logits(ImplicitForCausalLM.from_pretrained(tmp_path).eval()), logits(legacy))


def test_a_legacy_key_set_on_a_loaded_config_reaches_the_solver():
    model = tiny()
    before = logits(model)
    model.config.damping = 0.5
    assert model.config.solver_options["picard"] == {"damping": 0.5}
    assert not torch.equal(logits(model), before)


def test_broyden_memory_is_reachable_from_the_config():
    seen = []

    def recording(f, z0, max_iter, tol=None, *, memory=16, keep=()):
        seen.append(memory)
        return SOLVERS["broyden"](f, z0, max_iter, tol, memory=memory, keep=keep)

    register_solver("recording_broyden", recording)
    try:
        model = tiny(solver="recording_broyden", solver_options={"recording_broyden": {"memory": 2}})
        logits(model)
        assert seen == [2]
        with pytest.raises(ValueError, match="which it does not take; did you mean 'memory'"):
            model.config.solver_options = {"recording_broyden": {"memroy": 2}}
    finally:
        SOLVERS.pop("recording_broyden")
    broyden = tiny(solver="broyden", solver_options={"broyden": {"memory": 2}})
    assert not torch.equal(logits(broyden, num_loops=6), logits(tiny(solver="broyden"), num_loops=6))


def test_a_registered_solver_is_a_choice_of_config_forward_and_generate():
    calls = []

    def counted(f, z0, max_iter, tol=None, *, damping=1.0, keep=()):
        calls.append(max_iter)
        return picard(f, z0, max_iter, tol, damping=damping, keep=keep)

    with pytest.raises(ValueError, match="solver must be one of 'picard', 'anderson', 'broyden'; got 'counted'"):
        tiny(solver="counted")
    register_solver("counted", counted)
    try:
        model = tiny()
        torch.testing.assert_close(logits(model, solver="counted", num_loops=3), logits(model, num_loops=3))
        model.generate(IDS[:1], max_new_tokens=2, do_sample=False, solver="counted", num_loops=2, pad_token_id=0)
        assert calls == [3, 2, 2]
        assert tiny(solver="counted").config.solver == "counted"
    finally:
        SOLVERS.pop("counted")
    with pytest.raises(ValueError, match="keep"):
        register_solver("no_keep", lambda f, z0, max_iter, tol=None: None)


def test_trajectory_loops_is_the_list_and_return_trajectory_the_switch():
    model = tiny()
    with torch.no_grad():
        split = model(IDS, num_loops=4, return_trajectory=True, trajectory_loops=[3, 1], use_cache=False)
        short = model(IDS, num_loops=4, return_trajectory=[3, 1], use_cache=False)
        every = model(IDS, num_loops=4, return_trajectory=True, use_cache=False)
    assert len(split.trajectory) == 2 and len(every.trajectory) == 4
    for got, want in zip(split.trajectory, (every.trajectory[2], every.trajectory[0]), strict=True):
        torch.testing.assert_close(got, want)
    for got, want in zip(split.trajectory, short.trajectory, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="trajectory_loops needs return_trajectory=True"):
        model(IDS, trajectory_loops=[1], use_cache=False)
    with pytest.raises(ValueError, match="trajectory_loops must be a non-empty list of loop counts >= 1"):
        model(IDS, return_trajectory=True, trajectory_loops=[0], use_cache=False)


def test_forward_reads_no_token_id_values_but_still_names_a_bad_one(monkeypatch):
    model = tiny()
    monkeypatch.setattr(torch, "aminmax", lambda *a, **k: pytest.fail("forward read the token ids"))
    logits(model)  # good ids: no value read
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"token id 50, outside the vocabulary \[0, 50\)"):
        model(torch.tensor([[1, 50]]), use_cache=False)
