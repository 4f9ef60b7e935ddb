"""Implicit (looped, weight-tied) transformers built from transformers' own Llama layers.

    e  = prelude(embed(x))             run once
    z* = core(inject(z*, e))           one weight-tied block iterated to a fixed point
    y  = head(norm(coda(z*)))          run once

The layers are `LlamaDecoderLayer`s, so attention goes through transformers' attention interface
(eager / sdpa / flex / flash) and RoPE, masks and weight layout are transformers'. This file and
the ones it imports relatively are copied next to saved checkpoints, so it imports nothing from
``implicit_hf`` by absolute name (``trust_remote_code=True`` loads it where the package is absent).
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.modeling_outputs import ModelOutput
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)
from transformers.utils import GENERATION_CONFIG_NAME, cached_file, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import TransformersKwargs
from transformers.utils.output_capturing import capture_outputs

from .cache import LoopSlots
from .configuration_implicit import (
    LOOP_KEYWORDS,
    PER_CALL_LOOP_FIELDS,
    ImplicitConfig,
    check_integer,
    check_loop_count,
    check_per_call_loop_setting,
    per_call_loop_settings,
    refuse_unknown_keywords,
)
from .gradients import fixed_point
from .penalties import check_penalties, fixed_point_penalties
from .solvers import SolverStats


@dataclass
class ImplicitModelOutput(ModelOutput):
    """Output of `ImplicitModel`.

    Args:
        last_hidden_state: the coda's normalised output at the fixed point, ``(B, T, hidden)``.
        loop_stats: what the solver did per sample (steps, residual traces, converged, diverged).
        trajectory: with ``return_trajectory=True``, ``last_hidden_state`` after each iteration.
        penalties: with ``penalties``, each requested stabilising penalty at the last iterate (a scalar).
        cache: the KV cache (one slot per prelude/coda layer and per (loop, core layer)), with ``use_cache``.
        hidden_states: with ``output_hidden_states``: the embeddings, the prelude's output, the state after
            every iteration run, and ``last_hidden_state`` (3 + iterations entries, each ``(B, T, hidden)``).
        attentions: with ``output_attentions`` (eager attention): the weights of every attention call in
            order: the prelude's layers, the core's layers at every iteration, the coda's layers.
    """

    last_hidden_state: torch.Tensor | None = None
    loop_stats: SolverStats | None = None
    trajectory: tuple[torch.Tensor, ...] | None = None
    penalties: dict[str, torch.Tensor] | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class ImplicitHeadOutput(ModelOutput):
    """Output of the heads: ``logits`` at the fixed point, optionally per iteration.

    Args:
        loss: training loss when labels were given.
        logits: head output, ``(B, T, vocab)`` for LMs, ``(B, T, num_labels)`` for per-token heads.
        loop_stats: what the solver did per sample.
        trajectory: with ``return_trajectory``, the logits after each requested iteration (the eval
            harness scores every loop count from this one run).
        trajectory_loss: with labels and ``return_trajectory``, the loss of each trajectory entry,
            shape ``(len(trajectory),)`` (deep supervision).
        penalties: with ``penalties``, each requested stabilising penalty at the last iterate.
        cache: the KV cache, with ``use_cache``.
        hidden_states / attentions: see `ImplicitModelOutput`.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    loop_stats: SolverStats | None = None
    trajectory: tuple[torch.Tensor, ...] | None = None
    trajectory_loss: torch.Tensor | None = None
    penalties: dict[str, torch.Tensor] | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class ImplicitInjection(nn.Module):
    """Combines the state ``z`` with the injected input ``e`` at every iteration.

    ``"add"``: ``z + e``. ``"linear"``: ``W [z; e]`` with ``W`` initialised to ``[I | I]`` (addition).
    """

    def __init__(self, config: ImplicitConfig):
        super().__init__()
        hidden = config.hidden_size
        self.weight = nn.Parameter(torch.empty(hidden, 2 * hidden)) if config.injection == "linear" else None

    def forward(self, state: torch.Tensor, injected: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            return state + injected
        return nn.functional.linear(torch.cat([state, injected], dim=-1), self.weight)


class LoopShift(nn.Module):
    """The loop's token shift (``config.loop_shift = k``): a causal depthwise convolution over the normalised
    state of the ``k`` previous positions, projected, added to the core's input at every iteration:

        shift(z)[t] = W · sum_{j=1..k} w_j ⊙ norm(z)[t - j]            (zeros before the first position)

    Attention can move information between positions too, but only by content or position; this path
    moves every token's state one position on per iteration whatever the positions are, so a loop of
    ``K`` iterations can run a recurrence over ``K`` tokens. It starts as a pure one-step shift (``w_1 = 1``,
    the other taps 0, ``W`` the identity). Padding holds a zero state, so it shifts zeros into the first real token.
    With a KV cache the normalised states of earlier tokens come from the loop's shift slot
    (``cache.py``); ``layer_idx`` addresses it through the loop's cache view, after the core's layers.
    """

    def __init__(self, config: ImplicitConfig):
        super().__init__()
        self.kernel = config.loop_shift
        self.layer_idx = config.num_prelude_layers + config.num_core_layers
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.taps = nn.Parameter(torch.empty(self.kernel, config.hidden_size))  # taps[j]: offset j + 1
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, state: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        normed = self.norm(state)
        length, kernel = normed.shape[1], self.kernel
        if cache is not None:  # this loop's states of every token so far, this call's appended
            keys, _ = cache.update(normed[:, None], normed.new_zeros(*normed.shape[:2], 0)[:, None], self.layer_idx)
            normed = keys[:, 0, -(length + kernel) :]
        history = nn.functional.pad(normed, (0, 0, length + kernel - normed.shape[1], 0))  # (b, k + T, d)
        shifted = sum(self.taps[j] * history[:, kernel - 1 - j : kernel - 1 - j + length] for j in range(kernel))
        return self.proj(shifted)


# Keywords a forward pass takes beyond its own arguments: what transformers' generate, Trainer and attention
# back-ends pass (TransformersKwargs); anything else is refused with a did-you-mean, not ignored.
PASSED_THROUGH = frozenset(TransformersKwargs.__annotations__) | {"cache_position", "return_dict"}
# What `from_pretrained` hands `adjust_generation_fn` to find a checkpoint's files (transformers' download_kwargs).
_DOWNLOAD_KEYWORDS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder")


class ImplicitPreTrainedModel(PreTrainedModel):
    config: ImplicitConfig
    config_class = ImplicitConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_record_outputs = {"attentions": LlamaAttention}  # transformers' capture_outputs hooks collect them

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' ``from_pretrained``; a weights file that cannot be read is reported by its path."""
        from safetensors import SafetensorError, safe_open

        try:
            loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
            model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, loading info) on request
            model.config.__dict__.pop(LOOP_KEYWORDS, None)  # used by adjust_generation_fn while loading
            return loaded
        except SafetensorError as err:
            unreadable = []
            for path in sorted(Path(str(pretrained_model_name_or_path)).glob("*.safetensors")):
                try:
                    with safe_open(path, framework="pt"):
                        pass
                except SafetensorError:
                    unreadable.append(str(path))
            where = ", ".join(unreadable) or f"a safetensors file of {pretrained_model_name_or_path}"
            raise OSError(f"cannot read the weights in {where} (truncated or corrupted?): {err}") from err

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """transformers' ``save_pretrained``; loop settings set on ``generation_config`` are checked first (a
        checkpoint that ``from_pretrained`` would refuse is not written) and saved with it (transformers drops a
        custom entry of a generation config derived from the model config on load)."""
        generation_config = getattr(self, "generation_config", None)
        if generation_config is not None:
            # checked before anything is written
            per_call_loop_settings(_custom_entries(generation_config), "generation_config.")
            if any(hasattr(generation_config, name) for name in PER_CALL_LOOP_FIELDS):
                generation_config._from_model_config = False
        super().save_pretrained(save_directory, *args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, ImplicitInjection) and module.weight is not None:
            eye = torch.eye(self.config.hidden_size, dtype=module.weight.dtype)
            init.copy_(module.weight, torch.cat([eye, eye], dim=1))
        if isinstance(module, LoopShift):  # a pure one-step shift of the normalised state to begin with
            taps = torch.zeros_like(module.taps)
            taps[0] = 1.0
            init.copy_(module.taps, taps)
            init.copy_(module.proj.weight, torch.eye(self.config.hidden_size, dtype=module.proj.weight.dtype))


def _rows(x: torch.Tensor | None, index: torch.Tensor, batch: int) -> torch.Tensor | None:
    """Rows ``index`` of a per-sample tensor; tensors broadcast over the batch pass unchanged."""
    if x is None or index.shape[0] == batch or x.shape[0] != batch:
        return x
    return x[index]


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True: attend) as an additive float mask (0 or -inf); a float mask unchanged."""
    if mask.dtype != torch.bool:
        return mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def _add_bias(mask: torch.Tensor | None, bias: torch.Tensor) -> torch.Tensor:
    """An additive float mask ``(B, H, T, T)``: the attention mask (bool or additive) plus ``bias``."""
    return bias if mask is None else _additive(mask, bias.dtype) + bias


def check_input_shapes(
    config: ImplicitConfig,
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    input_features: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    edge_features: torch.Tensor | None,
    past: int,
) -> None:
    """Check every tensor input against the others and the config (``past``: tokens already in the cache);
    the error names the argument, its shape and the shape it needs."""
    if input_ids is not None:
        name, given = "input_ids", input_ids
        if input_ids.ndim != 2 or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise ValueError(
                f"input_ids must be integer token ids of shape (batch, length); got {_describe(input_ids)}"
            )
        if input_ids.numel():
            low, high = (int(x) for x in torch.aminmax(input_ids))  # one reduction, one sync per forward
            if low < 0 or high >= config.vocab_size:
                bad = high if high >= config.vocab_size else low
                raise ValueError(f"input_ids holds token id {bad}, outside the vocabulary [0, {config.vocab_size})")
    else:
        name, given = (
            ("inputs_embeds", inputs_embeds) if inputs_embeds is not None else ("input_features", input_features)
        )
        width = config.hidden_size if inputs_embeds is not None else config.input_features
        if given.ndim != 3 or given.shape[-1] != width:
            raise ValueError(f"{name} must have shape (batch, length, {width}); got {_describe(given)}")
    _refuse_no_tokens(name, given)
    batch, length = given.shape[:2]
    total = past + length
    context = f"{name} {tuple(given.shape)}" + (f" after {past} cached tokens" if past else "")
    if attention_mask is not None:
        if attention_mask.ndim == 2:
            needed = (batch, total)
            ok = tuple(attention_mask.shape) == needed
        elif attention_mask.ndim == 4:
            needed = (batch, "1 or heads", length, total)
            ok = attention_mask.shape[0] in (1, batch) and tuple(attention_mask.shape[2:]) == (length, total)
        else:
            needed, ok = (batch, total), False
        if not ok:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; with {context} it must be "
                f"{needed} (or a 4-D mask (batch, 1, {length}, {total}))"
            )
    if position_ids is not None and (
        position_ids.ndim != 2 or position_ids.shape[0] not in (1, batch) or position_ids.shape[1] != length
    ):
        raise ValueError(
            f"position_ids has shape {tuple(position_ids.shape)}; with {context} it must be ({batch} or 1, {length})"
        )
    if edge_features is not None and tuple(edge_features.shape) != (batch, length, length, config.edge_features):
        raise ValueError(
            f"edge_features has shape {tuple(edge_features.shape)}; with {context} it must be "
            f"{(batch, length, length, config.edge_features)}"
        )


def _describe(x: torch.Tensor) -> str:
    return f"shape {tuple(x.shape)}, dtype {x.dtype}"


@functools.cache
def _standard_generation_fields() -> frozenset[str]:
    """The attributes every transformers `GenerationConfig` has: what is not among them is a custom entry."""
    return frozenset(vars(GenerationConfig()))


def _custom_entries(generation_config: GenerationConfig) -> dict[str, Any]:
    """A generation config's entries beyond transformers' own (where loop settings live): checked once per
    ``generate`` call, so read without ``to_dict``'s deep copy or a look at every standard field."""
    standard = _standard_generation_fields()
    return {key: value for key, value in vars(generation_config).items() if key not in standard}


def _refuse_no_tokens(name: str, inputs: torch.Tensor) -> None:
    """A ``ValueError`` naming ``name`` when ``inputs`` ``(batch, length, ...)`` has no sequence or length 0 (an empty
    batch or prompt, which would otherwise fail deep inside attention or generate)."""
    if inputs.ndim >= 2 and not inputs.shape[0]:
        raise ValueError(f"{name} holds no sequences ({_describe(inputs)}): give a batch of at least one sequence")
    if inputs.ndim >= 2 and not inputs.shape[1]:
        raise ValueError(f"{name} has no tokens ({_describe(inputs)}): give at least one token per sequence")


def _check_prompt(name: str, inputs: torch.Tensor, hidden_size: int) -> None:
    """What ``generate`` needs of its prompt before transformers indexes it: ``input_ids`` ``(batch, length)`` or
    ``inputs_embeds`` ``(batch, length, hidden_size)``, with at least one sequence and token (`check_input_shapes`
    checks the rest at the first forward pass)."""
    if name == "input_ids" and inputs.ndim != 2:
        raise ValueError(f"input_ids must be integer token ids of shape (batch, length); got {_describe(inputs)}")
    if name == "inputs_embeds" and inputs.ndim != 3:
        raise ValueError(f"inputs_embeds must have shape (batch, length, {hidden_size}); got {_describe(inputs)}")
    _refuse_no_tokens(name, inputs)


def _loop_counts(requested: Sequence[int]) -> tuple[int, ...]:
    try:
        counts = [check_integer("return_trajectory", count) for count in requested]
    except (TypeError, ValueError):  # not a list, or not of integers >= 1
        counts = []
    if not counts:
        raise ValueError(
            f"return_trajectory must be True, False or a non-empty list of loop counts >= 1; got {requested!r}"
        )
    return tuple(check_loop_count("return_trajectory", count) for count in counts)


@dataclass
class LayerInputs:
    """What every decoder layer of one forward pass takes besides the hidden states.

    ``is_token`` is ``(B, T, 1)``, False at the padding of a 2-D attention mask, or ``None`` when this
    call has no padding. `rows` gives the view for the batch rows a solver still runs.
    """

    mask: torch.Tensor | None
    position_ids: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    is_token: torch.Tensor | None
    layer_kwargs: dict
    batch: int

    def rows(self, index: torch.Tensor) -> LayerInputs:
        """These inputs for the batch rows ``index`` (tensors broadcast over the batch stay as they are)."""
        if index.shape[0] == self.batch:
            return self
        pick = [_rows(x, index, self.batch) for x in (self.mask, self.position_ids, self.cos, self.sin, self.is_token)]
        return LayerInputs(*pick, self.layer_kwargs, index.shape[0])

    def run(self, layers: nn.ModuleList, hidden: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        for layer in layers:
            hidden = layer(
                hidden,
                attention_mask=self.mask,
                position_ids=self.position_ids,
                position_embeddings=(self.cos, self.sin),
                cache=cache,
                **self.layer_kwargs,
            )
        return hidden

    def zero_padding(self, state: torch.Tensor) -> torch.Tensor:
        """``state`` with zeros at padding positions: they are masked out of attention anyway, and this
        keeps them out of the residual norms that decide halting."""
        return state if self.is_token is None else state.masked_fill(~self.is_token, 0.0)


class CoreMap:
    """The map the solvers iterate, ``z -> core(inject(z, e [+ W fb(out(z))]))``, called as ``f(z, index)``
    on the batch rows ``index``. It counts its evaluations: the loop index of the next one picks that loop's
    cache slots and is passed to the model's ``loop_hook``."""

    def __init__(
        self,
        model: ImplicitModel,
        inputs: LayerInputs,
        injected: torch.Tensor,
        loop_feedback: Callable[[torch.Tensor], torch.Tensor] | None,
        slots: LoopSlots | None,
    ):
        self.model, self.inputs, self.injected = model, inputs, injected
        self.loop_feedback, self.slots = loop_feedback, slots
        self.evaluations = 0

    def __call__(self, state: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        model, rows, batch = self.model, self.inputs.rows(index), self.inputs.batch
        cache = None
        if self.slots is not None:
            cache = self.slots.core(self.evaluations, None if index.shape[0] == batch else index)
        if model.loop_hook is not None:
            model.loop_hook(self.evaluations)
        self.evaluations += 1
        injection = _rows(self.injected, index, batch)
        if self.loop_feedback is not None:
            injection = injection + self.feedback(state, index, rows)
        hidden = model.injection(state, injection)
        if model.loop_shift is not None:
            hidden = hidden + model.loop_shift(state, cache)
        hidden = rows.run(model.core, hidden, cache)
        if model.core_norm is not None:
            hidden = model.core_norm(hidden)
        return rows.zero_padding(hidden)

    def feedback(self, state: torch.Tensor, index: torch.Tensor, rows: LayerInputs) -> torch.Tensor:
        """The embedded ``loop_feedback`` features of the model's output at ``state``."""
        model, batch = self.model, self.inputs.batch
        output = model.norm(rows.run(model.coda, state))
        if index.shape[0] != batch:  # the callable sees the whole batch; rows not running are zeros
            output = output.new_zeros(batch, *output.shape[1:]).index_copy(0, index, output)
        features = self.loop_feedback(output)
        width = model.config.feedback_features
        if features.shape != (*output.shape[:2], width):
            raise ValueError(
                f"loop_feedback must return shape {(*output.shape[:2], width)}; got {tuple(features.shape)}"
            )
        return model.feedback_embed(_rows(features, index, batch))


class ImplicitModel(ImplicitPreTrainedModel):
    """Prelude, looped core and coda; returns the normalised hidden states at the fixed point."""

    def __init__(self, config: ImplicitConfig):
        super().__init__(config)
        # A model fed continuous features has no token vocabulary (an unused embedding would only cost
        # parameters and make DDP look for gradients that never come).
        if config.input_features:
            self.embed_tokens, self.feature_embed = None, nn.Linear(config.input_features, config.hidden_size)
        else:
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
            self.feature_embed = None
        self.edge_bias = (
            nn.Linear(config.edge_features, config.num_attention_heads, bias=False) if config.edge_features else None
        )
        self.feedback_embed = (
            nn.Linear(config.feedback_features, config.hidden_size) if config.feedback_features else None
        )
        first_core = config.num_prelude_layers
        first_coda = first_core + config.num_core_layers
        self.prelude = nn.ModuleList([LlamaDecoderLayer(config, i) for i in range(first_core)])
        self.core = nn.ModuleList([LlamaDecoderLayer(config, i) for i in range(first_core, first_coda)])
        self.coda = nn.ModuleList(
            [LlamaDecoderLayer(config, i) for i in range(first_coda, first_coda + config.num_coda_layers)]
        )
        for layer in (*self.prelude, *self.core, *self.coda):
            layer.self_attn.is_causal = config.is_causal
        self.injection = ImplicitInjection(config)
        self.loop_shift = LoopShift(config) if config.loop_shift else None
        self.core_norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps) if config.core_norm else None
        self.injection_norm = (
            LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps) if config.injection_norm else None
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        # Called with the 0-based loop index before every core evaluation, e.g. to switch to that loop's
        # LoRA adapter (`implicit_hf.integrations.peft.add_loop_adapters`); not saved with the model.
        self.loop_hook: Callable[[int], None] | None = None
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding | None:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        edge_features: torch.Tensor | None = None,
        num_loops: int | None = None,
        tol: float | None = None,
        solver: str | None = None,
        return_trajectory: bool | Sequence[int] = False,
        loop_feedback: Callable[[torch.Tensor], torch.Tensor] | None = None,
        penalties: Sequence[str] = (),
        use_cache: bool | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> ImplicitModelOutput:
        r"""
        input_features: continuous inputs ``(B, T, config.input_features)``, instead of ``input_ids``.
        edge_features: pairwise features ``(B, T, T, config.edge_features)`` biasing attention.
        loop_feedback: required exactly when ``config.feedback_features > 0``. Maps this model's output
            at the current state (the coda and final norm applied to it, ``(B, T, hidden)``) to
            features ``(B, T, config.feedback_features)``, embedded and added to the injected input
            at every iteration: the fixed-point map is ``z -> core(inject(z, e + W fb(out(z))))``, so
            every solver and gradient mode sees it. It is called on the whole batch, acting row by
            row: when the solver runs a subset of samples, the other rows are zeros and ignored.
        num_loops: iterations of the core (default ``config.num_loops``, or ``config.num_loops_train``
            in training mode); with a tolerance this is the maximum.
        tol: relative-residual tolerance for per-sample halting (default ``config.tol``; ``0``
            disables halting for this call).
        solver: ``"picard"``, ``"anderson"`` or ``"broyden"`` (default ``config.solver``).
        return_trajectory: ``True`` also returns the hidden states after every iteration run; a list
            of loop counts returns them after exactly those iterations, in that order (the solver keeps
            only those states and only they are decoded through the coda: a sweep over 1, 2, 4, ..., 64
            keeps and decodes 7 states, not 64). Counts past the last iteration run (every sample
            halted) repeat the final state.
        penalties: stabilising penalties to return at the last iterate, a subset of ``("jacobian",
            "fixed_point")`` (``modeling/penalties.py``): each costs one more evaluation of the core.
        use_cache: keep keys and values in ``cache`` (one slot per (loop, core layer), see
            ``modeling/cache.py``) and return it; by default on for a causal model at inference
            without ``return_trajectory``. A cache filled at one loop count cannot be continued at
            another. With Picard iteration and no tolerance, cached decoding equals uncached decoding.
        cache: a transformers ``DynamicCache`` from an earlier call (``past_key_values``, its former name,
            is accepted with a deprecation warning, as in transformers' own models).
        """
        refuse_unknown_keywords(f"{type(self).__name__}.forward()", set(kwargs) - PASSED_THROUGH, FORWARD_KEYWORDS)
        if kwargs.get("output_attentions") and self.config._attn_implementation != "eager":
            raise ValueError(
                f"output_attentions=True needs eager attention; this model uses {self.config._attn_implementation!r} "
                "(load it with attn_implementation='eager')"
            )
        output_hidden_states = kwargs.pop("output_hidden_states", None)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        cache = self._cache_for(use_cache, cache, return_trajectory)
        penalties = check_penalties(penalties)
        self._check_inputs(input_ids, inputs_embeds, input_features, edge_features, loop_feedback, penalties, cache)
        past = cache.get_seq_length() if cache is not None else 0
        check_input_shapes(
            self.config, input_ids, inputs_embeds, input_features, attention_mask, position_ids, edge_features, past
        )
        num_loops, tol, solver = self._loop_settings(num_loops, tol, solver)
        wanted = () if isinstance(return_trajectory, bool) else _loop_counts(return_trajectory)
        every_loop = return_trajectory is True or output_hidden_states

        hidden = self._embed(input_ids, inputs_embeds, input_features)
        inputs = self._layer_inputs(hidden, attention_mask, position_ids, edge_features, past, cache, kwargs)
        slots = None
        if cache is not None:
            layers = map(len, (self.prelude, self.core, self.coda))
            slots = LoopSlots(cache, *layers, num_loops, shift=self.loop_shift is not None)
        prelude_output = inputs.run(self.prelude, hidden, slots and slots.prelude())
        injected = prelude_output if self.injection_norm is None else self.injection_norm(prelude_output)
        core_map = CoreMap(self, inputs, injected, loop_feedback, slots)
        state, stats = fixed_point(
            core_map,
            inputs.zero_padding(self._initial_state(injected)),
            solver=solver,
            max_iter=num_loops,
            tol=tol,
            keep=range(1, num_loops + 1) if every_loop else wanted,
            **self._fixed_point_options(solver),
        )
        if slots is not None:
            slots.fill_remaining_loops(core_map.evaluations, hidden.shape[1])
        measured = fixed_point_penalties(core_map, state, penalties) if penalties else None

        kept, stats.states = stats.states or {}, None  # callers get decoded states, not the raw ones
        states_run = [kept[t] for t in sorted(kept)]
        trajectory = None
        if return_trajectory is not False:
            to_decode = states_run if return_trajectory is True else [kept.get(t, state) for t in wanted]
            trajectory = tuple(self._decode(inputs, z) for z in to_decode)
        last_hidden_state = self._decode(inputs, state, slots and slots.coda())
        return ImplicitModelOutput(
            last_hidden_state=last_hidden_state,
            loop_stats=stats,
            trajectory=trajectory,
            penalties=measured,
            cache=cache,
            hidden_states=(hidden, prelude_output, *states_run, last_hidden_state) if output_hidden_states else None,
        )

    def _cache_for(self, use_cache: bool | None, cache: Cache | None, return_trajectory) -> Cache | None:
        """The KV cache of this call: by default one where it serves (causal inference without trajectories)."""
        if use_cache is not None and not isinstance(use_cache, bool):
            raise ValueError(f"use_cache must be True, False or None (the default); got {use_cache!r}")
        if use_cache is None:
            use_cache = cache is not None or (
                self.config.use_cache and self.config.is_causal and not self.training and not return_trajectory
            )
        if not use_cache:
            return None
        if not self.config.is_causal:
            raise ValueError("use_cache needs a causal model (config.is_causal=True); this one attends both ways")
        if return_trajectory is not False:
            raise ValueError("return_trajectory cannot be combined with a KV cache: call with use_cache=False")
        return DynamicCache() if cache is None else cache  # its slots are created on first use

    def _check_inputs(self, input_ids, inputs_embeds, input_features, edge_features, loop_feedback, penalties, cache):
        """Refuse inputs this model was not built for, or that cannot go together."""
        if cache is not None and penalties:
            raise ValueError("penalties are a training objective and cannot use a KV cache: call with use_cache=False")
        given = [
            name
            for name, value in (
                ("input_ids", input_ids),
                ("inputs_embeds", inputs_embeds),
                ("input_features", input_features),
            )
            if value is not None
        ]
        if len(given) != 1:
            raise ValueError(f"pass exactly one of input_ids, inputs_embeds or input_features; got {given or 'none'}")
        if input_features is not None and self.feature_embed is None:
            raise ValueError("input_features needs a model built with config.input_features > 0")
        if input_ids is not None and self.embed_tokens is None:
            raise ValueError("this model takes input_features (config.input_features > 0), not input_ids")
        if edge_features is not None and self.edge_bias is None:
            raise ValueError("edge_features needs a model built with config.edge_features > 0")
        if loop_feedback is None and self.feedback_embed is not None:
            raise ValueError(
                f"this model was built with config.feedback_features={self.config.feedback_features} and needs "
                "loop_feedback, the function giving its in-loop features (for a task: task.loop_feedback(inputs))"
            )
        if loop_feedback is not None and self.feedback_embed is None:
            raise ValueError("loop_feedback needs a model built with config.feedback_features > 0")
        if loop_feedback is not None and cache is not None:
            raise ValueError("loop_feedback runs the coda inside the loop and cannot use a KV cache: use_cache=False")

    def _loop_settings(self, num_loops: int | None, tol: float | None, solver: str | None) -> tuple:
        """This call's ``(num_loops, tol, solver)``: the arguments, checked as the config checks them, or the
        config's defaults (a ``tol`` of 0 turns halting off)."""
        check = check_per_call_loop_setting
        num_loops, tol, solver = check("num_loops", num_loops), check("tol", tol), check("solver", solver)
        if num_loops is None:
            num_loops = self.config.train_loops if self.training else self.config.num_loops
        solver = self.config.solver if solver is None else solver
        return num_loops, self.config.tol if tol is None else (tol or None), solver

    def _embed(self, input_ids, inputs_embeds, input_features) -> torch.Tensor:
        if input_features is not None:
            return self.feature_embed(input_features)
        return self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds

    def _layer_inputs(self, hidden, attention_mask, position_ids, edge_features, past, cache, kwargs) -> LayerInputs:
        """Mask, positions and RoPE of this call, shared by every layer and loop."""
        batch, length = hidden.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=hidden.device).unsqueeze(0)
        # With an edge bias the mask must be materialised (sdpa's "no mask" shortcut would drop the bias).
        if self.config.is_causal:
            mask = create_causal_mask(
                config=self.config,
                inputs_embeds=hidden,
                attention_mask=attention_mask,
                position_ids=position_ids,
                allow_is_causal_skip=edge_features is None,
                cache=cache,
            )
        else:
            mask = create_bidirectional_mask(
                config=self.config,
                inputs_embeds=hidden,
                attention_mask=attention_mask,
                allow_is_bidirectional_skip=edge_features is None,
            )
        if edge_features is not None:
            mask = _add_bias(mask, self.edge_bias(edge_features).permute(0, 3, 1, 2))
        elif attention_mask is not None and attention_mask.ndim == 4 and self.config._attn_implementation == "eager":
            mask = _additive(mask, hidden.dtype)  # a custom 4-D mask passes through as given; eager adds it
        cos, sin = self.rotary_emb(hidden, position_ids)
        if self.config.position_encoding == "none":  # the identity rotation: q and k as they are
            cos, sin = torch.ones_like(cos), torch.zeros_like(sin)
        # Without padding among this call's tokens (e.g. every cached decoding step) there is nothing to mask.
        is_token = None
        if attention_mask is not None and attention_mask.ndim == 2:
            is_token = attention_mask[:, -length:, None].bool()
            if bool(is_token.all()):
                is_token = None
        return LayerInputs(mask, position_ids, cos, sin, is_token, kwargs, batch)

    def _decode(self, inputs: LayerInputs, state: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        return self.norm(inputs.run(self.coda, state, cache))

    def _initial_state(self, injected: torch.Tensor) -> torch.Tensor:
        if self.config.state_init == "prelude":
            return injected
        if self.config.state_init == "normal":
            return torch.randn_like(injected) * self.config.state_init_std
        return torch.zeros_like(injected)

    def _fixed_point_options(self, solver: str) -> dict:
        """The config's gradient-mode and ``solver`` settings, as `fixed_point` keywords."""
        options = {
            "gradient": self.config.gradient,
            "steps": self.config.gradient_steps,
            "tau": self.config.phantom_tau,
            "backward_max_iter": self.config.ift_max_iter,
            "backward_tol": self.config.ift_tol,
        }
        if solver in ("picard", "anderson"):
            options["damping"] = self.config.damping
        if solver == "anderson":
            options["memory"] = self.config.anderson_memory
        return options


# What a misspelt forward keyword is compared with: the model's own arguments, the heads' and the passed-through ones.
FORWARD_KEYWORDS = (
    (set(inspect.signature(ImplicitModel.forward).parameters) - {"self", "kwargs"})
    | {"labels", "logits_to_keep"}
    | PASSED_THROUGH
)


class ImplicitForCausalLM(ImplicitPreTrainedModel, GenerationMixin):
    """Implicit causal language model; ``generate(..., num_loops=K)`` passes the loop count through, as do
    ``num_loops`` / ``tol`` / ``solver`` entries of a `GenerationConfig`.

    A generate call takes each of these loop settings from, in order: its own argument (``num_loops=K``), the
    ``generation_config`` given to it, the model's ``generation_config`` (a checkpoint's generation_config.json),
    the model's config. ``from_pretrained(dir, num_loops=K)`` (lm-eval's ``--model_args ...,num_loops=K``) sets
    the config and leaves that setting out of the model's ``generation_config``, so it holds for generation too.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: ImplicitConfig):
        super().__init__(config)
        self.model = ImplicitModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def adjust_generation_fn(
        self, generation_config, from_auto_class, from_pipeline, pretrained_model_name_or_path, *args, **kwargs
    ) -> None:
        """transformers' loading of the generation config at ``from_pretrained``, then its loop settings
        (`PER_CALL_LOOP_FIELDS`) checked and kept: those of ``from_pretrained(..., generation_config=...)``, else
        those of the checkpoint's generation_config.json, which transformers drops when the file says
        ``_from_model_config`` (as ``save_pretrained`` of a model's default generation config writes). A setting
        given to ``from_pretrained`` as a keyword argument (``num_loops=7``: the config has it) is not kept: the
        keyword wins. A generation_config.json that is not valid JSON or not a JSON object is an ``OSError``
        naming it."""
        if generation_config is not None:
            entries, where = _custom_entries(generation_config), "generation_config."
        else:
            entries, where = self._saved_generation_entries(pretrained_model_name_or_path, kwargs)
        super().adjust_generation_fn(
            generation_config, from_auto_class, from_pipeline, pretrained_model_name_or_path, *args, **kwargs
        )
        keywords = getattr(self.config, LOOP_KEYWORDS, ())
        for name, value in per_call_loop_settings(entries, where).items():
            if name not in keywords:
                setattr(self.generation_config, name, value)
        for name in keywords:  # transformers may have copied the keyword into the generation config
            if hasattr(self.generation_config, name):
                delattr(self.generation_config, name)

    @staticmethod
    def _saved_generation_entries(pretrained_model_name_or_path, kwargs: dict) -> tuple[dict, str]:
        """The entries of the checkpoint's generation_config.json (none without one) and the prefix naming it."""
        found = pretrained_model_name_or_path and cached_file(
            pretrained_model_name_or_path,
            GENERATION_CONFIG_NAME,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **{key: kwargs[key] for key in _DOWNLOAD_KEYWORDS if key in kwargs},
        )
        if not found:
            return {}, ""
        try:
            with open(found, encoding="utf-8") as file:
                entries = json.load(file)
        except ValueError as err:  # not JSON (a truncated file), or not UTF-8
            raise OSError(f"{str(found)!r} is not valid JSON: {err}") from err
        if not isinstance(entries, dict):
            raise OSError(f"{str(found)!r} must hold a JSON object (a generation config); got {entries!r:.40}")
        return entries, f"{found}: "

    def _prepare_generation_config(self, generation_config, **kwargs):
        # transformers would absorb loop settings into the generation config (they are custom entries of it)
        # and never pass them to forward: take them out, explicit arguments first, then the config's. Both are
        # checked here, once per generate call, naming the setting.
        explicit = {
            name: check_per_call_loop_setting(name, kwargs.pop(name)) for name in PER_CALL_LOOP_FIELDS if name in kwargs
        }
        generation_config, model_kwargs = super()._prepare_generation_config(generation_config, **kwargs)
        configured = per_call_loop_settings(_custom_entries(generation_config), "generation_config.")
        for name in PER_CALL_LOOP_FIELDS:
            value = explicit[name] if name in explicit else configured.get(name)
            if value is not None:
                model_kwargs[name] = value
        return generation_config, model_kwargs

    def _prepare_model_inputs(self, inputs, bos_token_id, model_kwargs):
        # an empty or 1-D prompt fails inside transformers' generate before any forward pass: refuse it here, once
        inputs, input_name, model_kwargs = super()._prepare_model_inputs(inputs, bos_token_id, model_kwargs)
        _check_prompt(input_name, inputs, self.config.hidden_size)
        return inputs, input_name, model_kwargs

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        num_loops: int | None = None,
        tol: float | None = None,
        solver: str | None = None,
        return_trajectory: bool | Sequence[int] = False,
        penalties: Sequence[str] = (),
        logits_to_keep: int = 0,
        use_cache: bool | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> ImplicitHeadOutput:
        r"""
        labels: next-token targets (shifted inside the loss; ``-100`` is ignored).
        num_loops / tol / solver / return_trajectory / penalties / use_cache / cache: see `ImplicitModel.forward`.
        logits_to_keep: compute logits for the last ``logits_to_keep`` positions only (0 = all).
        """
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            num_loops=num_loops,
            tol=tol,
            solver=solver,
            return_trajectory=return_trajectory,
            penalties=penalties,
            use_cache=use_cache,
            cache=cache,
            **kwargs,
        )
        keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
        logits = self.lm_head(outputs.last_hidden_state[:, keep])
        trajectory = None
        if outputs.trajectory is not None:
            trajectory = tuple(self.lm_head(h[:, keep]) for h in outputs.trajectory)
        loss = trajectory_loss = None
        if labels is not None:

            def loss_of(x: torch.Tensor) -> torch.Tensor:
                return self.loss_function(logits=x, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

            loss = loss_of(logits)
            if trajectory is not None:
                trajectory_loss = torch.stack([loss_of(x) for x in trajectory])
        return ImplicitHeadOutput(
            loss=loss,
            logits=logits,
            loop_stats=outputs.loop_stats,
            trajectory=trajectory,
            trajectory_loss=trajectory_loss,
            penalties=outputs.penalties,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


class ImplicitForTokenClassification(ImplicitPreTrainedModel):
    """Per-token head for grid problems (sudoku cells, maze paths) or, with
    ``config.problem_type="regression"``, per-token regression (pixels, field values, LP solutions).

    ``config.num_labels`` is the number of classes, or of regression outputs per token.
    """

    def __init__(self, config: ImplicitConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = ImplicitModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        edge_features: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        num_loops: int | None = None,
        tol: float | None = None,
        solver: str | None = None,
        return_trajectory: bool | Sequence[int] = False,
        loop_feedback: Callable[[torch.Tensor], torch.Tensor] | None = None,
        penalties: Sequence[str] = (),
        **kwargs,
    ) -> ImplicitHeadOutput:
        r"""
        labels: class ids ``(B, T)`` (``-100`` ignored), or targets ``(B, T, num_labels)`` for
            regression (NaN targets and padding positions, where ``attention_mask`` is 0, are ignored).
        num_loops / tol / solver / return_trajectory / penalties: see `ImplicitModel.forward`.
        loop_feedback: as in `ImplicitModel.forward`, but it maps this head's output at the current
            state, ``(B, T, num_labels)``, to ``(B, T, config.feedback_features)``: a task's
            ``loop_feedback(inputs)``, e.g. the data-consistency gradient of the current estimate.
        """
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            input_features=input_features,
            edge_features=edge_features,
            num_loops=num_loops,
            tol=tol,
            solver=solver,
            return_trajectory=return_trajectory,
            loop_feedback=None if loop_feedback is None else lambda hidden: loop_feedback(self.score(hidden)),
            penalties=penalties,
            **kwargs,
        )
        logits = self.score(outputs.last_hidden_state)
        trajectory = None
        if outputs.trajectory is not None:
            trajectory = tuple(self.score(h) for h in outputs.trajectory)
        loss = trajectory_loss = None
        if labels is not None:
            loss = self._loss(logits, labels, attention_mask)
            if trajectory is not None:
                trajectory_loss = torch.stack([self._loss(x, labels, attention_mask) for x in trajectory])
        return ImplicitHeadOutput(
            loss=loss,
            logits=logits,
            loop_stats=outputs.loop_stats,
            trajectory=trajectory,
            trajectory_loss=trajectory_loss,
            penalties=outputs.penalties,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if self.config.problem_type == "regression":
            if labels.shape != logits.shape:
                raise ValueError(f"regression labels must have shape {tuple(logits.shape)}; got {tuple(labels.shape)}")
            labels = labels.to(logits.dtype)
            scored = torch.isfinite(labels)  # NaN marks a value without a target (like -100 for classes)
            if attention_mask is not None:
                scored = scored & attention_mask.bool()[..., None]
            squared = (logits - torch.where(scored, labels, logits.detach())).pow(2)
            return squared.sum() / scored.sum().clamp_min(1)
        return nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


class ImplicitForTokenRegression(ImplicitForTokenClassification):
    """Per-token regression head (continuous tasks): `ImplicitForTokenClassification` with
    ``problem_type="regression"``, so checkpoints also load with `AutoModelForTokenClassification`."""

    def __init__(self, config: ImplicitConfig):
        config.problem_type = "regression"
        super().__init__(config)


__all__ = [
    "ImplicitForCausalLM",
    "ImplicitForTokenClassification",
    "ImplicitForTokenRegression",
    "ImplicitModel",
    "ImplicitModelOutput",
    "ImplicitHeadOutput",
    "ImplicitPreTrainedModel",
]
