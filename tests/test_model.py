"""The model core: Auto classes, save/load, remote code, config validation, loop semantics, heads."""

import subprocess
import sys
import textwrap
from functools import partial

import pytest
import tiny_models
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForTokenClassification

import implicit_hf
from implicit_hf import (
    ImplicitConfig,
    ImplicitForCausalLM,
    ImplicitForTokenClassification,
    ImplicitForTokenRegression,
    ImplicitModel,
)

# The model tests' sizes: two core layers, six loops, a 97-token vocabulary.
MODEL_SIZES = dict(vocab_size=97, num_core_layers=2, num_loops=6)
tiny_config = partial(tiny_models.tiny_config, **MODEL_SIZES)
build = partial(tiny_models.tiny_model_of, **MODEL_SIZES)  # build(model_class, seed=0, **overrides)


def tokens(batch=3, length=12, vocab=97, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_issue_example_runs_through_auto_classes():
    config = ImplicitConfig(
        vocab_size=512,
        hidden_size=128,
        num_attention_heads=4,
        num_prelude_layers=1,
        num_core_layers=2,
        num_coda_layers=1,
        solver="anderson",
        tol=1e-4,
        gradient="jfb",
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    assert isinstance(model, ImplicitForCausalLM)
    input_ids = tokens(batch=2, length=10, vocab=512)
    with torch.no_grad():
        out = model(input_ids, num_loops=32)
    assert out.logits.shape == (2, 10, 512)
    stats = out.loop_stats
    assert stats.steps.shape == (2,)
    assert stats.rel_residual.shape[1] == 2 and stats.rel_residual.shape[0] == int(stats.steps.max())
    assert bool((stats.steps <= 32).all()) and bool((stats.steps >= 1).all())
    # Converged samples stopped before the budget, and what they report is below tol.
    assert bool(stats.converged.all())
    assert bool((stats.final_rel_residual < 1e-4).all())
    assert bool((stats.steps < 32).all())


@pytest.mark.parametrize(
    ("auto_class", "expected"),
    [
        (AutoModel, ImplicitModel),
        (AutoModelForCausalLM, ImplicitForCausalLM),
        (AutoModelForTokenClassification, ImplicitForTokenClassification),
    ],
)
def test_auto_classes_resolve(auto_class, expected):
    assert type(auto_class.from_config(tiny_config())) is expected
    assert AutoConfig.for_model("implicit").__class__ is ImplicitConfig


@pytest.mark.parametrize(
    ("model_class", "overrides"),
    [
        (ImplicitForCausalLM, {}),
        (ImplicitForCausalLM, {"injection": "linear", "state_init": "prelude", "solver": "anderson", "tol": 1e-3}),
        (ImplicitForTokenClassification, {"num_labels": 5, "is_causal": False}),
        (ImplicitForTokenRegression, {"num_labels": 3, "is_causal": False, "solver": "broyden"}),
    ],
)
def test_save_load_round_trip_is_bit_exact(tmp_path, model_class, overrides):
    model = build(model_class, **overrides)
    model.save_pretrained(tmp_path)
    auto = AutoModelForCausalLM if model_class is ImplicitForCausalLM else AutoModelForTokenClassification
    loaded = auto.from_pretrained(tmp_path).eval()
    original_state, loaded_state = model.state_dict(), loaded.state_dict()
    assert original_state.keys() == loaded_state.keys()
    for name, tensor in original_state.items():
        assert torch.equal(tensor, loaded_state[name]), name
    for field in ("injection", "state_init", "solver", "tol", "num_loops", "is_causal", "problem_type"):
        assert getattr(loaded.config, field) == getattr(model.config, field)
    input_ids = tokens()
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, loaded(input_ids).logits)


def test_checkpoint_carries_auto_map_and_code(tmp_path):
    build(ImplicitForCausalLM).save_pretrained(tmp_path)
    saved = {p.name for p in tmp_path.iterdir()}
    assert {"configuration_implicit.py", "modeling_implicit.py", "solvers.py", "gradients.py"} <= saved
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.auto_map["AutoModelForCausalLM"] == "modeling_implicit.ImplicitForCausalLM"
    assert config.auto_map["AutoConfig"] == "configuration_implicit.ImplicitConfig"


REMOTE_CODE_CHECK = textwrap.dedent(
    """
    import sys

    class BlockImplicitHF:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "implicit_hf":
                raise ImportError("implicit_hf is blocked in this process")

    sys.meta_path.insert(0, BlockImplicitHF())
    try:
        import implicit_hf  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("implicit_hf should not be importable here")

    import torch
    from transformers import AutoModelForCausalLM

    checkpoint, expected = sys.argv[1], sys.argv[2]
    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    input_ids = torch.arange(12).reshape(2, 6) % 97
    with torch.no_grad():
        logits = model(input_ids, num_loops=5).logits
    assert torch.equal(logits, torch.load(expected)), "remote-code logits differ"
    print("REMOTE_CODE_OK")
    """
)


def test_trust_remote_code_loads_where_package_is_absent(tmp_path):
    model = build(ImplicitForCausalLM, solver="anderson")
    checkpoint = tmp_path / "ckpt"
    model.save_pretrained(checkpoint)
    with torch.no_grad():
        expected = model(torch.arange(12).reshape(2, 6) % 97, num_loops=5).logits
    torch.save(expected, tmp_path / "expected.pt")
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_CODE_CHECK, str(checkpoint), str(tmp_path / "expected.pt")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    assert "REMOTE_CODE_OK" in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("solver", "newton", "solver must be one of 'picard', 'anderson', 'broyden'"),
        ("gradient", "backprop", "gradient must be one of"),
        ("injection", "concat", "injection must be one of 'add', 'linear'"),
        ("state_init", "ones", "state_init must be one of 'zeros', 'prelude', 'normal'"),
        ("tol", -1.0, "tol must be None or a number > 0"),
        ("damping", 0.0, "damping must be a number in (0, 1]"),
        ("num_core_layers", 0, "num_core_layers must be an integer >= 1"),
        ("num_loops", 2.5, "num_loops must be an integer >= 1"),
        ("anderson_memory", 0, "anderson_memory must be an integer >= 1"),
        ("phantom_tau", 2, "phantom_tau must be a number in (0, 1]"),
        ("is_causal", "yes", "is_causal must be True or False"),
        ("num_key_value_heads", 3, "num_attention_heads (4) must be a multiple of num_key_value_heads (3)"),
    ],
)
def test_config_rejects_invalid_values(field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        tiny_config(**{field: value})


def test_loop_settings_are_checked_wherever_they_are_set(tmp_path):
    config = tiny_config()
    for field, value, message in (
        ("num_loops", 0, "num_loops must be an integer >= 1; got 0"),
        ("solver", "newton", "solver must be one of"),
        ("tol", 0.0, "tol must be None or a number > 0"),
    ):
        before = getattr(config, field)
        with pytest.raises(ValueError, match=message):
            setattr(config, field, value)  # e.g. model.config.num_loops = 0 after loading
        assert getattr(config, field) == before
    build(ImplicitForCausalLM).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="num_loops must be an integer >= 1; got 0"):
        ImplicitForCausalLM.from_pretrained(tmp_path, num_loops=0)  # what lm-eval's num_loops=K does
    with pytest.raises(ValueError, match="gradient_steps must be an integer >= 1"):
        AutoConfig.from_pretrained(tmp_path, gradient_steps=-2)


def test_numpy_integers_are_loop_counts(tmp_path):
    import json

    import numpy as np

    config = tiny_config(num_loops=np.int64(3), num_loops_train=np.int32(2))
    assert type(config.num_loops) is int and type(config.num_loops_train) is int
    model = build(ImplicitForCausalLM, num_loops=np.int64(3)).eval()
    with torch.no_grad():
        expected = model(tokens(), num_loops=2).logits
        got = model(tokens(), num_loops=np.int64(2), return_trajectory=[np.int64(1), np.int16(2)])
    torch.testing.assert_close(got.logits, expected)
    assert len(got.trajectory) == 2
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["num_loops"] == 3
    assert ImplicitForCausalLM.from_pretrained(tmp_path, num_loops=np.int64(5)).config.num_loops == 5


def test_config_refuses_misspelt_loop_field_but_keeps_unrelated_extras():
    with pytest.raises(ValueError, match="did you mean 'num_loops'"):
        tiny_config(num_loop=3)
    assert tiny_config(my_project_tag="x").my_project_tag == "x"


def test_forward_rejects_bad_overrides():
    model = build(ImplicitForCausalLM)
    with pytest.raises(ValueError, match="num_loops must be an integer >= 1"):
        model(tokens(), num_loops=0)
    with pytest.raises(ValueError, match="solver must be one of"):
        model(tokens(), solver="newton")
    with pytest.raises(ValueError, match="exactly one of input_ids, inputs_embeds or input_features"):
        model()
    with pytest.raises(ValueError, match="input_features needs a model built with config.input_features > 0"):
        build(ImplicitForTokenRegression, num_labels=1)(input_features=torch.randn(1, 4, 3))


def test_loop_count_is_honoured_without_tolerance():
    model = build(ImplicitForCausalLM)
    input_ids = tokens()
    with torch.no_grad():
        outputs = {k: model(input_ids, num_loops=k) for k in (1, 2, 3)}
    for k, out in outputs.items():
        assert out.loop_stats.steps.tolist() == [k] * 3
        assert out.loop_stats.rel_residual.shape == (k, 3)
    assert not torch.equal(outputs[1].logits, outputs[2].logits)
    assert not torch.equal(outputs[2].logits, outputs[3].logits)


def test_outputs_change_until_convergence_and_agree_after():
    model = build(ImplicitForCausalLM, tol=1e-4)
    input_ids = tokens()
    with torch.no_grad():
        runs = [model(input_ids, num_loops=k) for k in range(1, 31)]
    converged_at = int(runs[-1].loop_stats.steps.max())
    assert bool(runs[-1].loop_stats.converged.all())
    assert 1 < converged_at < 30
    for k in range(1, converged_at):  # runs[k - 1] used k loops
        assert not torch.equal(runs[k - 1].logits, runs[k].logits), f"loops {k} and {k + 1} should differ"
    for k in range(converged_at, 30):
        assert torch.equal(runs[k - 1].logits, runs[k].logits), f"loops {k} and {k + 1} should agree"


def test_trajectory_scores_every_loop_count_from_one_run():
    model = build(ImplicitForCausalLM)
    input_ids = tokens()
    with torch.no_grad():
        full = model(input_ids, num_loops=5, return_trajectory=True)
        assert len(full.trajectory) == 5
        for k in (1, 3, 5):
            assert torch.allclose(full.trajectory[k - 1], model(input_ids, num_loops=k).logits, atol=1e-6)


def test_per_sample_halting_matches_single_sample_runs():
    model = build(ImplicitForCausalLM, tol=1e-3, solver="anderson")
    input_ids = tokens(batch=4)
    with torch.no_grad():
        batched = model(input_ids, num_loops=40)
        for row in range(4):
            single = model(input_ids[row : row + 1], num_loops=40)
            assert single.loop_stats.steps.item() == batched.loop_stats.steps[row].item()
            assert torch.allclose(single.logits[0], batched.logits[row], atol=1e-5)


def test_training_mode_uses_training_loop_count():
    model = build(ImplicitForCausalLM, num_loops=7, num_loops_train=3).train()
    assert model(tokens(), labels=tokens()).loop_stats.steps.tolist() == [3, 3, 3]
    model.eval()
    with torch.no_grad():
        assert model(tokens()).loop_stats.steps.tolist() == [7, 7, 7]


def test_attention_mask_hides_padding():
    """A sample's outputs at real positions do not depend on what stands at masked positions."""
    for causal in (True, False):
        model = build(ImplicitForTokenClassification, num_labels=4, is_causal=causal)
        input_ids = tokens(batch=1, length=10)
        mask = torch.ones_like(input_ids)
        mask[:, -3:] = 0
        other = input_ids.clone()
        other[:, -3:] = (other[:, -3:] + 1) % 97
        with torch.no_grad():
            a = model(input_ids, attention_mask=mask).logits[:, :7]
            b = model(other, attention_mask=mask).logits[:, :7]
        assert torch.allclose(a, b, atol=1e-5)


def test_bidirectional_attention_sees_the_future_and_causal_does_not():
    input_ids = tokens(batch=1, length=8)
    changed = input_ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 97
    for causal, should_change in ((True, False), (False, True)):
        model = build(ImplicitForTokenClassification, num_labels=4, is_causal=causal)
        with torch.no_grad():
            first = model(input_ids).logits[0, 0]
            second = model(changed).logits[0, 0]
        assert (not torch.allclose(first, second, atol=1e-6)) == should_change


def test_heads_losses_and_inputs_embeds():
    classifier = build(ImplicitForTokenClassification, num_labels=5, is_causal=False)
    labels = torch.randint(0, 5, (3, 12))
    labels[0, :4] = -100
    out = classifier(tokens(), labels=labels)
    assert out.logits.shape == (3, 12, 5) and out.loss.ndim == 0 and torch.isfinite(out.loss)

    regressor = build(ImplicitForTokenRegression, num_labels=2, is_causal=False)
    assert regressor.config.problem_type == "regression"
    embeds = torch.randn(3, 12, 32)
    targets = torch.randn(3, 12, 2)
    out = regressor(inputs_embeds=embeds, labels=targets)
    assert out.logits.shape == (3, 12, 2)
    expected = torch.nn.functional.mse_loss(out.logits, targets)
    assert torch.allclose(out.loss, expected)
    partial = targets.clone()
    partial[:, :5] = float("nan")
    out = regressor(inputs_embeds=embeds, labels=partial)
    assert torch.allclose(out.loss, torch.nn.functional.mse_loss(out.logits[:, 5:], targets[:, 5:]))
    with pytest.raises(ValueError, match="regression labels must have shape"):
        regressor(inputs_embeds=embeds, labels=targets[..., :1])


def test_generate_passes_loop_count_through():
    model = build(ImplicitForCausalLM)
    prompt = tokens(batch=1, length=5)
    seen = []
    hook = model.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(kwargs.get("num_loops")), with_kwargs=True
    )
    generated = model.generate(prompt, max_new_tokens=4, num_loops=3, do_sample=False)
    assert generated.shape == (1, 9)
    assert seen and all(k == 3 for k in seen)
    hook.remove()
    # Greedy generation equals the argmax of an explicit forward at the same loop count.
    with torch.no_grad():
        next_token = model(generated[:, :-1], num_loops=3).logits[0, -1].argmax()
    assert next_token.item() == generated[0, -1].item()


def test_solver_divergence_is_reported_not_hidden():
    # A linear injection scaled by 3 makes the map expand: z_{k+1} ~ 3 z_k, the state grows without bound.
    model = build(ImplicitForCausalLM, core_norm=False, injection_norm=False, injection="linear")
    with torch.no_grad():
        model.model.injection.weight.mul_(3.0)
        out = model(tokens(), num_loops=200, tol=1e-4)
    stats = out.loop_stats
    assert bool(stats.diverged.all()) and not bool(stats.converged.any())
    assert int(stats.steps.max()) < 200  # diverged samples stop ...
    assert bool(torch.isfinite(out.logits).all())  # ... on their last finite state


def test_a_solve_that_stalls_is_reported_as_not_converged():
    # Residual layers without the core norm do not contract: the relative residual stalls near 5e-3.
    model = build(ImplicitForCausalLM, core_norm=False, injection_norm=False)
    with torch.no_grad():
        out = model(tokens(), num_loops=50, tol=1e-4)
    stats = out.loop_stats
    assert not bool(stats.converged.any()) and not bool(stats.diverged.any())
    assert stats.steps.tolist() == [50] * 3
    assert float(stats.final_rel_residual.min()) > 1e-4


def test_version_and_public_api():
    assert implicit_hf.__version__
    for name in implicit_hf.__all__:
        assert hasattr(implicit_hf, name), name


def test_continuous_inputs_and_edge_bias():
    """input_features are embedded linearly; edge_features bias attention per head and are trained."""
    torch.manual_seed(0)
    model = build(ImplicitForTokenRegression, num_labels=1, is_causal=False, input_features=5, edge_features=2)
    features = torch.randn(2, 7, 5)
    edges = torch.randn(2, 7, 7, 2)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, -2:] = 0
    with torch.no_grad():
        plain = model(input_features=features, attention_mask=mask).logits
        biased = model(input_features=features, edge_features=edges, attention_mask=mask).logits
        padded_changed = features.clone()
        padded_changed[1, -2:] += 1.0
        biased_again = model(input_features=padded_changed, edge_features=edges, attention_mask=mask).logits
    assert plain.shape == (2, 7, 1)
    assert not torch.allclose(plain, biased)  # the bias changes attention
    assert torch.allclose(biased[1, :5], biased_again[1, :5], atol=1e-5)  # padding stays masked under the bias
    model.train()
    out = model(input_features=features, edge_features=edges, attention_mask=mask, labels=torch.randn(2, 7, 1))
    out.loss.backward()
    assert model.model.edge_bias.weight.grad.abs().sum() > 0
    assert model.model.feature_embed.weight.grad.abs().sum() > 0


def test_causal_mask_survives_an_edge_bias():
    model = build(ImplicitForTokenClassification, num_labels=3, is_causal=True, input_features=4, edge_features=1)
    features = torch.randn(1, 6, 4)
    edges = torch.randn(1, 6, 6, 1)
    changed = features.clone()
    changed[0, -1] += 1.0
    with torch.no_grad():
        first = model(input_features=features, edge_features=edges).logits[0, :5]
        second = model(input_features=changed, edge_features=edges).logits[0, :5]
    assert torch.allclose(first, second, atol=1e-6)


def test_trajectory_of_selected_loop_counts_decodes_only_those():
    model = build(ImplicitForCausalLM)
    input_ids = tokens()
    with torch.no_grad():
        every = model(input_ids, num_loops=8, return_trajectory=True).trajectory
        selected = model(input_ids, num_loops=8, return_trajectory=[8, 1, 4]).trajectory
    assert len(selected) == 3
    for position, t in enumerate([8, 1, 4]):
        assert torch.equal(selected[position], every[t - 1])
    with pytest.raises(ValueError, match="return_trajectory must be"):
        model(input_ids, num_loops=2, return_trajectory=[0])


def test_model_cards_have_metadata_provenance_and_a_usage_block_that_runs(tmp_path, monkeypatch):
    from test_convert import character_tokenizer

    from implicit_hf.modeling.model_card import write_model_card

    model = build(ImplicitForCausalLM, num_loops=5, solver="anderson", vocab_size=len(character_tokenizer()))
    model.save_pretrained(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / "README.md").exists()  # cards come from convert / train / eval, as in Trainer
    character_tokenizer().save_pretrained(tmp_path / "ckpt")
    write_model_card(tmp_path / "ckpt", training={"task": "toy", "steps": 10, "train_loss": 1.25})
    card = (tmp_path / "ckpt" / "README.md").read_text()
    metadata = card.split("---")[1]
    assert card.startswith("---\nlibrary_name: transformers")  # metadata block first, as the hub reads it
    assert "pipeline_tag: text-generation" in metadata and "license: apache-2.0" in metadata
    assert "base_model" not in metadata  # trained, not converted
    assert "| layers (prelude / core / coda) | 1 / 2 / 1 |" in card
    assert "| solver | anderson |" in card and "num_loops=5" in card
    assert f"| parameters | {model.num_parameters():,} |" in card
    assert "| steps | 10 |" in card and "| train loss | 1.25 |" in card
    assert str(tmp_path) not in card
    usage = card.split("```python\n")[1].split("```")[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(usage, "card", "exec"), {})  # the usage block runs from the folder's parent
    sweep = {"task": "toy", "quality_metric": "accuracy", "records": [{"loops": 4, "quality": 0.75}]}
    write_model_card(tmp_path / "ckpt", sweep=sweep)
    card = (tmp_path / "ckpt" / "README.md").read_text()
    assert "## Loop sweep (toy)" in card and "| 4 | 0.75 |" in card and "| steps | 10 |" in card  # both kept
    (tmp_path / "ckpt" / "README.md").write_text("# my own card\n")
    write_model_card(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "README.md").read_text() == "# my own card\n"


def test_a_converted_models_card_names_its_base_model_without_a_local_path(tmp_path, tiny_source):
    from test_convert import character_tokenizer

    from implicit_hf.modeling.convert import convert_checkpoint

    source = tiny_source("llama", vocab_size=len(character_tokenizer()))
    source.save_pretrained(tmp_path / "my-source")
    character_tokenizer().save_pretrained(tmp_path / "my-source")
    convert_checkpoint(tmp_path / "my-source", tmp_path / "converted", [0], [1, 2], [4])
    card = (tmp_path / "converted" / "README.md").read_text()
    assert "base_model: my-source" in card and "license: other" in card
    assert "Converted from `my-source`" in card and str(tmp_path) not in card


def test_hidden_states_attentions_and_tuples_as_in_transformers(tiny_causal_lm):
    model = tiny_causal_lm(num_core_layers=2, num_loops=3)
    input_ids = torch.randint(0, 61, (2, 5))
    out = model(input_ids, output_hidden_states=True, use_cache=False)
    embeddings, prelude, *states, last = out.hidden_states
    assert len(states) == 3  # one per iteration
    torch.testing.assert_close(embeddings, model.model.embed_tokens(input_ids))
    torch.testing.assert_close(last, model.model(input_ids, use_cache=False).last_hidden_state)
    torch.testing.assert_close(model.lm_head(last), out.logits)
    assert not torch.allclose(states[0], states[-1])
    assert isinstance(model(input_ids, return_dict=False, use_cache=False), tuple)
    torch.testing.assert_close(model(input_ids, return_dict=False, use_cache=False)[0], out.logits)
    with pytest.raises(ValueError, match="output_attentions=True needs eager attention"):
        model(input_ids, output_attentions=True, use_cache=False)
    model.config._attn_implementation = "eager"
    attentions = model(input_ids, output_attentions=True, use_cache=False).attentions
    assert len(attentions) == 1 + 2 * 3 + 1  # prelude, core layers at every loop, coda
    assert attentions[0].shape == (2, 4, 5, 5)
    torch.testing.assert_close(attentions[1].sum(-1), torch.ones(2, 4, 5))  # rows of a softmax
    generated = model.generate(
        input_ids[:, :3],
        max_new_tokens=2,
        do_sample=False,
        pad_token_id=0,
        output_hidden_states=True,
        return_dict_in_generate=True,
    )
    assert len(generated.hidden_states) == 2 and len(generated.hidden_states[0]) == 3 + 3


def test_without_position_encoding_a_bidirectional_model_is_permutation_equivariant(tmp_path):
    """position_encoding="none": attention sees no positions, so permuting the tokens of a bidirectional model
    permutes its outputs (with RoPE it does not); the setting is saved and checked like every field."""
    permutation = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    input_ids = tokens()
    for encoding, equivariant in (("none", True), ("rope", False)):
        model = build(ImplicitModel, position_encoding=encoding, is_causal=False).double()
        with torch.no_grad():
            out = model(input_ids, num_loops=3).last_hidden_state
            permuted = model(input_ids[:, permutation], num_loops=3).last_hidden_state
        assert torch.allclose(permuted, out[:, permutation], atol=1e-10) == equivariant, encoding
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).position_encoding == "rope"
    build(ImplicitModel, position_encoding="none").save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).position_encoding == "none"
    with pytest.raises(ValueError, match="position_encoding must be one of 'rope', 'none'; got 'alibi'"):
        tiny_config(position_encoding="alibi")
