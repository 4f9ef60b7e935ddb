"""PEFT LoRA on implicit models: targeting by layer group, save/load, merge, one adapter per loop."""

from functools import partial

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from test_convert import tokens
from tiny_models import tiny_causal_lm, tiny_source

from implicit_hf.integrations.peft import (
    add_loop_adapters,
    implicit_model_of,
    load_loop_adapters,
    lora_config,
    relaxed_recursion,
    target_modules,
)

# The LoRA tests' model: grouped-query attention and two core layers, so that per-group targeting shows.
tiny_model = partial(tiny_causal_lm, vocab_size=101, num_key_value_heads=2, num_core_layers=2, num_loops=3)


def randomise_adapters(model, seed=1):
    """Non-zero LoRA weights (peft starts B at zero, which would make every check below vacuous)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


def lora_module_names(model) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, LoraLayer)]


@pytest.mark.parametrize("parts", [("core",), ("prelude", "coda"), ("prelude", "core", "coda")])
def test_lora_targets_exactly_the_chosen_layer_groups(parts):
    model = get_peft_model(tiny_model(), lora_config(parts, r=4))
    names = lora_module_names(model)
    expected_layers = {"prelude": 1, "core": 2, "coda": 1}
    assert len(names) == 7 * sum(expected_layers[p] for p in parts)
    assert {name.split(".")[-4] for name in names} == set(parts)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)


def test_bad_lora_settings_are_refused():
    with pytest.raises(ValueError, match="parts must be a non-empty subset"):
        target_modules(("body",))
    with pytest.raises(ValueError, match="modules must be a non-empty subset"):
        target_modules(("core",), ("qkv",))
    with pytest.raises(ValueError, match="r must be an integer"):
        lora_config(r=0)


def test_adapters_save_load_and_merge_give_the_same_outputs(tmp_path):
    model = get_peft_model(tiny_model(), lora_config(("core",), r=4))
    randomise_adapters(model)
    input_ids = tokens()
    with torch.no_grad():
        adapted = model(input_ids, num_loops=4).logits
        base = tiny_model()(input_ids, num_loops=4).logits
    assert not torch.allclose(adapted, base, atol=1e-4)
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path / "adapter").eval()
    merged = loaded.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids, num_loops=4).logits, adapted)
        torch.testing.assert_close(merged(input_ids, num_loops=4).logits, adapted, atol=1e-5, rtol=1e-5)
    assert not lora_module_names(merged)


def test_loop_k_applies_adapter_k():
    model = add_loop_adapters(tiny_model(), num_loops=3, r=4)
    randomise_adapters(model)
    input_ids = tokens()
    with torch.no_grad():
        before = {k: model(input_ids, num_loops=k).logits for k in (1, 2, 3, 4)}
        for name, parameter in model.named_parameters():  # change only loop 2's adapter
            if "lora_B.loop_2" in name:
                parameter.mul_(3.0)
        after = {k: model(input_ids, num_loops=k).logits for k in (1, 2, 3, 4)}
    torch.testing.assert_close(after[1], before[1], rtol=0, atol=0)
    torch.testing.assert_close(after[2], before[2], rtol=0, atol=0)
    assert not torch.allclose(after[3], before[3])  # the third iteration used loop_2
    assert not torch.allclose(after[4], before[4])  # iterations past the last adapter reuse it
    trainable = {name.split(".")[-2] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"loop_0", "loop_1", "loop_2"}  # every loop's adapter trains


def test_every_loop_adapter_receives_gradients():
    model = add_loop_adapters(tiny_model(gradient="unroll"), num_loops=3, r=4).train()
    randomise_adapters(model)
    input_ids = tokens()
    model(input_ids, labels=input_ids, num_loops=3).loss.backward()
    for k in range(3):
        grads = [p.grad for name, p in model.named_parameters() if f"lora_A.loop_{k}" in name]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), k


def test_loop_adapters_save_and_load(tmp_path):
    model = add_loop_adapters(tiny_model(), num_loops=3, r=4)
    randomise_adapters(model)
    input_ids = tokens()
    with torch.no_grad():
        expected = model(input_ids, num_loops=3).logits
    model.save_pretrained(tmp_path / "loops")
    loaded = load_loop_adapters(tiny_model(), tmp_path / "loops", num_loops=3).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids, num_loops=3).logits, expected, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="no saved loop adapters"):
        load_loop_adapters(tiny_model(), tmp_path / "loops", num_loops=4)


def test_relaxed_recursion_at_full_rank_equals_the_source_stack():
    """Layers 1-2 and 3-4 of a 6-layer Llama become one tied block looped twice, each loop corrected by an
    SVD-initialised adapter: at full rank the implicit model at 2 loops is the source model."""
    source = tiny_source("llama", num_hidden_layers=6)
    model = relaxed_recursion(source, [0], [[1, 2], [3, 4]], [5], r=64)
    input_ids = tokens()
    with torch.no_grad():
        expected = source(input_ids).logits
        torch.testing.assert_close(model(input_ids, num_loops=2).logits, expected, atol=1e-4, rtol=1e-4)
    conversion = implicit_model_of(model).config.conversion
    assert conversion["core_blocks"] == [[1, 2], [3, 4]] and conversion["dropped_layers"] == []


def test_relaxed_recursion_svd_error_falls_with_rank():
    source = tiny_source("llama", num_hidden_layers=6)
    errors = {
        r: implicit_model_of(relaxed_recursion(source, [0], [[1, 2], [3, 4]], [5], r=r)).config.conversion[
            "svd_relative_error"
        ]
        for r in (4, 16, 64)
    }
    assert all(errors[r]["loop_0"] < 1e-6 for r in errors)  # loop 0 is the tied block itself
    assert 1.0 > errors[4]["loop_1"] > errors[16]["loop_1"] > errors[64]["loop_1"]
    assert errors[64]["loop_1"] < 1e-5


def test_the_old_module_path_still_imports_with_a_deprecation_warning():
    import importlib
    import sys

    import implicit_hf.integrations.peft as peft_integration

    sys.modules.pop("implicit_hf.lora", None)
    with pytest.warns(DeprecationWarning, match="implicit_hf.integrations.peft"):
        old = importlib.import_module("implicit_hf.lora")
    assert old.lora_config is peft_integration.lora_config
    assert sorted(old.__all__) == sorted(peft_integration.__all__)
