"""Looped generation: per-(loop, core layer) KV cache, left-padded batches, halting that saves compute."""

from functools import partial

import pytest
import torch
from tiny_models import TINY_VOCAB, tiny_causal_lm
from transformers import DynamicCache

from implicit_hf import ImplicitForCausalLM, ImplicitForTokenClassification

VOCAB = TINY_VOCAB
PAD = 0


# The generation tests' model (``causal_lm(seed=0, **overrides)``): grouped-query attention, two core layers,
# four loops, and large weights, so that greedy outputs vary from token to token.
causal_lm = partial(
    tiny_causal_lm, num_key_value_heads=2, num_core_layers=2, num_loops=4, pad_token_id=PAD, initializer_range=0.2
)


def prompts(lengths, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (length,), generator=generator) for length in lengths]


def left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), PAD, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for k, row in enumerate(rows):
        input_ids[k, length - len(row) :] = row
        attention_mask[k, length - len(row) :] = 1
    return input_ids, attention_mask


def greedy(model, input_ids, attention_mask=None, **kwargs):
    return model.generate(
        input_ids,
        attention_mask=attention_mask,
        max_new_tokens=12,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
        pad_token_id=PAD,
        **kwargs,
    )


# float32 rounding differs between the cached and the full computation (different matmul shapes) and a
# random map amplifies it over 16 loops (logits ~3 differ by ~2e-5); in float64 they agree to 1e-10.
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
@pytest.mark.parametrize("num_loops", [1, 4, 16])
@pytest.mark.parametrize("loop_shift, position_encoding", [(0, "rope"), (1, "rope"), (4, "rope"), (1, "none")])
def test_cached_greedy_decoding_equals_uncached(num_loops, dtype, atol, loop_shift, position_encoding):
    model = causal_lm(loop_shift=loop_shift, position_encoding=position_encoding).to(dtype)
    (prompt,) = prompts([7])
    with torch.no_grad():
        cached = greedy(model, prompt[None], num_loops=num_loops, use_cache=True)
        uncached = greedy(model, prompt[None], num_loops=num_loops, use_cache=False)
    new_tokens = cached.sequences[0, 7:]
    assert len(set(new_tokens.tolist())) > 3, "the test model should not repeat one token"
    assert torch.equal(cached.sequences, uncached.sequences)
    for step, (a, b) in enumerate(zip(cached.logits, uncached.logits, strict=True)):
        torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=f"step {step}")


def test_cache_holds_one_slot_per_loop_and_core_layer():
    model = causal_lm(num_prelude_layers=1, num_core_layers=2, num_coda_layers=1)
    (prompt,) = prompts([5])
    with torch.no_grad():
        out = model(prompt[None], num_loops=3, use_cache=True)
    cache = out.cache
    assert isinstance(cache, DynamicCache)
    assert len(cache.layers) == 1 + 1 + 3 * 2  # prelude + coda + loops x core
    assert all(layer.keys.shape[-2] == 5 for layer in cache.layers)
    # the core's slots differ from loop to loop: each loop attends to its own keys
    first_core = 2
    assert not torch.allclose(cache.layers[first_core].keys, cache.layers[first_core + 2].keys)
    with torch.no_grad():
        model(torch.tensor([[3]]), cache=cache, num_loops=3)
    assert all(layer.keys.shape[-2] == 6 for layer in cache.layers)
    with pytest.raises(ValueError, match="filled with num_loops=3"):
        model(torch.tensor([[3]]), cache=cache, num_loops=4)


@pytest.mark.parametrize("loop_shift", [0, 1, 3])
def test_incremental_forward_with_cache_equals_full_forward(loop_shift):
    model = causal_lm(loop_shift=loop_shift).double()
    (sequence,) = prompts([9])
    with torch.no_grad():
        full = model(sequence[None], num_loops=5, use_cache=False).logits
        prefix = model(sequence[None, :6], num_loops=5, use_cache=True)
        rest = model(sequence[None, 6:], cache=prefix.cache, num_loops=5).logits
    torch.testing.assert_close(torch.cat([prefix.logits, rest], dim=1), full, atol=1e-10, rtol=0)


class RowCounter:
    """Counts the batch rows each call of a module processes (what halting should save)."""

    def __init__(self, module: torch.nn.Module):
        self.rows = 0
        self.handle = module.register_forward_hook(self)

    def __call__(self, module, args, output):
        self.rows += output.shape[0] if isinstance(output, torch.Tensor) else output[0].shape[0]


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("init, tol", [(0.2, None), (0.02, 1e-3)])  # fixed 12 loops; halting rows (contracting map)
@pytest.mark.parametrize("loop_shift", [0, 2])
def test_left_padded_batch_generates_what_each_prompt_generates_alone(use_cache, init, tol, loop_shift):
    model = causal_lm(num_loops=12, initializer_range=init, loop_shift=loop_shift).double()
    rows = prompts([3, 8, 5, 1])
    input_ids, attention_mask = left_pad(rows)
    counter = RowCounter(model.model.core[0])
    with torch.no_grad():
        batched = greedy(model, input_ids, attention_mask, use_cache=use_cache, tol=tol)
    if tol is not None:  # rows did halt, at different loops, and the batch still equals the single runs
        assert counter.rows < len(rows) * 12 * len(batched.logits)
    with torch.no_grad():
        for k, row in enumerate(rows):
            alone = greedy(model, row[None], use_cache=use_cache, tol=tol)
            assert torch.equal(batched.sequences[k, input_ids.shape[1] :], alone.sequences[0, len(row) :]), k
            for step, (a, b) in enumerate(zip(batched.logits, alone.logits, strict=True)):
                torch.testing.assert_close(a[k], b[0], atol=1e-9, rtol=0, msg=f"row {k} step {step}")


def test_attention_mask_is_honoured_in_generation():
    """Changing what sits under the padding changes nothing; changing a real token does."""
    model = causal_lm()
    rows = prompts([2, 6])
    input_ids, attention_mask = left_pad(rows)
    other_padding = input_ids.clone()
    other_padding[0, :4] = torch.tensor([5, 9, 13, 17])
    with torch.no_grad():
        reference = greedy(model, input_ids, attention_mask, num_loops=4)
        same = greedy(model, other_padding, attention_mask, num_loops=4)
        changed_token = input_ids.clone()
        changed_token[0, -1] = (changed_token[0, -1] + 1) % VOCAB or 1
        different = greedy(model, changed_token, attention_mask, num_loops=4)
    assert torch.equal(reference.sequences[:, 6:], same.sequences[:, 6:])
    torch.testing.assert_close(torch.stack(reference.logits), torch.stack(same.logits))
    assert not torch.allclose(torch.stack(reference.logits)[:, 0], torch.stack(different.logits)[:, 0])


def test_halting_in_generation_stops_computing_converged_rows():
    model = causal_lm(initializer_range=0.02, num_loops=40)  # small weights: the core contracts
    input_ids, attention_mask = left_pad(prompts([4, 6, 5]))
    counter = RowCounter(model.model.core[0])
    with torch.no_grad():
        out = greedy(model, input_ids, attention_mask, tol=1e-3)
    halting_rows = counter.rows
    counter.rows = 0
    with torch.no_grad():
        fixed = greedy(model, input_ids, attention_mask)
    fixed_rows = counter.rows
    steps = len(out.logits)
    assert fixed_rows == 3 * 40 * steps  # every row, every loop, every decoding step
    assert halting_rows < fixed_rows / 2  # converged rows stop costing compute
    assert torch.equal(out.sequences, fixed.sequences)  # at tol 1e-3 the greedy tokens are unchanged


def test_halted_rows_leave_their_last_keys_in_later_loop_slots():
    model = causal_lm(initializer_range=0.02)
    input_ids, attention_mask = left_pad(prompts([4, 6]))
    with torch.no_grad():
        out = model(input_ids, attention_mask=attention_mask, num_loops=30, tol=1e-3, use_cache=True)
    steps = out.loop_stats.steps
    assert bool((steps < 30).all())
    cache, first_core, core = out.cache, 2, 2
    for row, halted_after in enumerate(steps.tolist()):
        last = cache.layers[first_core + (halted_after - 1) * core].keys[row]
        for loop in range(halted_after, 30):
            assert torch.equal(cache.layers[first_core + loop * core].keys[row], last)


def test_halted_rows_leave_their_last_shift_states_in_later_loop_slots():
    """With the token shift, every loop has one more slot (after its core layers): the normalised state each
    token entered that loop with; a halted row's later loops hold the one of its last loop, like its keys."""
    model = causal_lm(initializer_range=0.02, loop_shift=2)
    input_ids, attention_mask = left_pad(prompts([2, 9]))
    with torch.no_grad():
        out = model(input_ids, attention_mask=attention_mask, num_loops=30, tol=1e-4, use_cache=True)
    steps = out.loop_stats.steps
    assert bool((steps < 30).all()) and len(set(steps.tolist())) > 1  # rows halted, at different loops
    cache, first_core, per_loop = out.cache, 2, 3  # prelude + coda slots; two core layers and the shift per loop
    assert len(cache.layers) == first_core + 30 * per_loop
    shift_slot = [first_core + loop * per_loop + 2 for loop in range(30)]
    assert cache.layers[shift_slot[0]].keys.shape == (2, 1, 9, 32) and cache.layers[shift_slot[0]].values.numel() == 0
    assert torch.equal(cache.layers[shift_slot[0]].keys[0, 0, :7], torch.zeros(7, 32))  # padding: a zero state
    for row, halted_after in enumerate(steps.tolist()):
        last = cache.layers[shift_slot[halted_after - 1]].keys[row]
        assert not torch.equal(cache.layers[shift_slot[halted_after - 2]].keys[row], last)
        for loop in range(halted_after, 30):
            assert torch.equal(cache.layers[shift_slot[loop]].keys[row], last)


def test_cache_misuse_is_refused_with_a_clear_error(tiny_model_of):
    model = causal_lm()
    (prompt,) = prompts([4])
    with pytest.raises(ValueError, match="return_trajectory .* cannot use a KV cache"):
        model(prompt[None], use_cache=True, return_trajectory=True)
    assert model(prompt[None], return_trajectory=True).cache is None  # no cache by default with a trajectory
    with pytest.raises(ValueError, match="DynamicCache"):
        model.generate(prompt[None], max_new_tokens=2, cache_implementation="static", pad_token_id=PAD)
    grid_model = tiny_model_of(ImplicitForTokenClassification, num_labels=2, is_causal=False)
    with pytest.raises(ValueError, match="use_cache needs a causal model"):
        grid_model.model(prompt[None], use_cache=True)
    assert grid_model.model(prompt[None]).cache is None


def test_training_mode_keeps_no_cache():
    model = causal_lm().train()
    (prompt,) = prompts([6])
    out = model(prompt[None], labels=prompt[None])
    assert out.cache is None


@pytest.mark.parametrize("loop_shift", [0, 1])
def test_beam_search_reorders_every_loop_slot(loop_shift):
    model = causal_lm(loop_shift=loop_shift).double()
    input_ids, attention_mask = left_pad(prompts([3, 6]))
    settings = dict(attention_mask=attention_mask, max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=PAD)
    with torch.no_grad():
        cached = model.generate(input_ids, num_loops=4, use_cache=True, **settings)
        uncached = model.generate(input_ids, num_loops=4, use_cache=False, **settings)
    assert torch.equal(cached, uncached)


def test_loop_settings_come_from_the_generation_config_and_an_explicit_argument_wins(tmp_path):
    from transformers import GenerationConfig

    model = causal_lm()
    prompt = prompts([5])[0][None]
    settings = dict(max_new_tokens=12, do_sample=False, pad_token_id=PAD)
    steps: list[int] = []
    model.register_forward_hook(lambda module, args, output: steps.append(int(output.loop_stats.steps.max())))

    def run(**kwargs):
        steps.clear()
        tokens = model.generate(prompt, **settings, **kwargs)
        return tokens, set(steps)

    one_loop, one_steps = run(num_loops=1)
    default, default_steps = run()
    assert (one_steps, default_steps) == ({1}, {4}) and not torch.equal(one_loop, default)
    passed, passed_steps = run(generation_config=GenerationConfig(num_loops=1, **settings))
    assert passed_steps == {1} and torch.equal(passed, one_loop)
    model.generation_config.num_loops = 1
    from_model, from_model_steps = run()
    assert from_model_steps == {1} and torch.equal(from_model, one_loop)
    assert run(num_loops=4)[1] == {4}  # the explicit argument wins over the model's generation config
    model.generation_config.tol, model.generation_config.num_loops = 1e9, 16
    assert run()[1] == {1}  # tol from the generation config halts every row at its first iteration
    model.generation_config.tol = None
    model.save_pretrained(tmp_path)
    assert ImplicitForCausalLM.from_pretrained(tmp_path).generation_config.num_loops == 16
    with pytest.raises(ValueError, match="num_loops must be an integer >= 1"):
        model.generate(prompt, generation_config=GenerationConfig(num_loops=0, **settings))
