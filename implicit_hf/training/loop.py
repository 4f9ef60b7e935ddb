"""One Accelerate training loop for every head and task.

Usage (one process, or any ``accelerate launch`` setup: DDP, FSDP, DeepSpeed)::

    python -m implicit_hf.training RECIPE.yaml [--key value ...] [--resume]
    accelerate launch --config_file configs/accelerate/ddp.yaml -m implicit_hf.training RECIPE.yaml

A recipe is a YAML mapping of `TrainConfig` fields (`implicit_hf.training.recipe`); what needs its task is
checked by `implicit_hf.training.preflight` before any process trains. `train` reads top to bottom: checks,
set-up, resume, the loop, evaluation, the final save. How the model is spread over processes is one object,
`implicit_hf.training.distributed.Sharding`, so the loop is the same on every launch.

What a run writes under ``output_dir``::

    train_config.json           the resolved recipe
    train_log.jsonl             one JSON record per log_every steps (and eval results)
    logs/train/                 tensorboard events (tracker: tensorboard)
    checkpoints/step_N/         accelerator.save_state + trainer_state.json (flushed, then renamed into place
                                last: marks it complete; `implicit_hf.training.checkpoints`)
    model/                      the trained model (save_pretrained; loads with the Auto classes; with
                                LoRA, the adapters merged into the weights),
                                implicit_task.json (task, task_kwargs, task_module: what eval rebuilds)
                                and the task's artifacts (task.save_artifacts: e.g. a tokenizer)
    adapter/                    with ``lora``: the adapters alone (peft save_pretrained)
    metrics.json                final step, world size, last training loss, final held-out loss, runtime

Each step's loop count comes from ``loop_schedule`` (`implicit_hf.training.schedule`), and the loss is
`implicit_hf.training.objective.Objective`: the task loss, optionally with deep supervision, the Jacobian
and fixed-point penalties and distillation from a frozen ``teacher``.

``--resume`` continues from the newest complete checkpoint that passes its checks (a damaged one is skipped
with a warning naming the file; with none left, or none at all, it refuses): model, optimizer, scheduler,
gradient scaler and RNG states come back through ``accelerator.load_state``, the data loader skips the batches
already consumed in the current epoch (each epoch's order is seeded by ``seed + epoch``), and the
loop count of every step is a function of ``(seed, step)``, so a resumed run ends bit-identical to an
uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration, is_tensorboard_available, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from .. import modeling
from ..modeling import ImplicitConfig
from ..modeling.model_card import write_model_card
from ..tasks.base import TASK_FILE, TaskAdapter, feedback_kwargs
from ..tasks.models import HEADS
from .checkpoints import resume_from_checkpoint, save_checkpoint
from .difficulty import GroupedByDifficulty, WithDifficulty, difficulties
from .distributed import LaunchError, Sharding
from .objective import Objective, load_teacher
from .preflight import check_modules_to_save, check_output_dir, check_recipe, lora_integration, task_from_recipe
from .recipe import RecipeError, TrainConfig, parse_args, usage
from .schedule import LoopSchedule
from .stats import RunLog, TrainingStats, evaluate_loss


@dataclass
class TrainResult:
    """What `train` returns: the final metrics (as in ``metrics.json``) and the trained model (unwrapped; under
    FSDP on CPU processes, the gathered model on the main process and None on the others)."""

    metrics: dict[str, Any]
    model: Any


# ----------------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------------


def train(config: TrainConfig) -> TrainResult:
    """Train as ``config`` says; the final metrics are also written to ``output_dir/metrics.json``."""
    # -- everything that can be wrong with the recipe fails here, before any process trains -----------
    task = task_from_recipe(config)
    model_config = check_recipe(config, task)
    check_output_dir(config)

    # -- the accelerator: processes, devices, mixed precision, gradient accumulation, trackers ----------
    accelerator = make_accelerator(config)
    sharding = Sharding.for_run(accelerator, config.mixed_precision, model_config, config.loop_schedule)
    global_batch = check_global_batch(config, accelerator.num_processes)
    if config.overwrite_output_dir and not config.resume and accelerator.is_main_process:
        shutil.rmtree(Path(config.output_dir) / "checkpoints", ignore_errors=True)
    set_seed(config.seed)

    # -- data: generated locally by the task, cached once (the main process writes the cache) ---------
    train_set, eval_set = build_datasets(config, task, accelerator)
    train_loader = make_train_loader(config, task, train_set)

    # -- model, optimizer, schedule --------------------------------------------------------------------
    model = sharding.shard(initial_model(config, task, model_config))
    optimizer = make_optimizer(model, config)
    lr_scheduler = make_scheduler(optimizer, config)
    model, optimizer, train_loader, lr_scheduler = sharding.prepare(model, optimizer, train_loader, lr_scheduler)

    # -- resume: weights, optimizer, schedule, scaler and RNG states; the data position follows --------
    resumed_from = resume_from_checkpoint(config, accelerator, model, sharding, global_batch)
    start_step = resumed_from or 0
    batches = batch_stream(train_loader, accelerator, start_step * config.gradient_accumulation_steps)
    run_log, last = start_run_files(config, accelerator, resumed_from)

    # -- the loop --------------------------------------------------------------------------------------
    model.train()
    objective = objective_of(config, accelerator.device)
    stats = TrainingStats()
    started = time.perf_counter()
    progress = progress_bar(config, accelerator, start_step)
    for step in range(start_step, config.max_steps):
        for micro_batch in range(config.gradient_accumulation_steps):
            batch, num_loops = with_loop_count(next(batches), config, model_config, step, micro_batch)
            with accelerator.accumulate(model):  # gradients are synchronised on the last micro-batch only
                outputs = model(
                    **batch, num_loops=num_loops, **feedback_kwargs(task, batch), **objective.forward_kwargs(num_loops)
                )
                loss, parts = objective(outputs, batch)
                accelerator.backward(loss)
            stats.add_micro_batch(loss, parts, outputs.loop_stats, num_loops)
        grad_norm = None
        if config.max_grad_norm > 0:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        if not accelerator.optimizer_step_was_skipped:  # fp16: a step with inf gradients changes nothing
            lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        progress.update(1)

        checkpoint_now = config.checkpoint_every and done % config.checkpoint_every == 0
        # log at checkpoints too, so a resumed run's log is the uninterrupted run's log
        if done % config.log_every == 0 or done == config.max_steps or checkpoint_now:
            last = training_record(stats, config, accelerator, lr_scheduler, grad_norm, done, len(train_loader))
            run_log.write(last, done)
            progress.set_postfix(loss=f"{last['train/loss']:.4g}", loops=f"{last['train/loop_steps']:.1f}")
            stats = TrainingStats()
        if eval_set is not None and config.eval_every and done % config.eval_every == 0 and done < config.max_steps:
            with sharding.gathered():
                run_log.write(evaluate_loss(model, eval_set, task, accelerator, eval_batch_size(config)), done)
        if checkpoint_now:
            save_checkpoint(accelerator, config, done, global_batch, sharding)
    progress.close()

    # -- evaluation: the held-out loss of the trained model ---------------------------------------------
    final_eval = {}
    if eval_set is not None:
        with sharding.gathered():
            final_eval = evaluate_loss(model, eval_set, task, accelerator, eval_batch_size(config))
        run_log.write(final_eval, config.max_steps)

    # -- the end: the model in Hugging Face format, metrics ----------------------------------------------
    accelerator.wait_for_everyone()
    state_bytes = sharding.state_bytes()
    unwrapped = save_final_model(sharding, config, task, model_config)
    metrics = {
        **run_layout(config, sharding, state_bytes, global_batch),
        "resumed_from": resumed_from,
        "train_loss": last.get("train/loss", math.nan),
        **final_eval,
        "runtime_s": time.perf_counter() - started,
    }
    if accelerator.is_main_process:
        write_run_record(config, task, metrics, global_batch)
    # Free the DDP wrapper while every process is still alive: its reducer holds the gloo process group,
    # and a gloo group destroyed after a peer has exited waits forever for its worker threads.
    accelerator.wait_for_everyone()
    model = optimizer = lr_scheduler = train_loader = batches = outputs = objective = sharding = None
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()
    return TrainResult(metrics=metrics, model=unwrapped)


# ----------------------------------------------------------------------------------------------------
# Set-up
# ----------------------------------------------------------------------------------------------------


def make_accelerator(config: TrainConfig) -> Accelerator:
    """The run's `Accelerator`: mixed precision, gradient accumulation by hand, seedable data order, trackers."""
    output_dir = Path(config.output_dir)
    return Accelerator(
        mixed_precision=config.mixed_precision,
        # the loop feeds exactly gradient_accumulation_steps micro-batches per optimizer step, across epochs
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=config.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        # the schedule counts optimizer steps (not optimizer steps x processes): stepped by hand in the loop
        step_scheduler_with_optimizer=False,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
        log_with="tensorboard" if config.tracker == "tensorboard" and is_tensorboard_available() else None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=config.find_unused_parameters)],
    )


def check_global_batch(config: TrainConfig, num_processes: int) -> int:
    """The rows of one optimizer step over every process; the training set must fill one batch on each."""
    if config.train_size < config.per_device_batch_size * num_processes:
        raise RecipeError(
            f"recipe key 'train_size' ({config.train_size}) is smaller than one batch on every process "
            f"({config.per_device_batch_size} x {num_processes})"
        )
    return config.per_device_batch_size * config.gradient_accumulation_steps * num_processes


def build_datasets(config: TrainConfig, task: TaskAdapter, accelerator: Accelerator) -> tuple[Any, Any]:
    """The task's training set and held-out set (None with ``eval_size`` 0); the main process builds them first,
    so it alone writes the cache. A size the task cannot provide is a `RecipeError` naming the key."""
    with accelerator.main_process_first():
        # a task refuses a size it cannot provide (e.g. a corpus with fewer windows) with a ValueError
        try:
            train_set = task.build_dataset("train", config.train_size, config.seed)
        except ValueError as err:
            raise RecipeError(f"recipe key 'train_size' ({config.train_size}): {err}") from err
        try:
            eval_set = task.build_dataset("validation", config.eval_size, config.seed) if config.eval_size else None
        except ValueError as err:
            raise RecipeError(f"recipe key 'eval_size' ({config.eval_size}): {err}") from err
    return train_set, eval_set


def make_train_loader(config: TrainConfig, task: TaskAdapter, train_set: Any) -> DataLoader:
    """Full micro-batches in an order seeded by ``(seed, epoch)``: shuffled rows, or (``group_by_difficulty``)
    batches of one difficulty; a schedule tied to difficulty gets each batch with its difficulty."""
    grouped = None
    if config.group_by_difficulty:
        grouped = GroupedByDifficulty(difficulties(task, train_set), config.per_device_batch_size, config.seed)
    per_batch = config.loop_schedule is not None and config.loop_schedule.needs_difficulty
    loader = DataLoader(
        train_set,
        batch_size=config.per_device_batch_size,
        shuffle=grouped is None,  # accelerate's seedable sampler: epoch e is shuffled by data_seed + e on every process
        sampler=grouped,  # or batches of one difficulty, ordered by (seed, epoch)
        drop_last=True,  # every step sees a full global batch
        collate_fn=WithDifficulty(task) if per_batch else task.encode,
        generator=torch.Generator().manual_seed(config.seed),
    )
    if grouped is not None and len(loader) == 0:
        raise RecipeError(
            f"recipe key 'group_by_difficulty': no difficulty has {config.per_device_batch_size} rows "
            "(per_device_batch_size) in the training set; raise train_size or lower the batch size"
        )
    return loader


def initial_model(config: TrainConfig, task: TaskAdapter, model_config: ImplicitConfig) -> Any:
    """The model training starts from, built from the config `check_recipe` checked: ``init_from``'s weights or a
    fresh model; with ``lora``, wrapped by peft so that only the adapters train."""
    model_class = getattr(modeling, HEADS[task.head].model_class)
    if config.init_from is None:
        model = model_class(model_config)
    else:
        model = model_class.from_pretrained(config.init_from, config=model_config).train()
    return model if config.lora is None else with_lora(model, config)


def with_lora(model: Any, config: TrainConfig) -> Any:
    """``model`` wrapped by peft with the recipe's ``lora`` adapters (peft is optional: `lora_integration`)."""
    model = lora_integration().with_adapters(model, config.lora.peft_kwargs())
    check_modules_to_save(model, config.lora.modules_to_save or [])
    return model


def make_optimizer(model: Any, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, without weight decay on biases and norm weights (those below 2-D)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate,
        betas=tuple(config.adam_betas),
    )


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> Any:
    """The recipe's learning-rate schedule, in optimizer steps."""
    return get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=config.warmup_steps,
        num_training_steps=config.max_steps,
        scheduler_specific_kwargs=config.lr_scheduler_kwargs,
    )


def objective_of(config: TrainConfig, device: torch.device) -> Objective:
    """The training objective of the recipe (the teacher, if any, loaded frozen on ``device``)."""
    return Objective(
        deep_supervision=tuple(config.deep_supervision),
        jacobian_penalty=config.jacobian_penalty,
        fixed_point_penalty=config.fixed_point_penalty,
        teacher=None if config.teacher is None else load_teacher(config.teacher, device),
        distill_weight=config.distillation.weight,
        temperature=config.distillation.temperature,
    )


def eval_batch_size(config: TrainConfig) -> int:
    return config.eval_batch_size or config.per_device_batch_size


def batch_stream(loader: DataLoader, accelerator: Accelerator, consumed: int) -> Iterator[Any]:
    """Micro-batches forever, after the ``consumed`` ones of a resumed run: epoch by epoch (each shuffled by
    ``seed + epoch``)."""
    epoch, skip = divmod(consumed, len(loader))
    while True:
        loader.set_epoch(epoch)
        yield from accelerator.skip_first_batches(loader, skip) if skip else loader
        epoch, skip = epoch + 1, 0


def start_run_files(
    config: TrainConfig, accelerator: Accelerator, resumed_from: int | None
) -> tuple[RunLog, dict[str, Any]]:
    """Write the recipe, cut the log back to the resumed step and start the trackers; the run log and its last
    training record (the metrics of a run resumed at its end)."""
    output_dir = Path(config.output_dir)
    if accelerator.is_main_process:  # output_dir exists: check_output_dir made it
        (output_dir / "train_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
    run_log = RunLog(output_dir / "train_log.jsonl", accelerator)
    last = run_log.restart(resumed_from)
    if (resumed_from or 0) >= config.max_steps:
        accelerator.print(
            f"{str(output_dir)!r} already completed {resumed_from} of max_steps {config.max_steps} steps: nothing to "
            "train (the final evaluation, model and metrics are written again; raise max_steps to train on)"
        )
    accelerator.init_trackers("train", config=_flat_hparams(config))
    return run_log, last


def progress_bar(config: TrainConfig, accelerator: Accelerator, start_step: int) -> tqdm:
    """The steps' progress bar, on the local main process only."""
    disable = not accelerator.is_local_main_process
    return tqdm(total=config.max_steps, initial=start_step, disable=disable, desc="train")


def _flat_hparams(config: TrainConfig) -> dict[str, Any]:
    """The recipe as flat scalars, for the tracker's hyper-parameter table."""
    flat = {}
    for key, value in dataclasses.asdict(config).items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for sub, item in items:
            name = key if sub is None else f"{key}.{sub}"
            flat[name] = item if isinstance(item, (bool, int, float, str)) else str(item)
    return flat


# ----------------------------------------------------------------------------------------------------
# One step
# ----------------------------------------------------------------------------------------------------


def with_loop_count(
    batch: Any, config: TrainConfig, model_config: ImplicitConfig, step: int, micro_batch: int
) -> tuple[Any, int]:
    """A micro-batch and its loop count: the model's training count, the schedule's draw for ``(seed, step)``, or
    (``above_difficulty``) a draw above the batch's difficulty, which comes with the batch."""
    schedule: LoopSchedule | None = config.loop_schedule
    if schedule is None:
        return batch, model_config.train_loops
    if schedule.needs_difficulty:
        batch, difficulty = batch
        return batch, schedule.sample(config.seed, step, difficulty, micro_batch)
    return batch, schedule.sample(config.seed, step)


def training_record(
    stats: TrainingStats,
    config: TrainConfig,
    accelerator: Accelerator,
    lr_scheduler: Any,
    grad_norm: Any,
    done: int,
    batches_per_epoch: int,
) -> dict[str, Any]:
    """The training record at step ``done``: the means since the last one, the learning rate, the loop counts."""
    record = stats.means(accelerator) | {
        "train/lr": lr_scheduler.get_last_lr()[0],
        "train/num_loops": sum(stats.loops) / len(stats.loops),
        "epoch": (done * config.gradient_accumulation_steps) / batches_per_epoch,
    }
    schedule = config.loop_schedule
    if schedule is not None:  # the sampled count of every step (or micro-batch, when drawn per batch)
        record["loops"] = stats.loops[:: 1 if schedule.needs_difficulty else config.gradient_accumulation_steps]
    if grad_norm is not None:  # a tensor (a DTensor under FSDP2), a float or None (DeepSpeed)
        record["train/grad_norm"] = _as_float(grad_norm)
    return record


def _as_float(value: Any) -> float:
    """A float from a tensor, a DTensor (FSDP2 gradient norms) or a number."""
    if hasattr(value, "full_tensor"):
        value = value.full_tensor()
    return float(value)


# ----------------------------------------------------------------------------------------------------
# The final save
# ----------------------------------------------------------------------------------------------------


def save_final_model(sharding: Sharding, config: TrainConfig, task: TaskAdapter, model_config: ImplicitConfig) -> Any:
    """Write ``model/`` (and, with ``lora``, ``adapter/``: the adapters alone, then the model with them merged);
    collective. Returns the saved model (None off the main process under FSDP on CPU processes)."""
    output_dir, accelerator = Path(config.output_dir), sharding.accelerator
    unwrapped, state_dict = sharding.final_model(
        lambda: initial_model(config, task, model_config), lora=config.lora is not None
    )
    if unwrapped is not None and config.lora is not None:
        unwrapped.save_pretrained(output_dir / "adapter", is_main_process=accelerator.is_main_process)
        unwrapped = unwrapped.merge_and_unload()
        unwrapped.save_pretrained(output_dir / "model", is_main_process=accelerator.is_main_process)
    elif unwrapped is not None:
        unwrapped.save_pretrained(
            output_dir / "model",
            is_main_process=accelerator.is_main_process,
            save_function=accelerator.save,
            state_dict=state_dict,
        )
    return unwrapped


def run_layout(config: TrainConfig, sharding: Sharding, state_bytes: int, global_batch: int) -> dict[str, Any]:
    """The metrics that say how the run was laid out: steps, processes, sharding, precision, batch."""
    accelerator = sharding.accelerator
    return {
        "step": config.max_steps,
        "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "sharding": sharding.name,
        "state_bytes_per_process": state_bytes,
        "mixed_precision": accelerator.mixed_precision,
        "global_batch": global_batch,
    }


def write_run_record(config: TrainConfig, task: TaskAdapter, metrics: dict[str, Any], global_batch: int) -> None:
    """Main process, after the model is saved: what eval rebuilds the task from (``implicit_task.json``), the
    task's artifacts and the model card in ``model/``, and ``metrics.json``."""
    output_dir = Path(config.output_dir)
    task_record = {"task": config.task, "task_kwargs": config.task_kwargs, "task_module": config.task_module}
    (output_dir / "model" / TASK_FILE).write_text(json.dumps(task_record, indent=2))
    task.save_artifacts(output_dir / "model")  # e.g. a causal-LM task's tokenizer
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_model_card(output_dir / "model", training=training_summary(config, metrics, global_batch))


def training_summary(config: TrainConfig, metrics: dict[str, Any], global_batch: int) -> dict[str, Any]:
    """What the model card says about the run: task, steps, loop schedule, objective, final metrics."""
    settings = dataclasses.asdict(config)
    summary = {
        "task": config.task,
        "task_kwargs": config.task_kwargs,
        "init_from": None if config.init_from is None else Path(config.init_from).name,
        "steps": config.max_steps,
        "global_batch": global_batch,
        "loop_schedule": settings["loop_schedule"],
        "lora": settings["lora"],
        "teacher": None if config.teacher is None else Path(config.teacher).name,
        "distill": settings["distill"],
        "penalties": {k: getattr(config, k) for k in ("jacobian_penalty", "fixed_point_penalty") if getattr(config, k)}
        or None,
        "deep_supervision": config.deep_supervision or None,
        "learning_rate": config.learning_rate,
        "seed": config.seed,
        **{key: value for key, value in metrics.items() if key in ("train_loss", "eval/loss", "runtime_s")},
    }
    return {key: value for key, value in summary.items() if value is not None}


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> TrainResult:
    """Command-line entry: ``RECIPE.yaml [--key value ...] [--resume]``; exits with status 2 on a bad recipe."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        raise SystemExit(0 if argv else 2)
    try:
        return train(parse_args(argv))
    except (RecipeError, LaunchError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
