"""One Accelerate training loop for every head and task.

Usage (one process, or any ``accelerate launch`` setup: DDP, FSDP, DeepSpeed)::

    python -m implicit_hf.train RECIPE.yaml [--key value ...] [--resume]
    accelerate launch --config_file configs/accelerate/ddp.yaml -m implicit_hf.train RECIPE.yaml

A recipe is a YAML mapping of `TrainConfig` fields. ``--key value`` overrides one field (the value is
read as YAML: ``--random_loops "[2, 8]"``, ``--model '{hidden_size: 64}'``); ``--model.hidden_size 64``
sets one entry of a mapping field. A recipe with an unknown key, a value of the wrong type, an unknown
task or an invalid model setting is refused before anything is trained, with a message naming the key.

What a run writes under ``output_dir``::

    train_config.json           the resolved recipe
    train_log.jsonl             one JSON record per log_every steps (and eval results)
    logs/train/                 tensorboard events (tracker: tensorboard)
    checkpoints/step_N/         accelerator.save_state + trainer_state.json (written last: marks it complete)
    model/                      the trained model (save_pretrained; loads with the Auto classes; with
                                LoRA, the adapters merged into the weights),
                                implicit_task.json (task, task_kwargs, task_module: what eval rebuilds)
                                and the task's artifacts (task.save_artifacts: e.g. a tokenizer)
    adapter/                    with ``lora``: the adapters alone (peft save_pretrained)
    metrics.json                final step, world size, last training loss, final held-out loss, runtime

Each step's loop count comes from ``loop_schedule`` (or ``random_loops``; `implicit_hf.loop_schedule`), and
the loss is `implicit_hf.objective.Objective`: the task loss, optionally with deep supervision, the Jacobian
and fixed-point penalties and distillation from a frozen ``teacher``.

``--resume`` continues from the newest complete checkpoint: model, optimizer, scheduler, gradient
scaler and RNG states come back through ``accelerator.load_state``, the data loader skips the batches
already consumed in the current epoch (each epoch's order is seeded by ``seed + epoch``), and the
loop count of every step is a function of ``(seed, step)``, so a resumed run ends bit-identical to an
uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import gc
import importlib
import json
import math
import re
import shutil
import sys
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .distributed import (
    SHARDED_DIR,
    LaunchError,
    LaunchPlan,
    check_fixed_iterations,
    full_state_dict,
    gathered,
    load_sharded,
    local_state_bytes,
    plan_launch,
    save_sharded,
    shard_model,
)

# torch, numpy, transformers and the objective are imported where they are used, so that reading a recipe's
# keys (``implicit-hf train --help``) imports none of them.
if typing.TYPE_CHECKING:
    from .loop_schedule import LoopSchedule
    from .objective import Objective

MIXED_PRECISION = ("no", "fp16", "bf16")
TRACKERS = ("tensorboard", "none")
# transformers schedulers that need more than (optimizer, warmup, total steps) to step
_UNSUPPORTED_SCHEDULERS = ("reduce_lr_on_plateau", "greedy")
CHECKPOINT_MARKER = "trainer_state.json"
LORA_KEYS = ("r", "alpha", "dropout", "parts", "modules", "modules_to_save")


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class TrainConfig:
    """Everything a training run needs; a recipe file sets any of these fields."""

    task: str = _help("registered task name (see implicit_hf.tasks)")
    task_kwargs: dict[str, Any] = _help("keyword arguments of the task's constructor", default_factory=dict)
    task_module: str | None = _help(
        "extra module imported before the task is looked up, so a custom task registers itself", default=None
    )
    model: dict[str, Any] = _help(
        "ImplicitConfig fields (the task fixes its head and input sizes)", default_factory=dict
    )
    init_from: str | None = _help(
        "start from this implicit checkpoint (save_pretrained, implicit-hf convert) instead of a fresh model; "
        "'model' may then set only loop settings that own no weights (num_loops, solver, gradient, ...)",
        default=None,
    )
    lora: dict[str, Any] = _help(
        "train peft LoRA adapters instead of every weight: {r, alpha, dropout, parts: [prelude|core|coda], "
        "modules: [q_proj, ...], modules_to_save: [injection, core_norm, ...] (small modules trained in full, "
        "peft's modules_to_save)} (empty: no LoRA)",
        default_factory=dict,
    )
    output_dir: str = _help("where checkpoints, logs, the final model and metrics go", default="outputs/train")
    seed: int = _help("seed of model init, data generation and order, and random loop counts", default=0)
    train_size: int = _help("number of generated training rows", default=4096)
    eval_size: int = _help("number of generated held-out rows (0: no evaluation)", default=256)
    per_device_batch_size: int = _help("rows per process per micro-batch", default=8)
    eval_batch_size: int | None = _help(
        "rows per process per evaluation batch (default: per_device_batch_size)", default=None
    )
    gradient_accumulation_steps: int = _help("micro-batches per optimizer step", default=1)
    learning_rate: float = _help("peak learning rate of AdamW", default=3e-4)
    weight_decay: float = _help("AdamW weight decay (not applied to biases and norm weights)", default=0.01)
    adam_betas: list[float] = _help("AdamW betas", default_factory=lambda: [0.9, 0.999])
    lr_scheduler: str = _help(
        "a transformers.get_scheduler name (linear, cosine, constant_with_warmup, ...)", default="cosine"
    )
    lr_scheduler_kwargs: dict[str, Any] = _help(
        "scheduler_specific_kwargs of get_scheduler (e.g. min_lr_rate for cosine_with_min_lr)", default_factory=dict
    )
    warmup_steps: int = _help("linear warm-up, in optimizer steps", default=0)
    max_steps: int = _help("optimizer steps to train for", default=1000)
    max_grad_norm: float = _help("gradient-norm clipping (0: off)", default=1.0)
    mixed_precision: str = _help("no | fp16 | bf16", default="no")
    loops_train: int | None = _help("overrides the model's num_loops_train (core iterations in training)", default=None)
    random_loops: list[int] | None = _help(
        "[min, max]: sample each step's loop count uniformly (a function of seed and step, same on every process); "
        "the same as loop_schedule {distribution: uniform, min, max}",
        default=None,
    )
    loop_schedule: dict[str, Any] = _help(
        "each step's loop count, a function of seed and step: {distribution: uniform | poisson_lognormal, "
        "min, max, mean (poisson_lognormal: a log-normal rate of this mean, then a Poisson draw, clipped to "
        "[min, max]), sigma (default 0.5), ramp_steps (the mean rises from min over these steps)} (empty: none)",
        default_factory=dict,
    )
    jacobian_penalty: float = _help(
        "weight of the Hutchinson estimate of ||df/dz||_F^2 / dim at the last iterate (0: off)", default=0.0
    )
    fixed_point_penalty: float = _help(
        "weight of the squared relative residual ||f(z) - z||^2 / ||z||^2 at the last iterate (0: off)", default=0.0
    )
    deep_supervision: list[int] = _help(
        "loop counts at which the task loss is also taken (decoded from the trajectory) and averaged with the "
        "final one; counts >= a step's loop count are skipped",
        default_factory=list,
    )
    teacher: str | None = _help(
        "distill from this frozen AutoModelForCausalLM checkpoint (same vocabulary as the student), e.g. the "
        "unconverted source of a retrofit",
        default=None,
    )
    distill: dict[str, Any] = _help(
        "with teacher: {weight (in [0, 1], default 0.5): loss = (1 - weight) task + weight T^2 KL(teacher || "
        "student), temperature T (> 0, default 1)}",
        default_factory=dict,
    )
    checkpoint_every: int = _help("save a resumable checkpoint every N optimizer steps (0: never)", default=500)
    keep_checkpoints: int = _help("keep only the newest N checkpoints (0: keep all)", default=2)
    log_every: int = _help("log training statistics every N optimizer steps", default=10)
    eval_every: int = _help("held-out loss every N optimizer steps (0: only at the end)", default=500)
    tracker: str = _help("tensorboard | none (tensorboard is used only if importable)", default="tensorboard")
    find_unused_parameters: bool = _help(
        "DDP find_unused_parameters (only needed when some parameters get no gradient in a step)", default=False
    )
    resume: bool = _help("continue from the newest complete checkpoint in output_dir/checkpoints", default=False)
    overwrite_output_dir: bool = _help("start afresh even if output_dir already holds checkpoints", default=False)


@dataclass
class TrainResult:
    """What `train` returns: the final metrics (as in ``metrics.json``) and the trained model (unwrapped; under
    FSDP on CPU processes, the gathered model on the main process and None on the others)."""

    metrics: dict[str, Any]
    model: Any


class RecipeError(ValueError):
    """A recipe that cannot be trained; the message names the offending key."""


# ----------------------------------------------------------------------------------------------------
# Recipes: YAML + command-line overrides -> a validated TrainConfig
# ----------------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> TrainConfig:
    """``RECIPE.yaml [--key value ...] [--resume]`` -> a checked `TrainConfig` (raises `RecipeError`)."""
    if not argv or argv[0].startswith("-"):
        raise RecipeError("the first argument must be a recipe file: RECIPE.yaml [--key value ...] [--resume]")
    path = Path(argv[0])
    if not path.is_file():
        raise RecipeError(f"recipe file {str(path)!r} does not exist")
    try:
        recipe = load_yaml(path.read_text()) or {}
    except ValueError as err:
        raise RecipeError(f"recipe file {str(path)!r} is not valid YAML: {err}") from err
    if not isinstance(recipe, dict):
        raise RecipeError(f"recipe file {str(path)!r} must hold a mapping of TrainConfig fields")
    for key, value in _parse_overrides(argv[1:]):
        if "." in key:  # --model.hidden_size 64 sets one entry of a mapping field
            key, sub = key.split(".", 1)
            _known_key(key)
            if not isinstance(recipe.get(key, {}), dict):
                raise RecipeError(f"recipe key {key!r} must be a mapping to set {key}.{sub}")
            recipe[key] = {**recipe.get(key, {}), sub: value}
        else:
            recipe[key] = value
    return config_from_dict(recipe)


def _parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    hints = typing.get_type_hints(TrainConfig)
    pairs, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise RecipeError(f"expected --key value after the recipe file; got {arg!r}")
        key, has_value, value = arg[2:].partition("=")
        key = key.replace("-", "_")  # --max-steps is --max_steps (recipe keys are identifiers)
        i += 1
        if not has_value:
            is_flag = hints.get(key) in (bool, bool | None)
            if is_flag and (i == len(args) or args[i].startswith("--")):
                pairs.append((key, True))  # bare --resume
                continue
            if i == len(args):
                raise RecipeError(f"--{key} needs a value")
            value, i = args[i], i + 1
        try:
            pairs.append((key, load_yaml(value) if value != "" else ""))
        except ValueError as err:
            raise RecipeError(f"--{key}: {value!r} is not a YAML value: {err}") from err
    return pairs


def load_yaml(text: str) -> Any:
    """``yaml.safe_load``, except that ``1e-4`` is a float (YAML 1.2) rather than a string (YAML 1.1)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )
    try:
        return yaml.load(text, Loader=Loader)  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as err:
        raise ValueError(str(err)) from err


def _known_key(key: str) -> None:
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    if key not in names:
        close = difflib.get_close_matches(key, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RecipeError(f"unknown recipe key {key!r}{hint}; valid keys: {', '.join(names)}")


def config_from_dict(recipe: dict[str, Any]) -> TrainConfig:
    """Check keys and value types, build the `TrainConfig` with `HfArgumentParser`, check the values."""
    from transformers import HfArgumentParser

    hints = typing.get_type_hints(TrainConfig)
    for key in recipe:
        _known_key(key)
    if "task" not in recipe:
        raise RecipeError("recipe key 'task' is required")
    # HfArgumentParser.parse_dict does not check types: do it here, with the key in the message.
    checked = {key: _coerce(key, value, hints[key]) for key, value in recipe.items()}
    (config,) = HfArgumentParser(TrainConfig).parse_dict(checked, allow_extra_keys=False)
    _check_values(config)
    return config


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """``value`` as type ``hint`` or a `RecipeError` naming ``key``."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner)
    origin = typing.get_origin(hint) or hint
    if origin is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"recipe key {key!r} must be true or false; got {value!r}")
    if origin is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise RecipeError(f"recipe key {key!r} must be an integer; got {value!r}")
    if origin is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise RecipeError(f"recipe key {key!r} must be a number; got {value!r}")
    if origin is str:
        if isinstance(value, str):
            return value
        raise RecipeError(f"recipe key {key!r} must be a string; got {value!r}")
    if origin is dict:
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return dict(value)
        raise RecipeError(f"recipe key {key!r} must be a mapping with string keys; got {value!r}")
    if origin is list:
        if isinstance(value, (list, tuple)):
            return [_coerce(f"{key}[{i}]", item, args[0]) for i, item in enumerate(value)]
        raise RecipeError(f"recipe key {key!r} must be a list; got {value!r}")
    raise TypeError(f"TrainConfig.{key}: unsupported annotation {hint!r}")  # a bug in TrainConfig, not the recipe


def _check_values(config: TrainConfig) -> None:
    from transformers import SchedulerType

    def at_least(key: str, minimum: int) -> None:
        if getattr(config, key) < minimum:
            raise RecipeError(f"recipe key {key!r} must be >= {minimum}; got {getattr(config, key)!r}")

    for key in ("train_size", "per_device_batch_size", "gradient_accumulation_steps", "max_steps", "log_every"):
        at_least(key, 1)
    for key in ("eval_size", "warmup_steps", "checkpoint_every", "keep_checkpoints", "eval_every"):
        at_least(key, 0)
    if config.eval_batch_size is not None:
        at_least("eval_batch_size", 1)
    if config.loops_train is not None:
        at_least("loops_train", 1)
    if not config.learning_rate > 0:
        raise RecipeError(f"recipe key 'learning_rate' must be > 0; got {config.learning_rate!r}")
    for key in ("weight_decay", "max_grad_norm"):
        if not getattr(config, key) >= 0:
            raise RecipeError(f"recipe key {key!r} must be >= 0; got {getattr(config, key)!r}")
    if len(config.adam_betas) != 2 or not all(0 <= b < 1 for b in config.adam_betas):
        raise RecipeError(f"recipe key 'adam_betas' must be two numbers in [0, 1); got {config.adam_betas!r}")
    if config.mixed_precision not in MIXED_PRECISION:
        raise RecipeError(
            f"recipe key 'mixed_precision' must be one of {MIXED_PRECISION}; got {config.mixed_precision!r}"
        )
    if config.tracker not in TRACKERS:
        raise RecipeError(f"recipe key 'tracker' must be one of {TRACKERS}; got {config.tracker!r}")
    schedulers = [s.value for s in SchedulerType if s.value not in _UNSUPPORTED_SCHEDULERS]
    if config.lr_scheduler not in schedulers:
        raise RecipeError(f"recipe key 'lr_scheduler' must be one of {schedulers}; got {config.lr_scheduler!r}")
    if config.random_loops is not None:
        if len(config.random_loops) != 2 or not 1 <= config.random_loops[0] <= config.random_loops[1]:
            raise RecipeError(
                f"recipe key 'random_loops' must be [min, max] with 1 <= min <= max; got {config.random_loops!r}"
            )
    per_step = [key for key in ("random_loops", "loop_schedule", "loops_train") if getattr(config, key)]
    if len(per_step) > 1:
        raise RecipeError(f"recipe keys {per_step} each set the training loop count and exclude each other; set one")
    try:
        loop_schedule_of(config)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"recipe key 'loop_schedule': {err}") from err
    for key in ("jacobian_penalty", "fixed_point_penalty"):
        if not getattr(config, key) >= 0:
            raise RecipeError(f"recipe key {key!r} must be a weight >= 0; got {getattr(config, key)!r}")
    from .objective import DISTILL_FIELDS

    if any(count < 1 for count in config.deep_supervision) or len(set(config.deep_supervision)) != len(
        config.deep_supervision
    ):
        raise RecipeError(
            f"recipe key 'deep_supervision' must list distinct loop counts >= 1; got {config.deep_supervision!r}"
        )
    if config.distill and config.teacher is None:
        raise RecipeError("recipe key 'distill' needs a 'teacher' checkpoint to distill from")
    unknown = sorted(set(config.distill) - set(DISTILL_FIELDS))
    if unknown:
        raise RecipeError(f"recipe key 'distill': unknown entries {unknown}; allowed: {list(DISTILL_FIELDS)}")
    weight, temperature = distill_settings(config)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 1:
        raise RecipeError(f"recipe key 'distill': weight must be a number in [0, 1]; got {weight!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise RecipeError(f"recipe key 'distill': temperature must be a number > 0; got {temperature!r}")


def loop_schedule_of(config: TrainConfig) -> LoopSchedule | None:
    """The recipe's per-step loop counts (``loop_schedule``, or ``random_loops`` as its uniform case), or None."""
    from .loop_schedule import LoopSchedule

    if config.random_loops is not None:
        low, high = config.random_loops
        return LoopSchedule("uniform", min=low, max=high)
    return LoopSchedule.from_dict(config.loop_schedule) if config.loop_schedule else None


def distill_settings(config: TrainConfig) -> tuple[Any, Any]:
    """``(weight, temperature)`` of distillation, with their defaults (0.5 and 1)."""
    return config.distill.get("weight", 0.5), config.distill.get("temperature", 1.0)


def check_teacher_fits(config: TrainConfig, task) -> None:
    """The teacher must be a causal-LM checkpoint with the student's vocabulary (checked before training)."""
    if config.teacher is None:
        return
    if task.head != "causal_lm":
        raise RecipeError(f"recipe key 'teacher': distillation needs a causal-LM task; {task.name!r} is {task.head}")
    from .modeling import ImplicitConfig
    from .objective import check_teacher

    if config.init_from is not None:
        vocab_size = ImplicitConfig.from_pretrained(config.init_from).vocab_size
    else:
        vocab_size = task.model_config().get("vocab_size", config.model.get("vocab_size", ImplicitConfig().vocab_size))
    tokenizer = getattr(task, "tokenizer", None)
    if tokenizer is None and config.init_from is not None and (Path(config.init_from) / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(config.init_from)
    try:
        check_teacher(config.teacher, vocab_size, tokenizer)
    except (OSError, ValueError) as err:
        raise RecipeError(f"recipe key 'teacher': {err}") from err


def objective_of(config: TrainConfig, device) -> Objective:
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


def resolve_task(config: TrainConfig):
    """The recipe's task adapter (imports ``task_module`` first so a custom task registers)."""
    from .tasks.base import TASKS, get_task

    if config.task_module:
        try:
            importlib.import_module(config.task_module)
        except ImportError as err:
            raise RecipeError(f"recipe key 'task_module': cannot import {config.task_module!r}: {err}") from err
    try:
        return get_task(config.task, **config.task_kwargs)
    except (TypeError, ValueError) as err:  # an unknown task, or arguments its constructor refuses
        key = "task_kwargs" if config.task in TASKS else "task"
        raise RecipeError(f"recipe key {key!r} (task {config.task!r}): {err}") from err


def model_overrides(config: TrainConfig) -> dict[str, Any]:
    """The recipe's ``model`` mapping plus ``loops_train``."""
    overrides = dict(config.model)
    if config.loops_train is not None:
        overrides["num_loops_train"] = config.loops_train
    return overrides


def check_model_config(config: TrainConfig, task) -> None:
    """Build the model's config (not its weights) so an invalid model field fails before training."""
    from .modeling import ImplicitConfig

    if config.init_from is not None:
        check_initial_model(config, task)
        return
    allowed = set(ImplicitConfig().to_dict()) | {"num_labels", "attn_implementation"}
    allowed -= {"model_type", "transformers_version", "_name_or_path", "auto_map"}
    for key in config.model:
        if key not in allowed:
            close = difflib.get_close_matches(key, sorted(allowed), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RecipeError(f"recipe key 'model': unknown ImplicitConfig field {key!r}{hint}")
    overrides, fixed = model_overrides(config), task.model_config()
    clashes = {k: (v, fixed[k]) for k, v in overrides.items() if k in fixed and fixed[k] != v}
    if clashes:
        details = ", ".join(f"{k}={mine!r} (task needs {theirs!r})" for k, (mine, theirs) in clashes.items())
        raise RecipeError(f"recipe key 'model' conflicts with task {task.name!r}: {details}")
    try:
        ImplicitConfig(**{**overrides, **fixed})
    except (ValueError, TypeError) as err:
        raise RecipeError(f"recipe key 'model': {err}") from err


def check_initial_model(config: TrainConfig, task) -> None:
    """``init_from`` must be an implicit checkpoint that fits the task; ``model`` may set runtime fields only."""
    from .modeling import ImplicitConfig
    from .modeling.configuration_implicit import RUNTIME_LOOP_FIELDS

    path = Path(config.init_from)
    if not (path / "config.json").is_file():
        raise RecipeError(f"recipe key 'init_from': {str(path)!r} is not a checkpoint directory (no config.json)")
    try:
        saved = ImplicitConfig.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise RecipeError(f"recipe key 'init_from': {str(path)!r} is not an implicit checkpoint: {err}") from err
    structural = sorted(set(model_overrides(config)) - set(RUNTIME_LOOP_FIELDS))
    if structural:
        raise RecipeError(
            f"recipe key 'model': with init_from, only loop settings that own no weights can change "
            f"({', '.join(RUNTIME_LOOP_FIELDS)}); got {structural}"
        )
    mismatched = {
        k: (v, getattr(saved, k, None)) for k, v in task.model_config().items() if getattr(saved, k, None) != v
    }
    if mismatched:
        details = ", ".join(
            f"{k}: task needs {need!r}, checkpoint has {has!r}" for k, (need, has) in mismatched.items()
        )
        raise RecipeError(f"recipe key 'init_from': the checkpoint does not fit task {task.name!r}: {details}")
    for key, value in model_overrides(config).items():
        setattr(saved, key, value)
    try:
        saved.validate_loop_settings()
    except ValueError as err:
        raise RecipeError(f"recipe key 'model': {err}") from err


def check_lora(config: TrainConfig) -> None:
    """An invalid ``lora`` mapping fails before training (unknown keys, bad rank or layer groups)."""
    if not config.lora:
        return
    unknown = sorted(set(config.lora) - set(LORA_KEYS))
    if unknown:
        raise RecipeError(f"recipe key 'lora': unknown entries {unknown}; allowed: {list(LORA_KEYS)}")
    try:
        from .lora import lora_config

        lora_config(**config.lora)
    except ImportError as err:
        raise RecipeError(f"recipe key 'lora' needs peft (pip install 'implicit-hf[peft]'): {err}") from err
    except (TypeError, ValueError) as err:
        raise RecipeError(f"recipe key 'lora': {err}") from err


def initial_model(config: TrainConfig, task):
    """The model training starts from: ``init_from`` with the recipe's loop settings, or a fresh one; with
    ``lora``, wrapped by peft so that only the adapters train."""
    from .tasks.base import build_model

    if config.init_from is None:
        model = build_model(task, **model_overrides(config))
    else:
        from .eval.harness import load_model

        model = load_model(config.init_from, task.head).train()
        for key, value in model_overrides(config).items():
            setattr(model.config, key, value)
        model.config.validate_loop_settings()
    if config.lora:
        from peft import get_peft_model

        from .lora import lora_config

        model = get_peft_model(model, lora_config(**config.lora))
        check_modules_to_save(model, config.lora.get("modules_to_save") or [])
    return model


def check_modules_to_save(model, names: list[str]) -> None:
    """peft ignores a ``modules_to_save`` name that matches no module; refuse it instead."""
    from peft.utils import ModulesToSaveWrapper

    wrapped = [name for name, module in model.named_modules() if isinstance(module, ModulesToSaveWrapper)]
    unmatched = [name for name in names if not any(path.split(".")[-1] == name for path in wrapped)]
    if unmatched:
        from .lora import implicit_model_of

        implicit = implicit_model_of(model)
        present = [name for name, child in implicit.named_children() if type(child).__name__ != "ModuleList"]
        raise RecipeError(
            f"recipe key 'lora': modules_to_save {unmatched} match no module of this model; "
            f"its small modules: {present}"
        )


def check_scheduler(config: TrainConfig) -> None:
    """Build the learning-rate schedule on a dummy optimizer so missing scheduler arguments fail early."""
    import torch
    from transformers import get_scheduler

    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    try:
        get_scheduler(
            config.lr_scheduler,
            dummy,
            num_warmup_steps=config.warmup_steps,
            num_training_steps=config.max_steps,
            scheduler_specific_kwargs=config.lr_scheduler_kwargs,
        )
    except (ValueError, TypeError) as err:
        raise RecipeError(f"recipe keys 'lr_scheduler' / 'lr_scheduler_kwargs': {err}") from err


# ----------------------------------------------------------------------------------------------------
# Helpers of the loop
# ----------------------------------------------------------------------------------------------------


def find_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the complete checkpoints (those with a marker file), oldest first."""
    found = []
    for path in (output_dir / "checkpoints").glob("step_*"):
        if (path / CHECKPOINT_MARKER).is_file() and path.name[5:].isdigit():
            found.append((int(path.name[5:]), path))
    return sorted(found)


def save_checkpoint(
    accelerator, output_dir: Path, step: int, state: dict[str, Any], keep: int, sharded: tuple | None = None
) -> Path:
    """``accelerator.save_state`` into ``checkpoints/step_N`` (plus, for FSDP on CPU processes, the
    ``sharded=(model, optimizer)`` shards), then the marker, then drop old checkpoints."""
    path = output_dir / "checkpoints" / f"step_{step}"
    accelerator.save_state(str(path))
    if sharded is not None:
        save_sharded(*sharded, path / SHARDED_DIR)
    accelerator.wait_for_everyone()  # every process has written its part (RNG states are per process)
    if accelerator.is_main_process:
        (path / CHECKPOINT_MARKER).write_text(json.dumps(state, indent=2))
        if keep:
            for _, old in find_checkpoints(output_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


def batch_stream(loader, accelerator, epoch: int, skip: int):
    """Micro-batches forever: epoch by epoch (each shuffled by ``seed + epoch``), the first one after
    ``skip`` already-consumed batches."""
    while True:
        loader.set_epoch(epoch)
        yield from accelerator.skip_first_batches(loader, skip) if skip else loader
        epoch, skip = epoch + 1, 0


def _no_grad(function):
    """``torch.no_grad()`` as a decorator, with torch imported at the call."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import torch

        with torch.no_grad():
            return function(*args, **kwargs)

    return wrapper


@_no_grad
def evaluate_loss(model, dataset, task, accelerator, batch_size: int) -> dict[str, float]:
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
    totals = torch.zeros(5, dtype=torch.float64, device=accelerator.device)  # loss, steps, residual, converged, rows
    for batch in loader:
        batch = send_to_device(batch, accelerator.device)
        outputs = unwrapped(**batch, **feedback_kwargs(task, batch))
        rows = outputs.logits.shape[0]
        stats = outputs.loop_stats
        totals += torch.stack(
            [
                outputs.loss.double() * rows,
                stats.steps.double().sum(),
                stats.final_rel_residual.double().sum(),
                stats.converged.double().sum(),
                torch.tensor(rows, dtype=torch.float64, device=accelerator.device),
            ]
        )
    unwrapped.train(was_training)
    loss, steps, residual, converged, rows = accelerator.reduce(totals, "sum").tolist()
    rows = max(rows, 1.0)
    return {
        "eval/loss": loss / rows,
        "eval/loop_steps": steps / rows,
        "eval/rel_residual": residual / rows,
        "eval/converged": converged / rows,
    }


def _as_float(value: Any) -> float:
    """A float from a tensor, a DTensor (FSDP2 gradient norms) or a number."""
    if hasattr(value, "full_tensor"):
        value = value.full_tensor()
    return float(value)


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
# The training loop
# ----------------------------------------------------------------------------------------------------


def train(config: TrainConfig) -> TrainResult:
    """Train as ``config`` says; the final metrics are also written to ``output_dir/metrics.json``."""
    import torch
    from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
    from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration, set_seed
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from .tasks.base import TASK_FILE, feedback_kwargs

    # -- everything that can be wrong with the recipe fails here, before any process trains -----------
    task = resolve_task(config)
    check_model_config(config, task)
    check_teacher_fits(config, task)
    check_lora(config)
    check_scheduler(config)
    output_dir = Path(config.output_dir)
    if not config.resume and not config.overwrite_output_dir and find_checkpoints(output_dir):
        raise RecipeError(
            f"output_dir {str(output_dir)!r} already holds checkpoints: pass --resume to continue that run, "
            "--overwrite_output_dir true to start afresh, or choose another output_dir"
        )

    # -- the accelerator: processes, devices, mixed precision, gradient accumulation, trackers ----------
    log_with = None
    if config.tracker == "tensorboard":
        from accelerate.utils import is_tensorboard_available

        log_with = "tensorboard" if is_tensorboard_available() else None
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        # the loop feeds exactly gradient_accumulation_steps micro-batches per optimizer step, across epochs
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=config.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        # the schedule counts optimizer steps (not optimizer steps x processes): stepped by hand below
        step_scheduler_with_optimizer=False,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=config.find_unused_parameters)],
    )
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
    eval_batch = config.eval_batch_size or config.per_device_batch_size
    train_loader = DataLoader(
        train_set,
        batch_size=config.per_device_batch_size,
        shuffle=True,  # accelerate's seedable sampler: epoch e is shuffled by data_seed + e on every process
        drop_last=True,  # every step sees a full global batch
        collate_fn=task.encode,
        generator=torch.Generator().manual_seed(config.seed),
    )

    # -- model, optimizer (no weight decay on biases and norm weights), schedule ----------------------
    model = initial_model(config, task)
    if plan.shard_on_cpu:  # FSDP2 on CPU processes: sharded here, not by accelerator.prepare (which gives DDP)
        check_fixed_iterations(model.config)
        model = shard_model(model, plan)
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate,
        betas=tuple(config.adam_betas),
    )
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
    start_step, resumed_from = 0, None
    if config.resume:
        checkpoints = find_checkpoints(output_dir)
        if checkpoints:
            start_step, path = checkpoints[-1]
            saved = json.loads((path / CHECKPOINT_MARKER).read_text())
            if saved.get("global_batch") != global_batch:
                raise RecipeError(
                    f"cannot resume {str(path)!r}: it was trained with a global batch of {saved.get('global_batch')}, "
                    f"this run has {global_batch} (per_device_batch_size x gradient_accumulation_steps x processes)"
                )
            if (path / SHARDED_DIR).is_dir() != plan.shard_on_cpu:
                fsdp, other = "with FSDP on CPU processes (sharded)", "without it"
                written, now = (other, fsdp) if plan.shard_on_cpu else (fsdp, other)
                raise RecipeError(
                    f"cannot resume {str(path)!r}: it was written {written}, this run is {now}: resume with the "
                    "accelerate config and processes that wrote it"
                )
            accelerator.load_state(str(path))
            if sharded is not None:
                load_sharded(*sharded, path / SHARDED_DIR)
            resumed_from = start_step
            if accelerator.is_main_process:  # a checkpoint the killed run was still writing is not resumable
                for stale in (output_dir / "checkpoints").glob("step_*"):
                    if not (stale / CHECKPOINT_MARKER).is_file():
                        shutil.rmtree(stale, ignore_errors=True)
            accelerator.print(f"resumed from {path} (step {start_step})")
        else:
            accelerator.print(f"--resume: no checkpoint in {output_dir / 'checkpoints'}; starting afresh")
    consumed = start_step * config.gradient_accumulation_steps  # micro-batches per process so far
    batches = batch_stream(train_loader, accelerator, consumed // batches_per_epoch, consumed % batches_per_epoch)

    # -- run files: the recipe, the log (cut back to the resumed step), trackers ----------------------
    log_path = output_dir / "train_log.jsonl"
    logged: dict[str, Any] = {}  # the last training record of the log kept (metrics of a run resumed at its end)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "train_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
        kept = []
        if resumed_from is not None and log_path.is_file():
            kept = [line for line in log_path.read_text().splitlines() if json.loads(line)["step"] <= start_step]
        log_path.write_text("".join(line + "\n" for line in kept))
        logged = next((record for record in map(json.loads, reversed(kept)) if "train/loss" in record), {})
    if start_step >= config.max_steps:
        accelerator.print(
            f"{str(output_dir)!r} already completed {start_step} of max_steps {config.max_steps} steps: nothing to "
            "train (the final evaluation, model and metrics are written again; raise max_steps to train on)"
        )
    accelerator.init_trackers("train", config=_flat_hparams(config))

    def log(record: dict[str, Any], step: int) -> None:
        accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)
        if accelerator.is_main_process:
            with log_path.open("a") as handle:
                handle.write(json.dumps({"step": step, **record}) + "\n")

    # -- the loop --------------------------------------------------------------------------------------
    model.train()
    schedule = loop_schedule_of(config)
    default_loops = accelerator.unwrap_model(model).config.train_loops
    objective = objective_of(config, accelerator.device)
    running: dict[str, torch.Tensor] = {}  # sums over the micro-batches since the last record
    loops_since_log: list[int] = []
    last: dict[str, Any] = logged
    started = time.perf_counter()
    progress = tqdm(
        total=config.max_steps, initial=start_step, disable=not accelerator.is_local_main_process, desc="train"
    )
    for step in range(start_step, config.max_steps):
        num_loops = default_loops if schedule is None else schedule.sample(config.seed, step)
        for _ in range(config.gradient_accumulation_steps):
            batch = next(batches)
            with accelerator.accumulate(model):  # gradients are synchronised on the last micro-batch only
                outputs = model(
                    **batch, num_loops=num_loops, **feedback_kwargs(task, batch), **objective.forward_kwargs(num_loops)
                )
                loss, parts = objective(outputs, batch)
                accelerator.backward(loss)
            stats = outputs.loop_stats
            measured = {
                "train/loss": loss.detach(),
                **({f"train/{name}": value for name, value in parts.items()} if len(parts) > 1 else {}),
                "train/loop_steps": stats.steps.double().mean(),
                "train/rel_residual": stats.final_rel_residual.double().mean(),
                "train/converged": stats.converged.double().mean(),
            }
            for name, value in measured.items():
                running[name] = running.get(name, 0) + value.double()
        grad_norm = None
        if config.max_grad_norm > 0:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        if not accelerator.optimizer_step_was_skipped:  # fp16: a step with inf gradients changes nothing
            lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loops_since_log.append(num_loops)
        done = step + 1
        progress.update(1)

        checkpoint_now = config.checkpoint_every and done % config.checkpoint_every == 0
        # log at checkpoints too, so a resumed run's log is the uninterrupted run's log
        if done % config.log_every == 0 or done == config.max_steps or checkpoint_now:
            # every process ran the same number of micro-batches: the mean of the sums, over their count
            totals = accelerator.reduce(torch.stack(list(running.values())), "mean")
            micro_batches = len(loops_since_log) * config.gradient_accumulation_steps
            last = dict(zip(running, (totals / micro_batches).tolist(), strict=True))
            last |= {
                "train/lr": lr_scheduler.get_last_lr()[0],
                "train/num_loops": sum(loops_since_log) / len(loops_since_log),
                "epoch": (done * config.gradient_accumulation_steps) / batches_per_epoch,
            }
            if schedule is not None:  # the sampled count of every step since the last record
                last["loops"] = loops_since_log
            if grad_norm is not None:  # a tensor (a DTensor under FSDP2), a float or None (DeepSpeed)
                last["train/grad_norm"] = _as_float(grad_norm)
            log(last, done)
            progress.set_postfix(loss=f"{last['train/loss']:.4g}", loops=f"{last['train/loop_steps']:.1f}")
            running = {}
            loops_since_log = []
        if eval_set is not None and config.eval_every and done % config.eval_every == 0 and done < config.max_steps:
            with gathered(model, plan):
                log(evaluate_loss(model, eval_set, task, accelerator, eval_batch), done)
        if checkpoint_now:
            state = {"step": done, "global_batch": global_batch, "num_processes": accelerator.num_processes}
            save_checkpoint(accelerator, output_dir, done, state, config.keep_checkpoints, sharded)
    progress.close()

    # -- the end: held-out loss, the model in Hugging Face format, metrics ------------------------------
    final_eval = {}
    if eval_set is not None:
        with gathered(model, plan):
            final_eval = evaluate_loss(model, eval_set, task, accelerator, eval_batch)
        log(final_eval, config.max_steps)
    accelerator.wait_for_everyone()
    state_bytes = torch.tensor([local_state_bytes(model, optimizer)], device=accelerator.device)
    state_bytes = int(accelerator.gather(state_bytes).max())  # the largest process's parameters + optimizer
    unwrapped, state_dict = final_model(model, accelerator, plan, config, task)
    if unwrapped is not None and config.lora:  # the adapters alone, then the model with them merged
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
        task_record = {"task": config.task, "task_kwargs": config.task_kwargs, "task_module": config.task_module}
        (output_dir / "model" / TASK_FILE).write_text(json.dumps(task_record, indent=2))
        task.save_artifacts(output_dir / "model")  # e.g. a causal-LM task's tokenizer
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        from .modeling.model_card import write_model_card

        write_model_card(output_dir / "model", training=training_summary(config, metrics, global_batch))
    # Free the DDP wrapper while every process is still alive: its reducer holds the gloo process group,
    # and a gloo group destroyed after a peer has exited waits forever for its worker threads.
    accelerator.wait_for_everyone()
    model = optimizer = lr_scheduler = train_loader = batches = outputs = objective = None
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()
    return TrainResult(metrics=metrics, model=unwrapped)


def final_model(model, accelerator, plan: LaunchPlan, config: TrainConfig, task) -> tuple[Any, dict | None]:
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


def sharding_of(accelerator, plan: LaunchPlan) -> str | None:
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


def usage(prog: str = "python -m implicit_hf.train") -> str:
    """The help text: how to call ``prog`` and every recipe key with its type and help."""
    lines = [
        f"usage: {prog} RECIPE.yaml [--key value ...] [--key.subkey value ...] [--resume]",
        "       accelerate launch [--config_file configs/accelerate/ddp.yaml] -m implicit_hf.train RECIPE.yaml ...",
        "",
        "recipe keys (YAML mapping; --key value overrides, the value read as YAML; --some-key is --some_key):",
    ]
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        kind = getattr(hints[f.name], "__name__", str(hints[f.name]))
        lines.append(f"  {f.name} ({kind}): {f.metadata['help']}")
    return "\n".join(lines)


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
