"""Fine-tuning a converted checkpoint with LoRA through the training loop (init_from + lora)."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_convert import character_tokenizer
from tiny_models import tiny_source

from implicit_hf.modeling.convert import convert_checkpoint
from implicit_hf.training import loop as train_mod

RECIPE = {
    "task": "text",
    "train_size": 96,
    "eval_size": 16,
    "per_device_batch_size": 8,
    "learning_rate": 1e-2,
    "warmup_steps": 2,
    "max_steps": 30,
    "log_every": 5,
    "eval_every": 0,
    "checkpoint_every": 0,
    "tracker": "none",
    "model": {"num_loops": 2, "gradient": "unroll"},
    "lora": {"r": 4, "parts": ["core"]},
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_train")
    source = tiny_source("llama", vocab_size=len(character_tokenizer()))
    source.save_pretrained(root / "source")
    character_tokenizer().save_pretrained(root / "source")
    convert_checkpoint(root / "source", root / "implicit", [0], [1, 2], [4])
    return root


def recipe_file(tmp_path, monkeypatch, converted, **changes):
    monkeypatch.setenv("IMPLICIT_HF_CACHE", str(tmp_path / "cache"))
    recipe = {
        **RECIPE,
        "init_from": str(converted / "implicit"),
        "task_kwargs": {"tokenizer": str(converted / "implicit"), "seq_len": 32},
        "output_dir": str(tmp_path / "out"),
        **changes,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_lora_fine_tune_of_a_converted_model(tmp_path, monkeypatch, converted):
    result = train_mod.main([recipe_file(tmp_path, monkeypatch, converted)])
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in log if "train/loss" in r]
    assert losses[-1] < losses[0]
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
    before = load_file(converted / "implicit" / "model.safetensors")
    after = load_file(tmp_path / "out" / "model" / "model.safetensors")
    assert set(after) == set(before)  # merged: a plain implicit checkpoint, no adapter weights
    for name, tensor in before.items():
        changed = not torch.equal(tensor, after[name])
        in_core_linear = name.startswith("model.core.") and name.endswith("proj.weight")
        assert changed == in_core_linear, name  # only the core's linear layers moved (their LoRA merged)
    assert result.model.config.num_loops == 2
    assert (tmp_path / "out" / "model" / "tokenizer.json").is_file()  # the task saved the tokenizer


def test_lora_trains_the_modules_to_save_in_full(tmp_path, monkeypatch, converted):
    convert_checkpoint(converted / "source", tmp_path / "contracting", [0], [1, 2], [4], state_weight=0.5)
    lora = {"r": 4, "parts": ["core"], "modules_to_save": ["injection"]}
    recipe = recipe_file(tmp_path, monkeypatch, converted, init_from=str(tmp_path / "contracting"), lora=lora)
    train_mod.main([recipe, "--max_steps", "5"])
    before = load_file(tmp_path / "contracting" / "model.safetensors")
    after = load_file(tmp_path / "out" / "model" / "model.safetensors")
    assert set(after) == set(before)  # merged, the trained copy of the injection in its place
    assert not torch.equal(before["model.injection.weight"], after["model.injection.weight"])
    assert torch.equal(before["model.prelude.0.mlp.up_proj.weight"], after["model.prelude.0.mlp.up_proj.weight"])


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"model": {"hidden_size": 64}}, "only loop settings that own no weights"),
        ({"lora": {"rank": 4}}, "unknown entries"),
        ({"lora": {"r": 4, "parts": ["body"]}}, "parts must be a non-empty subset"),
        ({"init_from": "/nonexistent"}, "not a checkpoint directory"),
        ({"lora": {"r": 4, "modules_to_save": ["injektion"]}}, r"modules_to_save \['injektion'\] match no module"),
    ],
)
def test_bad_init_or_lora_recipes_fail_before_training(tmp_path, monkeypatch, converted, changes, message):
    with pytest.raises(train_mod.RecipeError, match=message):
        train_mod.train(train_mod.parse_args([recipe_file(tmp_path, monkeypatch, converted, **changes)]))
    assert not (tmp_path / "out" / "checkpoints").exists()
