"""Distributed training on 2 CPU processes: FSDP2 sharding equals one process, resumes bit-identically after a
kill, and ends in an ordinary checkpoint; launches that accelerate would silently replace are refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from implicit_hf.modeling.convert import convert_checkpoint
from implicit_hf.training import distributed
from implicit_hf.training.checkpoints import CHECKPOINT_MARKER
from tests.test_train import (
    ROOT,
    free_port,
    kill_after,
    log_records,
    run_in_process,
    subprocess_env,
    weights,
    write_recipe,
)
from tests.test_train_lora import RECIPE as LORA_RECIPE
from tests.test_train_lora import converted  # noqa: F401 (a fixture: a converted tiny Llama)

FSDP = {
    "per_device_batch_size": 4,
    "gradient_accumulation_steps": 2,
    "train_size": 36,  # 4.5 optimizer steps of 2 x 2 x 4 rows per epoch: resuming lands mid-epoch
    "loop_schedule": {"distribution": "uniform", "min": 1, "max": 4},
    "max_steps": 10,
    "checkpoint_every": 3,
    "keep_checkpoints": 2,
    "eval_every": 5,
    "lr_scheduler": "cosine",
}


def launch_command(config: str, recipe: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "configs" / "accelerate" / f"{config}.yaml"),
        "--num_processes",
        "2",
        "--main_process_port",
        str(free_port()),
        "-m",
        "implicit_hf.training",
        str(recipe),
        *args,
    ]


def launch(tmp: Path, config: str, recipe: Path, *args: str, cpu: bool = True) -> subprocess.CompletedProcess:
    extra = {"ACCELERATE_USE_CPU": "true"} if cpu else {}
    return subprocess.run(
        launch_command(config, recipe, *args),
        cwd=ROOT,
        env=subprocess_env(tmp, **extra),
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """2 CPU processes under configs/accelerate/fsdp.yaml, uninterrupted."""
    tmp = tmp_path_factory.mktemp("fsdp")
    recipe = write_recipe(tmp, "fsdp", output_dir=str(tmp / "out"), **FSDP)
    done = launch(tmp, "fsdp", recipe)
    assert done.returncode == 0, done.stderr[-4000:]
    return tmp, tmp / "out"


def test_fsdp_shards_and_equals_one_process(fsdp_run, tmp_path):
    tmp, out = fsdp_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["sharding"] == "fsdp2" and metrics["num_processes"] == 2 and metrics["global_batch"] == 16
    # the checkpoints hold each process's shards (torch.distributed.checkpoint), no gathered weights
    checkpoint = out / "checkpoints" / "step_9"
    assert sorted(p.name for p in (checkpoint / distributed.SHARDED_DIR).glob("*.distcp")) == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    assert not list(checkpoint.glob("model*.safetensors")) and not list(checkpoint.glob("optimizer*"))

    single_out = tmp_path / "single"
    recipe = write_recipe(tmp_path, "single", output_dir=str(single_out), **{**FSDP, "per_device_batch_size": 8})
    run_in_process(tmp, recipe)
    reference, trained = weights(single_out), weights(out)
    assert reference.keys() == trained.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(trained[name], tensor, rtol=0, atol=1e-5, msg=name)
    single_losses = [r["train/loss"] for r in log_records(single_out) if "train/loss" in r]
    fsdp_losses = [r["train/loss"] for r in log_records(out) if "train/loss" in r]
    assert fsdp_losses == pytest.approx(single_losses, abs=1e-5)
    evals = [r["eval/loss"] for r in log_records(out) if "eval/loss" in r]
    assert evals == pytest.approx([r["eval/loss"] for r in log_records(single_out) if "eval/loss" in r], abs=1e-5)


def test_fsdp_final_model_is_an_ordinary_checkpoint(fsdp_run):
    from implicit_hf import ImplicitForTokenRegression

    _, out = fsdp_run
    model = ImplicitForTokenRegression.from_pretrained(out / "model")
    for name, tensor in model.state_dict().items():
        assert not hasattr(tensor, "device_mesh"), name  # plain tensors, not DTensor shards
    assert weights(out)["model.core.0.mlp.down_proj.weight"].shape == model.model.core[0].mlp.down_proj.weight.shape


def test_fsdp_killed_run_resumes_bit_identical(fsdp_run, tmp_path):
    _, reference_out = fsdp_run
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, "fsdp", output_dir=str(out), **FSDP)
    env = subprocess_env(tmp_path, ACCELERATE_USE_CPU="true")
    # a slow collate_fn (0.1 s per micro-batch) keeps the run busy long after the step-3 checkpoint
    process = subprocess.Popen(
        launch_command("fsdp", recipe, "--task_kwargs.delay", "0.1"),
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # the launcher and its two workers: killed together
    )
    kill_after(process, out / "checkpoints" / "step_3" / CHECKPOINT_MARKER, timeout_s=300, group=True)
    assert not (out / "model").exists()

    done = launch(tmp_path, "fsdp", recipe, "--resume")
    assert done.returncode == 0, done.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from"] is not None and 3 <= metrics["resumed_from"] < FSDP["max_steps"]
    reference, resumed = weights(reference_out), weights(out)
    for name, tensor in reference.items():
        assert torch.equal(resumed[name], tensor), name
    assert log_records(out) == log_records(reference_out)


def test_fsdp_lora_fine_tune_equals_one_process(converted, tmp_path):  # noqa: F811
    """LoRA on the core plus the injection trained in full (modules_to_save), sharded: the merged model
    equals the one-process run's."""
    convert_checkpoint(converted / "source", tmp_path / "contracting", [0], [1, 2], [4], state_weight=0.5)
    recipe = {
        **LORA_RECIPE,
        "init_from": str(tmp_path / "contracting"),
        "task_kwargs": {"tokenizer": str(converted / "implicit"), "seq_len": 32},
        "lora": {"r": 4, "parts": ["core"], "modules_to_save": ["injection"]},
        "max_steps": 6,
        "eval_size": 8,
        "train_size": 48,
    }
    paths = {}
    for name, batch in (("fsdp", 4), ("single", 8)):
        paths[name] = tmp_path / f"{name}.yaml"
        overrides = {"per_device_batch_size": batch, "output_dir": str(tmp_path / name)}
        paths[name].write_text(yaml.safe_dump({**recipe, **overrides}))
    done = launch(tmp_path, "fsdp", paths["fsdp"])
    assert done.returncode == 0, done.stderr[-4000:]
    run_in_process(tmp_path, paths["single"])
    reference, trained = weights(tmp_path / "single"), weights(tmp_path / "fsdp")
    assert reference.keys() == trained.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(trained[name], tensor, rtol=0, atol=1e-5, msg=name)
    assert (tmp_path / "fsdp" / "adapter" / "adapter_config.json").is_file()
    assert json.loads((tmp_path / "fsdp" / "metrics.json").read_text())["sharding"] == "fsdp2"


def test_resuming_a_sharded_checkpoint_without_fsdp_is_refused(fsdp_run, tmp_path, capsys):
    _, fsdp_out = fsdp_run
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    os.symlink(fsdp_out / "checkpoints" / "step_9", out / "checkpoints" / "step_9")
    recipe = write_recipe(tmp_path, "ddp", output_dir=str(out), **{**FSDP, "per_device_batch_size": 8})
    with pytest.raises(SystemExit):
        run_in_process(tmp_path, recipe, "--resume")
    assert "with FSDP on CPU processes (sharded)" in capsys.readouterr().err


@pytest.mark.parametrize("config", ["fsdp", "ddp"])
def test_processes_without_a_backend_are_refused(config, tmp_path):
    """Without ACCELERATE_USE_CPU on a machine without GPUs, accelerate runs each process alone: refused."""
    out = tmp_path / "out"
    done = launch(tmp_path, config, write_recipe(tmp_path, "r", output_dir=str(out), max_steps=2), cpu=False)
    assert done.returncode != 0
    assert "the launcher started 2 processes" in done.stderr and "ACCELERATE_USE_CPU=true" in done.stderr
    assert "Traceback" not in done.stderr.split("the launcher started")[0][-200:]
    assert not (out / "model").exists()


# ---------------------------------------------------------------------------- plan_launch, no processes


def fake_accelerator(kind: str, processes: int) -> SimpleNamespace:
    from accelerate.utils import DistributedType

    return SimpleNamespace(distributed_type=DistributedType(kind), num_processes=processes)


FSDP_ENV = {
    "ACCELERATE_USE_FSDP": "true",
    "FSDP_VERSION": "2",
    "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
    "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer",
    "FSDP_RESHARD_AFTER_FORWARD": "false",
    "FSDP_OFFLOAD_PARAMS": "false",
    "FSDP_ACTIVATION_CHECKPOINTING": "false",
    "WORLD_SIZE": "2",
}


def plan(monkeypatch, kind: str, processes: int, mixed_precision: str = "no", **env: str):
    for key in [k for k in os.environ if k.startswith(("ACCELERATE_USE_", "FSDP_")) or k == "WORLD_SIZE"]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return distributed.plan_launch(fake_accelerator(kind, processes), mixed_precision)


def test_fsdp_on_cpu_processes_is_sharded_here(monkeypatch):
    got = plan(monkeypatch, "MULTI_CPU", 2, **FSDP_ENV)
    assert got.shard_on_cpu and got.reshard_after_forward is False and got.wrap_classes == ("LlamaDecoderLayer",)
    assert not plan(monkeypatch, "FSDP", 2, **FSDP_ENV).shard_on_cpu  # accelerate's own FSDP (GPUs)
    assert not plan(monkeypatch, "MULTI_CPU", 2, WORLD_SIZE="2").shard_on_cpu  # DDP
    assert not plan(monkeypatch, "NO", 1).shard_on_cpu


@pytest.mark.parametrize(
    ("kind", "processes", "env", "mixed_precision", "message"),
    [
        ("NO", 1, {"WORLD_SIZE": "2"}, "no", "the launcher started 2 processes"),
        ("MULTI_CPU", 2, {"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true"}, "no", "DeepSpeed"),
        ("NO", 1, {**FSDP_ENV, "WORLD_SIZE": "1"}, "no", "FSDP needs several processes"),
        ("MULTI_CPU", 2, {**FSDP_ENV, "FSDP_VERSION": "1"}, "no", "fsdp_version"),
        ("MULTI_CPU", 2, {**FSDP_ENV, "FSDP_OFFLOAD_PARAMS": "true"}, "no", "fsdp_offload_params"),
        ("MULTI_CPU", 2, {**FSDP_ENV, "FSDP_ACTIVATION_CHECKPOINTING": "true"}, "no", "gradient_checkpointing"),
        ("MULTI_CPU", 2, {**FSDP_ENV, "FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP"}, "no", "fsdp_auto_wrap_policy"),
        ("MULTI_CPU", 2, FSDP_ENV, "fp16", "fp16"),
    ],
)
def test_launch_mismatches_are_refused(monkeypatch, kind, processes, env, mixed_precision, message):
    with pytest.raises(distributed.LaunchError, match=message):
        plan(monkeypatch, kind, processes, mixed_precision, **env)


@pytest.mark.parametrize(("settings", "message"), [({"tol": 1e-3}, "model.tol"), ({"gradient": "ift"}, "ift")])
def test_settings_that_vary_iterations_between_processes_are_refused_under_fsdp(settings, message):
    config = SimpleNamespace(**{"tol": None, "gradient": "unroll", **settings})
    with pytest.raises(distributed.LaunchError, match=message):
        distributed.check_fixed_iterations(config)
    distributed.check_fixed_iterations(SimpleNamespace(tol=None, gradient="truncated"))  # fixed counts: fine
