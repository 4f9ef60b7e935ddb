"""Models for tasks: the model classes of each task head (`HEADS`), whether a checkpoint fits a task
(`check_fits`), building and loading a model for a task, and finding the task a checkpoint was trained on again
(`task_for_model`). Used by training (``init_from``), evaluation and the command line.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import transformers

from .. import modeling
from .base import TASK_FILE, TaskAdapter, get_task

# A task's ``head`` -> its model classes (the one table, in the model code).
HEADS = modeling.HEADS


def missing_head(architectures: list[str], head: str) -> str | None:
    """The model class a task of ``head`` needs when a checkpoint's ``architectures`` do not include it; None when
    they do (or name none)."""
    expected = HEADS[head].model_class if head in HEADS else None
    return expected if expected and architectures and expected not in architectures else None


def check_fits(task: TaskAdapter, config: Mapping[str, Any]) -> list[str]:
    """Why an implicit checkpoint whose ``config.json`` holds ``config`` does not fit ``task``: empty when it fits.

    A wrong head is the one reason given when there is one (the task needs a {head} model); otherwise each input
    size and the attention causality must equal the task's (`TaskAdapter.model_config`), the number of labels too
    for a task that is not a causal LM, and the vocabulary must cover the task's.
    """
    architectures = config.get("architectures") or []
    expected = missing_head(architectures, task.head)
    if expected:
        return [f"the task needs a {task.head} model ({expected}), the checkpoint is {', '.join(architectures)}"]
    needs = task.model_config()
    has = {
        "input_features": config.get("input_features", 0),
        "edge_features": config.get("edge_features", 0),
        "feedback_features": config.get("feedback_features", 0),
        "is_causal": config.get("is_causal", True),
    }
    if task.head != "causal_lm":
        has["num_labels"] = len(config["id2label"]) if config.get("id2label") else config.get("num_labels", 2)
    problems = [
        f"{key}: task needs {needs[key]!r}, checkpoint has {value!r}"
        for key, value in has.items()
        if key in needs and needs[key] != value
    ]
    if "vocab_size" in needs and config.get("vocab_size", 0) < needs["vocab_size"]:
        problems.append(f"vocab_size: task needs >= {needs['vocab_size']}, checkpoint has {config.get('vocab_size')}")
    return problems


def build_model(task: TaskAdapter, **config_overrides: Any):
    """A fresh implicit model with the head and input sizes ``task`` needs, plus ``config_overrides``."""
    fixed = task.model_config()
    clashes = {k: (v, fixed[k]) for k, v in config_overrides.items() if k in fixed and fixed[k] != v}
    if clashes:
        details = ", ".join(
            f"{k}={mine!r} (task {task.name!r} needs {theirs!r})" for k, (mine, theirs) in clashes.items()
        )
        raise ValueError(f"model settings conflict with the task: {details}")
    model_class = getattr(modeling, HEADS[task.head].model_class)
    return model_class(modeling.ImplicitConfig(**{**config_overrides, **fixed}))


def load_model(model_dir: str | Path, head: str, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The checkpoint in ``model_dir`` through the Auto class of ``head`` (the task's head type), in eval mode.

    A checkpoint that cannot be loaded is an ``OSError`` naming it, as transformers reports an unreadable
    config.json: also a setting its config.json or generation_config.json holds that the model's checks refuse
    (e.g. a loop count past the bound it was saved under); importing `implicit_hf.modeling` registered the
    implicit model type with the Auto classes."""
    if head not in HEADS:
        raise ValueError(f"unknown task head {head!r}; expected one of {sorted(HEADS)}")
    try:
        model = getattr(transformers, HEADS[head].auto_class).from_pretrained(str(model_dir))
    except ValueError as err:  # a refused setting of the checkpoint's files (JSONDecodeError is one too)
        raise OSError(f"cannot load the checkpoint {str(model_dir)!r}: {err}") from err
    return model.to(device).eval()


def recorded_task(model_dir: str | Path) -> dict[str, Any] | None:
    """The task a model was trained on (``implicit_task.json`` written by the training loop), or ``None``; a
    ``ValueError`` naming the file when it is not such a record."""
    path = Path(model_dir) / TASK_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{str(path)!r} is not valid JSON: {err}") from err
    if not isinstance(record, dict) or not isinstance(record.get("task"), str):
        raise ValueError(f"{str(path)!r} does not record a task (a JSON object with a 'task' name)")
    if not isinstance(record.get("task_kwargs") or {}, dict):
        raise ValueError(f"{str(path)!r}: task_kwargs must be a JSON object; got {record['task_kwargs']!r}")
    return record


def task_for_model(
    model_dir: str | Path, task_name: str | TaskAdapter | None, task_kwargs: dict[str, Any] | None
) -> tuple[TaskAdapter, dict[str, Any]]:
    """The task to score ``model_dir`` on, and its constructor arguments: ``task_name`` / ``task_kwargs``
    when given, else what the model was trained on.

    Recorded constructor arguments fill in only for the recorded task, and only when ``task_kwargs`` is
    not given, so a model trained on ``deblur`` with ``blur_sigma: 2.5`` is scored on that blur by default.
    """
    record = recorded_task(model_dir)
    if task_name is None:
        if record is None:
            raise ValueError(
                f"no task given and {str(Path(model_dir) / TASK_FILE)!r} does not exist "
                "(it is written by implicit-hf train): pass the task name (--task)"
            )
        task_name = record["task"]
    if record is not None and task_name == record["task"]:
        if record.get("task_module"):
            importlib.import_module(record["task_module"])
        if task_kwargs is None:
            task_kwargs = record.get("task_kwargs") or {}
    task_kwargs = dict(task_kwargs or {})
    task = task_name if isinstance(task_name, TaskAdapter) else get_task(task_name, **task_kwargs)
    return task, task_kwargs
