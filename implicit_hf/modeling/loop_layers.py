"""The two small modules the loop adds around the core's layers: how the state and the injected input combine
(`ImplicitInjection`) and the loop's token shift (`LoopShift`)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from .configuration_implicit import ImplicitConfig


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
