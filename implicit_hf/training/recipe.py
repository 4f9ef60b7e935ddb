"""Recipes: a YAML mapping of `TrainConfig` fields and its command-line overrides, checked once as it is read.

``--key value`` overrides one field (the value is read as YAML: ``--loop_schedule "{min: 2, max: 8}"``,
``--model '{hidden_size: 64}'``); ``--model.hidden_size 64`` sets one entry of a mapping field. A recipe with
an unknown key, a value of the wrong type or out of its range is refused by `TrainConfig` itself (each field
declares its type and its range once), with a message naming the key. ``lora``, ``distill`` and
``loop_schedule`` are nested settings (`LoraSettings`, `DistillSettings`, `LoopSchedule`).

What needs the task (the model config, the teacher, ``lora``'s layer groups, the learning-rate schedule) is
checked by `implicit_hf.training.preflight` before any process trains.

Nothing here imports torch or transformers at import time, so ``implicit-hf train --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import yaml

from ..checks import Allowed, Fraction, Positive, at_least, number
from ..loop_counts import check_loop_bound
from .fields import check_fields, choice
from .schedule import LoopSchedule

MIXED_PRECISION = ("no", "fp16", "bf16")
TRACKERS = ("tensorboard", "none")
SEED_MAX = 2**32 - 1


class RecipeError(ValueError):
    """A recipe that cannot be trained; the message names the offending key."""


# What a field takes beyond its type (`implicit_hf.checks.Allowed`, enforced by `fields.check_fields`)
Weight = Annotated[float, Allowed("a weight >= 0", lambda value: value >= 0)]
NonNegative = Annotated[float, number(">= 0", lambda value: value >= 0)]
Count = Annotated[int, at_least(1)]
CountOrZero = Annotated[int, at_least(0)]
# the range of numpy's global seed, which accelerate's set_seed sets
Seed = Annotated[int, Allowed("an integer in [0, 2**32 - 1]", lambda value: 0 <= value <= SEED_MAX)]
Betas = Annotated[
    list[float], Allowed("two numbers in [0, 1)", lambda value: len(value) == 2 and all(0 <= b < 1 for b in value))
]
LoopCounts = Annotated[
    list[int],
    Allowed(
        "a list of distinct loop counts >= 1",
        lambda value: min(value, default=1) >= 1 and len(set(value)) == len(value),
    ),
]


# ----------------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------------


def _field(help: str, default: Any = dataclasses.MISSING, *, factory: Any = None) -> Any:
    """A recipe field: its help text and its default (its type and range are the annotation)."""
    metadata = {"help": help}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class LoraSettings:
    """peft LoRA adapters instead of every weight (`implicit_hf.integrations.peft.lora_config` checks them)."""

    r: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    parts: list[str] = field(default_factory=lambda: ["core"])
    modules: list[str] | None = None  # None: every linear layer of the parts
    modules_to_save: list[str] | None = None

    def peft_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``lora_config`` (unset ones left to its defaults)."""
        return {key: value for key, value in dataclasses.asdict(self).items() if value is not None}


@dataclass(frozen=True)
class DistillSettings:
    """Distillation from the recipe's ``teacher``: loss = (1 - weight) task + weight T² KL(teacher || student)."""

    weight: Fraction = 0.5
    temperature: Positive = 1.0

    def __post_init__(self) -> None:
        check_fields(self, str)


@dataclass
class TrainConfig:
    """Everything a training run needs; a recipe file sets any of these fields. Checked when built."""

    task: str = _field("registered task name (see implicit_hf.tasks)")
    task_kwargs: dict[str, Any] = _field("keyword arguments of the task's constructor", factory=dict)
    task_module: str | None = _field(
        "extra module imported before the task is looked up, so a custom task registers itself", None
    )
    model: dict[str, Any] = _field("ImplicitConfig fields (the task fixes its head and input sizes)", factory=dict)
    init_from: str | None = _field(
        "start from this implicit checkpoint (save_pretrained, implicit-hf convert) instead of a fresh model; "
        "'model' may then set only loop settings that own no weights (num_loops, solver, gradient, ...)",
        None,
    )
    lora: LoraSettings | None = _field(
        "train peft LoRA adapters instead of every weight: {r, alpha, dropout, parts: [prelude|core|coda], "
        "modules: [q_proj, ...], modules_to_save: [injection, core_norm, ...] (small modules trained in full, "
        "peft's modules_to_save)} (empty: no LoRA)",
        None,
    )
    output_dir: str = _field("where checkpoints, logs, the final model and metrics go", "outputs/train")
    seed: Seed = _field("seed of model init, data generation and order, and random loop counts", 0)
    train_size: Count = _field("number of generated training rows", 4096)
    eval_size: CountOrZero = _field("number of generated held-out rows (0: no evaluation)", 256)
    per_device_batch_size: Count = _field("rows per process per micro-batch", 8)
    eval_batch_size: Count | None = _field(
        "rows per process per evaluation batch (default: per_device_batch_size)", None
    )
    gradient_accumulation_steps: Count = _field("micro-batches per optimizer step", 1)
    learning_rate: Positive = _field("peak learning rate of AdamW", 3e-4)
    weight_decay: NonNegative = _field("AdamW weight decay (not applied to biases and norm weights)", 0.01)
    adam_betas: Betas = _field("AdamW betas", factory=lambda: [0.9, 0.999])
    lr_scheduler: str = _field(
        "a transformers.get_scheduler name (linear, cosine, constant_with_warmup, ...)", "cosine"
    )
    lr_scheduler_kwargs: dict[str, Any] = _field(
        "scheduler_specific_kwargs of get_scheduler (e.g. min_lr_rate for cosine_with_min_lr)", factory=dict
    )
    warmup_steps: CountOrZero = _field("linear warm-up, in optimizer steps", 0)
    max_steps: Count = _field("optimizer steps to train for", 1000)
    max_grad_norm: NonNegative = _field("gradient-norm clipping (0: off)", 1.0)
    mixed_precision: Annotated[str, choice(MIXED_PRECISION)] = _field("no | fp16 | bf16", "no")
    loop_schedule: LoopSchedule | None = _field(
        "each step's loop count, a function of seed and step: {distribution: uniform | poisson_lognormal | "
        "above_difficulty, min, max, mean (poisson_lognormal: a log-normal rate of this mean, then a Poisson draw, "
        "clipped to [min, max]), sigma (default 0.5), ramp_steps (the mean rises from min over these steps), extra "
        "(above_difficulty: d + U[1, 1 + round(extra d)] for a batch of difficulty d, default 1)} (empty: the "
        "model's train_loops every step)",
        None,
    )
    group_by_difficulty: bool = _field(
        "batches of rows of one difficulty (the task's difficulty(), e.g. state-tracking steps), in a shuffled "
        "order seeded by seed + epoch; rows left over from a difficulty's last full batch are skipped that epoch",
        False,
    )
    jacobian_penalty: Weight = _field(
        "weight of the Hutchinson estimate of ||df/dz||_F^2 / dim at the last iterate (0: off)",
        0.0,
    )
    fixed_point_penalty: Weight = _field(
        "weight of the squared relative residual ||f(z) - z||^2 / ||z||^2 at the last iterate (0: off)",
        0.0,
    )
    deep_supervision: LoopCounts = _field(
        "loop counts at which the task loss is also taken (decoded from the trajectory) and averaged with the "
        "final one; counts >= a step's loop count are skipped",
        factory=list,
    )
    teacher: str | None = _field(
        "distill from this frozen AutoModelForCausalLM checkpoint (same vocabulary as the student), e.g. the "
        "unconverted source of a retrofit",
        None,
    )
    distill: DistillSettings | None = _field(
        "with teacher: {weight (in [0, 1], default 0.5): loss = (1 - weight) task + weight T^2 KL(teacher || "
        "student), temperature T (> 0, default 1)}",
        None,
    )
    checkpoint_every: CountOrZero = _field("save a resumable checkpoint every N optimizer steps (0: never)", 500)
    keep_checkpoints: CountOrZero = _field("keep only the newest N checkpoints (0: keep all)", 2)
    log_every: Count = _field("log training statistics every N optimizer steps", 10)
    eval_every: CountOrZero = _field("held-out loss every N optimizer steps (0: only at the end)", 500)
    tracker: Annotated[str, choice(TRACKERS)] = _field(
        "tensorboard | none (tensorboard is used only if importable)", "tensorboard"
    )
    find_unused_parameters: bool = _field(
        "DDP find_unused_parameters (only needed when some parameters get no gradient in a step)", False
    )
    resume: bool = _field("continue from the newest complete checkpoint in output_dir/checkpoints", False)
    overwrite_output_dir: bool = _field("start afresh even if output_dir already holds checkpoints", False)

    def __post_init__(self) -> None:
        """Each field as its type (a mapping becomes its settings class), then in its range."""
        hints = typing.get_type_hints(TrainConfig)
        for spec in dataclasses.fields(self):
            setattr(self, spec.name, _typed(spec.name, getattr(self, spec.name), hints[spec.name]))
        try:
            check_fields(self, lambda key: f"recipe key {key!r}")
            check_loop_bound("recipe key 'deep_supervision': loop counts", max(self.deep_supervision, default=1))
        except ValueError as err:
            raise RecipeError(str(err)) from None
        if self.distill is not None and self.teacher is None:
            raise RecipeError("recipe key 'distill' needs a 'teacher' checkpoint to distill from")

    @property
    def distillation(self) -> DistillSettings:
        """The distillation settings, with their defaults when ``distill`` is not set."""
        return self.distill or DistillSettings()


_TYPE_WORDS = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    dict: "a mapping with string keys (or null: none)",
    list: "a list",
}


def _typed(key: str, value: Any, hint: Any) -> Any:
    """``value`` as the field type ``hint`` (an integer as a float, a mapping as its settings dataclass, null as
    an empty mapping), or a `RecipeError` naming ``key``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None
        if value is None:
            return None
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    if dataclasses.is_dataclass(hint):
        return _settings(key, hint, value)
    origin = typing.get_origin(hint) or hint
    if origin is dict and value is None:  # every mapping defaults to empty: null is that default
        return {}
    fits = {
        bool: lambda: isinstance(value, bool),
        int: lambda: isinstance(value, int) and not isinstance(value, bool),
        float: lambda: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: lambda: isinstance(value, str),
        dict: lambda: isinstance(value, dict) and all(isinstance(k, str) for k in value),
        list: lambda: isinstance(value, (list, tuple)),
    }[origin]
    if not fits():
        raise RecipeError(f"recipe key {key!r} must be {_TYPE_WORDS[origin]}; got {value!r}")
    if origin is list:
        (item,) = typing.get_args(hint)
        return [_typed(f"{key}[{i}]", entry, item) for i, entry in enumerate(value)]
    return float(value) if origin is float else value


def _settings(key: str, cls: type, value: Any) -> Any:
    """A nested settings object from its recipe mapping (None for an empty one); its own checks name ``key``."""
    if isinstance(value, cls):
        return value
    if not _typed(key, value, dict[str, Any]):  # a mapping with string keys, or a RecipeError
        return None
    allowed = [spec.name for spec in dataclasses.fields(cls)]
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise RecipeError(f"recipe key {key!r}: unknown entries {unknown}; allowed: {allowed}")
    try:
        return cls(**value)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"recipe key {key!r}: {err}") from err


# ----------------------------------------------------------------------------------------------------
# Reading: YAML + command-line overrides -> a checked TrainConfig
# ----------------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> TrainConfig:
    """``RECIPE.yaml [--key value ...] [--resume]`` -> a checked `TrainConfig` (raises `RecipeError`)."""
    if not argv or argv[0].startswith("-"):
        raise RecipeError("the first argument must be a recipe file: RECIPE.yaml [--key value ...] [--resume]")
    path = Path(argv[0])
    try:
        recipe = load_yaml(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:  # no such file, unreadable, not YAML
        raise RecipeError(f"recipe file {str(path)!r} cannot be read as YAML: {err}") from err
    if not isinstance(recipe, dict):
        raise RecipeError(f"recipe file {str(path)!r} must hold a mapping of TrainConfig fields")
    for key, value in _parse_overrides(argv[1:]):
        if "." in key:  # --model.hidden_size 64 sets one entry of a mapping field
            key, sub = key.split(".", 1)
            _known_key(key)
            if not isinstance(recipe.get(key) or {}, dict):
                raise RecipeError(f"recipe key {key!r} must be a mapping to set {key}.{sub}")
            recipe[key] = {**(recipe.get(key) or {}), sub: value}
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
            if hints.get(key) is bool and (i == len(args) or args[i].startswith("--")):
                pairs.append((key, True))  # bare --resume
                continue
            if i == len(args):
                raise RecipeError(f"--{key} needs a value")
            value, i = args[i], i + 1
        try:
            pairs.append((key, load_yaml(value) if value != "" else ""))
        except yaml.YAMLError as err:
            raise RecipeError(f"--{key}: {value!r} is not a YAML value: {err}") from err
    return pairs


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` reading ``1e-4`` as a float (YAML 1.2) rather than a string (YAML 1.1)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load``, except that ``1e-4`` is a float (a ``yaml.YAMLError`` for text that is not YAML)."""
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: no arbitrary objects


def _known_key(key: str) -> None:
    """Refuse a key that is no `TrainConfig` field, suggesting the closest one."""
    names = [spec.name for spec in dataclasses.fields(TrainConfig)]
    if key not in names:
        close = difflib.get_close_matches(key, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RecipeError(f"unknown recipe key {key!r}{hint}; valid keys: {', '.join(names)}")


def config_from_dict(recipe: dict[str, Any]) -> TrainConfig:
    """A checked `TrainConfig` from a recipe mapping; unknown or missing keys are refused by name."""
    for key in recipe:
        _known_key(key)
    if "task" not in recipe:
        raise RecipeError("recipe key 'task' is required")
    return TrainConfig(**recipe)


def usage(prog: str = "python -m implicit_hf.training") -> str:
    """The help text: how to call ``prog`` and every recipe key with its type and help."""
    lines = [
        f"usage: {prog} RECIPE.yaml [--key value ...] [--key.subkey value ...] [--resume]",
        "       accelerate launch [--config_file configs/accelerate/ddp.yaml] -m implicit_hf.training RECIPE.yaml ...",
        "",
        "recipe keys (YAML mapping; --key value overrides, the value read as YAML; --some-key is --some_key):",
    ]
    hints = typing.get_type_hints(TrainConfig)
    for spec in dataclasses.fields(TrainConfig):
        lines.append(f"  {spec.name} ({_type_name(hints[spec.name])}): {spec.metadata['help']}")
    return "\n".join(lines)


def _type_name(hint: Any) -> str:
    """``int``, ``int | None``, ``LoopSchedule | None``: a field's type as the help shows it."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in typing.get_args(hint))
    return "None" if hint is type(None) else getattr(hint, "__name__", str(hint))
