"""Trajectories per input through every path a transformers user knows: config fields (inference defaults of the
heads), ``from_pretrained`` keywords, ``generate`` and `GenerationConfig`, a checkpoint's generation_config.json and
lm-eval's ``--model_args`` (issue 28)."""

import json
from functools import partial
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_causal_lm, tiny_model_of
from transformers import GenerationConfig

from implicit_hf import ImplicitConfig, ImplicitForCausalLM, ImplicitForTokenClassification
from implicit_hf.modeling.configuration_implicit import TRAJECTORY_DEFAULTS

PAD = 0
# Large weights so that greedy outputs vary from token to token, and trajectories from noisy starts differ.
causal_lm = partial(tiny_causal_lm, num_loops=4, pad_token_id=PAD, initializer_range=0.2)
WIDTH = {"num_trajectories": 4, "trajectory_noise": 0.5, "select": "vote", "trajectory_seed": 3}
GREEDY = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": PAD}
PROMPT = torch.tensor([[5, 7, 9, 11, 13]])
OLD_CHECKPOINTS = Path(__file__).parent / "fixtures"


def test_the_config_fields_default_to_one_trajectory_and_old_configs_load_with_the_defaults():
    config = ImplicitConfig()
    assert {name: getattr(config, name) for name in TRAJECTORY_DEFAULTS} == TRAJECTORY_DEFAULTS
    assert TRAJECTORY_DEFAULTS == {
        "num_trajectories": 1,
        "trajectory_noise": 0.0,
        "select": "residual",
        "trajectory_seed": 0,
        "trajectory_batch_size": None,
    }
    old = sorted(OLD_CHECKPOINTS.glob("checkpoint_*/*/config.json"))
    assert old
    for path in old:
        assert "num_trajectories" not in json.loads(path.read_text())
        loaded = ImplicitConfig.from_pretrained(path.parent)
        assert {name: getattr(loaded, name) for name in TRAJECTORY_DEFAULTS} == TRAJECTORY_DEFAULTS


def test_the_config_fields_are_the_heads_defaults_at_inference_and_an_argument_wins():
    model, configured = causal_lm(), causal_lm(**WIDTH)
    with torch.no_grad():
        explicit = model(PROMPT, **WIDTH)
        by_config = configured(PROMPT)
        assert torch.equal(by_config.logits, explicit.logits)
        assert by_config.loop_stats.trajectories.num_trajectories == 4
        assert by_config.loop_stats.trajectories.select == "vote"
        plain = configured(PROMPT, num_trajectories=1)
        assert plain.loop_stats.trajectories is None
        assert torch.equal(plain.logits, model(PROMPT).logits)
        assert configured(PROMPT, select="residual").loop_stats.trajectories.select == "residual"


def test_the_config_fields_are_not_used_in_training_mode_unless_given():
    configured = causal_lm(**WIDTH).train()
    assert configured(PROMPT).loop_stats.trajectories is None
    assert configured(PROMPT, num_trajectories=2).loop_stats.trajectories.num_trajectories == 2


def test_a_token_classifier_and_a_regressor_take_their_config_fields_too():
    common = {"num_labels": 3, "is_causal": False, "num_loops": 3, "initializer_range": 0.2}
    for select, overrides in (("vote", {}), ("mean", {"problem_type": "regression"})):
        width = {**WIDTH, "select": select}
        model = tiny_model_of(ImplicitForTokenClassification, **common, **overrides)
        configured = tiny_model_of(ImplicitForTokenClassification, **common, **overrides, **width)
        with torch.no_grad():
            by_config = configured(PROMPT)
            assert torch.equal(by_config.logits, model(PROMPT, **width).logits)
        assert by_config.loop_stats.trajectories.select == select


def test_several_trajectories_by_config_keep_no_cache_by_default_and_refuse_one_asked_for():
    configured = causal_lm(num_trajectories=2)
    assert configured(PROMPT).cache is None
    assert causal_lm()(PROMPT).cache is not None
    with pytest.raises(ValueError, match="num_trajectories > 1 .* cannot use a KV cache: call with use_cache=False"):
        configured(PROMPT, use_cache=True)


def test_from_pretrained_keywords_set_the_fields_and_save_and_load_round_trip_them(tmp_path):
    model = causal_lm()
    model.save_pretrained(tmp_path / "plain")
    loaded = ImplicitForCausalLM.from_pretrained(tmp_path / "plain", num_trajectories=4, trajectory_noise=0.1)
    assert (loaded.config.num_trajectories, loaded.config.trajectory_noise) == (4, 0.1)
    with torch.no_grad():
        expected = model(PROMPT, num_trajectories=4, trajectory_noise=0.1).logits
        assert torch.equal(loaded(PROMPT).logits, expected)
    loaded.config.select, loaded.config.trajectory_batch_size = "vote", 8
    loaded.save_pretrained(tmp_path / "wide")
    saved = json.loads((tmp_path / "wide" / "config.json").read_text())
    assert {name: saved[name] for name in ("num_trajectories", "trajectory_noise", "select")} == {
        "num_trajectories": 4,
        "trajectory_noise": 0.1,
        "select": "vote",
    }
    again = ImplicitForCausalLM.from_pretrained(tmp_path / "wide")
    assert {name: getattr(again.config, name) for name in TRAJECTORY_DEFAULTS} == {
        "num_trajectories": 4,
        "trajectory_noise": 0.1,
        "select": "vote",
        "trajectory_seed": 0,
        "trajectory_batch_size": 8,
    }


def manual_greedy(model, prompt: torch.Tensor, steps: int, **settings) -> torch.Tensor:
    """Greedy decoding by hand: one uncached forward over the whole sequence per token, argmax of the last position."""
    tokens = prompt
    with torch.no_grad():
        for _ in range(steps):
            logits = model(tokens, attention_mask=torch.ones_like(tokens), use_cache=False, **settings).logits
            tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens


@pytest.mark.parametrize("select", ["residual", "vote"])
def test_greedy_generate_with_several_trajectories_equals_a_loop_of_forward_calls(select):
    model, width = causal_lm(), {**WIDTH, "select": select}
    generated = model.generate(PROMPT, use_cache=False, **GREEDY, **width)
    assert torch.equal(generated, manual_greedy(model, PROMPT, GREEDY["max_new_tokens"], **width))
    scored = dict(use_cache=False, output_logits=True, return_dict_in_generate=True, **GREEDY)
    one, wide = model.generate(PROMPT, **scored), model.generate(PROMPT, **scored, **width)
    assert not torch.allclose(one.logits[0], wide.logits[0])  # the trajectories took effect
    configured = causal_lm(**width)  # the same through the model's config
    assert torch.equal(configured.generate(PROMPT, use_cache=False, **GREEDY), generated)


def trajectories_per_step(model) -> list:
    """The trajectory count of each forward pass ``model`` runs from now on (1 when it reduced none)."""
    seen = []

    def record(module, args, output):
        choice = output.loop_stats.trajectories
        seen.append(1 if choice is None else choice.num_trajectories)

    model.register_forward_hook(record)
    return seen


def test_the_trajectory_settings_of_generate_come_in_the_order_of_the_loop_settings():
    model = causal_lm(num_trajectories=2)
    seen = trajectories_per_step(model)

    def run(**kwargs) -> set[int]:
        seen.clear()
        model.generate(PROMPT, **kwargs)
        return set(seen)

    uncached = {**GREEDY, "use_cache": False}
    assert run(**uncached) == {2}  # the model's config
    model.generation_config.num_trajectories = 3
    assert run(**uncached) == {3}  # the model's generation config wins over its config
    assert run(generation_config=GenerationConfig(num_trajectories=4, **uncached)) == {4}  # a given one over both
    assert run(generation_config=GenerationConfig(num_trajectories=4, **uncached), num_trajectories=1) == {1}
    settings = GenerationConfig(num_trajectories=4, trajectory_noise=0.5, select="vote", trajectory_seed=3, **uncached)
    assert torch.equal(model.generate(PROMPT, generation_config=settings), model.generate(PROMPT, **uncached, **WIDTH))


@pytest.mark.parametrize(
    ("source", "kwargs", "model_settings"),
    [
        ("argument", {"num_trajectories": 2}, {}),
        ("a given GenerationConfig", {"generation_config": GenerationConfig(num_trajectories=2, **GREEDY)}, {}),
        ("the model's generation config", {}, {"generation_config.num_trajectories": 2}),
        ("the model's config", {}, {"num_trajectories": 2}),
        ("an explicit use_cache", {"num_trajectories": 2, "use_cache": True}, {}),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_generate_with_several_trajectories_and_a_kv_cache_is_refused_before_any_forward(
    source, kwargs, model_settings
):
    model = causal_lm(**{key: value for key, value in model_settings.items() if "." not in key})
    if "generation_config.num_trajectories" in model_settings:
        model.generation_config.num_trajectories = 2
    seen = trajectories_per_step(model)
    settings = {} if "generation_config" in kwargs else GREEDY
    with pytest.raises(
        ValueError, match=r"num_trajectories > 1 .* KV cache: call with use_cache=False \(this generate"
    ):
        model.generate(PROMPT, **settings, **kwargs)
    assert seen == []  # refused before the first forward pass


def test_a_generation_config_json_sets_the_trajectories_and_a_from_pretrained_keyword_wins(tmp_path):
    model = causal_lm()
    model.generation_config.num_trajectories, model.generation_config.select = 2, "vote"
    model.generation_config.use_cache = False
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    assert (saved["num_trajectories"], saved["select"]) == (2, "vote")

    loaded = ImplicitForCausalLM.from_pretrained(tmp_path)
    assert (loaded.generation_config.num_trajectories, loaded.generation_config.select) == (2, "vote")
    assert loaded.config.num_trajectories == 1  # forward alone runs one trajectory; generate runs the file's
    seen = trajectories_per_step(loaded)
    generated = loaded.generate(PROMPT, **GREEDY)
    assert set(seen) == {2}
    assert torch.equal(generated, model.generate(PROMPT, **GREEDY))

    keyword = ImplicitForCausalLM.from_pretrained(tmp_path, num_trajectories=3)
    assert not hasattr(keyword.generation_config, "num_trajectories")  # the keyword wins over the file
    assert keyword.generation_config.select == "vote"
    seen = trajectories_per_step(keyword)
    keyword.generate(PROMPT, **GREEDY)
    assert set(seen) == {3}


# ------------------------------------------------------------------------------------------------------------- lm-eval


@pytest.fixture(scope="module")
def lm_eval_checkpoint(tmp_path_factory, tiny_checkpoint):
    pytest.importorskip("lm_eval", reason="lm_eval (lm-evaluation-harness) is not installed")
    from test_convert import character_tokenizer

    path = tmp_path_factory.mktemp("lm_eval_trajectories") / "ckpt"
    tiny_checkpoint(path, character_tokenizer(), initializer_range=0.2, num_loops=3)
    return path


REQUESTS = [("3+4=", " 7"), ("12+30=", " 42"), ("9+9=", " 18"), ("1+1=", " 2")]


def direct_loglikelihoods(model_dir: Path, **settings) -> list[float]:
    """log p(continuation | context) of each of `REQUESTS` from one forward of the model itself per request, on what
    lm-eval feeds it: the context and the continuation without its last token (the noise is drawn per shape)."""
    from test_convert import character_tokenizer

    model = ImplicitForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = character_tokenizer()
    values = []
    for context, continuation in REQUESTS:
        context_ids, continuation_ids = tokenizer(context).input_ids, tokenizer(continuation).input_ids
        with torch.no_grad():
            logits = model(torch.tensor([context_ids + continuation_ids[:-1]]), **settings).logits
        logprobs = logits.log_softmax(-1)[0]
        values.append(sum(float(logprobs[len(context_ids) + i - 1, token]) for i, token in enumerate(continuation_ids)))
    return values


def hflm_loglikelihoods(model_args: str, batch_size: int) -> list[float]:
    """The log-likelihoods of `REQUESTS` from lm-eval's ``hf`` model built from ``--model_args``."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM.create_from_arg_string(model_args, {"batch_size": batch_size, "device": "cpu"})
    requests = [
        Instance("loglikelihood", {}, (context, continuation), index)
        for index, (context, continuation) in enumerate(REQUESTS)
    ]
    return [value for value, _ in lm.loglikelihood(requests, disable_tqdm=True)]


def test_lm_eval_model_args_run_loglikelihood_requests_with_several_trajectories(lm_eval_checkpoint):
    settings = {"num_trajectories": 4, "trajectory_noise": 0.1, "select": "residual"}
    model_args = f"pretrained={lm_eval_checkpoint}," + ",".join(f"{key}={value}" for key, value in settings.items())
    scored = hflm_loglikelihoods(model_args, batch_size=1)
    assert scored == pytest.approx(direct_loglikelihoods(lm_eval_checkpoint, **settings), abs=1e-4)
    one = direct_loglikelihoods(lm_eval_checkpoint)
    assert scored != pytest.approx(one, abs=1e-3)  # the trajectories took effect


def test_lm_eval_scores_with_noisy_trajectories_do_not_depend_on_the_batch(lm_eval_checkpoint):
    model_args = f"pretrained={lm_eval_checkpoint},num_trajectories=4,trajectory_noise=0.1"
    assert hflm_loglikelihoods(model_args, batch_size=4) == pytest.approx(
        hflm_loglikelihoods(model_args, batch_size=1), abs=1e-4
    )
