"""Checkpoints saved by an earlier main load unchanged: same parameter names, same outputs.

`tests/fixtures/checkpoint_652a3be` holds a causal LM and a bidirectional token classifier saved by
main at commit 652a3be (the code before the readability refactor of issue 15), with their logits and
first trajectory entry on fixed input ids. A refactor that renames a module or changes the forward
computation fails here.
"""

import json
from pathlib import Path

import pytest
import torch

from implicit_hf.modeling import ImplicitForCausalLM, ImplicitForTokenClassification, ImplicitForTokenRegression

FIXTURE = Path(__file__).parent / "fixtures" / "checkpoint_652a3be"
HEADS = {"causal": ImplicitForCausalLM, "token_classification": ImplicitForTokenClassification}


@pytest.mark.parametrize("name", sorted(HEADS))
def test_checkpoint_saved_by_earlier_main_loads_with_the_same_keys_and_outputs(name):
    expected = json.loads((FIXTURE / "expected.json").read_text())
    model, info = HEADS[name].from_pretrained(FIXTURE / name, output_loading_info=True)
    assert not any(info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert sorted(model.state_dict()) == expected[name]["keys"]
    model.eval()
    ids = torch.tensor(expected["input_ids"])
    with torch.no_grad():
        out = model(input_ids=ids, num_loops=4, return_trajectory=[1, 4], use_cache=False)
    torch.testing.assert_close(out.logits, torch.tensor(expected[name]["logits"]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.trajectory[0], torch.tensor(expected[name]["trajectory_1"]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.trajectory[1], out.logits, rtol=1e-5, atol=1e-5)


# ----------------------------------------------- the config.json format of c490b25 (flat solver keys, issue 27)

FIXTURE_C490B25 = Path(__file__).parent / "fixtures" / "checkpoint_c490b25"
HEADS_C490B25 = {
    "causal_anderson": ImplicitForCausalLM,
    "token_classification_broyden": ImplicitForTokenClassification,
    "token_regression_picard": ImplicitForTokenRegression,
}


@pytest.mark.parametrize("name", sorted(HEADS_C490B25))
def test_checkpoint_saved_before_the_typed_config_loads_and_runs_the_same(name):
    expected = json.loads((FIXTURE_C490B25 / "expected.json").read_text())
    model, info = HEADS_C490B25[name].from_pretrained(FIXTURE_C490B25 / name, output_loading_info=True)
    assert not any(info[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert sorted(model.state_dict()) == expected[name]["keys"]
    model.eval()
    if model.config.input_features:
        inputs = {"input_features": torch.tensor(expected["input_features"])}
    else:
        inputs = {"input_ids": torch.tensor(expected["input_ids"])}
    with torch.no_grad():
        out = model(**inputs, num_loops=8, return_trajectory=[2, 8], use_cache=False)
    torch.testing.assert_close(out.logits, torch.tensor(expected[name]["logits"]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.trajectory[0], torch.tensor(expected[name]["trajectory_2"]), rtol=1e-5, atol=1e-5)
    assert out.loop_stats.steps.tolist() == expected[name]["steps"]
