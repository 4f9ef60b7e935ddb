"""Training that extrapolates past its loop count: loop schedules, stabilisers, deep supervision, distillation.

Unit tests check each piece against its definition; tiny training runs check that each recipe field
does what it says (a penalty lowers what it penalises, deep supervision trains the early iterations,
distillation pulls the student to the teacher), that a bad field is refused before any step, and that
all of them together give the same result on 2 processes as on 1 and resume bit-identically after a kill.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from functools import partial

import numpy as np
import pytest
import torch
from test_convert import character_tokenizer
from test_train import (
    BASE_RECIPE,
    ROOT,
    free_port,
    log_records,
    run_in_process,
    subprocess_env,
    weights,
    write_recipe,
)
from tiny_models import tiny_causal_lm, tiny_source

from implicit_hf.modeling.convert import convert_checkpoint
from implicit_hf.modeling.penalties import fixed_point_penalties
from implicit_hf.training import loop as train_mod
from implicit_hf.training.checkpoints import CHECKPOINT_MARKER
from implicit_hf.training.objective import distillation_loss
from implicit_hf.training.schedule import LoopSchedule

# --------------------------------------------------------------------------------------------------
# Loop schedules


def test_uniform_schedule_draws_what_random_loops_drew():
    """The uniform schedule draws what the former ``random_loops: [lo, hi]`` drew, draw for draw (recipes migrated
    from it stay reproducible)."""
    import random

    schedule = LoopSchedule("uniform", min=2, max=9)
    expected = [random.Random(f"random_loops/5/{step}").randint(2, 9) for step in range(200)]
    assert [schedule.sample(5, step) for step in range(200)] == expected
    config = train_mod.TrainConfig(task="x", loop_schedule={"min": 2, "max": 9}, seed=5)
    assert config.loop_schedule == schedule


def test_poisson_lognormal_schedule_is_heavy_tailed_clipped_and_deterministic():
    schedule = LoopSchedule("poisson_lognormal", min=2, max=64, mean=8, sigma=0.5)
    draws = np.array([schedule.sample(0, step) for step in range(4000)])
    assert draws.min() >= 2 and draws.max() <= 64
    assert abs(draws.mean() - 8) < 0.4  # E[Poisson(τ)] = E[τ] = mean (clipping at 2 and 64 barely moves it)
    assert np.median(draws) < draws.mean()  # right-skewed
    assert (draws >= 16).mean() > 0.02  # a tail of deep steps, beyond anything a Poisson(8) would give often
    assert [schedule.sample(0, step) for step in range(50)] == draws[:50].tolist()  # a function of (seed, step)
    assert [schedule.sample(1, step) for step in range(50)] != draws[:50].tolist()
    narrow = LoopSchedule("poisson_lognormal", min=6, max=10, mean=8)
    assert {narrow.sample(0, step) for step in range(500)} <= set(range(6, 11))


def test_ramp_raises_the_mean_from_min():
    schedule = LoopSchedule("poisson_lognormal", min=1, max=40, mean=16, ramp_steps=1000)
    assert schedule.current_mean(0) == 1 and schedule.current_mean(500) == 8.5 and schedule.current_mean(5000) == 16
    early = np.mean([schedule.sample(0, step) for step in range(0, 100)])
    late = np.mean([schedule.sample(0, step) for step in range(1000, 1100)])
    assert early < 3 and abs(late - 16) < 2
    uniform = LoopSchedule("uniform", min=2, max=10, ramp_steps=100)
    assert {uniform.sample(0, 0) for _ in range(3)} == {2} and max(uniform.sample(0, s) for s in range(40)) <= 6
    assert max(uniform.sample(0, step) for step in range(100, 300)) == 10


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"distribution": "geometric"}, "distribution must be one of"),
        ({"min": 5, "max": 3}, "min <= max"),
        ({"min": 0}, "min must be an integer >= 1"),
        ({"distribution": "poisson_lognormal", "min": 1, "max": 8}, "mean must be a number in"),
        ({"distribution": "poisson_lognormal", "min": 1, "max": 8, "mean": 9}, "mean must be a number in"),
        ({"distribution": "poisson_lognormal", "min": 1, "max": 8, "mean": 4, "sigma": -1}, "sigma must be"),
        ({"ramp_steps": -1}, "ramp_steps"),
        ({"mean": 4}, "applies to poisson_lognormal only"),
        ({"maximum": 4}, "unknown entries"),
    ],
)
def test_bad_schedules_are_refused(fields, message):
    with pytest.raises(train_mod.RecipeError, match="recipe key 'loop_schedule': .*" + message):
        train_mod.TrainConfig(task="x", loop_schedule=fields)


# --------------------------------------------------------------------------------------------------
# Penalties at the last iterate


def test_jacobian_penalty_is_an_unbiased_frobenius_estimate():
    """For a linear map ``f(z) = A z + b`` the Hutchinson estimate averages to ``||A||_F² / d``."""
    torch.manual_seed(0)
    a = torch.randn(6, 6) * 0.3
    b = torch.randn(6)

    def f(z, index):
        return z @ a.T + b

    z = torch.randn(4, 6)
    estimates = torch.stack([fixed_point_penalties(f, z, ["jacobian"])["jacobian"] for _ in range(3000)])
    exact = a.pow(2).sum() / 6
    assert float(estimates.mean()) == pytest.approx(float(exact), rel=0.05)


def test_fixed_point_penalty_is_the_squared_relative_residual():
    def f(z, index):
        return 0.5 * z + 1.0

    z = torch.tensor([[2.0, 2.0], [1.0, 3.0]])
    expected = ((f(z, None) - z).pow(2).sum(1) / z.pow(2).sum(1)).mean()
    assert torch.allclose(fixed_point_penalties(f, z, ["fixed_point"])["fixed_point"], expected)
    assert float(fixed_point_penalties(f, torch.full((1, 2), 2.0), ["fixed_point"])["fixed_point"]) == 0.0
    with pytest.raises(ValueError, match="penalties must be a subset"):
        fixed_point_penalties(f, z, ["spectral"])


# The penalty tests' model: 40 tokens, four loops, a two-step truncated gradient.
tiny_lm = partial(tiny_causal_lm, vocab_size=40, num_loops=4, gradient="truncated", gradient_steps=2)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_model_penalties_are_differentiable_in_the_core(attention):
    model = tiny_lm(attn_implementation=attention).train()
    ids = torch.randint(0, 40, (3, 9), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, penalties=("jacobian", "fixed_point"))
    assert set(out.penalties) == {"jacobian", "fixed_point"}
    (out.penalties["jacobian"] + out.penalties["fixed_point"]).backward()
    core = [p.grad for name, p in model.named_parameters() if name.startswith("model.core.")]
    assert all(g is not None and torch.isfinite(g).all() for g in core) and any(g.abs().sum() > 0 for g in core)
    assert model.lm_head.weight.grad is None  # the penalties concern the map, not the head
    with torch.no_grad():  # measurable at inference too (the Jacobian builds its own graph)
        measured = model.eval()(input_ids=ids, penalties=("jacobian",), use_cache=False).penalties["jacobian"]
    assert torch.isfinite(measured) and not measured.requires_grad
    with pytest.raises(ValueError, match="cannot use a KV cache"):
        model(input_ids=ids, penalties=("jacobian",), use_cache=True)


def test_trajectory_loss_is_the_loss_at_those_loop_counts():
    model = tiny_lm(gradient="unroll").eval()
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(1))
    out = model(input_ids=ids, labels=ids, num_loops=5, return_trajectory=[1, 3])
    for position, count in enumerate([1, 3]):
        alone = model(input_ids=ids, labels=ids, num_loops=count, use_cache=False).loss
        torch.testing.assert_close(out.trajectory_loss[position], alone)


def test_distillation_loss_is_zero_for_equal_logits_and_masks_like_the_labels():
    torch.manual_seed(0)
    teacher = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 1, 2, 3, -100]])
    assert float(distillation_loss(teacher, teacher, labels, None, 2.0)) == pytest.approx(0.0, abs=1e-6)
    student = teacher.clone()
    student[0, 0, 0] += 5.0  # position 0 predicts token 1, whose label is -100: not scored
    assert float(distillation_loss(student, teacher, labels, None, 1.0)) == pytest.approx(0.0, abs=1e-6)
    student[0, 1, 0] += 5.0  # position 1 predicts token 2 (label 3): scored
    assert float(distillation_loss(student, teacher, labels, None, 1.0)) > 0.01


# --------------------------------------------------------------------------------------------------
# Each recipe field does what it says (tiny runs of the toy task)

FEATURE_RUN = {
    "max_steps": 30,
    "checkpoint_every": 0,
    "eval_every": 0,
    "log_every": 5,
    "learning_rate": 1e-2,
    "model": {**BASE_RECIPE["model"], "num_loops": 2},
}


def toy_batch(tmp):
    from tests.toy_task import TrainToyTask

    task = TrainToyTask(cache_dir=tmp / "cache")
    return task.encode(list(task.build_dataset("validation", 16, BASE_RECIPE["seed"])))


def measured_penalty(model, batch, name: str, num_loops: int = 2) -> float:
    torch.manual_seed(0)
    with torch.no_grad():
        return float(model.eval()(**batch, num_loops=num_loops, penalties=(name,)).penalties[name])


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plain")
    recipe = write_recipe(tmp, "plain", output_dir=str(tmp / "out"), **FEATURE_RUN)
    return tmp, run_in_process(tmp, recipe).model


# the toy map contracts fast (relative residual ~1e-4 after two loops), so its residual penalty needs a large weight
@pytest.mark.parametrize(
    "field, name, weight", [("jacobian_penalty", "jacobian", 3.0), ("fixed_point_penalty", "fixed_point", 300.0)]
)
def test_a_penalty_lowers_what_it_penalises(plain_run, tmp_path, field, name, weight):
    tmp, plain = plain_run
    recipe = write_recipe(tmp_path, "penalised", output_dir=str(tmp_path / "out"), **FEATURE_RUN, **{field: weight})
    penalised = run_in_process(tmp_path, recipe).model
    batch = toy_batch(tmp)
    assert measured_penalty(penalised, batch, name) < 0.7 * measured_penalty(plain, batch, name)
    records = [r for r in log_records(tmp_path / "out") if f"train/{name}" in r]
    assert records and all("train/task_loss" in r and r[f"train/{name}"] > 0 for r in records)  # both parts logged
    assert records[-1]["train/loss"] == pytest.approx(
        records[-1]["train/task_loss"] + weight * records[-1][f"train/{name}"]
    )


def test_deep_supervision_averages_the_task_loss_over_those_iterations():
    """The objective's task loss (and its gradient) is the mean of the losses of separate runs at each count;
    counts at or past the step's loop count are skipped."""
    from implicit_hf.training.objective import Objective

    objective = Objective(deep_supervision=(1, 3, 6))
    assert objective.forward_kwargs(6) == {"return_trajectory": True, "trajectory_loops": [1, 3]}
    assert objective.forward_kwargs(1) == {}
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(2))
    batch = {"input_ids": ids, "labels": ids}
    model = tiny_lm(gradient="unroll").train()
    loss, parts = objective(model(**batch, num_loops=6, **objective.forward_kwargs(6)), batch)
    loss.backward()
    got = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    expected = sum(model(**batch, num_loops=count).loss for count in (6, 1, 3)) / 3
    expected.backward()
    torch.testing.assert_close(loss, expected)
    assert torch.equal(parts["task_loss"], loss.detach())
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, msg=name)


def test_deep_supervision_in_a_training_run(tmp_path):
    recipe = write_recipe(
        tmp_path, "deep", output_dir=str(tmp_path / "out"), **FEATURE_RUN, deep_supervision=[1],
        loop_schedule={"min": 1, "max": 3},
    )  # fmt: skip
    run_in_process(tmp_path, recipe)
    records = [r for r in log_records(tmp_path / "out") if "train/loss" in r]
    # the task loss is the only part: no separate record of it, and the loss fell
    assert records[-1]["train/loss"] < records[0]["train/loss"] and "train/task_loss" not in records[-1]


# --------------------------------------------------------------------------------------------------
# Distillation from the unconverted source of a retrofit (the text task on a tiny Llama)

TEXT_RECIPE = {
    "task": "text",
    "train_size": 64,
    "eval_size": 8,
    "per_device_batch_size": 8,
    "learning_rate": 5e-3,
    "warmup_steps": 2,
    "max_steps": 20,
    "log_every": 5,
    "eval_every": 0,
    "checkpoint_every": 0,
    "tracker": "none",
    "model": {"num_loops": 2, "gradient": "unroll"},
}


@pytest.fixture(scope="module")
def retrofit(tmp_path_factory):
    """A tiny Llama (the teacher) and an implicit model converted from it with two layers dropped."""
    root = tmp_path_factory.mktemp("distill")
    source = tiny_source("llama", vocab_size=len(character_tokenizer()), num_hidden_layers=5)
    source.save_pretrained(root / "source")
    character_tokenizer().save_pretrained(root / "source")
    convert_checkpoint(root / "source", root / "student", [0], [1], [4])
    return root


def text_recipe(tmp_path, retrofit, name="distill", **changes):
    recipe = {
        **TEXT_RECIPE,
        "init_from": str(retrofit / "student"),
        "task_kwargs": {"tokenizer": str(retrofit / "student"), "seq_len": 24},
        "output_dir": str(tmp_path / "out"),
        **changes,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(recipe))
    return path


def test_distillation_pulls_the_student_to_its_teacher(tmp_path, retrofit):
    recipe = text_recipe(tmp_path, retrofit, teacher=str(retrofit / "source"), distill={"weight": 1.0})
    result = run_in_process(tmp_path, recipe)
    distill = [r["train/distill"] for r in log_records(tmp_path / "out") if "train/distill" in r]
    assert len(distill) == TEXT_RECIPE["max_steps"] // TEXT_RECIPE["log_every"]
    assert distill[-1] < 0.7 * distill[0]
    assert result.metrics["train_loss"] == pytest.approx(distill[-1])  # weight 1: the loss is the KL alone


def test_distilling_an_exact_conversion_costs_nothing(tmp_path, retrofit):
    """A conversion that drops no layer reproduces its source: the KL to it starts at zero."""
    convert_checkpoint(retrofit / "source", tmp_path / "exact", [0], [1, 2, 3], [4], num_loops=1)
    recipe = text_recipe(
        tmp_path, retrofit, init_from=str(tmp_path / "exact"), teacher=str(retrofit / "source"),
        distill={"weight": 0.5, "temperature": 2.0}, max_steps=1, log_every=1, learning_rate=1e-9,
        model={"num_loops": 1, "gradient": "unroll"},
    )  # fmt: skip
    run_in_process(tmp_path, recipe)
    (record,) = [r for r in log_records(tmp_path / "out") if "train/distill" in r]
    assert record["train/distill"] == pytest.approx(0.0, abs=1e-6)


def other_vocabulary_teacher(root, same_size: bool):
    if same_size:  # the same number of tokens in another order: a different tokenizer
        tokenizer = character_tokenizer()
        vocab = tokenizer.get_vocab()
        swapped = {token: vocab[other] for token, other in zip(sorted(vocab), sorted(vocab, reverse=True), strict=True)}
        from tokenizers import Tokenizer, models
        from transformers import PreTrainedTokenizerFast

        backend = Tokenizer(models.WordLevel(swapped, unk_token="<unk>"))
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")
        size = len(vocab)
    else:
        tokenizer, size = None, len(character_tokenizer()) + 7
    tiny_source("llama", vocab_size=size).save_pretrained(root)
    if tokenizer is not None:
        tokenizer.save_pretrained(root)
    return str(root)


@pytest.mark.parametrize(
    "changes, message",
    [
        (lambda tmp: {"teacher": str(tmp / "missing")}, "'teacher'.*not a checkpoint directory"),
        (lambda tmp: {"teacher": other_vocabulary_teacher(tmp / "t", False)}, "vocabulary of 105 tokens"),
        (lambda tmp: {"teacher": other_vocabulary_teacher(tmp / "t", True)}, "another tokenizer"),
        (lambda tmp: {"distill": {"weight": 0.5}}, "'distill' needs a 'teacher'"),
        (lambda tmp: {"teacher": "T", "distill": {"weight": 1.5}}, "weight must be a number in \\[0, 1\\]"),
        (lambda tmp: {"teacher": "T", "distill": {"temperature": 0}}, "temperature must be a number > 0"),
        (lambda tmp: {"teacher": "T", "distill": {"alpha": 0.5}}, "unknown entries \\['alpha'\\]"),
        (lambda tmp: {"loop_schedule": {"distribution": "zipf"}}, "'loop_schedule': .*distribution must be one of"),
        (lambda tmp: {"loop_schedule": {"min": 9, "max": 2}}, "'loop_schedule': .*min <= max"),
        (lambda tmp: {"loop_schedule": {"min": 0}}, "'loop_schedule': loop_schedule.min must be an integer >= 1"),
        (lambda tmp: {"loop_schedule": {"mean": 2}}, "'loop_schedule': .*mean applies to poisson_lognormal only"),
        (lambda tmp: {"jacobian_penalty": -0.1}, "'jacobian_penalty' must be a weight >= 0"),
        (lambda tmp: {"fixed_point_penalty": -1}, "'fixed_point_penalty' must be a weight >= 0"),
        (lambda tmp: {"deep_supervision": [0, 2]}, "'deep_supervision' must be a list of distinct loop counts >= 1"),
    ],
)
def test_bad_objective_recipes_fail_before_training(tmp_path, retrofit, changes, message):
    recipe = text_recipe(tmp_path, retrofit, **changes(tmp_path))
    with pytest.raises(train_mod.RecipeError, match=message):
        train_mod.train(train_mod.parse_args([str(recipe)]))
    assert not (tmp_path / "out").exists()


def test_a_teacher_needs_a_causal_lm_task(tmp_path, retrofit):
    recipe = write_recipe(tmp_path, "toy", output_dir=str(tmp_path / "out"), teacher=str(retrofit / "source"))
    with pytest.raises(train_mod.RecipeError, match="distillation needs a causal-LM task"):
        train_mod.train(train_mod.parse_args([str(recipe)]))


# --------------------------------------------------------------------------------------------------
# Everything together: 2 processes equal 1, and a killed run resumes bit-identically

ALL_FEATURES = {
    "loop_schedule": {"distribution": "poisson_lognormal", "min": 1, "max": 5, "mean": 3, "ramp_steps": 4},
    "fixed_point_penalty": 0.5,
    "deep_supervision": [1],
    "distill": {"weight": 0.3, "temperature": 2.0},
    "model": {"num_loops": 3, "gradient": "truncated", "gradient_steps": 2},
    "max_steps": 6,
    "log_every": 1,
}


def test_all_features_on_two_processes_match_one(tmp_path, retrofit):
    teacher = {"teacher": str(retrofit / "source")}
    for name in ("single", "ddp"):
        (tmp_path / name).mkdir()
    single = text_recipe(tmp_path / "single", retrofit, output_dir=str(tmp_path / "single" / "out"), **ALL_FEATURES,
                         **teacher)  # fmt: skip
    run_in_process(tmp_path / "single", single)
    ddp = text_recipe(tmp_path / "ddp", retrofit, output_dir=str(tmp_path / "ddp" / "out"), **ALL_FEATURES,
                      **teacher, per_device_batch_size=4)  # fmt: skip
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(ROOT / "configs" / "accelerate" / "ddp.yaml"), "--num_processes", "2", "--main_process_port",
        str(free_port()), "-m", "implicit_hf.training", str(ddp),
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=ROOT, env=subprocess_env(tmp_path / "ddp", ACCELERATE_USE_CPU="true"),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads((tmp_path / "ddp" / "out" / "metrics.json").read_text())["num_processes"] == 2
    reference, trained = weights(tmp_path / "single" / "out"), weights(tmp_path / "ddp" / "out")
    for name, tensor in reference.items():
        torch.testing.assert_close(trained[name], tensor, rtol=0, atol=2e-5, msg=name)
    single_log, ddp_log = log_records(tmp_path / "single" / "out"), log_records(tmp_path / "ddp" / "out")
    assert [r["loops"] for r in ddp_log if "loops" in r] == [r["loops"] for r in single_log if "loops" in r]
    for key in ("train/loss", "train/task_loss", "train/distill", "train/fixed_point"):
        assert [r[key] for r in ddp_log if key in r] == pytest.approx(
            [r[key] for r in single_log if key in r], abs=1e-5
        )


RESUME_FEATURES = {
    "gradient_accumulation_steps": 2,
    "per_device_batch_size": 4,
    "train_size": 36,
    "max_steps": 12,
    "checkpoint_every": 3,
    "eval_every": 5,
    "loop_schedule": {"distribution": "poisson_lognormal", "min": 1, "max": 8, "mean": 4, "ramp_steps": 6},
    "jacobian_penalty": 0.2,
    "fixed_point_penalty": 0.2,
    "deep_supervision": [1, 2],
    "model": {**BASE_RECIPE["model"], "gradient": "truncated", "gradient_steps": 2},
}


def test_killed_run_with_every_stabiliser_resumes_bit_identical(tmp_path):
    reference = tmp_path / "reference"
    run_in_process(tmp_path, write_recipe(tmp_path, "reference", output_dir=str(reference), **RESUME_FEATURES))
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, "resume", output_dir=str(out), **RESUME_FEATURES)
    env = subprocess_env(tmp_path)
    command = [sys.executable, "-m", "implicit_hf.training", str(recipe), "--task_kwargs.delay", "0.1"]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marker = out / "checkpoints" / "step_3" / CHECKPOINT_MARKER
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert process.poll() is None, process.stderr.read().decode()[-4000:]
        assert time.monotonic() < deadline, "no checkpoint after 120 s"
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    process.stderr.close()
    done = subprocess.run(
        [sys.executable, "-m", "implicit_hf.training", str(recipe), "--resume"], cwd=ROOT, env=env,
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads((out / "metrics.json").read_text())["resumed_from"] >= 3
    expected, resumed = weights(reference), weights(out)
    for name, tensor in expected.items():
        assert torch.equal(resumed[name], tensor), name
    assert log_records(out) == log_records(reference)  # the same draws, penalties and losses at every step
    assert len({loops for r in log_records(out) if "loops" in r for loops in r["loops"]}) > 2
