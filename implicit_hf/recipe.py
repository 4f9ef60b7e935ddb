"""Recipes: a YAML mapping of `TrainConfig` fields, its command-line overrides, and every check made before training.

``--key value`` overrides one field (the value is read as YAML: ``--random_loops "[2, 8]"``,
``--model '{hidden_size: 64}'``); ``--model.hidden_size 64`` sets one entry of a mapping field. A recipe with
an unknown key, a value of the wrong type, an unknown task or an invalid model setting is refused before
anything is trained, with a message naming the key.

A recipe is checked in two stages, each check once:

* `config_from_dict` (so `parse_args`): every key is known, of its type and in its range; the loop schedule
  and the distillation settings are well formed. Only the recipe itself is read.
* `check_recipe`: what needs the task, run by `implicit_hf.train.train` before any process trains: the model
  config (a fresh one, or ``init_from``'s with the recipe's loop settings), the teacher, ``lora`` and the
  learning-rate schedule. Only ``lora.modules_to_save`` needs the built model: `check_modules_to_save`.

``output_dir`` is created and written to once the run is known to start (`check_output_dir`), so that a folder
that cannot be written fails before training rather than at the first checkpoint.

Nothing here imports torch or transformers at import time, so ``implicit-hf train --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .loop_counts import check_loop_bound

if typing.TYPE_CHECKING:
    from .loop_schedule import LoopSchedule
    from .modeling import ImplicitConfig
    from .tasks.base import TaskAdapter

MIXED_PRECISION = ("no", "fp16", "bf16")
TRACKERS = ("tensorboard", "none")
# transformers schedulers that need more than (optimizer, warmup, total steps) to step
_UNSUPPORTED_SCHEDULERS = ("reduce_lr_on_plateau", "greedy")
LORA_KEYS = ("r", "alpha", "dropout", "parts", "modules", "modules_to_save")
SEED_MAX = 2**32 - 1


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
    random_loops: list[int] | None = _help(
        "[min, max]: sample each step's loop count uniformly (a function of seed and step, same on every process); "
        "the same as loop_schedule {distribution: uniform, min, max}",
        default=None,
    )
    loop_schedule: dict[str, Any] = _help(
        "each step's loop count, a function of seed and step: {distribution: uniform | poisson_lognormal | "
        "above_difficulty, min, max, mean (poisson_lognormal: a log-normal rate of this mean, then a Poisson draw, "
        "clipped to [min, max]), sigma (default 0.5), ramp_steps (the mean rises from min over these steps), extra "
        "(above_difficulty: d + U[1, 1 + round(extra d)] for a batch of difficulty d, default 1)} (empty: none)",
        default_factory=dict,
    )
    group_by_difficulty: bool = _help(
        "batches of rows of one difficulty (the task's difficulty(), e.g. state-tracking steps), in a shuffled "
        "order seeded by seed + epoch; rows left over from a difficulty's last full batch are skipped that epoch",
        default=False,
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


class RecipeError(ValueError):
    """A recipe that cannot be trained; the message names the offending key."""


# ----------------------------------------------------------------------------------------------------
# Reading: YAML + command-line overrides -> a TrainConfig whose values are checked
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
    """``--key value``, ``--key=value`` and bare boolean ``--flag`` arguments -> ``(key, YAML value)`` pairs."""
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
    """Refuse a key that is no `TrainConfig` field, suggesting the closest one."""
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
    if origin is dict:  # every mapping key defaults to empty: null (e.g. --loop_schedule null) is that default
        if value is None:
            return {}
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return dict(value)
        raise RecipeError(f"recipe key {key!r} must be a mapping with string keys (or null: none); got {value!r}")
    if origin is list:
        if isinstance(value, (list, tuple)):
            return [_coerce(f"{key}[{i}]", item, args[0]) for i, item in enumerate(value)]
        raise RecipeError(f"recipe key {key!r} must be a list; got {value!r}")
    raise TypeError(f"TrainConfig.{key}: unsupported annotation {hint!r}")  # a bug in TrainConfig, not the recipe


def _check_values(config: TrainConfig) -> None:
    """Each value in its range, the loop schedule and the distillation settings well formed."""
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
    if not 0 <= config.seed <= SEED_MAX:  # the range of numpy's global seed, which accelerate's set_seed sets
        raise RecipeError(f"recipe key 'seed' must be an integer in [0, 2**32 - 1]; got {config.seed!r}")
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
    per_step = [key for key in ("random_loops", "loop_schedule") if getattr(config, key)]
    if len(per_step) > 1:
        raise RecipeError(f"recipe keys {per_step} each set the training loop count and exclude each other; set one")
    try:
        loop_schedule_of(config)
    except (TypeError, ValueError) as err:
        key = "random_loops" if config.random_loops is not None else "loop_schedule"
        raise RecipeError(f"recipe key {key!r}: {err}") from err
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
    try:
        check_loop_bound("recipe key 'deep_supervision': loop counts", max(config.deep_supervision, default=1))
    except ValueError as err:
        raise RecipeError(str(err)) from None
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


# ----------------------------------------------------------------------------------------------------
# Pre-flight: the checks that need the recipe's task, before any process trains
# ----------------------------------------------------------------------------------------------------


def resolve_task(config: TrainConfig) -> TaskAdapter:
    """The recipe's task adapter (imports ``task_module`` first so a custom task registers)."""
    from .checks import TaskSettingError
    from .tasks.base import TASKS, get_task

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


def check_recipe(config: TrainConfig, task: TaskAdapter) -> None:
    """Everything that can be wrong with ``config`` for ``task`` fails here, before any data or weights exist.

    The model config training starts from is built once (a fresh one, or ``init_from``'s with the recipe's
    loop settings) and the teacher is checked against its vocabulary; then ``lora`` and the schedule.
    """
    _check_difficulty(config, task)
    model_config = _initial_model_config(config, task)
    _check_teacher_fits(config, task, model_config.vocab_size)
    _check_lora(config)
    _check_scheduler(config)


def _check_difficulty(config: TrainConfig, task: TaskAdapter) -> None:
    """A loop schedule tied to difficulty, or batches grouped by it, need a task that rates its rows."""
    from .tasks.base import TaskAdapter

    schedule = loop_schedule_of(config)
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


def _initial_model_config(config: TrainConfig, task: TaskAdapter) -> ImplicitConfig:
    """The config of the model training starts from, without its weights, so an invalid field fails early."""
    from .modeling import ImplicitConfig

    if config.init_from is not None:
        return _init_from_config(config, task)
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
    """``init_from``'s config with the recipe's ``model`` settings: it must be an implicit checkpoint that fits
    the task, and ``model`` may set only loop settings that own no weights."""
    from .modeling import ImplicitConfig
    from .modeling.configuration_implicit import RUNTIME_LOOP_FIELDS

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
    mismatched = {
        k: (v, getattr(saved, k, None)) for k, v in task.model_config().items() if getattr(saved, k, None) != v
    }
    if mismatched:
        details = ", ".join(
            f"{k}: task needs {need!r}, checkpoint has {has!r}" for k, (need, has) in mismatched.items()
        )
        raise RecipeError(f"recipe key 'init_from': the checkpoint does not fit task {task.name!r}: {details}")
    for key, value in config.model.items():
        setattr(saved, key, value)
    try:
        saved.validate_loop_settings()
    except ValueError as err:
        raise RecipeError(f"recipe key 'model': {err}") from err
    return saved


def _check_init_from_files(path: Path, task: TaskAdapter) -> None:
    """``init_from`` must be a folder holding an implicit checkpoint of the task's head with readable weights: a
    Llama checkpoint, say, would pass every other check and fail at the first training step."""
    from safetensors import SafetensorError, safe_open
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

    from .tasks.models import missing_head

    where = f"recipe key 'init_from': {str(path)!r}"
    if not (path / "config.json").is_file():
        raise RecipeError(f"{where} is not a checkpoint directory (no config.json)")
    try:
        saved = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise RecipeError(f"{where}: config.json is not valid JSON: {err}") from err
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
    names = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
    if not any((path / name).is_file() for name in names):
        raise RecipeError(f"{where} has no weights (none of {', '.join(names)})")
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
    from .objective import check_teacher

    tokenizer = getattr(task, "tokenizer", None)
    if tokenizer is None and config.init_from is not None and (Path(config.init_from) / "tokenizer.json").is_file():
        from .tasks.generation import load_tokenizer

        try:
            tokenizer = load_tokenizer(config.init_from, "checkpoint")
        except OSError as err:
            raise RecipeError(f"recipe key 'init_from': {err}") from err
    try:
        check_teacher(config.teacher, vocab_size, tokenizer)
    except (OSError, ValueError) as err:
        raise RecipeError(f"recipe key 'teacher': {err}") from err


def _check_lora(config: TrainConfig) -> None:
    """An invalid ``lora`` mapping fails before training (unknown keys, bad rank or layer groups)."""
    if not config.lora:
        return
    unknown = sorted(set(config.lora) - set(LORA_KEYS))
    if unknown:
        raise RecipeError(f"recipe key 'lora': unknown entries {unknown}; allowed: {list(LORA_KEYS)}")
    try:
        from .integrations.peft import lora_config

        lora_config(**config.lora)
    except ImportError as err:
        raise RecipeError(f"recipe key 'lora' needs peft (pip install 'implicit-hf[peft]'): {err}") from err
    except (TypeError, ValueError) as err:
        raise RecipeError(f"recipe key 'lora': {err}") from err


def _check_scheduler(config: TrainConfig) -> None:
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


def check_output_dir(config: TrainConfig) -> None:
    """Create ``output_dir`` and write a file in it (removed at once): a file there, a path under a file or a
    place that cannot be written is a `RecipeError` naming ``output_dir``, before any training. Every process may
    run it at once (the folder is kept: the run writes there next)."""
    from .local_paths import check_writable_folder

    path = Path(config.output_dir)
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
    from peft.utils import ModulesToSaveWrapper

    wrapped = [name for name, module in model.named_modules() if isinstance(module, ModulesToSaveWrapper)]
    unmatched = [name for name in names if not any(path.split(".")[-1] == name for path in wrapped)]
    if unmatched:
        from .integrations.peft import implicit_model_of

        implicit = implicit_model_of(model)
        present = [name for name, child in implicit.named_children() if type(child).__name__ != "ModuleList"]
        raise RecipeError(
            f"recipe key 'lora': modules_to_save {unmatched} match no module of this model; "
            f"its small modules: {present}"
        )


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
