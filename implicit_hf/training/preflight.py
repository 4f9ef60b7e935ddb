"""The recipe checks that need its task, run before any process trains: each fails with a `RecipeError` naming
the key, before any data or weights exist.

`check_recipe` builds the model config training starts from once (a fresh one, or ``init_from``'s with the
recipe's loop settings) and returns it, so the loop builds the model from the config checked here; it also
checks the teacher against that vocabulary, ``lora`` and the learning-rate schedule. `check_output_dir`
makes sure ``output_dir`` can be written and holds no run the recipe would silently overwrite or miss. Only
``lora.modules_to_save`` needs the built model: `check_modules_to_save`.
"""

from __future__ import annotations

import difflib
import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any

import torch
from safetensors import SafetensorError, safe_open
from transformers import SchedulerType, get_scheduler
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

from ..checks import TaskSettingError, check_setting
from ..local_paths import check_writable_folder
from ..modeling import ImplicitConfig
from ..modeling.configuration_implicit import RUNTIME_LOOP_FIELDS
from ..tasks.base import TASKS, TaskAdapter, get_task
from ..tasks.generation import load_tokenizer
from ..tasks.models import check_fits, missing_head
from .checkpoints import CHECKPOINT_MARKER, find_checkpoints
from .fields import choice
from .objective import check_teacher
from .recipe import RecipeError, TrainConfig

WEIGHT_FILES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
# the names transformers.get_scheduler knows, less those that need more than (optimizer, warmup, total steps) to step
SCHEDULERS = tuple(s.value for s in SchedulerType if s.value not in ("reduce_lr_on_plateau", "greedy"))


def task_from_recipe(config: TrainConfig) -> TaskAdapter:
    """The recipe's task adapter (imports ``task_module`` first so a custom task registers)."""
    if config.task_module:
        try:
            importlib.import_module(config.task_module)
        except ImportError as err:
            raise RecipeError(f"recipe key 'task_module': cannot import {config.task_module!r}: {err}") from err
    try:
        return get_task(config.task, **config.task_kwargs)
    except TaskSettingError as err:  # a setting the task refuses: the message names the task and the setting
        raise RecipeError(f"recipe key 'task_kwargs': {err}") from err
    except (TypeError, ValueError) as err:  # an unknown task, or a custom task's own error
        key = "task_kwargs" if config.task in TASKS else "task"
        raise RecipeError(f"recipe key {key!r} (task {config.task!r}): {err}") from err


def check_recipe(config: TrainConfig, task: TaskAdapter) -> ImplicitConfig:
    """Everything that can be wrong with ``config`` for ``task``; returns the checked config of the model training
    starts from (without its weights)."""
    _check_difficulty(config, task)
    model_config = _init_from_config(config, task) if config.init_from else _fresh_model_config(config, task)
    _check_teacher_fits(config, task, model_config.vocab_size)
    _check_lora(config)
    _check_scheduler(config)
    return model_config


def _check_difficulty(config: TrainConfig, task: TaskAdapter) -> None:
    """A loop schedule tied to difficulty, or batches grouped by it, need a task that rates its rows."""
    schedule = config.loop_schedule
    wanted = [
        key
        for key, needed in (
            ("loop_schedule", schedule is not None and schedule.needs_difficulty),
            ("group_by_difficulty", config.group_by_difficulty),
        )
        if needed
    ]
    if wanted and type(task).difficulty is TaskAdapter.difficulty:
        raise RecipeError(
            f"recipe key {wanted[0]!r} needs the difficulty of a row, and task {task.name!r} has none "
            "(TaskAdapter.difficulty)"
        )


def _fresh_model_config(config: TrainConfig, task: TaskAdapter) -> ImplicitConfig:
    """``model`` with the sizes ``task`` fixes: unknown fields, clashes and invalid values are refused (ImplicitConfig
    itself keeps unknown keyword arguments as extra attributes, as transformers configs do)."""
    allowed = set(ImplicitConfig().to_dict()) | {"num_labels", "attn_implementation"}
    allowed -= {"model_type", "transformers_version", "_name_or_path", "auto_map"}
    for key in config.model:
        if key not in allowed:
            close = difflib.get_close_matches(key, sorted(allowed), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RecipeError(f"recipe key 'model': unknown ImplicitConfig field {key!r}{hint}")
    fixed = task.model_config()
    clashes = {k: (v, fixed[k]) for k, v in config.model.items() if k in fixed and fixed[k] != v}
    if clashes:
        details = ", ".join(f"{k}={mine!r} (task needs {theirs!r})" for k, (mine, theirs) in clashes.items())
        raise RecipeError(f"recipe key 'model' conflicts with task {task.name!r}: {details}")
    try:
        return ImplicitConfig(**{**config.model, **fixed})
    except (ValueError, TypeError) as err:
        raise RecipeError(f"recipe key 'model': {err}") from err


def _init_from_config(config: TrainConfig, task: TaskAdapter) -> ImplicitConfig:
    """``init_from``'s config with the recipe's ``model`` settings applied (the one place they are): it must be an
    implicit checkpoint that fits the task, and ``model`` may set only loop settings that own no weights."""
    path = Path(config.init_from)
    _check_init_from_files(path, task)
    try:
        saved = ImplicitConfig.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise RecipeError(f"recipe key 'init_from': {str(path)!r} is not an implicit checkpoint: {err}") from err
    structural = sorted(set(config.model) - set(RUNTIME_LOOP_FIELDS))
    if structural:
        raise RecipeError(
            f"recipe key 'model': with init_from, only loop settings that own no weights can change "
            f"({', '.join(RUNTIME_LOOP_FIELDS)}); got {structural}"
        )
    try:
        for key, value in config.model.items():
            setattr(saved, key, value)
        saved.validate_loop_settings()
    except ValueError as err:
        raise RecipeError(f"recipe key 'model': {err}") from err
    return saved


def _check_init_from_files(path: Path, task: TaskAdapter) -> None:
    """``init_from`` must be a folder holding an implicit checkpoint that fits the task (its head, its input sizes
    and a vocabulary covering the task's: `check_fits`, as ``implicit-hf eval`` asks) with readable weights: a
    Llama checkpoint, say, would pass every other check and fail at the first training step."""
    where = f"recipe key 'init_from': {str(path)!r}"
    try:
        saved = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as err:  # no such file (not a checkpoint directory), unreadable, not JSON
        raise RecipeError(f"{where} is not a checkpoint directory with a readable config.json: {err}") from err
    if not isinstance(saved, dict):
        raise RecipeError(
            f"{where}: config.json is not a model config (a JSON object of config fields); got {json.dumps(saved)[:40]}"
        )
    model_type, architectures = saved.get("model_type"), saved.get("architectures") or []
    if model_type != "implicit":
        raise RecipeError(
            f"{where} is not an implicit checkpoint (config.json model_type {model_type!r}); init_from takes one "
            "written by save_pretrained, implicit-hf train or implicit-hf convert (which turns a Llama-family "
            "model into one)"
        )
    expected = missing_head(architectures, task.head)
    if expected:
        raise RecipeError(
            f"{where} is {', '.join(architectures)}; task {task.name!r} needs a {task.head} model ({expected})"
        )
    problems = check_fits(task, saved)
    if problems:
        raise RecipeError(f"{where}: the checkpoint does not fit task {task.name!r}: {'; '.join(problems)}")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise RecipeError(f"{where} has no weights (none of {', '.join(WEIGHT_FILES)})")
    for weights in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(weights), "pt"):  # reads the header only; a truncated file is refused
                pass
        except (OSError, SafetensorError) as err:
            raise RecipeError(f"{where}: cannot read the weights in {weights.name}: {err}") from err


def _check_teacher_fits(config: TrainConfig, task: TaskAdapter, vocab_size: int) -> None:
    """The teacher must be a causal-LM checkpoint with the student's vocabulary (and tokenizer, where known)."""
    if config.teacher is None:
        return
    if task.head != "causal_lm":
        raise RecipeError(f"recipe key 'teacher': distillation needs a causal-LM task; {task.name!r} is {task.head}")
    tokenizer = getattr(task, "tokenizer", None)
    if tokenizer is None and config.init_from is not None and (Path(config.init_from) / "tokenizer.json").is_file():
        try:
            tokenizer = load_tokenizer(config.init_from, "checkpoint")
        except OSError as err:
            raise RecipeError(f"recipe key 'init_from': {err}") from err
    try:
        check_teacher(config.teacher, vocab_size, tokenizer)
    except (OSError, ValueError) as err:
        raise RecipeError(f"recipe key 'teacher': {err}") from err


def lora_integration() -> ModuleType:
    """`implicit_hf.integrations.peft`, imported when a recipe asks for ``lora``: peft is an optional extra, so
    this is the one place training imports it; without peft a `RecipeError` says how to install it."""
    try:
        from ..integrations import peft
    except ImportError as err:
        raise RecipeError(f"recipe key 'lora' needs peft (pip install 'implicit-hf[peft]'): {err}") from err
    return peft


def _check_lora(config: TrainConfig) -> None:
    """An invalid ``lora`` (bad rank, dropout or layer groups) fails before training; it needs peft."""
    if config.lora is None:
        return
    try:
        lora_integration().lora_config(**config.lora.peft_kwargs())
    except (TypeError, ValueError) as err:
        raise RecipeError(f"recipe key 'lora': {err}") from err


def _check_scheduler(config: TrainConfig) -> None:
    """The learning-rate schedule must be one `SCHEDULERS` names, and is built on a dummy optimizer so that missing
    scheduler arguments fail early."""
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    try:
        check_setting("lr_scheduler", config.lr_scheduler, Annotated[str, choice(SCHEDULERS)])
        get_scheduler(
            config.lr_scheduler,
            dummy,
            num_warmup_steps=config.warmup_steps,
            num_training_steps=config.max_steps,
            scheduler_specific_kwargs=config.lr_scheduler_kwargs,
        )
    except (ValueError, TypeError) as err:
        raise RecipeError(f"recipe keys 'lr_scheduler' / 'lr_scheduler_kwargs': {err}") from err


def check_output_dir(config: TrainConfig) -> None:
    """``output_dir`` holds no checkpoints unless the recipe resumes or overwrites them (and some when it
    resumes); it is created and a file written in it (removed at once), so that a file there, a path under a
    file or a place that cannot be written fails before training. Every process may run it at once."""
    path = Path(config.output_dir)
    if not config.resume and not config.overwrite_output_dir and find_checkpoints(path):
        raise RecipeError(
            f"output_dir {str(path)!r} already holds checkpoints: pass --resume to continue that run, "
            "--overwrite_output_dir true to start afresh, or choose another output_dir"
        )
    if config.resume and not find_checkpoints(path):
        raise RecipeError(
            f"--resume: nothing to resume in {str(path / 'checkpoints')!r} (no checkpoint with its "
            f"completion marker {CHECKPOINT_MARKER}): run without --resume to start afresh"
        )
    where = f"recipe key 'output_dir' ({str(path)!r})"
    if path.exists() and not path.is_dir():
        raise RecipeError(f"{where} is a file; it must be a folder to write the run to")
    try:
        check_writable_folder(path, keep=True)
    except OSError as err:
        raise RecipeError(f"{where} cannot be written: {err.strerror or err}") from None


def check_modules_to_save(model: Any, names: list[str]) -> None:
    """peft ignores a ``lora.modules_to_save`` name that matches no module of ``model`` (peft-wrapped); refuse it
    instead. The one recipe check that needs the built model, so it runs when training builds it."""
    peft = lora_integration()
    unmatched = peft.unmatched_modules_to_save(model, names)
    if unmatched:
        implicit = peft.implicit_model_of(model)
        present = [name for name, child in implicit.named_children() if type(child).__name__ != "ModuleList"]
        raise RecipeError(
            f"recipe key 'lora': modules_to_save {unmatched} match no module of this model; "
            f"its small modules: {present}"
        )
