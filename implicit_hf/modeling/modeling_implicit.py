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

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import ModelOutput
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)
from transformers.utils import can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import TransformersKwargs
from transformers.utils.output_capturing import capture_outputs

from .cache import LoopSlots
from .configuration_implicit import (
    TRAJECTORY_DEFAULTS,
    ImplicitConfig,
    check_per_call_loop_setting,
    refuse_unknown_keywords,
)
from .generation import LoopSettingsGenerationMixin
from .gradients import fixed_point, gradient_options
from .inputs import check_input_shapes, check_inputs, refuse_token_ids, refuse_with_a_cache, trajectory_request
from .layer_inputs import LayerInputs, rows_of
from .loop_layers import ImplicitInjection, LoopShift
from .penalties import check_penalties, fixed_point_penalties
from .solvers import SolverStats
from .trajectories import (
    TrajectoryReduction,
    check_width,
    input_chunks,
    per_trajectory,
    perturbed_starts,
    refuse_in_chunks,
    repeat_rows,
    solve_in_chunks,
    trajectory_reduction,
)


@dataclass
class ImplicitModelOutput(ModelOutput):
    """Output of `ImplicitModel`.

    Args:
        last_hidden_state: the coda's normalised output at the fixed point, ``(B, T, hidden)``.
        loop_stats: what the solver did per sample (steps, residual traces, converged, diverged).
        trajectory: with ``return_trajectory=True``, ``last_hidden_state`` after each iteration.
        trajectory_loops: with ``return_trajectory=True``, the loop count of each trajectory entry.
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
    trajectory_loops: tuple[int, ...] | None = None
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


# Keywords a forward pass takes beyond its own arguments: what transformers' generate, Trainer and attention
# back-ends pass (TransformersKwargs); anything else is refused with a did-you-mean, not ignored.
PASSED_THROUGH = frozenset(TransformersKwargs.__annotations__) | {"cache_position", "return_dict"}


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

    @staticmethod
    def _load_pretrained_model(model, state_dict, checkpoint_files, *args, **kwargs):
        """transformers' reading of the weights files at ``from_pretrained`` (the hook it calls through the model
        class); a file that cannot be read is an ``OSError`` naming it (safetensors' own error names no file)."""
        try:
            return PreTrainedModel._load_pretrained_model(model, state_dict, checkpoint_files, *args, **kwargs)
        except SafetensorError as err:
            where = ", ".join(path for path in checkpoint_files or () if not _readable(path)) or "a weights file"
            raise OSError(f"cannot read the weights in {where} (truncated or corrupted?): {err}") from err

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

    def trajectory_settings(self, **given: Any) -> dict[str, Any]:
        """This call's trajectory settings (the names of `TRAJECTORY_DEFAULTS`): each one ``given`` (not ``None``),
        else the config's inference default, or in training mode the plain forward's (one trajectory): the config's
        ``num_trajectories`` is for evaluation, never a training step's."""
        fallback = TRAJECTORY_DEFAULTS if self.training else {name: getattr(self.config, name) for name in given}
        return {name: fallback[name] if value is None else value for name, value in given.items()}


def _readable(path: str) -> bool:
    """Whether safetensors can open the file ``path`` (its header is whole)."""
    try:
        with safe_open(path, framework="pt"):
            return True
    except SafetensorError:
        return False


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
        injection = rows_of(self.injected, index, batch)
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
        return model.feedback_embed(rows_of(features, index, batch))


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
        return_trajectory: bool = False,
        trajectory_loops: Sequence[int] | None = None,
        loop_feedback: Callable[[torch.Tensor], torch.Tensor] | None = None,
        penalties: Sequence[str] = (),
        use_cache: bool | None = None,
        cache: Cache | None = None,
        num_trajectories: int = 1,
        trajectory_noise: float = 0.0,
        trajectory_seed: int = 0,
        trajectory_batch_size: int | None = None,
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
        solver: a solver's name (default ``config.solver``; `solvers.SOLVERS`), run with its
            ``config.solver_options``.
        return_trajectory: also return the hidden states after every iteration run, or after the
            ``trajectory_loops``.
        trajectory_loops: with ``return_trajectory``, the loop counts whose states make the trajectory, in
            that order (the solver keeps only those states and only they are decoded through the coda: a sweep
            over 1, 2, 4, ..., 64 keeps and decodes 7 states, not 64). Counts past the last iteration run
            (every sample halted) repeat the final state. ``return_trajectory=[...]`` is short for
            ``return_trajectory=True, trajectory_loops=[...]``.
        penalties: stabilising penalties to return at the last iterate, a subset of ``("jacobian",
            "fixed_point")`` (``modeling/penalties.py``): each costs one more evaluation of the core.
        use_cache: keep keys and values in ``cache`` (one slot per (loop, core layer), see
            ``modeling/cache.py``) and return it; by default on for a causal model at inference
            without ``return_trajectory``. A cache filled at one loop count cannot be continued at
            another. With Picard iteration and no tolerance, cached decoding equals uncached decoding.
        cache: a transformers ``DynamicCache`` from an earlier call (``past_key_values``, its former name,
            is accepted with a deprecation warning, as in transformers' own models).
        num_trajectories / trajectory_noise / trajectory_seed: solve ``K`` trajectories per input in one batch,
            each from the ``state_init`` state plus Gaussian noise of ``trajectory_noise`` times its RMS drawn
            with ``trajectory_seed`` (``modeling/trajectories.py``); the outputs have ``B * K`` rows (row ``b * K
            + k``: trajectory ``k`` of input ``b``), which the heads reduce to ``B``. ``K > 1`` uses no KV cache.
            This model solves what it is told (its defaults: one trajectory); the heads take the config's
            ``num_trajectories`` / ... as their defaults at inference.
        trajectory_batch_size: with ``K > 1``, solve at most this many rows at once: the inputs in chunks of
            ``max(1, trajectory_batch_size // K)``, each with the starts it has in the whole batch, so the outputs
            equal one solve's (with ``return_trajectory`` every loop count up to ``num_loops`` is an entry).
        """
        config, num_trajectories = self.config, check_width(num_trajectories, trajectory_noise, trajectory_seed)
        refuse_unknown_keywords(f"{type(self).__name__}.forward()", set(kwargs) - PASSED_THROUGH, FORWARD_KEYWORDS)
        if kwargs.get("output_attentions") and config._attn_implementation != "eager":
            raise ValueError(
                f"output_attentions=True needs eager attention; this model uses {config._attn_implementation!r} "
                "(load it with attn_implementation='eager')"
            )
        output_hidden_states = kwargs.pop("output_hidden_states", None)
        if output_hidden_states is None:
            output_hidden_states = config.output_hidden_states
        return_trajectory, trajectory_loops = trajectory_request(return_trajectory, trajectory_loops)
        penalties = check_penalties(penalties)
        cache = self._cache_for(use_cache, cache, return_trajectory, penalties, loop_feedback, num_trajectories)
        check_inputs(config, input_ids, inputs_embeds, input_features, edge_features, loop_feedback)
        past = cache.get_seq_length() if cache is not None else 0
        check_input_shapes(
            config, input_ids, inputs_embeds, input_features, attention_mask, position_ids, edge_features, past
        )
        num_loops, tol, solver = self._loop_settings(num_loops, tol, solver)
        batch = next(x for x in (input_ids, inputs_embeds, input_features) if x is not None).shape[0]
        chunks = input_chunks(batch, num_trajectories, trajectory_batch_size)
        if chunks:
            refuse_in_chunks(loop_feedback, penalties, kwargs.get("output_attentions"), output_hidden_states)
            if return_trajectory:
                kwargs.update(return_trajectory=True, trajectory_loops=trajectory_loops or range(1, num_loops + 1))
            per_row = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
            per_row.update(inputs_embeds=inputs_embeds, input_features=input_features, edge_features=edge_features)
            width = dict(
                num_trajectories=num_trajectories, trajectory_noise=trajectory_noise, trajectory_seed=trajectory_seed
            )
            loops = dict(num_loops=num_loops, tol=tol or 0, solver=solver, use_cache=False)
            return solve_in_chunks(self, chunks, batch, per_row, **loops, **width, **kwargs)
        keep_every_loop = (return_trajectory and trajectory_loops is None) or output_hidden_states

        hidden = self._embed(input_ids, inputs_embeds, input_features)
        if num_trajectories > 1:  # K rows per input, solved as one batch
            per_row = hidden, attention_mask, position_ids, edge_features
            hidden, attention_mask, position_ids, edge_features = repeat_rows(num_trajectories, len(hidden), *per_row)
            if loop_feedback is not None:
                loop_feedback = per_trajectory(loop_feedback, num_trajectories)
        inputs = LayerInputs.build(self, hidden, attention_mask, position_ids, edge_features, past, cache, kwargs)
        slots = None
        if cache is not None:
            layers = map(len, (self.prelude, self.core, self.coda))
            slots = LoopSlots(cache, *layers, num_loops, shift=self.loop_shift is not None)
        prelude_output = inputs.run(self.prelude, hidden, slots and slots.prelude())
        injected = prelude_output if self.injection_norm is None else self.injection_norm(prelude_output)
        core_map = CoreMap(self, inputs, injected, loop_feedback, slots)
        start = self._initial_state(injected)
        if num_trajectories > 1:
            normal_std = config.state_init_std if config.state_init == "normal" else None
            width = num_trajectories, trajectory_noise, trajectory_seed, normal_std
            start = perturbed_starts(start, injected, inputs.position_ids, *width)
        state, stats = fixed_point(
            core_map,
            inputs.zero_padding(start),
            solver=solver,
            max_iter=num_loops,
            tol=tol,
            keep=range(1, num_loops + 1) if keep_every_loop else trajectory_loops or (),
            **gradient_options(config),
            **config.options_for(solver),
        )
        if slots is not None:
            slots.fill_remaining_loops(core_map.evaluations, hidden.shape[1])
        measured = fixed_point_penalties(core_map, state, penalties) if penalties else None

        kept, stats.states = stats.states or {}, None  # callers get decoded states, not the raw ones
        states_run = [kept[t] for t in sorted(kept)]
        last_hidden_state = self._decode(inputs, state, slots and slots.coda())
        trajectory = None
        if return_trajectory:  # an entry at the final state (e.g. the largest count) is the output, decoded once
            trajectory_loops = trajectory_loops or tuple(sorted(kept))
            trajectory = tuple(
                last_hidden_state if kept.get(t, state) is state else self._decode(inputs, kept[t])
                for t in trajectory_loops
            )
        return ImplicitModelOutput(
            last_hidden_state=last_hidden_state,
            loop_stats=stats,
            trajectory=trajectory,
            trajectory_loops=trajectory_loops if return_trajectory else None,
            penalties=measured,
            cache=cache,
            hidden_states=(hidden, prelude_output, *states_run, last_hidden_state) if output_hidden_states else None,
        )

    def _cache_for(self, use_cache, cache, return_trajectory, penalties, loop_feedback, trajectories) -> Cache | None:
        """The KV cache of this call: by default one where it serves (causal inference, one trajectory per input,
        without ``return_trajectory``); a cache asked for where it cannot serve is refused."""
        if use_cache is not None and not isinstance(use_cache, bool):
            raise ValueError(f"use_cache must be True, False or None (the default); got {use_cache!r}")
        if use_cache is None:
            by_default = self.config.use_cache and self.config.is_causal and not self.training and not return_trajectory
            use_cache = cache is not None or (by_default and trajectories == 1)
        if not use_cache:
            return None
        if not self.config.is_causal:
            raise ValueError("use_cache needs a causal model (config.is_causal=True); this one attends both ways")
        refuse_with_a_cache(
            return_trajectory=return_trajectory,
            penalties=penalties,
            loop_feedback=loop_feedback,
            num_trajectories=trajectories > 1,
        )
        return DynamicCache() if cache is None else cache  # its slots are created on first use

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
        if inputs_embeds is not None:
            return inputs_embeds
        try:
            return self.embed_tokens(input_ids)
        except IndexError:  # an id outside the vocabulary (on CPU; CUDA fails inside the lookup): name it
            refuse_token_ids(input_ids, self.config.vocab_size)
            raise

    def _decode(self, inputs: LayerInputs, state: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        return self.norm(inputs.run(self.coda, state, cache))

    def _initial_state(self, injected: torch.Tensor) -> torch.Tensor:
        if self.config.state_init == "prelude":
            return injected
        if self.config.state_init == "normal":
            return torch.randn_like(injected) * self.config.state_init_std
        return torch.zeros_like(injected)


def head_output(
    outputs: ImplicitModelOutput,
    project: Callable[[torch.Tensor], torch.Tensor],
    loss_of: Callable[[torch.Tensor], torch.Tensor] | None,
    keep_cache: bool = True,
    width: TrajectoryReduction | None = None,
    token_mask: torch.Tensor | None = None,
) -> ImplicitHeadOutput:
    """A head's output: ``project`` of the fixed point and of each trajectory entry, with ``width`` the K
    trajectories per input reduced to one (over the tokens of ``token_mask``) and, with ``loss_of`` (given labels),
    the loss of each (``trajectory_loss``: deep supervision)."""
    logits = project(outputs.last_hidden_state)
    trajectory = None
    if outputs.trajectory is not None:  # the entry at the final state is the output: projected once
        trajectory = tuple(logits if h is outputs.last_hidden_state else project(h) for h in outputs.trajectory)
    stats, hidden_states, attentions = outputs.loop_stats, outputs.hidden_states, outputs.attentions
    if width is not None:
        logits, trajectory, stats, hidden_states, attentions = width.reduce(logits, trajectory, outputs, token_mask)
    loss = trajectory_loss = None
    if loss_of is not None:
        loss = loss_of(logits)
        if trajectory is not None:
            trajectory_loss = torch.stack([loss if x is logits else loss_of(x) for x in trajectory])
    return ImplicitHeadOutput(
        loss=loss,
        logits=logits,
        loop_stats=stats,
        trajectory=trajectory,
        trajectory_loss=trajectory_loss,
        penalties=outputs.penalties,
        cache=outputs.cache if keep_cache else None,
        hidden_states=hidden_states,
        attentions=attentions,
    )


# What a misspelt forward keyword is compared with: the model's own arguments, the heads' and the passed-through ones.
FORWARD_KEYWORDS = (
    (set(inspect.signature(ImplicitModel.forward).parameters) - {"self", "kwargs"})
    | {"labels", "logits_to_keep", "select"}
    | PASSED_THROUGH
)


class ImplicitForCausalLM(LoopSettingsGenerationMixin, ImplicitPreTrainedModel, GenerationMixin):
    """Implicit causal language model; ``generate(..., num_loops=K)`` passes the loop count through, as do
    ``num_loops`` / ``tol`` / ``solver`` entries of a `GenerationConfig` (``modeling/generation.py``)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: ImplicitConfig):
        super().__init__(config)
        self.model = ImplicitModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

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
        return_trajectory: bool = False,
        trajectory_loops: Sequence[int] | None = None,
        penalties: Sequence[str] = (),
        logits_to_keep: int = 0,
        use_cache: bool | None = None,
        cache: Cache | None = None,
        num_trajectories: int | None = None,
        trajectory_noise: float | None = None,
        select: str | None = None,
        trajectory_seed: int | None = None,
        trajectory_batch_size: int | None = None,
        **kwargs,
    ) -> ImplicitHeadOutput:
        r"""
        labels: next-token targets (shifted inside the loss; ``-100`` is ignored).
        num_loops / tol / solver / return_trajectory / trajectory_loops / penalties / use_cache / cache: see
            `ImplicitModel.forward`.
        logits_to_keep: compute logits for the last ``logits_to_keep`` positions only (0 = all).
        num_trajectories / trajectory_noise / select / trajectory_seed / trajectory_batch_size: ``K`` trajectories
            per input from noisy starts (see `ImplicitModel.forward`, uncached only), reduced by ``select``:
            ``"residual"`` (lowest final residual) or ``"vote"`` (majority of the argmax per token);
            ``loop_stats.trajectories`` says how. Each not given is the config's (``config.num_trajectories``, ...)
            at inference, one trajectory in training mode (`trajectory_settings`).
        """
        trajectories = self.trajectory_settings(
            num_trajectories=num_trajectories,
            trajectory_noise=trajectory_noise,
            select=select,
            trajectory_seed=trajectory_seed,
            trajectory_batch_size=trajectory_batch_size,
        )
        width = trajectory_reduction(trajectories, "causal_lm")
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            num_loops=num_loops,
            tol=tol,
            solver=solver,
            return_trajectory=return_trajectory,
            trajectory_loops=trajectory_loops,
            penalties=penalties,
            use_cache=use_cache,
            cache=cache,
            **trajectories,
            **kwargs,
        )
        keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)

        def loss_of(logits: torch.Tensor) -> torch.Tensor:
            return self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        loss = loss_of if labels is not None else None
        return head_output(outputs, lambda h: self.lm_head(h[:, keep]), loss, True, width, attention_mask)


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
        return_trajectory: bool = False,
        trajectory_loops: Sequence[int] | None = None,
        loop_feedback: Callable[[torch.Tensor], torch.Tensor] | None = None,
        penalties: Sequence[str] = (),
        num_trajectories: int | None = None,
        trajectory_noise: float | None = None,
        select: str | None = None,
        trajectory_seed: int | None = None,
        trajectory_batch_size: int | None = None,
        **kwargs,
    ) -> ImplicitHeadOutput:
        r"""
        labels: class ids ``(B, T)`` (``-100`` ignored), or targets ``(B, T, num_labels)`` for
            regression (NaN targets and padding positions, where ``attention_mask`` is 0, are ignored).
        num_loops / tol / solver / return_trajectory / trajectory_loops / penalties: see `ImplicitModel.forward`.
        loop_feedback: as in `ImplicitModel.forward`, but it maps this head's output at the current
            state, ``(B, T, num_labels)``, to ``(B, T, config.feedback_features)``: a task's
            ``loop_feedback(inputs)``, e.g. the data-consistency gradient of the current estimate.
        num_trajectories / trajectory_noise / select / trajectory_seed / trajectory_batch_size: ``K`` trajectories
            per input from noisy starts (see `ImplicitModel.forward`), reduced by ``select``: ``"residual"`` (lowest
            final residual), ``"vote"`` (classes: majority per token) or ``"mean"`` (regression);
            ``loop_stats.trajectories`` says how. Each not given is the config's at inference, one trajectory in
            training mode (`trajectory_settings`).
        """
        head = "token_regression" if self.config.problem_type == "regression" else "token_classification"
        trajectories = self.trajectory_settings(
            num_trajectories=num_trajectories,
            trajectory_noise=trajectory_noise,
            select=select,
            trajectory_seed=trajectory_seed,
            trajectory_batch_size=trajectory_batch_size,
        )
        width = trajectory_reduction(trajectories, head)
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
            trajectory_loops=trajectory_loops,
            loop_feedback=None if loop_feedback is None else lambda hidden: loop_feedback(self.score(hidden)),
            penalties=penalties,
            **trajectories,
            **kwargs,
        )
        loss_of = None if labels is None else lambda logits: self._loss(logits, labels, attention_mask)
        return head_output(outputs, self.score, loss_of, False, width, attention_mask)

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
