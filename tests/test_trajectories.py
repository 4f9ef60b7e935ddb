"""Several trajectories per input (``num_trajectories=K``): one batched solve from K noisy starts, reduced per input
by the final residual, a vote or a mean (``modeling/trajectories.py``)."""

from types import SimpleNamespace

import pytest
import torch

from implicit_hf import ImplicitForCausalLM, ImplicitForTokenClassification, ImplicitForTokenRegression
from implicit_hf.modeling import modeling_implicit
from implicit_hf.modeling.solvers import SolverStats
from implicit_hf.modeling.trajectories import TrajectoryReduction

K = 4
HEADS = {
    "classification": (ImplicitForTokenClassification, {"num_labels": 5, "is_causal": False}),
    "regression": (ImplicitForTokenRegression, {"num_labels": 2, "is_causal": False, "input_features": 3}),
    "causal_lm": (ImplicitForCausalLM, {}),
}


def head_model(tiny_model_of, head: str, **overrides):
    model_class, settings = HEADS[head]
    return tiny_model_of(model_class, **{**settings, **overrides})


def inputs_of(head: str, batch: int = 3, length: int = 6) -> dict:
    generator = torch.Generator().manual_seed(1)
    if head == "regression":
        return {"input_features": torch.randn(batch, length, 3, generator=generator)}
    return {"input_ids": torch.randint(0, 61, (batch, length), generator=generator)}


@pytest.mark.parametrize("head", HEADS)
def test_one_trajectory_is_the_plain_forward(tiny_model_of, head):
    model, inputs = head_model(tiny_model_of, head), inputs_of(head)
    plain = model(**inputs, use_cache=False)
    one = model(**inputs, use_cache=False, num_trajectories=1, trajectory_noise=0.5, trajectory_seed=3)
    assert torch.equal(plain.logits, one.logits)
    assert torch.equal(plain.loop_stats.rel_residual, one.loop_stats.rel_residual)
    assert one.loop_stats.trajectories is None


@pytest.mark.parametrize("head", HEADS)
def test_the_output_keeps_the_input_batch(tiny_model_of, head):
    model, inputs = head_model(tiny_model_of, head), inputs_of(head)
    plain = model(**inputs, use_cache=False, return_trajectory=[1, 2], output_hidden_states=True)
    wide = model(
        **inputs, num_trajectories=K, trajectory_noise=0.3, return_trajectory=[1, 2], output_hidden_states=True
    )
    assert wide.logits.shape == plain.logits.shape
    assert [t.shape for t in wide.trajectory] == [t.shape for t in plain.trajectory]
    assert [h.shape for h in wide.hidden_states] == [h.shape for h in plain.hidden_states]
    assert wide.loop_stats.steps.shape == wide.loop_stats.converged.shape == (3,)
    choice = wide.loop_stats.trajectories
    assert choice.chosen.shape == choice.agreement.shape == choice.residual_min.shape == (3,)
    assert choice.final_residual.shape == (3, K)
    assert (choice.residual_min <= choice.residual_max).all()
    assert wide.cache is None  # K > 1 runs without a KV cache, also by default on a causal LM


def test_the_same_seed_gives_the_same_outputs_and_another_seed_others(tiny_model_of):
    model, inputs = head_model(tiny_model_of, "classification"), inputs_of("classification")

    def run(seed):
        return model(**inputs, num_trajectories=K, trajectory_noise=0.5, trajectory_seed=seed)

    first, again, other = run(7), run(7), run(8)
    assert torch.equal(first.logits, again.logits)
    assert torch.equal(first.loop_stats.trajectories.final_residual, again.loop_stats.trajectories.final_residual)
    assert not torch.equal(first.loop_stats.trajectories.final_residual, other.loop_stats.trajectories.final_residual)


@pytest.mark.parametrize("select", ["residual", "vote"])
def test_without_noise_zero_starts_give_identical_trajectories(tiny_model_of, select):
    model, inputs = head_model(tiny_model_of, "classification", state_init="zeros"), inputs_of("classification")
    plain = model(**inputs)
    wide = model(**inputs, num_trajectories=K, trajectory_noise=0.0, select=select)
    choice = wide.loop_stats.trajectories
    assert torch.equal(choice.chosen, torch.zeros(3, dtype=torch.long))
    assert torch.equal(choice.agreement, torch.ones(3))
    torch.testing.assert_close(choice.residual_min, choice.residual_max)
    torch.testing.assert_close(wide.logits, plain.logits)


def separate_solves(model, inputs: dict, monkeypatch, **wide) -> tuple:
    """The batched K-trajectory output and, for each trajectory k, a plain forward started from the same states."""
    starts = []
    perturb = modeling_implicit.perturbed_starts
    monkeypatch.setattr(modeling_implicit, "perturbed_starts", lambda *args: starts.append(perturb(*args)) or starts[0])
    batched = model(**inputs, num_trajectories=K, **wide)
    separate = []
    for k in range(K):
        monkeypatch.setattr(model.model, "_initial_state", lambda injected, k=k: starts[0][k::K])
        separate.append(model(**inputs))
    return batched, separate


def test_residual_keeps_the_trajectory_with_the_lowest_residual(tiny_model_of, monkeypatch):
    model, inputs = head_model(tiny_model_of, "classification"), inputs_of("classification")
    batched, separate = separate_solves(model, inputs, monkeypatch, trajectory_noise=1.0, select="residual")
    residuals = torch.stack([s.loop_stats.final_rel_residual for s in separate], dim=1)  # (B, K)
    choice = batched.loop_stats.trajectories
    torch.testing.assert_close(choice.final_residual, residuals)
    assert torch.equal(choice.chosen, residuals.argmin(1))
    assert residuals.std(1).gt(0).all()  # the noise made the trajectories differ: a real choice
    for b, k in enumerate(choice.chosen.tolist()):
        torch.testing.assert_close(batched.logits[b], separate[k].logits[b])


def test_mean_averages_the_regression_outputs(tiny_model_of, monkeypatch):
    model, inputs = head_model(tiny_model_of, "regression"), inputs_of("regression")
    batched, separate = separate_solves(model, inputs, monkeypatch, trajectory_noise=1.0, select="mean")
    torch.testing.assert_close(batched.logits, torch.stack([s.logits for s in separate]).mean(0))
    assert batched.loop_stats.trajectories.agreement.isnan().all()  # no discrete predictions to compare


def test_vote_takes_the_majority_per_token_and_ties_go_to_the_lowest_residual():
    # One input, 4 trajectories, 2 tokens, 3 classes. Token 0 predicts [2, 2, 1, 0]: class 2 wins, from
    # trajectory 1 (residual 0.2 < 0.4). Token 1 predicts [0, 0, 1, 1], a tie: class 1, whose best trajectory
    # (2, residual 0.1) has the lowest residual of all.
    predictions = torch.tensor([[2, 0], [2, 0], [1, 1], [0, 1]])
    logits = torch.nn.functional.one_hot(predictions, 3).float() + torch.arange(4.0)[:, None, None] / 10
    residual = torch.tensor([[0.4], [0.2], [0.1], [0.3]]).T.repeat(2, 1)  # (iterations, B * K)
    count = torch.zeros(4, dtype=torch.long)
    stats = SolverStats("picard", count + 2, residual, residual, count.bool(), count.bool(), count)
    outputs = SimpleNamespace(loop_stats=stats, hidden_states=None, attentions=None)
    voted, _, reduced, _, _ = TrajectoryReduction(4, "vote", discrete=True).reduce(logits, None, outputs, None)
    torch.testing.assert_close(voted[0, 0], logits[1, 0])
    torch.testing.assert_close(voted[0, 1], logits[2, 1])
    choice = reduced.trajectories
    assert choice.chosen.tolist() == [2]  # every trajectory matches the vote at one token: the lowest residual
    assert choice.agreement.tolist() == [0.5]  # two of four trajectories predict the vote's class, at each token
    assert reduced.steps.tolist() == [2] and choice.steps.tolist() == [8]


def test_vote_on_the_causal_lm_predicts_the_majority_of_separate_solves(tiny_model_of, monkeypatch):
    model, inputs = head_model(tiny_model_of, "causal_lm"), inputs_of("causal_lm")
    labels = inputs["input_ids"]
    voted, separate = separate_solves(model, inputs, monkeypatch, trajectory_noise=1.0, select="vote", labels=labels)
    predictions = torch.stack([s.logits.argmax(-1) for s in separate])  # (K, B, T)
    most = (predictions[:, None] == predictions[None]).sum(0).amax(0)  # the majority's size per token
    assert torch.equal((predictions == voted.logits.argmax(-1)).sum(0), most)
    assert (most < K).any()  # some tokens were disputed
    agreement = (most.float() / K).mean(1)
    torch.testing.assert_close(voted.loop_stats.trajectories.agreement, agreement)
    assert voted.loss.ndim == 0 and torch.isfinite(voted.loss)


def test_per_sample_halting_still_stops_trajectories_early(tiny_model_of):
    model, inputs = head_model(tiny_model_of, "classification"), inputs_of("classification")
    fixed = model(**inputs, num_loops=40, tol=0, num_trajectories=K, trajectory_noise=0.3)
    halted = model(**inputs, num_loops=40, tol=0.02, num_trajectories=K, trajectory_noise=0.3)
    assert fixed.loop_stats.trajectories.steps.tolist() == [K * 40] * 3
    assert halted.loop_stats.converged.all()
    assert (halted.loop_stats.trajectories.steps < K * 40).all()
    assert (halted.loop_stats.steps < 40).all()


def test_loop_feedback_written_for_the_input_batch_runs_per_trajectory(tiny_model_of):
    model = head_model(tiny_model_of, "regression", feedback_features=2, state_init="zeros")
    inputs = inputs_of("regression")
    target = torch.randn(3, 6, 2, generator=torch.Generator().manual_seed(2))  # per input, like a measurement

    def feedback(estimate: torch.Tensor) -> torch.Tensor:
        return estimate - target  # fails on B * K rows

    plain = model(**inputs, loop_feedback=feedback)
    wide = model(**inputs, loop_feedback=feedback, num_trajectories=K, select="mean")
    torch.testing.assert_close(wide.logits, plain.logits)


def test_random_picks_a_seeded_trajectory_per_input(tiny_model_of):
    model, inputs = head_model(tiny_model_of, "classification"), inputs_of("classification", batch=8)
    run = model(**inputs, num_trajectories=K, trajectory_noise=0.5, select="random", trajectory_seed=2)
    again = model(**inputs, num_trajectories=K, trajectory_noise=0.5, select="random", trajectory_seed=2)
    choice = run.loop_stats.trajectories
    assert torch.equal(choice.chosen, again.loop_stats.trajectories.chosen)
    assert len(set(choice.chosen.tolist())) > 1  # not one index for every input
    lowest = model(**inputs, num_trajectories=K, trajectory_noise=0.5, trajectory_seed=2).loop_stats.trajectories
    assert not torch.equal(choice.chosen, lowest.chosen)  # 8 inputs, 4 trajectories: not the residual's choice
    picked = choice.final_residual[torch.arange(8), choice.chosen]
    assert torch.equal(run.loop_stats.final_rel_residual, picked)


@pytest.mark.parametrize("select", ["residual", "vote", "random"])
def test_each_trajectory_entry_is_reduced_as_a_run_stopped_at_its_loop_count(tiny_model_of, select):
    model, inputs = head_model(tiny_model_of, "classification"), inputs_of("classification", batch=5)
    width = dict(num_trajectories=K, trajectory_noise=0.4, select=select, trajectory_seed=1, tol=0)
    swept = model(**inputs, **width, num_loops=6, return_trajectory=True, trajectory_loops=[2, 6])
    for entry, loops in zip(swept.trajectory, [2, 6], strict=True):
        alone = model(**inputs, **width, num_loops=loops)
        assert torch.allclose(entry, alone.logits, atol=1e-5)
    entries = swept.loop_stats.trajectories.entries
    short = model(**inputs, **width, num_loops=2).loop_stats.trajectories
    assert torch.equal(entries[0].chosen, short.chosen)
    assert torch.allclose(entries[0].final_residual, short.final_residual)
    assert torch.equal(entries[0].answer_agreement, short.answer_agreement)


def test_an_input_gets_the_same_answer_alone_in_another_batch_or_in_chunks(tiny_model_of):
    model, inputs = head_model(tiny_model_of, "causal_lm", tol=0.05), inputs_of("causal_lm", batch=5)
    width = dict(num_trajectories=K, trajectory_noise=0.3, trajectory_seed=4, use_cache=False)
    whole = model(**inputs, **width, return_trajectory=[1, 3])
    alone = model(input_ids=inputs["input_ids"][3:4], **width, return_trajectory=[1, 3])
    assert torch.allclose(whole.logits[3:4], alone.logits, atol=1e-5)
    for size in (1, 5, 9):  # fewer rows than one input's trajectories, some inputs, uneven chunks
        chunked = model(**inputs, **width, return_trajectory=[1, 3], trajectory_batch_size=size)
        assert torch.allclose(whole.logits, chunked.logits, atol=1e-5)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(whole.trajectory, chunked.trajectory, strict=True))
        assert torch.equal(whole.loop_stats.steps, chunked.loop_stats.steps)
        assert torch.equal(whole.loop_stats.trajectories.chosen, chunked.loop_stats.trajectories.chosen)


def test_answer_agreement_counts_trajectories_right_at_every_token():
    predictions = torch.tensor([[0, 1], [0, 1], [0, 2], [1, 2]])  # K = 4 trajectories of one input, 2 tokens
    logits = torch.nn.functional.one_hot(predictions, 3).float()
    residual = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    count = torch.ones(4, dtype=torch.long)
    stats = SolverStats("picard", count, residual, residual, count.bool(), ~count.bool(), count - 1)
    outputs = SimpleNamespace(loop_stats=stats, hidden_states=None, attentions=None)
    _, _, reduced, _, _ = TrajectoryReduction(4, "residual", discrete=True).reduce(logits, None, outputs, None)
    choice = reduced.trajectories
    assert choice.answer_agreement.tolist() == [0.5]  # trajectories 0 and 1 equal the chosen one everywhere
    assert choice.token_agreement.tolist() == [[0.75, 0.5]]
    assert choice.agreement.tolist() == [0.625]


@pytest.mark.parametrize(
    "argument", [{"penalties": ["jacobian"]}, {"output_hidden_states": True}, {"trajectory_batch_size": 0}]
)
def test_what_a_batch_in_chunks_cannot_honour_is_refused(tiny_model_of, argument):
    model, inputs = head_model(tiny_model_of, "classification"), inputs_of("classification")
    name = next(iter(argument))
    with pytest.raises(ValueError, match=name):
        model(**inputs, num_trajectories=K, **{"trajectory_batch_size": 2, **argument})


def test_normal_starts_follow_the_trajectory_seed(tiny_model_of):
    model = head_model(tiny_model_of, "classification", state_init="normal", state_init_std=0.5)
    inputs = inputs_of("classification")

    def run(seed: int):
        torch.manual_seed(seed + 100)  # the global generator must not matter
        return model(**inputs, num_trajectories=K, trajectory_seed=seed, return_trajectory=[1]).trajectory[0]

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))
