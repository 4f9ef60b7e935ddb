"""The Accelerate training loop: multi-process equivalence, kill-and-resume, recipe checks, outputs.

Runs that must be separate processes (2-process DDP, a run killed with SIGKILL, its resumption, the
real command line) are subprocesses; reference runs are in-process (one thread, like the
subprocesses, so results are bit-comparable).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from implicit_hf.training import loop as train_mod
from implicit_hf.training.checkpoints import CHECKPOINT_MARKER, find_checkpoints
from implicit_hf.training.schedule import LoopSchedule

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = {
    "hidden_size": 32,
    "num_attention_heads": 4,
    "num_prelude_layers": 1,
    "num_core_layers": 1,
    "num_coda_layers": 1,
    "num_loops": 4,
    "attention_dropout": 0.0,
}
BASE_RECIPE = {
    "task": "train_toy",
    "task_module": "tests.toy_task",
    "model": TINY_MODEL,
    "seed": 3,
    "train_size": 64,
    "eval_size": 16,
    "per_device_batch_size": 8,
    "learning_rate": 3e-3,
    "lr_scheduler": "linear",
    "warmup_steps": 2,
    "max_steps": 12,
    "checkpoint_every": 6,
    "log_every": 1,
    "eval_every": 6,
    "tracker": "none",
}


def write_recipe(folder: Path, name: str, **overrides) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**BASE_RECIPE, **overrides}))
    return path


def subprocess_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        IMPLICIT_HF_CACHE=str(tmp / "cache"),
        HF_DATASETS_CACHE=str(tmp / "hf_datasets"),
        **extra,
    )
    return env


def run_in_process(tmp: Path, recipe: Path, *args: str) -> train_mod.TrainResult:
    """`implicit_hf.training.loop.main` in this process, with the same cache and thread settings as the subprocesses."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("IMPLICIT_HF_CACHE", str(tmp / "cache"))
        patch.setenv("HF_DATASETS_CACHE", str(tmp / "hf_datasets"))
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.syspath_prepend(str(ROOT))
        torch.set_num_threads(1)
        try:
            return train_mod.main([str(recipe), *args])
        finally:
            torch.set_num_threads(threads)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "model" / "model.safetensors")


def log_records(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]


def kill_after(process: subprocess.Popen, marker: Path, timeout_s: float, group: bool = False) -> None:
    """SIGKILL ``process`` (its whole process group with ``group``) as soon as ``marker`` exists; fails if the
    process ends first or no marker appears within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not marker.exists():
        assert process.poll() is None, process.stderr.read().decode()[-4000:]
        assert time.monotonic() < deadline, f"no checkpoint after {timeout_s} s"
        time.sleep(0.02)
    if group:
        os.killpg(process.pid, signal.SIGKILL)
    else:
        os.kill(process.pid, signal.SIGKILL)
    process.wait()
    process.stderr.close()


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """One process, batch 8: the reference of the DDP test and the run whose model the Auto classes load."""
    tmp = tmp_path_factory.mktemp("single")
    recipe = write_recipe(tmp, "single", output_dir=str(tmp / "out"))
    result = run_in_process(tmp, recipe)
    return tmp, tmp / "out", result


def test_two_processes_match_one_process(single_run, tmp_path):
    """2 CPU processes x batch 4 (DDP, gloo) end with the weights of 1 process x batch 8."""
    tmp, single_out, _ = single_run
    out = tmp_path / "ddp"
    recipe = write_recipe(tmp_path, "ddp", output_dir=str(out), per_device_batch_size=4)
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "configs" / "accelerate" / "ddp.yaml"),
        "--num_processes",
        "2",
        "--main_process_port",
        str(free_port()),
        "-m",
        "implicit_hf.training",
        str(recipe),
    ]
    # ACCELERATE_USE_CPU: the MULTI_GPU launch starts CPU processes (gloo) on a machine without GPUs
    done = subprocess.run(
        command,
        cwd=ROOT,
        env=subprocess_env(tmp, ACCELERATE_USE_CPU="true"),
        capture_output=True,
        text=True,
        timeout=600,  # a process that hangs at exit fails the test instead of stalling the suite
    )
    assert done.returncode == 0, done.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["distributed_type"] == "DistributedType.MULTI_CPU"
    assert metrics["global_batch"] == json.loads((single_out / "metrics.json").read_text())["global_batch"] == 8

    reference, trained = weights(single_out), weights(out)
    assert reference.keys() == trained.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(trained[name], tensor, rtol=0, atol=1e-5, msg=name)
    moved = max(
        float((tensor - load_file(single_out / "checkpoints" / "step_6" / "model.safetensors")[name]).abs().max())
        for name, tensor in reference.items()
    )
    assert moved > 1e-3  # the weights really trained between step 6 and 12, so the comparison means something
    single_losses = [r["train/loss"] for r in log_records(single_out) if "train/loss" in r]
    ddp_losses = [r["train/loss"] for r in log_records(out) if "train/loss" in r]
    assert ddp_losses == pytest.approx(single_losses, abs=1e-5)


def test_final_model_loads_with_auto_class(single_run):
    from transformers import AutoModelForTokenClassification

    from implicit_hf.tasks.base import TASKS

    tmp, out, result = single_run
    loaded = AutoModelForTokenClassification.from_pretrained(out / "model").eval()
    assert loaded.config.problem_type == "regression" and loaded.config.num_loops == TINY_MODEL["num_loops"]
    task = TASKS["train_toy"](cache_dir=tmp / "cache")
    batch = task.encode(list(task.build_dataset("validation", 16, BASE_RECIPE["seed"])))
    trained = result.model.eval()
    with torch.no_grad():
        expected, got = trained(**batch), loaded(**batch)
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=0)
    assert torch.equal(got.loss, expected.loss)
    for name, tensor in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval/loss"] == pytest.approx(float(expected.loss), rel=1e-5)  # eval = the whole held-out set


RESUME = {
    "gradient_accumulation_steps": 2,
    "per_device_batch_size": 4,
    "train_size": 36,  # 9 micro-batches of 4 per epoch: epochs end mid-step, and resuming lands mid-epoch
    "loop_schedule": {"distribution": "uniform", "min": 1, "max": 4},
    "max_steps": 16,
    "checkpoint_every": 3,
    "keep_checkpoints": 2,
    "eval_every": 5,
    "lr_scheduler": "cosine",
}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    recipe = write_recipe(tmp, "resume", output_dir=str(tmp / "out"), **RESUME)
    result = run_in_process(tmp, recipe)
    return tmp / "out", result


def test_killed_run_resumes_bit_identical(uninterrupted, tmp_path):
    reference_out, _ = uninterrupted
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, "resume", output_dir=str(out), **RESUME)
    env = subprocess_env(tmp_path)
    # a slow collate_fn (0.1 s per micro-batch) keeps the run busy long after the step-3 checkpoint
    command = [sys.executable, "-m", "implicit_hf.training", str(recipe), "--task_kwargs.delay", "0.1"]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    kill_after(process, out / "checkpoints" / "step_3" / CHECKPOINT_MARKER, timeout_s=120)
    assert process.returncode == -signal.SIGKILL
    assert not (out / "model").exists() and not (out / "metrics.json").exists()  # killed mid-run

    done = subprocess.run(
        [sys.executable, "-m", "implicit_hf.training", str(recipe), "--resume"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from"] is not None and 3 <= metrics["resumed_from"] < RESUME["max_steps"]
    assert f"resumed from {out / 'checkpoints'}" in done.stdout

    reference, resumed = weights(reference_out), weights(out)
    assert reference.keys() == resumed.keys()
    for name, tensor in reference.items():
        assert torch.equal(resumed[name], tensor), name
    # the log is cut back to the checkpoint and continued: same steps, same loop counts, same losses
    assert log_records(out) == log_records(reference_out)
    # only the newest keep_checkpoints checkpoints are kept
    assert [step for step, _ in find_checkpoints(out)] == [12, 15]


GROUPED = {
    **RESUME,
    "loop_schedule": {"distribution": "above_difficulty", "min": 1, "max": 64},
    "group_by_difficulty": True,
}


def test_killed_run_grouped_by_difficulty_resumes_bit_identical(tmp_path):
    """Batches of one difficulty, each drawn its own loop count above it: a killed run resumes the same batches
    and the same counts."""
    reference = tmp_path / "reference"
    run_in_process(tmp_path, write_recipe(tmp_path, "reference", output_dir=str(reference), **GROUPED))
    loops = [count for r in log_records(reference) if "loops" in r for count in r["loops"]]
    assert len(loops) == GROUPED["max_steps"] * GROUPED["gradient_accumulation_steps"]  # one per micro-batch
    assert set(loops) <= set(range(2, 8)) and len(set(loops)) > 3  # d + U[1, d + 1] for d in 1..3
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, "resume", output_dir=str(out), **GROUPED)
    env = subprocess_env(tmp_path)
    command = [sys.executable, "-m", "implicit_hf.training", str(recipe), "--task_kwargs.delay", "0.1"]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    kill_after(process, out / "checkpoints" / "step_3" / CHECKPOINT_MARKER, timeout_s=120)
    done = subprocess.run(
        [sys.executable, "-m", "implicit_hf.training", str(recipe), "--resume"], cwd=ROOT, env=env,
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads((out / "metrics.json").read_text())["resumed_from"] >= 3
    expected, resumed = weights(reference), weights(out)
    for name, tensor in expected.items():
        assert torch.equal(resumed[name], tensor), name
    assert log_records(out) == log_records(reference)


def test_batches_grouped_by_difficulty():
    from implicit_hf.training.difficulty import GroupedByDifficulty

    levels = [1, 2, 3, 1, 2, 3, 1, 2, 1, 1, 3]  # 5 rows of level 1, 3 of level 2, 3 of level 3
    sampler = GroupedByDifficulty(levels, batch_size=2, seed=0)
    assert len(sampler) == 2 * (2 + 1 + 1)  # full batches only
    epochs = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        order = list(sampler)
        batches = [order[i : i + 2] for i in range(0, len(order), 2)]
        assert all(levels[a] == levels[b] for a, b in batches) and len(set(order)) == len(order) == len(sampler)
        epochs.append(order)
        sampler.set_epoch(epoch)
        assert list(sampler) == order  # seeded by (seed, epoch)
    assert len({tuple(order) for order in epochs}) > 1


def test_difficulty_settings_need_a_task_that_rates_its_rows(tmp_path):
    for key, value in (
        ("loop_schedule", {"distribution": "above_difficulty", "min": 1, "max": 8}),
        ("group_by_difficulty", True),
    ):
        recipe = write_recipe(tmp_path, key, task="lp", task_module=None, **{key: value})
        with pytest.raises(train_mod.RecipeError, match=f"recipe key '{key}' needs the difficulty of a row"):
            train_mod.train(train_mod.parse_args([str(recipe)]))


def test_random_loops_are_logged_and_reproducible(uninterrupted):
    out, result = uninterrupted
    config = train_mod.TrainConfig(**json.loads((out / "train_config.json").read_text()))
    schedule = config.loop_schedule
    expected = [schedule.sample(config.seed, step) for step in range(RESUME["max_steps"])]
    assert expected == [schedule.sample(config.seed, step) for step in range(RESUME["max_steps"])]
    assert set(expected) == {1, 2, 3, 4}  # sampled over the whole [min, max] range
    records = [r for r in log_records(out) if "loops" in r]
    assert [r["step"] for r in records] == list(range(1, RESUME["max_steps"] + 1))
    assert [loops for r in records for loops in r["loops"]] == expected
    # without a tolerance the solver runs exactly the sampled count
    assert [r["train/loop_steps"] for r in records] == [float(k) for k in expected]
    assert [schedule.sample(4, step) for step in range(RESUME["max_steps"])] != expected


BAD_RECIPES = [
    ({"lerning_rate": 1e-3}, "lerning_rate"),
    ({"learning_rate": "fast"}, "learning_rate"),
    ({"max_steps": 2.5}, "max_steps"),
    ({"model": {**TINY_MODEL, "solver": "newton"}}, "solver"),
    ({"model": {**TINY_MODEL, "hiden_size": 16}}, "hiden_size"),
    ({"task": "no_such_task"}, "no_such_task"),
    ({"task_kwargs": {"colour": "red"}}, "task_kwargs"),
    ({"task_kwargs": {"seq_len": "long"}}, "task_kwargs"),
    ({"loop_schedule": {"min": 4, "max": 2}}, "loop_schedule"),
    ({"random_loops": [1, 4]}, "random_loops"),  # the former key: unknown now
    ({"mixed_precision": "fp8"}, "mixed_precision"),
    ({"lr_scheduler": "reduce_lr_on_plateau"}, "lr_scheduler must be one of"),  # steps on a metric: refused
]


@pytest.mark.parametrize(("change", "named"), BAD_RECIPES, ids=[named for _, named in BAD_RECIPES])
def test_bad_recipe_fails_before_training(change, named, tmp_path, capsys):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, "bad", output_dir=str(out), **change)
    with pytest.raises(SystemExit) as exit_info:
        run_in_process(tmp_path, recipe)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert named in error and error.startswith("error: ")
    assert not out.exists()


def test_bad_override_fails_before_training(tmp_path, capsys):
    recipe = write_recipe(tmp_path, "ok", output_dir=str(tmp_path / "out"))
    with pytest.raises(SystemExit):
        run_in_process(tmp_path, recipe, "--max_steps", "ten")
    assert "'max_steps' must be an integer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_in_process(tmp_path, recipe, "--model.num_loop", "3")
    assert "num_loop" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bad_recipe_exit_code_on_the_command_line(tmp_path):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, "bad", output_dir=str(out), learning_rate="fast")
    done = subprocess.run(
        [sys.executable, "-m", "implicit_hf.training", str(recipe)],
        cwd=ROOT,
        env=subprocess_env(tmp_path),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "recipe key 'learning_rate' must be a number; got 'fast'" in done.stderr
    assert not out.exists()


def test_overrides_and_yaml_quirks(tmp_path):
    recipe = tmp_path / "raw.yaml"
    # YAML 1.1 reads 1e-4 (no dot) as a string: recipes read it as a number
    recipe.write_text("task: train_toy\ntask_module: tests.toy_task\nlearning_rate: 1e-4\nmodel: {tol: 1e-3}\n")
    config = train_mod.parse_args(
        [
            str(recipe),
            "--loop_schedule",
            "{min: 2, max: 5}",
            "--model.num_loops",
            "6",
            "--resume",
            "--seed=7",
            "--weight_decay",
            "2e-2",
        ]
    )
    assert config.learning_rate == 1e-4 and config.weight_decay == 2e-2
    assert config.loop_schedule == LoopSchedule("uniform", min=2, max=5) and config.resume and config.seed == 7
    assert config.model == {"tol": 1e-3, "num_loops": 6}
    # a mapping key set to null is its default, none: a recipe's loop schedule switched off from the command line
    recipe.write_text(
        "task: train_toy\ntask_module: tests.toy_task\nloop_schedule: {distribution: uniform, min: 1, max: 3}\n"
    )
    assert train_mod.parse_args([str(recipe), "--loop_schedule", "null"]).loop_schedule is None
    with pytest.raises(
        ValueError, match=r"'loop_schedule' must be a mapping with string keys \(or null: none\); got 3"
    ):
        train_mod.parse_args([str(recipe), "--loop_schedule", "3"])


def test_existing_checkpoints_need_resume(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "checkpoints" / "step_2").mkdir(parents=True)
    (out / "checkpoints" / "step_2" / CHECKPOINT_MARKER).write_text("{}")
    recipe = write_recipe(tmp_path, "again", output_dir=str(out))
    with pytest.raises(SystemExit):
        run_in_process(tmp_path, recipe)
    assert "pass --resume" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints"]


def test_accelerate_configs_are_valid(monkeypatch):
    """Each config file goes through `accelerate launch`'s own argument processing and plugin construction."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    expected = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed_zero2": "DEEPSPEED"}
    for name, kind in expected.items():
        path = ROOT / "configs" / "accelerate" / f"{name}.yaml"
        args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "implicit_hf.training", "r.yaml"])
        args, defaults, _ = _validate_launch_command(args)
        assert defaults.distributed_type == DistributedType(kind)
        if name == "deepspeed_zero2":
            args.deepspeed_fields_from_accelerate_config = list(defaults.deepspeed_config)
            _, env = prepare_deepspeed_cmd_env(args)
        else:
            env = prepare_multi_gpu_env(args)
        with monkeypatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            if name == "fsdp":
                plugin = FullyShardedDataParallelPlugin()
                assert plugin.fsdp_version == 2 and plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
                assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
            if name == "deepspeed_zero2":
                plugin = DeepSpeedPlugin()
                assert plugin.deepspeed_config["zero_optimization"]["stage"] == 2
                assert plugin.deepspeed_config["gradient_accumulation_steps"] == "auto"  # the recipe's value
