"""Per-sequence halting of the vLLM implicit model, inside vLLM's flattened token batch.

A vLLM step packs the tokens of many sequences into one batch (``query_start_loc`` of the step's attention
metadata: a prompt, a chunk of one, or one new token per sequence). `HaltingLoop` applies the rule of the Hugging
Face Picard solver, as ``generate(tol=...)`` does, to each sequence: after every loop, a sequence still running
measures the relative residual ``||f(z) - z|| / ||f(z)||`` over its tokens of this step (in float32) and stops once
it is below ``tol``, or once its residual is not finite or grew past `DIVERGENCE_FACTOR` times its best (diverged:
it keeps the state before that loop).

Stopped sequences stop costing core evaluations: the next loops run the core on the running sequences' tokens
only, with the attention metadata narrowed to those sequences (`narrow_metadata`), while the keys and values of
every token are still written to each loop's paged KV cache, a stopped token's being those of its last loop (what
the Hugging Face cache holds), so that later tokens see it as it was when it stopped.

`HaltingStatistics` keeps what the loop spent, per engine: core evaluations per token, loops per prompt and per
decoded token (mean and histogram), and a record per request.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import deque
from collections.abc import Iterator

import torch
from vllm import _custom_ops as ops
from vllm import envs
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.model_executor.layers.attention.attention import unified_kv_cache_update
from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadata

from ..modeling.solvers import DIVERGENCE_FACTOR, EPS

# Finished requests kept for `HaltingStatistics.summary` (the oldest are dropped first).
KEPT_REQUESTS = 1024


def step_metadata():
    """This step's attention metadata (every attention of the model is in one KV cache group, so one object), or
    ``None`` in vLLM's profiling and warm-up runs, which have none, and for dual micro-batches (not served)."""
    if not is_forward_context_available():
        return None
    metadata = get_forward_context().attn_metadata
    if not isinstance(metadata, dict) or not metadata:
        return None
    return next(iter(metadata.values()))


@dataclasses.dataclass
class StepSequences:
    """The sequences of one step, on the host."""

    lengths: list[int]  # tokens of each sequence in this step
    positions: list[int]  # position of each sequence's first token of this step
    first_blocks: list[int]  # each sequence's first KV block: its identity while it lives

    @classmethod
    def of(cls, metadata) -> StepSequences:
        lengths = metadata.query_start_loc.diff().tolist()
        positions = (metadata.seq_lens - metadata.query_start_loc.diff()).tolist()
        return cls(lengths, positions, metadata.block_table[: len(lengths), 0].tolist())


def narrow_metadata(metadata, keep: torch.Tensor, attention, dtype: torch.dtype):
    """``metadata`` for the sequences ``keep`` (bool per sequence) alone, their queries gathered in order; ``None``
    where this backend's metadata cannot be narrowed here (then every token runs every loop)."""
    if type(metadata) is not CPUAttentionMetadata or metadata.dynamic_causal is not None:
        return None
    kept = keep.nonzero().squeeze(1)
    starts = metadata.query_start_loc
    lengths = (starts[1:] - starts[:-1])[kept]
    query_start_loc = torch.zeros(len(kept) + 1, dtype=starts.dtype)
    torch.cumsum(lengths, 0, out=query_start_loc[1:])
    seq_lens = metadata.seq_lens[kept]
    impl = attention.impl
    return dataclasses.replace(
        metadata,
        num_actual_tokens=int(query_start_loc[-1]),
        max_query_len=int(lengths.max()),
        query_start_loc=query_start_loc,
        max_seq_len=int(seq_lens.max()),
        seq_lens=seq_lens,
        block_table=metadata.block_table[kept],
        slot_mapping=metadata.slot_mapping[: int(starts[-1])][_token_mask(starts, keep)],
        scheduler_metadata=ops.cpu_attn_get_scheduler_metadata(
            num_reqs=len(kept),
            num_heads=impl.num_heads,
            num_kv_heads=impl.num_kv_heads,
            head_dim=impl.head_size,
            seq_lens=seq_lens,
            dtype=dtype,
            query_start_loc=query_start_loc,
            causal=metadata.causal,
            sliding_window_size=impl.sliding_window,
            isa=attention.isa,
            enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
            dynamic_causal=None,
            kv_cache_dtype=impl.kv_cache_dtype,
        ),
    )


def _token_mask(starts: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per token of the sequences of ``starts``: whether its sequence is kept."""
    return keep.repeat_interleave((starts[1:] - starts[:-1]).long())


class HaltingLoop:
    """The halting of one step's tokens: which sequences still run, the token rows the next loop evaluates
    (``rows``; ``None``: every token), and what they spent.

    Sequence ``s`` owns the tokens ``query_start_loc[s] : query_start_loc[s + 1]``; padding tokens after the last
    sequence, if any, never run.
    """

    def __init__(self, tol: float, metadata, tokens: int, attention, dtype: torch.dtype, device: torch.device):
        self.tol, self.metadata, self.attention, self.dtype = tol, metadata, attention, dtype
        starts = metadata.query_start_loc.to(device)
        self.count, self.tokens, self.real_tokens, self.device = len(starts) - 1, tokens, int(starts[-1]), device
        self.sequence = torch.searchsorted(starts[1:], torch.arange(self.real_tokens, device=device), right=True)
        self.running = torch.ones(self.count, dtype=torch.bool, device=device)
        self.best = torch.full((self.count,), float("inf"), device=device)
        self.loops = torch.zeros(self.count, dtype=torch.long, device=device)
        self.evaluations = 0  # token rows run through the core, summed over loops
        self.keys: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.rows = None if self.real_tokens == tokens else torch.arange(self.real_tokens, device=device)
        self.narrowable = True  # False: this backend's metadata cannot be narrowed, every row runs every loop
        self.narrowed: dict | None = None  # the forward context's attention metadata for the running sequences
        self.running_count = self.count

    @classmethod
    def of_step(cls, tol: float | None, state: torch.Tensor, attention) -> HaltingLoop | None:
        """The halting of this step's ``state`` tokens, or ``None`` without a tolerance or attention metadata.
        ``attention``: one of the core's attentions (their kernel settings narrow the metadata)."""
        metadata = step_metadata() if tol is not None else None
        if metadata is None:
            return None
        return cls(tol, metadata, state.shape[0], attention, state.dtype, state.device)

    @property
    def finished(self) -> bool:
        """Whether every sequence has stopped."""
        return self.rows is not None and self.rows.numel() == 0

    def gather(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Of each tensor, the rows the next loop evaluates."""
        return list(tensors) if self.rows is None else [tensor[self.rows] for tensor in tensors]

    def _per_sequence(self, values: torch.Tensor, sequence: torch.Tensor) -> torch.Tensor:
        return torch.zeros(self.count, device=self.device).index_add_(0, sequence, values)

    def step(self, state: torch.Tensor, new_state: torch.Tensor) -> torch.Tensor:
        """The state after this loop, given ``new_state`` = f(state) on `rows`: the running sequences' tokens move,
        the others keep theirs; sequences that converge or diverge stop."""
        old = state if self.rows is None else state[self.rows]
        sequence = self.sequence if self.rows is None else self.sequence[self.rows]
        absolute = self._per_sequence((new_state.float() - old.float()).pow(2).sum(-1), sequence).sqrt()
        relative = absolute / (self._per_sequence(new_state.float().pow(2).sum(-1), sequence).sqrt() + EPS)
        finite = torch.isfinite(absolute) & torch.isfinite(relative)
        healthy = finite & ~(absolute / self.best.clamp_min(EPS) > DIVERGENCE_FACTOR)
        self.best = torch.where(self.running & finite & (absolute < self.best), absolute, self.best)
        self.loops += self.running
        self.evaluations += old.shape[0]
        moved = (self.running & healthy)[sequence]
        self.running &= healthy & ~(relative < self.tol)
        result = torch.where(moved[:, None], new_state, old)
        state = result if self.rows is None else state.index_copy(0, self.rows, result)
        self._narrow()
        return state

    def _narrow(self) -> None:
        """Rows, and attention metadata, of the sequences still running."""
        count = int(self.running.sum())
        if count == self.running_count or not self.narrowable:
            return
        self.running_count = count
        if count:
            narrowed = narrow_metadata(self.metadata, self.running, self.attention, self.dtype)
            if narrowed is None:
                self.narrowable = False
                return
            self.narrowed = dict.fromkeys(get_forward_context().attn_metadata, narrowed)
        self.rows = self.running[self.sequence].nonzero().squeeze(1)

    @contextlib.contextmanager
    def narrowed_attention(self) -> Iterator[None]:
        """Within: the forward context's attention metadata covers the running sequences only."""
        if self.narrowed is None:
            yield
            return
        context = get_forward_context()
        original, context.attn_metadata = context.attn_metadata, self.narrowed
        try:
            yield
        finally:
            context.attn_metadata = original

    def keys_and_values(self, layer: int, keys: torch.Tensor, values: torch.Tensor):
        """Every token's keys and values of core layer ``layer`` at this loop, given those of `rows`: a stopped
        token's are those of its last loop."""
        if layer not in self.keys:  # the first loop: every token is new
            if self.rows is None:
                self.keys[layer] = keys, values
                return keys, values
            shape = (self.tokens, keys.shape[-1])
            self.keys[layer] = keys.new_zeros(shape), values.new_zeros(shape)
        last_keys, last_values = self.keys[layer]
        rows = torch.arange(self.tokens, device=self.device) if self.rows is None else self.rows
        if not self.narrowable:  # every row ran: only the running sequences' rows are new
            new = self.running[self.sequence[rows]]
            rows, keys, values = rows[new], keys[new], values[new]
        last_keys.index_copy_(0, rows, keys)
        last_values.index_copy_(0, rows, values)
        return last_keys, last_values

    def write_stopped(self, attentions) -> None:
        """Once every sequence has stopped: write every token's last keys and values into the caches of a later
        loop (``attentions``: that loop's attention per core layer), which later tokens will read."""
        for layer, attention in enumerate(attentions):
            keys, values = self.keys[layer]
            unified_kv_cache_update(
                keys.view(-1, attention.num_kv_heads, attention.head_size),
                values.view(-1, attention.num_kv_heads, attention.head_size_v),
                attention.layer_name,
            )


@dataclasses.dataclass
class _Request:
    prompt_tokens: int = 0
    prompt_loops: list[int] = dataclasses.field(default_factory=list)  # per chunk of the prompt
    decode_loops: list[int] = dataclasses.field(default_factory=list)  # per decoded token
    next_position: int = 0
    partial: bool = False  # first seen after its start (statistics reset in between)

    def summary(self, max_loops: int) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "prompt_loops": self.prompt_loops,
            "decoded_tokens": len(self.decode_loops),
            "loops_per_decoded_token": _mean(self.decode_loops),
            "decoded_loops_histogram": _histogram(self.decode_loops, max_loops),
            "partial": self.partial,
        }


def _mean(values: list[int]) -> float | None:
    return sum(values) / len(values) if values else None


def _histogram(values: list[int], max_loops: int) -> list[int]:
    """Entry k: how many of ``values`` are k + 1 loops."""
    counts = [0] * max_loops
    for value in values:
        counts[value - 1] += 1
    return counts


class HaltingStatistics:
    """What the loop spent since the engine started (or since the last ``summary(reset=True)``), in memory that does
    not grow with the tokens served (histograms; the last `KEPT_REQUESTS` finished requests).

    A step of a sequence is a prompt step (a prompt, or a chunk of one) or a decode step (one new token: its loops are
    those spent on the token the step samples). A request is followed by its first KV block, from the prompt step at
    position 0 to the next prompt that starts in that block.
    """

    def __init__(self, max_loops: int, tol: float | None):
        self.max_loops, self.tol = max_loops, tol
        self.reset()

    def reset(self) -> None:
        self.tokens = self.evaluations = 0
        self.prompt_histogram = [0] * self.max_loops  # entry k: prompt steps that took k + 1 loops
        self.decode_histogram = [0] * self.max_loops  # entry k: decoded tokens that took k + 1 loops
        self.open: dict[int, _Request] = {}
        self.finished: deque[_Request] = deque(maxlen=KEPT_REQUESTS)

    def record(self, metadata, loops: list[int], evaluations: int) -> None:
        """One step: ``loops`` per sequence, ``evaluations`` core evaluations in all."""
        sequences = StepSequences.of(metadata)
        self.tokens += sum(sequences.lengths)
        self.evaluations += evaluations
        for length, position, block, spent in zip(
            sequences.lengths, sequences.positions, sequences.first_blocks, loops, strict=True
        ):
            request = self.open.get(block)
            if position == 0:
                if request is not None:
                    self.finished.append(request)
                request = self.open[block] = _Request()
            elif request is None or request.next_position != position:
                request = self.open[block] = _Request(partial=True)
            request.next_position = position + length
            if position == 0 or length > 1:
                request.prompt_tokens += length
                request.prompt_loops.append(spent)
                self.prompt_histogram[spent - 1] += 1
            else:
                request.decode_loops.append(spent)
                self.decode_histogram[spent - 1] += 1

    def summary(self, reset: bool = False) -> dict:
        """Totals, loops per prompt step and per decoded token, and each request's record (finished ones first)."""
        result = {
            "tol": self.tol,
            "max_loops": self.max_loops,
            "tokens": self.tokens,
            "core_evaluations": self.evaluations,
            "core_evaluations_per_token": self.evaluations / self.tokens if self.tokens else None,
            "prompt_steps": sum(self.prompt_histogram),
            "loops_per_prompt_step": _histogram_mean(self.prompt_histogram),
            "prompt_loops_histogram": list(self.prompt_histogram),
            "decoded_tokens": sum(self.decode_histogram),
            "loops_per_decoded_token": _histogram_mean(self.decode_histogram),
            "decoded_loops_histogram": list(self.decode_histogram),
            "requests": [request.summary(self.max_loops) for request in [*self.finished, *self.open.values()]],
        }
        if reset:
            self.reset()
        return result


def _histogram_mean(histogram: list[int]) -> float | None:
    count = sum(histogram)
    return sum((k + 1) * n for k, n in enumerate(histogram)) / count if count else None
