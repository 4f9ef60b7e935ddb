"""The loop's token shift (config.loop_shift): a causal depthwise convolution of the normalised state, added to
the core's input at every iteration. Cached decoding, padding, halting and beam search with it are tested
beside the plain model in test_generation.py."""

import pytest
import torch
from test_model import build, tokens
from transformers import AutoModelForCausalLM

from implicit_hf import ImplicitForCausalLM, ImplicitForTokenClassification


@pytest.mark.parametrize("value", [-1, 5, 1.5, "1", True, None])
def test_loop_shift_must_be_an_integer_from_0_to_4(value, tiny_config):
    with pytest.raises(ValueError, match=r"loop_shift must be an integer in \[0, 4\]"):
        tiny_config(loop_shift=value)
    config = tiny_config()
    with pytest.raises(ValueError, match="loop_shift must be"):
        config.loop_shift = value


def test_off_by_default_and_checkpoints_without_the_field_load_as_before(tmp_path):
    import json

    model = build(ImplicitForCausalLM)
    assert model.config.loop_shift == 0 and model.model.loop_shift is None
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["loop_shift"]  # written before the field existed
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.loop_shift == 0
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens()).logits, model(tokens()).logits, rtol=0, atol=0)


@pytest.mark.parametrize("kernel", [1, 3])
def test_the_shift_is_the_causal_convolution_of_the_normalised_state(kernel):
    model = build(ImplicitForCausalLM, loop_shift=kernel)
    shift = model.model.loop_shift
    torch.nn.init.normal_(shift.taps)
    state = torch.randn(2, 7, 32)
    with torch.no_grad():
        got = shift(state)
        normed = shift.norm(state)
        expected = torch.zeros_like(state)
        for t in range(7):
            for j in range(1, kernel + 1):
                if t - j >= 0:
                    expected[:, t] += shift.taps[j - 1] * normed[:, t - j]
        expected = shift.proj(expected)
    torch.testing.assert_close(got, expected)
    initial = build(ImplicitForCausalLM, loop_shift=kernel).model.loop_shift
    assert initial.taps[:, 0].tolist() == [1.0] + [0.0] * (kernel - 1)  # a pure one-step shift to begin with
    assert torch.equal(initial.proj.weight, torch.eye(32))


def test_the_shift_moves_information_one_position_per_loop():
    """With attention confined to each token itself, only the shift carries information along the sequence: from a
    zero state, a change at position 0 reaches position t after 1 + t / kernel loops and no sooner (the first
    loop shifts zeros), and never without the shift."""
    for kernel in (0, 1, 2):
        model = build(ImplicitForCausalLM, loop_shift=kernel, num_prelude_layers=0, num_coda_layers=0).double()
        if kernel:
            torch.nn.init.normal_(model.model.loop_shift.taps)  # every tap in use (they start as a one-step shift)
        input_ids = tokens(batch=1, length=8)
        changed = input_ids.clone()
        changed[0, 0] = (changed[0, 0] + 1) % 97
        eye = torch.eye(8, dtype=torch.bool)[None, None]  # a 4-D mask: every token attends to itself only
        with torch.no_grad():
            a = model(input_ids, attention_mask=eye, num_loops=3, return_trajectory=True).trajectory
            b = model(changed, attention_mask=eye, num_loops=3, return_trajectory=True).trajectory
        for loops, (x, y) in enumerate(zip(a, b, strict=True), start=1):
            reached = (x - y).abs().amax(-1)[0] > 1e-9
            expected = [t == 0 or bool(kernel and t <= (loops - 1) * kernel) for t in range(8)]
            assert reached.tolist() == expected, (kernel, loops)


def test_left_padding_never_leaks_into_a_real_token():
    model = build(ImplicitForCausalLM, loop_shift=4).double()
    row = tokens(batch=1, length=5)
    padded = torch.cat([torch.full((1, 3), 7), row], dim=1)
    other = torch.cat([torch.full((1, 3), 50), row], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        alone = model(row, num_loops=6).logits
        a = model(padded, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), num_loops=6).logits
        b = model(other, attention_mask=mask, num_loops=6).logits
    torch.testing.assert_close(a[:, 3:], alone, atol=1e-10, rtol=0)
    torch.testing.assert_close(b[:, 3:], a[:, 3:], atol=1e-10, rtol=0)


@pytest.mark.parametrize("gradient", ["unroll", "truncated", "jfb", "phantom", "ift"])
def test_every_gradient_mode_trains_the_shift(gradient):
    model = build(ImplicitForCausalLM, loop_shift=2, gradient=gradient, gradient_steps=2).train()
    input_ids = tokens()
    out = model(input_ids, labels=input_ids, num_loops=5)
    out.loss.backward()
    shift = model.model.loop_shift
    assert shift.taps.grad is not None and shift.taps.grad.abs().sum() > 0
    assert shift.proj.weight.grad.abs().sum() > 0


def test_trajectory_halting_and_a_per_token_head_with_the_shift(tmp_path):
    model = build(ImplicitForCausalLM, loop_shift=1)
    input_ids = tokens()
    with torch.no_grad():
        out = model(input_ids, num_loops=6, return_trajectory=[2, 6])
        torch.testing.assert_close(out.trajectory[0], model(input_ids, num_loops=2).logits)
        torch.testing.assert_close(out.trajectory[1], out.logits)
        halted = model(input_ids, num_loops=200, tol=1e-3, use_cache=False)
    assert int(halted.loop_stats.steps.max()) < 200 and bool(halted.loop_stats.converged.all())
    model.save_pretrained(tmp_path / "lm")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "lm").eval()
    assert loaded.config.loop_shift == 1
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids, num_loops=6).logits, out.logits, rtol=0, atol=0)
    grid = build(ImplicitForTokenClassification, loop_shift=2, num_labels=3, is_causal=False)
    with torch.no_grad():
        assert grid(input_ids, num_loops=3).logits.shape == (3, 12, 3)
