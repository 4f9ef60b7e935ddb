"""Configuration of implicit (looped, weight-tied) transformers: a transformers 5 ``@strict`` dataclass config.

Every field is declared once, typed, with the rule it must pass (`validated_field`); the rule runs wherever the
field is set (the constructor, ``from_pretrained(dir, field=...)``, ``config.field = value``) and a refused
value is a ``ValueError`` naming the field and what it allows. The annotations are strings here (``from
__future__ import annotations``), so ``@strict``'s own type check leaves them to the rules, which also take
numpy integers (stored as ``int``) and give this package's messages.
"""

from __future__ import annotations

import difflib
import functools
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING
from typing import Any, NamedTuple

from huggingface_hub.dataclasses import strict, validated_field
from huggingface_hub.errors import (
    StrictDataclassClassValidationError,
    StrictDataclassError,
    StrictDataclassFieldValidationError,
)
from transformers import PreTrainedConfig

from .gradients import GRADIENTS
from .rules import (
    DEFAULT_MAX_LOOPS,
    RefusedValue,
    Rule,
    check,
    check_integer,
    check_loop_count,
    instance_of,
    integer,
    loop_count,
    max_loops,
    number,
    one_of,
    plain,
)
from .solvers import ARGUMENT_RULES, SOLVERS, check_solver_options, options_of
from .trajectories import SELECT_RULES

INJECTIONS = ("add", "linear")
STATE_INITS = ("zeros", "prelude", "normal")
POSITION_ENCODINGS = ("rope", "none")
MAX_LOOP_SHIFT = 4  # the widest causal convolution of the loop's token shift (config.loop_shift)


class Head(NamedTuple):
    """A model class of ``modeling_implicit``, the transformers Auto class that loads its checkpoints and the hub's
    pipeline tag for it (``None``: none fits)."""

    model_class: str
    auto_class: str
    pipeline_tag: str | None = None


# The model classes: the one table that config.json's auto_map (`AUTO_MAP`), the Auto registrations
# (``register_auto_classes``), model cards and the task heads (``implicit_hf.tasks.models``) derive from.
BASE_MODEL = Head("ImplicitModel", "AutoModel")
HEADS: dict[str, Head] = {  # by task head (a task's ``head``)
    "causal_lm": Head("ImplicitForCausalLM", "AutoModelForCausalLM", "text-generation"),
    "token_classification": Head(
        "ImplicitForTokenClassification", "AutoModelForTokenClassification", "token-classification"
    ),
    "token_regression": Head("ImplicitForTokenRegression", "AutoModelForTokenClassification"),
}
MODEL_CLASSES = (BASE_MODEL, *HEADS.values())
# What `save_pretrained` writes into config.json so `trust_remote_code=True` can load every head in a process that
# cannot import implicit_hf (the code files are copied next to the weights). An Auto class two classes share loads
# the first (reversed: the first written last): token regression is token classification with
# ``problem_type="regression"``.
AUTO_MAP = {
    "AutoConfig": "configuration_implicit.ImplicitConfig",
    **{head.auto_class: f"modeling_implicit.{head.model_class}" for head in reversed(MODEL_CLASSES)},
}

# Solver settings of configs written before `solver_options`: each key loads (and sets) these solver options.
LEGACY_SOLVER_KEYS = {
    "damping": (("picard", "damping"), ("anderson", "damping")),
    "anderson_memory": (("anderson", "memory"),),
}

# Loop settings that own no weights: they can change on a trained or converted checkpoint (e.g. the
# training loop's init_from) without touching its parameters.
RUNTIME_LOOP_FIELDS = (
    "num_loops",
    "num_loops_train",
    "solver",
    "solver_options",
    *LEGACY_SOLVER_KEYS,
    "tol",
    "gradient",
    "gradient_steps",
    "phantom_tau",
    "ift_max_iter",
    "ift_tol",
)
# Loop settings a single call can set: forward(num_loops=...), generate(...), a GenerationConfig's entries (and so a
# checkpoint's generation_config.json); `check_per_call_loop_setting` checks them.
PER_CALL_LOOP_FIELDS = ("num_loops", "tol", "solver")
# The trajectories per input (``modeling/trajectories.py``): config fields that are inference defaults (a head's
# forward uses them when not given, in eval mode only) and per-call settings like `PER_CALL_LOOP_FIELDS`, with the
# value each takes when neither the call nor (in training mode) the config says: one trajectory, the plain forward.
TRAJECTORY_DEFAULTS = {
    "num_trajectories": 1,
    "trajectory_noise": 0.0,
    "select": "residual",
    "trajectory_seed": 0,
    "trajectory_batch_size": None,  # no chunking
}
PER_CALL_TRAJECTORY_FIELDS = tuple(TRAJECTORY_DEFAULTS)
# Every setting a single call can set, and so a GenerationConfig entry or a from_pretrained keyword for generate.
PER_CALL_FIELDS = PER_CALL_LOOP_FIELDS + PER_CALL_TRAJECTORY_FIELDS
# The selection rules of any head (`SELECT_RULES` says which head takes which).
SELECT_NAMES = tuple(dict.fromkeys(rule for rules in SELECT_RULES.values() for rule in rules))
# Where a config loaded by ``from_pretrained(dir, num_loops=7)`` (what lm-eval's ``--model_args ...,num_loops=7``
# does) records which of `PER_CALL_FIELDS` were given as keyword arguments: they win over the checkpoint's
# generation_config.json (`ImplicitForCausalLM.adjust_generation_fn`, which drops it). Never saved.
LOOP_KEYWORDS = "_loop_keywords"
_LOOP_FIELDS = (
    "num_prelude_layers",
    "num_core_layers",
    "num_coda_layers",
    "injection",
    "state_init",
    "state_init_std",
    "core_norm",
    "injection_norm",
    "loop_shift",
    "position_encoding",
    *RUNTIME_LOOP_FIELDS,
    "is_causal",
    "feedback_features",
)
# The names a misspelt keyword is compared with (`_refuse_misspelt_loop_fields`).
_CHECKED_NAMES = (*_LOOP_FIELDS, *PER_CALL_TRAJECTORY_FIELDS)


def setting(rule: Rule, default: Any = None, *, default_factory: Any = MISSING) -> Any:
    """A config field checked by ``rule`` whenever it is set."""
    if default_factory is not MISSING:
        return validated_field(rule, default_factory=default_factory)
    return validated_field(rule, default=default)


def _unwrapped(err: StrictDataclassError, key: str = "") -> Exception:
    """What a caller sees of ``err``, the error type ``@strict`` wraps refusals in (which callers catching
    ``ValueError`` would miss): a rule's refusal of field ``key`` as a ``ValueError`` naming it, another
    ``ValueError`` (a validator's, a bad IMPLICIT_HF_MAX_LOOPS) as itself, anything else as ``err``."""
    cause = err.__cause__
    if isinstance(cause, RefusedValue) and key:
        return ValueError(f"{key} {cause}")
    return cause if isinstance(cause, ValueError) else err


def _names_refused_fields(cls: type) -> type:
    """Report the refusals of ``@strict`` as `_unwrapped` errors; store numpy numbers as Python ones."""
    strict_setattr, strict_init = cls.__setattr__, cls.__init__

    def __setattr__(self, key: str, value: Any) -> None:
        try:
            strict_setattr(self, key, plain(value))
        except StrictDataclassFieldValidationError as err:
            raise _unwrapped(err, key) from None

    @functools.wraps(strict_init)
    def __init__(self, **kwargs: Any) -> None:
        try:
            strict_init(self, **kwargs)
        except StrictDataclassClassValidationError as err:
            raise _unwrapped(err) from None

    cls.__setattr__, cls.__init__ = __setattr__, __init__
    return cls


# ----------------------------------------------------------------------------------------------- the config


@_names_refused_fields
@strict
class ImplicitConfig(PreTrainedConfig):
    r"""Configuration of an implicit model: a Llama-family decoder split into prelude, core and coda.

    ``prelude`` layers run once on the input, the ``core`` block (``num_core_layers`` weight-tied
    layers) is iterated to a fixed point ``z = core(inject(z, e))`` of the prelude output ``e``,
    and the ``coda`` layers plus the head run once on the result.

    Architecture fields are those of `LlamaConfig` (RMSNorm, RoPE, SwiGLU, grouped-query
    attention) so the layers are transformers' own `LlamaDecoderLayer`s.

    Input fields (continuous tasks):
        input_features: when > 0, the model also takes ``input_features`` ``(B, T, input_features)``
            (image patches, field values, LP coefficients), embedded by a linear layer.
        edge_features: when > 0, the model also takes ``edge_features`` ``(B, T, T, edge_features)``
            (pairwise structure, e.g. an LP's constraint matrix), turned into a learned additive
            attention bias per head and used by every layer (Graphormer-style edge encoding).
        feedback_features: when > 0, every iteration also injects per-token features computed from
            the model's current output: ``forward(loop_feedback=fn)`` maps the head's output at the
            current state ``(B, T, num_labels)`` to ``(B, T, feedback_features)`` (e.g. the
            data-consistency gradient ``Aᵀ(Ax̂ - y)`` of an inverse problem), embedded by a linear
            layer and added to the injected input, so the fixed-point map includes it.

    Loop fields:
        num_prelude_layers / num_core_layers / num_coda_layers: the layer split (core >= 1).
        injection: how the input enters every iteration: ``"add"`` (``z + e``) or ``"linear"``
            (a linear map of ``[z; e]``, initialised to ``z + e``).
        state_init: the starting state ``z0``: ``"zeros"``, ``"prelude"`` (``e``) or ``"normal"``
            (Gaussian noise of std ``state_init_std``; outputs are then random).
        core_norm: apply an RMSNorm to the core's output at every iteration. The Llama layers are
            residual (``h + g(h)``), so without it the state is not contracted and drifts.
        injection_norm: apply an RMSNorm to the prelude output before it is injected, so input and
            state have the same scale; a tiny injection (fresh embeddings) makes the map nearly the
            identity on the state and the loop converges slowly.
        position_encoding: ``"rope"`` (Llama's rotary embedding, the default) or ``"none"`` (no position
            encoding: a causal model still orders its tokens through the causal mask and, with
            ``loop_shift``, through the shift; attention then cannot key on absolute or relative positions
            it never saw in training).
        loop_shift: kernel of a causal depthwise convolution over the normalised state of the previous
            ``loop_shift`` positions (``t-1 .. t-loop_shift``), projected and added to the core's input
            at every iteration (``0``: off; ``1``: a one-step token shift; at most 4). It gives the
            loop a position-free path that moves the state one token on per iteration, so that a
            loop can run as a recurrence along the sequence (state tracking).
        num_loops / num_loops_train: default iteration counts at inference and in training mode
            (``num_loops_train=None`` uses ``num_loops``); ``forward(num_loops=K)`` overrides both. Every
            loop count is at most `max_loops` (4096; the environment variable ``IMPLICIT_HF_MAX_LOOPS`` raises it).
        solver: a name in `solvers.SOLVERS`: ``"picard"`` (plain looping), ``"anderson"``, ``"broyden"``, or one
            added with `solvers.register_solver`.
        solver_options: each solver's own keyword arguments, by solver name, e.g. ``{"picard": {"damping":
            0.5}, "anderson": {"memory": 3}, "broyden": {"memory": 8}}``; a solver not named runs with its
            defaults. The keys ``damping`` and ``anderson_memory`` of older configs load into it
            (`LEGACY_SOLVER_KEYS`) and can still be read and set.
        tol: relative-residual tolerance for per-sample halting; ``None`` runs exactly the loop
            count.
        gradient: backward mode: ``"unroll"`` (backprop through every iteration), ``"truncated"``
            (through the last ``gradient_steps``), ``"jfb"`` (one step at the fixed point),
            ``"phantom"`` (``gradient_steps`` steps damped by ``phantom_tau``) or ``"ift"``
            (implicit differentiation; its backward fixed point runs up to ``ift_max_iter``
            iterations, default ``num_loops``, to ``ift_tol``).
        is_causal: causal attention (language models) or bidirectional (grids, fields, LPs).

    Trajectory fields (inference defaults of the heads' forward, so ``from_pretrained(dir, num_trajectories=4)``,
    lm-eval's ``--model_args pretrained=DIR,num_trajectories=4``, runs every forward with 4 trajectories; a
    forward argument wins, and in training mode a forward runs one trajectory unless told otherwise):
        num_trajectories: trajectories per input (``1``: the plain forward); ``> 1`` uses no KV cache by default.
        trajectory_noise: the scale of each trajectory's starting noise, relative to the state's RMS.
        select: how a head reduces the trajectories: ``"residual"``, ``"vote"`` (classes, tokens), ``"mean"``
            (regression) or ``"random"``; a rule the head cannot apply is refused at its forward.
        trajectory_seed: the seed of the starting noise.
        trajectory_batch_size: solve at most this many rows (inputs x trajectories) at once (``None``: all).

    Unknown choices and out-of-range values raise ``ValueError`` naming the field and what is
    allowed; a keyword that looks like a misspelt loop field (``num_loop``) is refused too rather
    than silently ignored.
    """

    model_type = "implicit"
    keys_to_ignore_at_inference = ["past_key_values"]

    # architecture (checked so a recipe's "64" fails here, naming the field, not deep inside torch)
    vocab_size: int = setting(integer(1), 32000)
    hidden_size: int = setting(integer(1), 512)
    intermediate_size: int | None = setting(integer(1, allow_none=True))  # None: Llama's SwiGLU width
    num_attention_heads: int = setting(integer(1), 8)
    num_key_value_heads: int | None = setting(integer(1, allow_none=True))  # None: num_attention_heads
    head_dim: int | None = setting(integer(1, allow_none=True))  # None: hidden_size / num_attention_heads
    hidden_act: str = setting(instance_of(str, "a string"), "silu")
    max_position_embeddings: int = setting(integer(1), 2048)
    initializer_range: float = setting(number(">= 0", lambda value: value >= 0), 0.02)
    rms_norm_eps: float = setting(number("> 0", lambda value: value > 0), 1e-6)
    rope_parameters: dict | None = None
    attention_bias: bool = setting(instance_of(bool, "True or False"), False)
    attention_dropout: float = setting(number("in [0, 1)", lambda value: 0 <= value < 1), 0.0)
    mlp_bias: bool = setting(instance_of(bool, "True or False"), False)
    use_cache: bool = True
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # inputs
    input_features: int = setting(integer(0), 0)
    edge_features: int = setting(integer(0), 0)
    feedback_features: int = setting(integer(0), 0)
    # layout of the loop
    num_prelude_layers: int = setting(integer(0), 2)
    num_core_layers: int = setting(integer(1), 4)
    num_coda_layers: int = setting(integer(0), 2)
    injection: str = setting(one_of(INJECTIONS), "add")
    state_init: str = setting(one_of(STATE_INITS), "zeros")
    state_init_std: float = setting(number("> 0", lambda value: value > 0), 1.0)
    core_norm: bool = setting(instance_of(bool, "True or False"), True)
    injection_norm: bool = setting(instance_of(bool, "True or False"), True)
    loop_shift: int = setting(integer(0, MAX_LOOP_SHIFT), 0)
    position_encoding: str = setting(one_of(POSITION_ENCODINGS), "rope")
    # running the loop
    num_loops: int = setting(loop_count(), 8)
    num_loops_train: int | None = setting(loop_count(allow_none=True))
    solver: str = setting(one_of(SOLVERS), "picard")
    solver_options: dict[str, dict[str, Any]] = setting(check_solver_options, default_factory=dict)
    tol: float | None = setting(number("> 0", lambda value: value > 0, allow_none=True))
    gradient: str = setting(one_of(GRADIENTS), "jfb")
    gradient_steps: int = setting(loop_count(), 4)
    phantom_tau: float = setting(number("in (0, 1]", lambda value: 0 < value <= 1), 0.5)
    ift_max_iter: int | None = setting(loop_count(allow_none=True))
    ift_tol: float = setting(number("> 0", lambda value: value > 0), 1e-5)
    is_causal: bool = setting(instance_of(bool, "True or False"), True)
    # trajectories per input at inference (see the ``Trajectory fields`` above)
    num_trajectories: int = setting(integer(1), TRAJECTORY_DEFAULTS["num_trajectories"])
    trajectory_noise: float = setting(number(">= 0", lambda value: value >= 0), TRAJECTORY_DEFAULTS["trajectory_noise"])
    select: str = setting(one_of(SELECT_NAMES), TRAJECTORY_DEFAULTS["select"])
    trajectory_seed: int = setting(integer(0), TRAJECTORY_DEFAULTS["trajectory_seed"])
    trajectory_batch_size: int | None = setting(
        integer(1, allow_none=True), TRAJECTORY_DEFAULTS["trajectory_batch_size"]
    )

    def __post_init__(self, **kwargs: Any) -> None:
        _refuse_misspelt_loop_fields(kwargs)
        kwargs.pop("num_hidden_layers", None)  # derived from the layer split
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                    f"({self.num_attention_heads}) unless head_dim is given"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.intermediate_size is None:
            self.intermediate_size = 32 * math.ceil(8 * self.hidden_size / 3 / 32)  # Llama's SwiGLU width
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        super().__post_init__(**kwargs)  # sets the remaining keys, LEGACY_SOLVER_KEYS through their properties

    def validate_loop_settings(self) -> None:
        """The constraints between fields (each field is checked whenever it is set); ``@strict`` runs it when
        a config is made."""
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    @property
    def num_hidden_layers(self) -> int:
        """Distinct (parameter-owning) decoder layers: prelude + core + coda."""
        return self.num_prelude_layers + self.num_core_layers + self.num_coda_layers

    @property
    def train_loops(self) -> int:
        """Iterations used in training mode when a forward call does not say."""
        return self.num_loops_train if self.num_loops_train is not None else self.num_loops

    def options_for(self, solver: str) -> dict[str, Any]:
        """The keyword arguments ``solver`` runs with: its entry of ``solver_options`` (none: its defaults)."""
        return self.solver_options.get(solver, {})

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> ImplicitConfig:
        # from_pretrained(dir, num_loop=3) arrives here: refuse a misspelt loop field as the constructor does
        _refuse_misspelt_loop_fields(kwargs)
        loaded = super().from_dict(config_dict, **kwargs)
        given = tuple(name for name in PER_CALL_FIELDS if name in kwargs)
        if given:  # from_pretrained(dir, num_loops=7): see LOOP_KEYWORDS
            (loaded[0] if isinstance(loaded, tuple) else loaded).__dict__[LOOP_KEYWORDS] = given
        return loaded

    def _remove_keys_not_serialized(self, d: dict[str, Any]) -> None:
        super()._remove_keys_not_serialized(d)
        d.pop(LOOP_KEYWORDS, None)


def _legacy_solver_key(key: str) -> property:
    """``config.<key>`` of an older config (`LEGACY_SOLVER_KEYS`): setting it checks the value by the rule of the
    solver option it maps to (named ``key``) and writes it into ``solver_options``; reading it gives the first
    solver's option it maps to."""
    targets = LEGACY_SOLVER_KEYS[key]
    rule = ARGUMENT_RULES[targets[0][1]]

    def get(self: ImplicitConfig) -> Any:
        solver, option = targets[0]
        return self.options_for(solver).get(option, options_of(solver)[option])

    def set_(self: ImplicitConfig, value: Any) -> None:
        value = check(key, value, rule)
        options = {name: dict(given) for name, given in self.solver_options.items()}
        for solver, option in targets:
            options.setdefault(solver, {})[option] = value
        self.solver_options = options

    return property(get, set_, doc=f"``{key}`` of configs written before solver_options: {targets}.")


ImplicitConfig.damping = _legacy_solver_key("damping")
ImplicitConfig.anderson_memory = _legacy_solver_key("anderson_memory")


# A per-call setting is checked as the config checks the field, except that a call's tol may be 0 (no halting).
_PER_CALL_RULES = {
    "num_loops": loop_count(),
    "tol": number(">= 0 (0: no halting in this call)", lambda value: value >= 0, allow_none=True),
    "solver": one_of(SOLVERS),
    "num_trajectories": integer(1),
    "trajectory_noise": number(">= 0", lambda value: value >= 0),
    "select": one_of(SELECT_NAMES),
    "trajectory_seed": integer(0),
    "trajectory_batch_size": integer(1, allow_none=True),
}


def check_per_call_loop_setting(name: str, value: Any, where: str = "") -> Any:
    """``value`` of the per-call setting ``name`` (`PER_CALL_FIELDS`), checked as the config checks the field (a
    ``tol`` of 0 turns halting off for the call); ``None`` ("not given") passes. ``where`` prefixes the name in the
    error, e.g. ``"generation_config."`` or a file."""
    return None if value is None else check(f"{where}{name}", value, _PER_CALL_RULES[name])


def per_call_loop_settings(entries: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The per-call settings (`PER_CALL_FIELDS`) among a generation config's ``entries``, each checked
    (`check_per_call_loop_setting`). Another loop field there (a model setting such as ``damping``) or a misspelt
    one (``num_loop``) would be ignored by ``generate``, so it is refused, named with ``where``."""
    settings = {}
    for key, value in entries.items():
        if key in PER_CALL_FIELDS and value is not None:
            settings[key] = check_per_call_loop_setting(key, value, where)
        elif key in PER_CALL_FIELDS:
            continue
        elif key in _LOOP_FIELDS:
            raise ValueError(
                f"{where}{key} cannot be set per call (only {', '.join(PER_CALL_LOOP_FIELDS)} can): it is a model "
                f"setting, set it on the model's config (config.{key})"
            )
    _refuse_misspelt_loop_fields(entries, lambda key: f"{where}{key} is not a loop setting")
    return settings


def refuse_unknown_keywords(where: str, unknown: Iterable[str], known: Iterable[str]) -> None:
    """A ``TypeError`` naming the first of ``unknown`` (if any) and the closest of ``known``."""
    unknown = sorted(unknown)
    if not unknown:
        return
    known = sorted(known)
    match = difflib.get_close_matches(unknown[0], known, n=1, cutoff=0.6)
    hint = f"did you mean {match[0]!r}?" if match else f"accepted: {', '.join(known)}"
    raise TypeError(f"{where} got an unexpected keyword argument {unknown[0]!r}; {hint}")


def _refuse_misspelt_loop_fields(
    keys: Iterable[str], what: Callable[[str], str] = lambda key: f"unknown ImplicitConfig field {key!r}"
) -> None:
    """Refuse keys that look like a misspelt loop field instead of storing or ignoring them unused: a ``ValueError``
    saying ``what(key)`` and the field meant."""
    for key in keys:
        match = key not in _CHECKED_NAMES and difflib.get_close_matches(key, _CHECKED_NAMES, n=1, cutoff=0.85)
        if match:
            raise ValueError(f"{what(key)}; did you mean {match[0]!r}?")


# The config and the rules its fields are checked by (from `rules`), which the package checks other settings with.
__all__ = [
    "DEFAULT_MAX_LOOPS",
    "ImplicitConfig",
    "check",
    "check_integer",
    "check_loop_count",
    "max_loops",
    "number",
]
