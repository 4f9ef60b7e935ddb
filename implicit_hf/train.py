"""One Accelerate training loop for every head and task.

Usage (one process, or any ``accelerate launch`` setup: DDP, FSDP, DeepSpeed)::

    python -m implicit_hf.train RECIPE.yaml [--key value ...] [--resume]
    accelerate launch --config_file configs/accelerate/ddp.yaml -m implicit_hf.train RECIPE.yaml

A recipe is a YAML mapping of `TrainConfig` fields; reading it, its overrides and every check made before
training live in `implicit_hf.recipe`. `train` reads top to bottom: set-up, resume, the loop, evaluation,
the final save.

What a run writes under ``output_dir``::

    train_config.json           the resolved recipe
    train_log.jsonl             one JSON record per log_every steps (and eval results)
    logs/train/                 tensorboard events (tracker: tensorboard)
    checkpoints/step_N/         accelerator.save_state + trainer_state.json (flushed, then renamed into place
                                last: marks it complete; `implicit_hf.checkpoints`)
    model/                      the trained model (save_pretrained; loads with the Auto classes; with
                                LoRA, the adapters merged into the weights),
                                implicit_task.json (task, task_kwargs, task_module: what eval rebuilds)
                                and the task's artifacts (task.save_artifacts: e.g. a tokenizer)
    adapter/                    with ``lora``: the adapters alone (peft save_pretrained)
    metrics.json                final step, world size, last training loss, final held-out loss, runtime

Each step's loop count comes from ``loop_schedule`` (or ``random_loops``; `implicit_hf.loop_schedule`), and
the loss is `implicit_hf.objective.Objective`: the task loss, optionally with deep supervision, the Jacobian
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
import functools
import gc
import json
import math
import shutil
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoints import CHECKPOINT_MARKER, find_checkpoints, resume_from_checkpoint, save_checkpoint
from .distributed import (
    LaunchError,
    LaunchPlan,
    check_fixed_iterations,
    full_state_dict,
    gathered,
    local_state_bytes,
    plan_launch,
    shard_model,
)
from .recipe import (
    RecipeError,
    TrainConfig,
    check_modules_to_save,
    check_output_dir,
    check_recipe,
    config_from_dict,
    distill_settings,
    loop_schedule_of,
    parse_args,
    resolve_task,
    usage,
)

# torch, numpy, transformers and the objective are imported where they are used, so that reading a recipe's
# keys (``implicit-hf train --help``) imports none of them.
if typing.TYPE_CHECKING:
    from accelerate import Accelerator

    from .objective import Objective
    from .tasks.base import TaskAdapter

# the recipe names are part of this module's interface: the CLI, the tests and the benchmarks import them here
__all__ = [
    "CHECKPOINT_MARKER",
    "RecipeError",
    "TrainConfig",
    "TrainResult",
    "config_from_dict",
    "find_checkpoints",
    "loop_schedule_of",
    "main",
    "parse_args",
    "train",
    "usage",
]


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
    import torch
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from .difficulty import GroupedByDifficulty, WithDifficulty, difficulties
    from .tasks.base import feedback_kwargs

    # -- everything that can be wrong with the recipe fails here, before any process trains -----------
    task = resolve_task(config)
    check_recipe(config, task)
    output_dir = Path(config.output_dir)
    if not config.resume and not config.overwrite_output_dir and find_checkpoints(output_dir):
        raise RecipeError(
            f"output_dir {str(output_dir)!r} already holds checkpoints: pass --resume to continue that run, "
            "--overwrite_output_dir true to start afresh, or choose another output_dir"
        )
    if config.resume and not find_checkpoints(output_dir):
        raise RecipeError(
            f"--resume: nothing to resume in {str(output_dir / 'checkpoints')!r} (no checkpoint with its "
            f"completion marker {CHECKPOINT_MARKER}): run without --resume to start afresh"
        )
    check_output_dir(config)

    # -- the accelerator: processes, devices, mixed precision, gradient accumulation, trackers ----------
    accelerator = make_accelerator(config)
    try:  # what the launcher asked for against what accelerate runs: refused on a mismatch, before any step
        plan = plan_launch(accelerator, config.mixed_precision)
    except LaunchError:
        accelerator.end_training()
        raise
    global_batch = config.per_device_batch_size * config.gradient_accumulation_steps * accelerator.num_processes
    if config.train_size < config.per_device_batch_size * accelerator.num_processes:
        raise RecipeError(
            f"recipe key 'train_size' ({config.train_size}) is smaller than one batch on every process "
            f"({config.per_device_batch_size} x {accelerator.num_processes})"
        )
    if config.overwrite_output_dir and not config.resume and accelerator.is_main_process:
        shutil.rmtree(output_dir / "checkpoints", ignore_errors=True)
    set_seed(config.seed)

    # -- data: generated locally by the task, cached once (the main process writes the cache) ---------
    train_set, eval_set = build_datasets(config, task, accelerator)
    eval_batch = config.eval_batch_size or config.per_device_batch_size
    schedule = loop_schedule_of(config)
    per_batch_loops = schedule is not None and schedule.needs_difficulty  # batches come with their difficulty
    grouped = None
    if config.group_by_difficulty:
        grouped = GroupedByDifficulty(difficulties(task, train_set), config.per_device_batch_size, config.seed)
    train_loader = DataLoader(
        train_set,
        batch_size=config.per_device_batch_size,
        shuffle=grouped is None,  # accelerate's seedable sampler: epoch e is shuffled by data_seed + e on every process
        sampler=grouped,  # or batches of one difficulty, ordered by (seed, epoch)
        drop_last=True,  # every step sees a full global batch
        collate_fn=WithDifficulty(task) if per_batch_loops else task.encode,
        generator=torch.Generator().manual_seed(config.seed),
    )
    if grouped is not None and len(train_loader) == 0:
        raise RecipeError(
            f"recipe key 'group_by_difficulty': no difficulty has {config.per_device_batch_size} rows "
            "(per_device_batch_size) in the training set; raise train_size or lower the batch size"
        )

    # -- model, optimizer, schedule --------------------------------------------------------------------
    model = initial_model(config, task)
    if config.lora:
        check_modules_to_save(model, config.lora.get("modules_to_save") or [])
    if plan.shard_on_cpu:  # FSDP2 on CPU processes: sharded here, not by accelerator.prepare (which gives DDP)
        check_fixed_iterations(model.config, schedule)
        model = shard_model(model, plan)
    optimizer = make_optimizer(model, config)
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=config.warmup_steps,
        num_training_steps=config.max_steps,
        scheduler_specific_kwargs=config.lr_scheduler_kwargs,
    )
    if plan.shard_on_cpu:  # the model and optimizer states are sharded: checkpointed by save_sharded, not accelerate
        train_loader, lr_scheduler = accelerator.prepare(train_loader, lr_scheduler)
    else:
        model, optimizer, train_loader, lr_scheduler = accelerator.prepare(model, optimizer, train_loader, lr_scheduler)
    sharded = (model, optimizer) if plan.shard_on_cpu else None
    batches_per_epoch = len(train_loader)  # per process

    # -- resume: weights, optimizer, schedule, scaler and RNG states; the data position follows --------
    resumed_from = resume_from_checkpoint(config, accelerator, model, plan, global_batch, sharded)
    start_step = 0 if resumed_from is None else resumed_from
    consumed = start_step * config.gradient_accumulation_steps  # micro-batches per process so far
    batches = batch_stream(train_loader, accelerator, consumed // batches_per_epoch, consumed % batches_per_epoch)

    # -- run files: the recipe, the log (cut back to the resumed step), trackers ----------------------
    if accelerator.is_main_process:  # output_dir exists: check_output_dir made it
        (output_dir / "train_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
    run_log = RunLog(output_dir / "train_log.jsonl", accelerator)
    last = run_log.restart(resumed_from)  # the last training record: the metrics of a run resumed at its end
    if start_step >= config.max_steps:
        accelerator.print(
            f"{str(output_dir)!r} already completed {start_step} of max_steps {config.max_steps} steps: nothing to "
            "train (the final evaluation, model and metrics are written again; raise max_steps to train on)"
        )
    accelerator.init_trackers("train", config=_flat_hparams(config))

    # -- the loop --------------------------------------------------------------------------------------
    model.train()
    default_loops = accelerator.unwrap_model(model).config.train_loops
    objective = objective_of(config, accelerator.device)
    stats = TrainingStats()
    started = time.perf_counter()
    progress = tqdm(
        total=config.max_steps, initial=start_step, disable=not accelerator.is_local_main_process, desc="train"
    )
    for step in range(start_step, config.max_steps):
        num_loops = default_loops if schedule is None or per_batch_loops else schedule.sample(config.seed, step)
        for micro_batch in range(config.gradient_accumulation_steps):
            batch = next(batches)
            if per_batch_loops:  # drawn above this batch's difficulty
                batch, difficulty = batch
                num_loops = schedule.sample(config.seed, step, difficulty, micro_batch)
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
            last = stats.means(accelerator) | {
                "train/lr": lr_scheduler.get_last_lr()[0],
                "train/num_loops": sum(stats.loops) / len(stats.loops),
                "epoch": (done * config.gradient_accumulation_steps) / batches_per_epoch,
            }
            if schedule is not None:  # the sampled count of every step (or micro-batch, when drawn per batch)
                last["loops"] = stats.loops[:: 1 if per_batch_loops else config.gradient_accumulation_steps]
            if grad_norm is not None:  # a tensor (a DTensor under FSDP2), a float or None (DeepSpeed)
                last["train/grad_norm"] = _as_float(grad_norm)
            run_log.write(last, done)
            progress.set_postfix(loss=f"{last['train/loss']:.4g}", loops=f"{last['train/loop_steps']:.1f}")
            stats = TrainingStats()
        if eval_set is not None and config.eval_every and done % config.eval_every == 0 and done < config.max_steps:
            with gathered(model, plan):
                run_log.write(evaluate_loss(model, eval_set, task, accelerator, eval_batch), done)
        if checkpoint_now:
            save_checkpoint(accelerator, config, done, global_batch, sharded)
    progress.close()

    # -- evaluation: the held-out loss of the trained model ---------------------------------------------
    final_eval = {}
    if eval_set is not None:
        with gathered(model, plan):
            final_eval = evaluate_loss(model, eval_set, task, accelerator, eval_batch)
        run_log.write(final_eval, config.max_steps)

    # -- the end: the model in Hugging Face format, metrics ----------------------------------------------
    accelerator.wait_for_everyone()
    state_bytes = torch.tensor([local_state_bytes(model, optimizer)], device=accelerator.device)
    state_bytes = int(accelerator.gather(state_bytes).max())  # the largest process's parameters + optimizer
    unwrapped = save_final_model(model, accelerator, plan, config, task)
    metrics = {
        "step": config.max_steps,
        "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "sharding": sharding_of(accelerator, plan),
        "state_bytes_per_process": state_bytes,
        "mixed_precision": accelerator.mixed_precision,
        "global_batch": global_batch,
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
    model = optimizer = lr_scheduler = train_loader = batches = outputs = objective = None
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()
    return TrainResult(metrics=metrics, model=unwrapped)


# ----------------------------------------------------------------------------------------------------
# Set-up
# ----------------------------------------------------------------------------------------------------


def make_accelerator(config: TrainConfig) -> Accelerator:
    """The run's `Accelerator`: mixed precision, gradient accumulation by hand, seedable data order, trackers."""
    from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
    from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration

    log_with = None
    if config.tracker == "tensorboard":
        from accelerate.utils import is_tensorboard_available

        log_with = "tensorboard" if is_tensorboard_available() else None
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
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=config.find_unused_parameters)],
    )


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


def initial_model(config: TrainConfig, task: TaskAdapter) -> Any:
    """The model training starts from: ``init_from`` with the recipe's loop settings, or a fresh one; with
    ``lora``, wrapped by peft so that only the adapters train. (`check_recipe` has checked the settings.)"""
    from .tasks.models import build_model

    if config.init_from is None:
        model = build_model(task, **config.model)
    else:
        from .tasks.models import load_model

        model = load_model(config.init_from, task.head).train()
        for key, value in config.model.items():
            setattr(model.config, key, value)
    if config.lora:
        from peft import get_peft_model

        from .integrations.peft import lora_config

        model = get_peft_model(model, lora_config(**config.lora))
    return model


def make_optimizer(model: Any, config: TrainConfig) -> Any:
    """AdamW over the trainable parameters, without weight decay on biases and norm weights (those below 2-D)."""
    import torch

    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate,
        betas=tuple(config.adam_betas),
    )


def objective_of(config: TrainConfig, device: Any) -> Objective:
    """The training objective of the recipe (the teacher, if any, loaded frozen on ``device``)."""
    from .objective import Objective, load_teacher

    weight, temperature = distill_settings(config)
    return Objective(
        deep_supervision=tuple(config.deep_supervision),
        jacobian_penalty=config.jacobian_penalty,
        fixed_point_penalty=config.fixed_point_penalty,
        teacher=None if config.teacher is None else load_teacher(config.teacher, device),
        distill_weight=float(weight),
        temperature=float(temperature),
    )


def batch_stream(loader: Any, accelerator: Accelerator, epoch: int, skip: int) -> typing.Iterator[Any]:
    """Micro-batches forever: epoch by epoch (each shuffled by ``seed + epoch``), the first one after
    ``skip`` already-consumed batches."""
    while True:
        loader.set_epoch(epoch)
        yield from accelerator.skip_first_batches(loader, skip) if skip else loader
        epoch, skip = epoch + 1, 0


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
# What the loop measures and logs
# ----------------------------------------------------------------------------------------------------


@dataclass
class RunLog:
    """``train_log.jsonl`` (written by the main process) and the trackers: one record per log or evaluation."""

    path: Path
    accelerator: Accelerator

    def restart(self, resumed_from: int | None) -> dict[str, Any]:
        """Cut the log back to the resumed step (empty it for a fresh run); return the last training record kept
        ({} for a fresh run and off the main process)."""
        if not self.accelerator.is_main_process:
            return {}
        kept = []
        if resumed_from is not None and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= resumed_from]
        self.path.write_text("".join(line + "\n" for line in kept))
        return next((record for record in map(json.loads, reversed(kept)) if "train/loss" in record), {})

    def write(self, record: dict[str, Any], step: int) -> None:
        """Append ``record`` at ``step``; its numbers also go to the trackers."""
        self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)
        if self.accelerator.is_main_process:
            with self.path.open("a") as handle:
                handle.write(json.dumps({"step": step, **record}) + "\n")


@dataclass
class TrainingStats:
    """What the next training record averages: per-name sums over the micro-batches since the last record
    (float64 tensors, left on the device) and the loop count of each micro-batch."""

    sums: dict[str, Any] = field(default_factory=dict)
    loops: list[int] = field(default_factory=list)

    def add_micro_batch(self, loss: Any, parts: dict[str, Any], loop_stats: Any, num_loops: int) -> None:
        """Add one micro-batch's loss, its parts (when there are several), loop count and loop statistics."""
        self.loops.append(num_loops)
        measured = {
            "train/loss": loss.detach(),
            **({f"train/{name}": value for name, value in parts.items()} if len(parts) > 1 else {}),
            "train/loop_steps": loop_stats.steps.double().mean(),
            "train/rel_residual": loop_stats.final_rel_residual.double().mean(),
            "train/converged": loop_stats.converged.double().mean(),
        }
        for name, value in measured.items():
            self.sums[name] = self.sums.get(name, 0) + value.double()

    def means(self, accelerator: Accelerator) -> dict[str, float]:
        """Each name's mean over the micro-batches of every process (all processes ran the same number)."""
        import torch

        totals = accelerator.reduce(torch.stack(list(self.sums.values())), "mean")
        return dict(zip(self.sums, (totals / len(self.loops)).tolist(), strict=True))


@dataclass
class HeldOutSums:
    """One process's sums over held-out batches (float64 tensors on its device): the loss weighted by the rows
    of its batch, the loop statistics summed over rows, and the number of rows."""

    loss: Any
    loop_steps: Any
    rel_residual: Any
    converged: Any
    rows: Any

    @classmethod
    def zeros(cls, device: Any) -> HeldOutSums:
        import torch

        return cls(*(torch.zeros((), dtype=torch.float64, device=device) for _ in dataclasses.fields(cls)))

    def add(self, outputs: Any) -> None:
        """Add one batch's model outputs."""
        rows = outputs.logits.shape[0]
        stats = outputs.loop_stats
        self.loss += outputs.loss.double() * rows
        self.loop_steps += stats.steps.double().sum()
        self.rel_residual += stats.final_rel_residual.double().sum()
        self.converged += stats.converged.double().sum()
        self.rows += rows

    def means(self, accelerator: Accelerator) -> dict[str, float]:
        """The row-weighted means over every process's rows, as ``eval/<name>``."""
        import torch

        names = [f.name for f in dataclasses.fields(self)]
        totals = accelerator.reduce(torch.stack([getattr(self, name) for name in names]), "sum").tolist()
        sums = dict(zip(names, totals, strict=True))
        rows = max(sums.pop("rows"), 1.0)
        return {f"eval/{name}": value / rows for name, value in sums.items()}


def _no_grad(function):
    """``torch.no_grad()`` as a decorator, with torch imported at the call."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import torch

        with torch.no_grad():
            return function(*args, **kwargs)

    return wrapper


@_no_grad
def evaluate_loss(
    model: Any, dataset: Any, task: TaskAdapter, accelerator: Accelerator, batch_size: int
) -> dict[str, float]:
    """Held-out loss at the model's inference loop count, plus its loop statistics.

    Every process scores its own contiguous shard of ``dataset`` (no padding rows); the sums are
    reduced across processes, so the result is the row-weighted mean over the whole set.
    """
    import torch
    from accelerate.utils import send_to_device
    from torch.utils.data import DataLoader

    from .tasks.base import feedback_kwargs

    shard = dataset.shard(num_shards=accelerator.num_processes, index=accelerator.process_index, contiguous=True)
    # its own generator: creating the iterator then draws no number from the global RNG
    loader = DataLoader(shard, batch_size=batch_size, collate_fn=task.encode, generator=torch.Generator())
    unwrapped = accelerator.unwrap_model(model)
    was_training = unwrapped.training
    unwrapped.eval()
    sums = HeldOutSums.zeros(accelerator.device)
    for batch in loader:
        batch = send_to_device(batch, accelerator.device)
        sums.add(unwrapped(**batch, **feedback_kwargs(task, batch)))
    unwrapped.train(was_training)
    return sums.means(accelerator)


def _as_float(value: Any) -> float:
    """A float from a tensor, a DTensor (FSDP2 gradient norms) or a number."""
    if hasattr(value, "full_tensor"):
        value = value.full_tensor()
    return float(value)


# ----------------------------------------------------------------------------------------------------
# The final save
# ----------------------------------------------------------------------------------------------------


def save_final_model(model: Any, accelerator: Accelerator, plan: LaunchPlan, config: TrainConfig, task: TaskAdapter):
    """Write ``model/`` (and, with ``lora``, ``adapter/``: the adapters alone, then the model with them merged);
    collective. Returns the saved model (None off the main process under FSDP on CPU processes)."""
    output_dir = Path(config.output_dir)
    unwrapped, state_dict = final_model(model, accelerator, plan, config, task)
    if unwrapped is not None and config.lora:
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


def final_model(
    model: Any, accelerator: Accelerator, plan: LaunchPlan, config: TrainConfig, task: TaskAdapter
) -> tuple[Any, dict | None]:
    """The trained model to save, unwrapped, and its state dict (None: the model's own); collective. Under FSDP
    on CPU processes the shards are gathered into an unsharded copy on the main process (None elsewhere)."""
    if plan.shard_on_cpu:
        state = full_state_dict(model)
        if not accelerator.is_main_process:
            return None, None
        unsharded = initial_model(config, task)
        unsharded.load_state_dict(state)
        return unsharded, None
    state_dict = None if config.lora else accelerator.get_state_dict(model)  # gathered by accelerate's FSDP
    return accelerator.unwrap_model(model), state_dict


def write_run_record(config: TrainConfig, task: TaskAdapter, metrics: dict[str, Any], global_batch: int) -> None:
    """Main process, after the model is saved: what eval rebuilds the task from (``implicit_task.json``), the
    task's artifacts and the model card in ``model/``, and ``metrics.json``."""
    from .modeling.model_card import write_model_card
    from .tasks.base import TASK_FILE

    output_dir = Path(config.output_dir)
    task_record = {"task": config.task, "task_kwargs": config.task_kwargs, "task_module": config.task_module}
    (output_dir / "model" / TASK_FILE).write_text(json.dumps(task_record, indent=2))
    task.save_artifacts(output_dir / "model")  # e.g. a causal-LM task's tokenizer
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_model_card(output_dir / "model", training=training_summary(config, metrics, global_batch))


def sharding_of(accelerator: Accelerator, plan: LaunchPlan) -> str | None:
    """How the run sharded the model: "fsdp2" (accelerate's, or torch's fully_shard on CPU processes),
    "deepspeed", or None (replicated)."""
    from accelerate.utils import DistributedType

    if plan.shard_on_cpu or accelerator.distributed_type == DistributedType.FSDP:
        return "fsdp2"
    return "deepspeed" if accelerator.distributed_type == DistributedType.DEEPSPEED else None


def training_summary(config: TrainConfig, metrics: dict[str, Any], global_batch: int) -> dict[str, Any]:
    """What the model card says about the run: task, steps, loop schedule, objective, final metrics."""
    schedule = loop_schedule_of(config)
    summary = {
        "task": config.task,
        "task_kwargs": config.task_kwargs,
        "init_from": None if config.init_from is None else Path(config.init_from).name,
        "steps": config.max_steps,
        "global_batch": global_batch,
        "loop_schedule": None if schedule is None else dataclasses.asdict(schedule),
        "lora": config.lora or None,
        "teacher": None if config.teacher is None else Path(config.teacher).name,
        "distill": config.distill or None,
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
        config = parse_args(argv)
        return train(config)
    except (RecipeError, LaunchError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
