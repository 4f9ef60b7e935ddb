"""`ImplicitForCausalLM` in vLLM, built from vLLM's own Llama layers (fused QKV / gate-up projections,
paged attention, its rotary embedding and RMSNorm).

    e = prelude(embed(x));   z_0 = 0 (or e);   z_{k+1} = core(inject(z_k, e)), k < K;   y = head(norm(coda(z_K)))

Every (loop, core layer) pair owns an `Attention` of its own, so each loop has its own paged KV cache,
while the core's projections and MLP are one set of weights shared by all loops. vLLM derives a
layer's cache index from the single integer in an attention's name, so every attention is named by
its global slot, the same layout as the Hugging Face cache (``modeling/cache.py``): prelude layer i
-> slot i, coda layer j -> P + j, core layer i at loop l -> P + D + l C + i.

Served: the Picard loop (``solver="picard"``), ``num_loops`` iterations, or with a tolerance (``tol``, from the
checkpoint or ``hf_overrides``) halting per sequence by the rule of Hugging Face ``generate(tol=...)``: a
sequence stops once the relative residual ``||f(z) - z|| / ||f(z)||`` over its tokens of this step (its prompt in
prefill, its new token in decode) falls below ``tol``, and a stopped token writes, into the KV caches of its later
loops, the keys and values it wrote at its last loop. Later loops run the core on the running sequences' tokens
only, with narrowed attention metadata (`vllm_halting.HaltingLoop`); what the loop spent is kept per engine and per
request (``ImplicitForCausalLMVllm.halting_statistics``).

The loop count is the model config's ``num_loops`` (``hf_overrides={"num_loops": K}`` sets it). Unlike
``ImplicitForCausalLM.generate``, vLLM does not apply loop settings saved in the checkpoint's
generation_config.json (``num_loops`` / ``tol`` / ``solver``): it reads that file for sampling defaults only
(through transformers, which drops custom entries of a default-saved file), and the loop count fixes the
number of paged KV caches when the engine is built. Serve such a checkpoint with ``hf_overrides``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.llama import LlamaDecoderLayer
from vllm.model_executor.models.utils import maybe_prefix
from vllm.sequence import IntermediateTensors

from .vllm_halting import HaltingLoop, HaltingStatistics, step_metadata

# Hugging Face projection names -> vLLM's fused parameter and the shard each fills.
_STACKED = (
    ("qkv_proj", "q_proj", "q"),
    ("qkv_proj", "k_proj", "k"),
    ("qkv_proj", "v_proj", "v"),
    ("gate_up_proj", "gate_proj", 0),
    ("gate_up_proj", "up_proj", 1),
)


def _check_servable(config) -> None:
    # hf_overrides={"num_loops": 0} reaches the config after it was loaded: re-check every loop setting here
    config.validate_loop_settings()
    if not config.is_causal:
        raise ValueError("vLLM serves causal implicit LMs; this checkpoint attends both ways (is_causal=False)")
    if config.solver != "picard":
        raise ValueError(
            f"vLLM runs the plain (Picard) loop, but the checkpoint's solver is {config.solver!r}: serve it with "
            "hf_overrides={'solver': 'picard'} if a fixed number of plain iterations is what you want"
        )
    if config.state_init not in ("zeros", "prelude"):
        raise ValueError(f"state_init={config.state_init!r} is random per call; vLLM serves 'zeros' or 'prelude'")
    if config.loop_shift:
        raise ValueError(
            f"vLLM does not serve the loop's token shift yet (loop_shift={config.loop_shift}: its per-loop state "
            "is not kept in vLLM's paged cache); generate with transformers (model.generate) instead"
        )
    if config.position_encoding != "rope":
        raise ValueError(
            f"vLLM serves rotary position embeddings; this checkpoint has position_encoding="
            f"{config.position_encoding!r}: generate with transformers (model.generate) instead"
        )
    if config.input_features or config.edge_features or config.feedback_features:
        raise ValueError("vLLM serves token-input LMs: input_features, edge_features and feedback_features must be 0")


class ImplicitModelVllm(nn.Module):
    """Prelude, looped core and coda; the module tree mirrors the Hugging Face names for weight loading."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        _check_servable(config)
        self.config = config
        prelude, core, coda = config.num_prelude_layers, config.num_core_layers, config.num_coda_layers
        self.num_loops = config.num_loops

        def slot(index: int) -> str:  # one integer per attention name: its cache slot
            return f"{prefix}.slots.{index}"

        def layer(index: int) -> LlamaDecoderLayer:
            return LlamaDecoderLayer(vllm_config=vllm_config, prefix=slot(index), config=config)

        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.prelude = nn.ModuleList([layer(i) for i in range(prelude)])
        self.coda = nn.ModuleList([layer(prelude + j) for j in range(coda)])
        first_core = prelude + coda
        self.core = nn.ModuleList([layer(first_core + i) for i in range(core)])  # their attention serves loop 0
        attention = self.core[0].self_attn if core else None
        self.loop_attention = nn.ModuleList(
            [
                nn.ModuleList(
                    [
                        Attention(
                            attention.num_heads,
                            attention.head_dim,
                            attention.scaling,
                            num_kv_heads=attention.num_kv_heads,
                            cache_config=vllm_config.cache_config,
                            quant_config=vllm_config.quant_config,
                            prefix=f"{slot(first_core + loop * core + i)}.attn",
                        )
                        for i in range(core)
                    ]
                )
                for loop in range(1, self.num_loops)
            ]
        )
        hidden = config.hidden_size
        self.injection = (
            nn.Parameter(torch.empty(hidden, 2 * hidden), requires_grad=False) if config.injection == "linear" else None
        )
        self.core_norm = RMSNorm(hidden, eps=config.rms_norm_eps) if config.core_norm else None
        self.injection_norm = RMSNorm(hidden, eps=config.rms_norm_eps) if config.injection_norm else None
        self.norm = RMSNorm(hidden, eps=config.rms_norm_eps)
        self.statistics = HaltingStatistics(self.num_loops, config.tol)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    @staticmethod
    def _run(layers: Iterable[LlamaDecoderLayer], positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Layers applied in turn; returns the plain hidden state (vLLM's layers pass a separate residual)."""
        residual = None
        for layer in layers:
            hidden, residual = layer(positions, hidden, residual)
        return hidden if residual is None else hidden + residual

    def _core_pass(
        self, loop: int, positions: torch.Tensor, hidden: torch.Tensor, halting: HaltingLoop | None = None
    ) -> torch.Tensor:
        """The core's layers at iteration ``loop``: shared weights, that loop's attentions (its KV cache); with
        ``halting``, the stopped tokens' keys and values are those of their last loop."""
        residual = None
        for i, layer in enumerate(self.core):
            attention = layer.self_attn
            if residual is None:
                residual, hidden = hidden, layer.input_layernorm(hidden)
            else:
                hidden, residual = layer.input_layernorm(hidden, residual)
            qkv, _ = attention.qkv_proj(hidden)
            q, k, v = qkv.split([attention.q_size, attention.kv_size, attention.kv_size], dim=-1)
            q, k = attention.rotary_emb(positions, q, k)
            if halting is not None:
                k, v = halting.keys_and_values(i, k, v)
            attend = attention.attn if loop == 0 else self.loop_attention[loop - 1][i]
            hidden, _ = attention.o_proj(attend(q, k, v))
            hidden, residual = layer.post_attention_layernorm(hidden, residual)
            hidden = layer.mlp(hidden)
        return hidden + residual

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        injected = self._run(self.prelude, positions, hidden)
        if self.injection_norm is not None:
            injected = self.injection_norm(injected)
        state = injected if self.config.state_init == "prelude" else torch.zeros_like(injected)
        halting = HaltingLoop.of_step(self.config.tol, state, self.core[0].self_attn.attn)
        if halting is None:
            for loop in range(self.num_loops):
                state = self._iterate(loop, positions, state, injected)
            metadata = step_metadata()
            if metadata is not None:  # not vLLM's profiling run
                count = len(metadata.query_start_loc) - 1
                self.statistics.record(metadata, [self.num_loops] * count, state.shape[0] * self.num_loops)
        else:
            for loop in range(self.num_loops):
                if halting.finished:  # later tokens read this loop's cache: it gets the stopped tokens' last keys
                    halting.write_stopped(self.loop_attention[loop - 1])
                    continue
                running_positions, running_state, running_injected = halting.gather(positions, state, injected)
                with halting.narrowed_attention():
                    new_state = self._iterate(loop, running_positions, running_state, running_injected, halting)
                state = halting.step(state, new_state)
            self.statistics.record(halting.metadata, halting.loops.tolist(), halting.evaluations)
        return self.norm(self._run(self.coda, positions, state))

    def _iterate(
        self,
        loop: int,
        positions: torch.Tensor,
        state: torch.Tensor,
        injected: torch.Tensor,
        halting: HaltingLoop | None = None,
    ) -> torch.Tensor:
        """One application of the core at iteration ``loop``: f(state) given the injected input."""
        if self.injection is None:
            mixed = state + injected
        else:
            mixed = nn.functional.linear(torch.cat([state, injected], dim=-1), self.injection)
        new_state = self._core_pass(loop, positions, mixed, halting)
        return new_state if self.core_norm is None else self.core_norm(new_state)


class ImplicitForCausalLMVllm(nn.Module):
    """vLLM's model interface for `ImplicitForCausalLM` checkpoints (architecture ``ImplicitForCausalLM``)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.model = ImplicitModelVllm(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, prefix=maybe_prefix(prefix, "lm_head"))
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def halting_statistics(self, reset: bool = False) -> dict:
        """What the loop spent since the engine started (or the last reset): core evaluations per token, loops per
        prompt and per decoded token (mean and histogram), one record per request (`HaltingStatistics`). From an
        engine started with the worker extension of `implicit_hf.integrations.vllm`:
        ``llm.collective_rpc("halting_statistics")``."""
        return self.model.statistics.summary(reset)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Hugging Face tensors -> these parameters (q/k/v and gate/up into the fused projections)."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            if name == "model.injection.weight":
                name = "model.injection"
            for fused, original, shard in _STACKED:
                if f".{original}." in name:
                    target = name.replace(f".{original}.", f".{fused}.")
                    param = params[target]
                    param.weight_loader(param, tensor, shard)
                    loaded.add(target)
                    break
            else:
                if name not in params:
                    raise ValueError(f"checkpoint tensor {name!r} has no place in the vLLM implicit model")
                param = params[name]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
                loaded.add(name)
        if self.config.tie_word_embeddings:
            loaded.add("lm_head.weight")
        return loaded
