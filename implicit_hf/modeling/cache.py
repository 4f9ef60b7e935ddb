"""KV-cache slots for a looped model: one per (loop, core layer), over one transformers `Cache`.

A looped model runs the same core layers at every iteration, but the keys and values a core layer
produces differ from one iteration to the next, so a token decoded later must attend, at loop ``l``,
to the keys and values every earlier token had at loop ``l``. The Llama layers write to
``cache.update(k, v, self.layer_idx)``; `LoopCacheView` is what they are handed instead of the cache:
it adds an offset to the layer index, so one `DynamicCache` holds

    prelude layer i            -> slot i
    coda layer j               -> slot P + j
    core layer i at loop l     -> slot P + D + l * S + i
    loop shift at loop l       -> slot P + D + l * S + C      (with ``config.loop_shift``)

(``P``, ``C``, ``D``: prelude, core and coda layer counts; ``S = C``, or ``C + 1`` with the loop's
token shift), ``P + D + K * S`` slots for ``K`` loops. The token shift's slot holds, as its "keys"
``(B, 1, T, hidden)``, the normalised state every token had when it entered loop ``l`` (its values are
empty): what the causal convolution of a later token reads at that loop, as Mamba keeps its
convolution state beside the attention cache. Being a cache layer like the others, it is reordered
by beam search, cropped and batch-selected with them.
Slots that the cache does not have yet are added as plain `DynamicLayer`s, so the cache that
``generate`` creates for the model's ``num_hidden_layers`` serves any loop count.

Halting. With a tolerance, a sample stops iterating once it has converged, while other samples of
the batch go on. A cache slot must still receive keys and values for every row of the batch, so for
a sample that stopped after loop ``h`` the view writes, into every later loop's slot, a copy of the
keys and values it wrote at loop ``h`` for the same positions (its converged representation: at a
fixed point, later loops would recompute nearly the same values). Tokens decoded later therefore
see, at loop ``l > h``, the stopped token as it was when it stopped. Loops that no sample of the
batch reached in a forward pass are filled the same way (`fill_remaining_loops`), so all slots keep
the same length.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer


def _ensure_slots(cache: Cache, count: int) -> None:
    if len(cache.layers) >= count:
        return
    if not isinstance(cache, DynamicCache):
        raise ValueError(
            f"an implicit model needs {count} cache slots (one per prelude and coda layer and per loop and core "
            f"layer), but the {type(cache).__name__} it was given has {len(cache.layers)} and cannot grow: use a "
            "DynamicCache (generate's default; cache_implementation='static' is not supported)"
        )
    cache.layers.extend(DynamicLayer() for _ in range(count - len(cache.layers)))


class LoopSlots:
    """The slot layout of one model over one cache, for a forward pass with ``num_loops`` loops; ``shift``: the
    loop has a token shift, whose state takes one more slot per loop (read through the view's ``layer_idx``
    ``P + C``, after the core's layers)."""

    def __init__(
        self, cache: Cache, num_prelude: int, num_core: int, num_coda: int, num_loops: int, shift: bool = False
    ):
        recorded = getattr(cache, "implicit_num_loops", None)
        if recorded is not None and recorded != num_loops and cache.get_seq_length() > 0:
            raise ValueError(
                f"this cache was filled with num_loops={recorded}; it cannot be continued with num_loops={num_loops} "
                "(every loop has its own key/value slots): start a new cache or keep the loop count"
            )
        cache.implicit_num_loops = num_loops
        self.cache = cache
        self.num_prelude, self.num_core, self.num_coda = num_prelude, num_core, num_coda
        self.num_loops = num_loops
        self.per_loop = num_core + int(shift)  # slots of one loop: its core layers (and the shift state)
        _ensure_slots(cache, num_prelude + num_coda + num_loops * self.per_loop)

    def prelude(self) -> LoopCacheView:
        return LoopCacheView(self.cache, offset=0)

    def coda(self) -> LoopCacheView:
        return LoopCacheView(self.cache, offset=-self.num_core)

    def core(self, loop: int, rows: torch.Tensor | None = None) -> LoopCacheView:
        """The view for iteration ``loop`` (0-based); ``rows``: the batch rows running it (``None``: all)."""
        if not 0 <= loop < self.num_loops:
            raise RuntimeError(f"core evaluation {loop + 1} exceeds the {self.num_loops} loops laid out in the cache")
        offset = self.num_coda + loop * self.per_loop
        return LoopCacheView(self.cache, offset, rows=rows, previous=offset - self.per_loop if loop > 0 else None)

    def fill_remaining_loops(self, loops_run: int, new_tokens: int) -> None:
        """Copy the last loop's new keys/values (and shift states) into the slots of loops ``loops_run ..
        num_loops-1``."""
        first_core_slot = self.num_prelude + self.num_coda
        for loop in range(max(loops_run, 1), self.num_loops):
            for layer in range(self.per_loop):
                source = self.cache.layers[first_core_slot + (loop - 1) * self.per_loop + layer]
                self.cache.update(
                    source.keys[:, :, -new_tokens:],
                    source.values[:, :, -new_tokens:],
                    first_core_slot + loop * self.per_loop + layer,
                )


class LoopCacheView:
    """What a decoder layer is handed as its cache: ``update`` writes to slot ``layer_idx + offset``.

    With ``rows`` (the batch rows still iterating), the layer computed keys and values for those rows
    only; the other rows get a copy of what they wrote at the previous loop (slot ``layer_idx +
    previous``), and the layer gets back the cached keys and values of its own rows.
    """

    def __init__(self, cache: Cache, offset: int, rows: torch.Tensor | None = None, previous: int | None = None):
        self.cache, self.offset, self.rows, self.previous = cache, offset, rows, previous

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        slot = layer_idx + self.offset
        if self.rows is None:
            return self.cache.update(key_states, value_states, slot, *args, **kwargs)
        source = self.cache.layers[layer_idx + self.previous]
        new_tokens = key_states.shape[-2]
        keys = source.keys[:, :, -new_tokens:].clone()
        values = source.values[:, :, -new_tokens:].clone()
        keys[self.rows], values[self.rows] = key_states, value_states
        keys, values = self.cache.update(keys, values, slot, *args, **kwargs)
        return keys[self.rows], values[self.rows]
