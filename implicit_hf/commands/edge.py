"""Checks at the edge of the commands: model and output paths, tasks against models (``--device`` is checked by
`implicit_hf.eval.harness.resolve_device`). Each refuses with a `UsageError` naming the option and the value,
before anything is loaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

from ..arguments import UsageError
from ..checks import TaskSettingError
from ..local_paths import check_writable_folder, looks_local
from ..tasks.base import TaskAdapter
from ..tasks.models import check_fits, task_for_model


def check_model_path(value: str | Path, option: str, needs_config: bool = True) -> str:
    """``value`` as given if it is a checkpoint folder (with ``config.json`` when ``needs_config``) or could be a
    hub id; else a `UsageError` naming ``option`` and the path."""
    spec = str(value)
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"{option} {spec!r} is a file; expected a checkpoint folder")
        if needs_config and not (path / "config.json").is_file():
            raise UsageError(f"{option} {spec!r} is not a checkpoint folder: it has no config.json")
        return str(path)
    if looks_local(spec):
        raise UsageError(f"{option} {spec!r} does not exist")
    return spec  # a hub id: transformers looks it up (an OSError, reported on one line, if it cannot)


def check_output_folder(value: str | Path, option: str) -> None:
    """``value`` must be a folder this process can write, checked before any work is done (so that a run is not
    lost when it writes its results): a file there, a path under a file or a place that cannot be written is a
    `UsageError` naming ``option`` and the path. The folders it creates to find out are removed again."""
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {str(value)!r} is a file; expected a folder to write to")
    try:
        check_writable_folder(path, keep=False)
    except OSError as err:
        raise UsageError(f"{option} {str(value)!r} cannot be written: {err.strerror or err}") from None


def saved_config(model: str, option: str) -> dict[str, Any]:
    """The ``config.json`` of the checkpoint folder (or hub id) ``model`` given as ``option``, as a dict; a
    `UsageError` naming the option and the file when it is not a JSON object."""
    path = Path(model) / "config.json"
    if not path.is_file():
        return PretrainedConfig.get_config_dict(model)[0]
    try:
        saved = json.loads(path.read_text())
    except ValueError as err:  # not JSON, not UTF-8
        raise UsageError(f"{option} {model!r}: {str(path)!r} is not valid JSON: {err}") from err
    if not isinstance(saved, dict):
        raise UsageError(
            f"{option} {model!r}: {str(path)!r} is not a model config (a JSON object of config fields); got "
            f"{json.dumps(saved)[:40]}"
        )
    return saved


def check_task_fits(model: str, task: TaskAdapter, option: str = "--model", explicit: bool = False) -> None:
    """The checkpoint ``model`` must be an implicit model with the head and input sizes ``task`` needs
    (`implicit_hf.tasks.models.check_fits`); with ``explicit`` (a baseline) a plain transformers causal LM
    (``...ForCausalLM``) also fits a causal-LM task whose vocabulary it covers: it is scored with one forward
    pass."""
    saved = saved_config(model, option)
    model_type = saved.get("model_type")
    architectures = saved.get("architectures") or []
    if model_type == "implicit":
        problems = check_fits(task, saved)
    elif explicit and task.head == "causal_lm" and any(name.endswith("ForCausalLM") for name in architectures):
        needs = task.model_config().get("vocab_size", 0)
        has = saved.get("vocab_size", 0)
        problems = [f"vocab_size: task needs >= {needs}, checkpoint has {has}"] if has < needs else []
    elif explicit and task.head == "causal_lm":
        raise UsageError(
            f"{option} {model!r} is neither an implicit checkpoint nor a causal LM (architectures {architectures})"
        )
    else:
        raise UsageError(
            f"{option} {model!r} is not an implicit checkpoint (config.json model_type {model_type!r}); "
            "turn a Llama-family model into one with implicit-hf convert"
        )
    if problems:
        raise UsageError(f"task {task.name!r} does not fit {option} {model!r}: {'; '.join(problems)}")


def task_of(model: str, task_name: str | None, task_kwargs: dict[str, Any] | None) -> tuple[TaskAdapter, dict]:
    """The task ``--task`` names (or the one recorded with ``model``) and its arguments (`task_for_model`); an
    unknown task, refused arguments or a missing record is a `UsageError` saying where the task came from."""
    try:
        return task_for_model(model, task_name, task_kwargs)
    except (UsageError, TaskSettingError):  # a refused setting names the task and the setting itself
        raise
    except (TypeError, ValueError, ImportError) as err:  # an unknown task, refused arguments, a missing module
        where = f"--task {task_name!r}" if task_name else f"the task recorded with --model {model!r}"
        raise UsageError(f"{where}: {err}") from err
