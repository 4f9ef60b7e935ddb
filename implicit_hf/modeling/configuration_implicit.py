"""Configuration of implicit (looped, weight-tied) transformers."""

from __future__ import annotations

import difflib
import math
import numbers
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from transformers import PretrainedConfig

INJECTIONS = ("add", "linear")
STATE_INITS = ("zeros", "prelude", "normal")
SOLVER_NAMES = ("picard", "anderson", "broyden")
GRADIENTS = ("unroll", "truncated", "jfb", "phantom", "ift")
POSITION_ENCODINGS = ("rope", "none")
MAX_LOOP_SHIFT = 4  # the widest causal convolution of the loop's token shift (config.loop_shift)
# The bound on every loop count (`max_loops`): config.num_loops and the other iteration counts, forward/generate
# (num_loops=...), a generation config's num_loops, return_trajectory's counts and ``--loops``. A count past it is a
# typo or a hang (1e10 loops never finish; a KV cache holds one slot per loop and core layer), not a setting: 4096 is
# 20x the largest count this project runs (200) and far beyond a fixed-point solver's usual budget (tens of
# iterations). The environment variable IMPLICIT_HF_MAX_LOOPS raises it.
DEFAULT_MAX_LOOPS = 4096

# What `save_pretrained` writes into config.json so `trust_remote_code=True` can load every head
# in a process that cannot import implicit_hf (the code files are copied next to the weights).
AUTO_MAP = {
    "AutoConfig": "configuration_implicit.ImplicitConfig",
    "AutoModel": "modeling_implicit.ImplicitModel",
    "AutoModelForCausalLM": "modeling_implicit.ImplicitForCausalLM",
    "AutoModelForTokenClassification": "modeling_implicit.ImplicitForTokenClassification",
}

# Loop settings that own no weights: they can change on a trained or converted checkpoint (e.g. the
# training loop's init_from) without touching its parameters.
RUNTIME_LOOP_FIELDS = (
    "num_loops",
    "num_loops_train",
    "solver",
    "tol",
    "damping",
    "anderson_memory",
    "gradient",
    "gradient_steps",
    "phantom_tau",
    "ift_max_iter",
    "ift_tol",
)
# Loop settings a single call can set: forward(num_loops=...), generate(...), a GenerationConfig's entries (and so a
# checkpoint's generation_config.json); `check_per_call_loop_setting` checks them.
PER_CALL_LOOP_FIELDS = ("num_loops", "tol", "solver")
# Where a config loaded by ``from_pretrained(dir, num_loops=7)`` (what lm-eval's ``--model_args ...,num_loops=7``
# does) records which of `PER_CALL_LOOP_FIELDS` were given as keyword arguments: they win over the checkpoint's
# generation_config.json (`ImplicitForCausalLM.adjust_generation_fn`). Never saved; the model drops it once loaded.
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


class ImplicitConfig(PretrainedConfig):
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
        solver: ``"picard"`` (plain looping, optional ``damping``), ``"anderson"`` (history of
            ``anderson_memory``) or ``"broyden"``.
        tol: relative-residual tolerance for per-sample halting; ``None`` runs exactly the loop
            count.
        gradient: backward mode: ``"unroll"`` (backprop through every iteration), ``"truncated"``
            (through the last ``gradient_steps``), ``"jfb"`` (one step at the fixed point),
            ``"phantom"`` (``gradient_steps`` steps damped by ``phantom_tau``) or ``"ift"``
            (implicit differentiation; its backward fixed point runs up to ``ift_max_iter``
            iterations, default ``num_loops``, to ``ift_tol``).
        is_causal: causal attention (language models) or bidirectional (grids, fields, LPs).

    Unknown choices and out-of-range values raise ``ValueError`` naming the field and what is
    allowed; a keyword that looks like a misspelt loop field (``num_loop``) is refused too rather
    than silently ignored.
    """

    model_type = "implicit"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 512,
        intermediate_size: int | None = None,
        num_attention_heads: int = 8,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        rope_parameters: dict[str, Any] | None = None,
        attention_bias: bool = False,
        attention_dropout: float = 0.0,
        mlp_bias: bool = False,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        input_features: int = 0,
        edge_features: int = 0,
        feedback_features: int = 0,
        num_prelude_layers: int = 2,
        num_core_layers: int = 4,
        num_coda_layers: int = 2,
        injection: str = "add",
        state_init: str = "zeros",
        state_init_std: float = 1.0,
        core_norm: bool = True,
        injection_norm: bool = True,
        loop_shift: int = 0,
        position_encoding: str = "rope",
        num_loops: int = 8,
        num_loops_train: int | None = None,
        solver: str = "picard",
        tol: float | None = None,
        damping: float = 1.0,
        anderson_memory: int = 5,
        gradient: str = "jfb",
        gradient_steps: int = 4,
        phantom_tau: float = 0.5,
        ift_max_iter: int | None = None,
        ift_tol: float = 1e-5,
        is_causal: bool = True,
        **kwargs: Any,
    ):
        _refuse_misspelt_loop_fields(kwargs)
        kwargs.pop("num_hidden_layers", None)  # derived from the layer split
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size or _swiglu_width(hidden_size)
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        if head_dim is None and num_attention_heads and hidden_size % num_attention_heads:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be a multiple of num_attention_heads ({num_attention_heads}) "
                "unless head_dim is given"
            )
        self.head_dim = head_dim or (hidden_size // num_attention_heads if num_attention_heads else None)
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.rope_parameters = rope_parameters
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.mlp_bias = mlp_bias
        self.use_cache = use_cache
        self.input_features = input_features
        self.edge_features = edge_features
        self.feedback_features = feedback_features
        self.num_prelude_layers = num_prelude_layers
        self.num_core_layers = num_core_layers
        self.num_coda_layers = num_coda_layers
        self.injection = injection
        self.state_init = state_init
        self.state_init_std = state_init_std
        self.core_norm = core_norm
        self.injection_norm = injection_norm
        self.loop_shift = loop_shift
        self.position_encoding = position_encoding
        self.num_loops = num_loops
        self.num_loops_train = num_loops_train
        self.solver = solver
        self.tol = tol
        self.damping = damping
        self.anderson_memory = anderson_memory
        self.gradient = gradient
        self.gradient_steps = gradient_steps
        self.phantom_tau = phantom_tau
        self.ift_max_iter = ift_max_iter
        self.ift_tol = ift_tol
        self.is_causal = is_causal
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.validate_loop_settings()

    @property
    def num_hidden_layers(self) -> int:
        """Distinct (parameter-owning) decoder layers: prelude + core + coda."""
        return self.num_prelude_layers + self.num_core_layers + self.num_coda_layers

    @property
    def train_loops(self) -> int:
        """Iterations used in training mode when a forward call does not say."""
        return self.num_loops_train if self.num_loops_train is not None else self.num_loops

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> ImplicitConfig:
        # from_pretrained(dir, num_loop=3) arrives here: refuse a misspelt loop field as __init__ does
        _refuse_misspelt_loop_fields({key: value for key, value in kwargs.items() if key not in _LOOP_FIELDS})
        loaded = super().from_dict(config_dict, **kwargs)
        given = tuple(name for name in PER_CALL_LOOP_FIELDS if name in kwargs)
        if given:  # from_pretrained(dir, num_loops=7): see LOOP_KEYWORDS
            setattr(loaded[0] if isinstance(loaded, tuple) else loaded, LOOP_KEYWORDS, given)
        return loaded

    def _remove_keys_not_serialized(self, d: dict[str, Any]) -> None:
        super()._remove_keys_not_serialized(d)
        d.pop(LOOP_KEYWORDS, None)

    def __setattr__(self, key: str, value: Any) -> None:
        # Every checked field is checked where it is set: in __init__, by from_pretrained(dir, field=...)
        # (transformers sets config attributes from keyword arguments) and by `config.field = value`.
        check = _FIELD_CHECKS.get(key)
        super().__setattr__(key, value if check is None else check(key, value))

    def validate_loop_settings(self) -> None:
        """Raise ``ValueError`` naming the first invalid field and what it allows (each field is also checked
        when it is set; this re-checks them all and the constraints between fields)."""
        for name in _FIELD_CHECKS:
            setattr(self, name, getattr(self, name))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )


def _swiglu_width(hidden_size: int) -> int:
    """Llama's SwiGLU width: 8/3 of the hidden size, rounded up to a multiple of 32."""
    return 32 * math.ceil(8 * hidden_size / 3 / 32)


def check_integer(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an ``int`` if it is an integral number (Python or numpy, not a bool) ``>= minimum``;
    otherwise a ``ValueError`` naming ``name`` and what it allows."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return int(value)


def max_loops() -> int:
    """The bound on loop counts: the environment variable ``IMPLICIT_HF_MAX_LOOPS`` if set (read at every check,
    so setting it in a running process takes effect), else `DEFAULT_MAX_LOOPS`. ``implicit_hf.loop_counts`` keeps
    a copy (it may not import this package, which imports torch); a test checks the two agree."""
    given = os.environ.get("IMPLICIT_HF_MAX_LOOPS")
    if given is None:
        return DEFAULT_MAX_LOOPS
    if not given.strip().isdigit() or int(given) < 1:
        raise ValueError(f"the environment variable IMPLICIT_HF_MAX_LOOPS must be an integer >= 1; got {given!r}")
    return int(given)


def check_loop_count(name: str, value: Any) -> int:
    """``value`` as an ``int`` if it is an integer in ``[1, max_loops()]``; otherwise a ``ValueError`` naming
    ``name``, the bound and how to raise it."""
    value = check_integer(name, value)
    bound = max_loops()
    if value > bound:
        raise ValueError(
            f"{name} must be at most {bound}, the bound on loop counts (set the environment variable "
            f"IMPLICIT_HF_MAX_LOOPS to raise it); got {value}"
        )
    return value


def _choice(allowed: tuple[str, ...]):
    def check(name: str, value: Any) -> str:
        if value not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}")
        return value

    return check


def _integer(minimum: int, allow_none: bool = False):
    def check(name: str, value: Any) -> int | None:
        return None if value is None and allow_none else check_integer(name, value, minimum)

    return check


def real_number(bounds: str, within: Callable[[float], bool], allow_none: bool = False):
    """A check for a finite real number with ``within(value)`` true (NaN and infinities never pass: a tolerance of
    ``inf`` would halt every loop at once); ``bounds`` says it in words."""

    def check(name: str, value: Any) -> float | None:
        if value is None and allow_none:
            return None
        if (
            isinstance(value, bool)
            or not isinstance(value, numbers.Real)
            or not math.isfinite(value)
            or not within(value)
        ):
            allowed = f"None or a number {bounds}" if allow_none else f"a number {bounds}"
            raise ValueError(f"{name} must be {allowed}; got {value!r}")
        return value if isinstance(value, (int, float)) else float(value)

    return check


def _loop_count(allow_none: bool = False):
    def check(name: str, value: Any) -> int | None:
        return None if value is None and allow_none else check_loop_count(name, value)

    return check


def _integer_in(low: int, high: int):
    def check(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= high:
            raise ValueError(f"{name} must be an integer in [{low}, {high}]; got {value!r}")
        return int(value)

    return check


def _positive(allow_none: bool = False):
    return real_number("> 0", lambda value: value > 0, allow_none)


def _boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def _string(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string; got {value!r}")
    return value


# The fields ImplicitConfig checks whenever they are set, and how.
_FIELD_CHECKS = {
    # architecture (checked so a recipe's "64" fails here, naming the field, not deep inside torch)
    "vocab_size": _integer(1),
    "intermediate_size": _integer(1),
    "head_dim": _integer(1, allow_none=True),
    "max_position_embeddings": _integer(1),
    "initializer_range": real_number(">= 0", lambda value: value >= 0),
    "rms_norm_eps": _positive(),
    "attention_dropout": real_number("in [0, 1)", lambda value: 0 <= value < 1),
    "attention_bias": _boolean,
    "mlp_bias": _boolean,
    "hidden_act": _string,
    # loop and layout
    "injection": _choice(INJECTIONS),
    "state_init": _choice(STATE_INITS),
    "solver": _choice(SOLVER_NAMES),
    "gradient": _choice(GRADIENTS),
    "hidden_size": _integer(1),
    "num_attention_heads": _integer(1),
    "num_key_value_heads": _integer(1),
    "input_features": _integer(0),
    "edge_features": _integer(0),
    "feedback_features": _integer(0),
    "num_prelude_layers": _integer(0),
    "num_core_layers": _integer(1),
    "num_coda_layers": _integer(0),
    "loop_shift": _integer_in(0, MAX_LOOP_SHIFT),
    "position_encoding": _choice(POSITION_ENCODINGS),
    "num_loops": _loop_count(),
    "num_loops_train": _loop_count(allow_none=True),
    "anderson_memory": _integer(1),
    "gradient_steps": _loop_count(),
    "ift_max_iter": _loop_count(allow_none=True),
    "tol": _positive(allow_none=True),
    "ift_tol": _positive(),
    "state_init_std": _positive(),
    "damping": real_number("in (0, 1]", lambda value: 0 < value <= 1),
    "phantom_tau": real_number("in (0, 1]", lambda value: 0 < value <= 1),
    "core_norm": _boolean,
    "injection_norm": _boolean,
    "is_causal": _boolean,
}


# A per-call setting is checked as the config checks the field, except that a call's tol may be 0 (no halting).
_PER_CALL_CHECKS = {
    "num_loops": _FIELD_CHECKS["num_loops"],
    "tol": real_number(">= 0 (0: no halting in this call)", lambda value: value >= 0, allow_none=True),
    "solver": _FIELD_CHECKS["solver"],
}


def check_per_call_loop_setting(name: str, value: Any, where: str = "") -> Any:
    """``value`` of the per-call loop setting ``name`` (`PER_CALL_LOOP_FIELDS`), checked as the config checks the
    field (a ``tol`` of 0 turns halting off for the call); ``None`` ("not given") passes. ``where`` prefixes the
    name in the error, e.g. ``"generation_config."`` or a file."""
    return None if value is None else _PER_CALL_CHECKS[name](f"{where}{name}", value)


def per_call_loop_settings(entries: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The per-call loop settings among a generation config's ``entries``, each checked
    (`check_per_call_loop_setting`). Another loop field there (a model setting such as ``damping``) or a misspelt
    one (``num_loop``) would be ignored by ``generate``, so it is refused, named with ``where``."""
    settings = {}
    for key, value in entries.items():
        if key in PER_CALL_LOOP_FIELDS and value is not None:
            settings[key] = check_per_call_loop_setting(key, value, where)
        elif key in PER_CALL_LOOP_FIELDS:
            continue
        elif key in _LOOP_FIELDS:
            raise ValueError(
                f"{where}{key} cannot be set per call (only {', '.join(PER_CALL_LOOP_FIELDS)} can): it is a model "
                f"setting, set it on the model's config (config.{key})"
            )
        else:
            match = difflib.get_close_matches(key, _LOOP_FIELDS, n=1, cutoff=0.85)
            if match:
                raise ValueError(f"{where}{key} is not a loop setting; did you mean {match[0]!r}?")
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


def _refuse_misspelt_loop_fields(kwargs: dict[str, Any]) -> None:
    """Refuse keywords that look like a misspelt loop field instead of storing them unused."""
    for key in kwargs:
        match = difflib.get_close_matches(key, _LOOP_FIELDS, n=1, cutoff=0.85)
        if match:
            raise ValueError(f"unknown ImplicitConfig field {key!r}; did you mean {match[0]!r}?")
