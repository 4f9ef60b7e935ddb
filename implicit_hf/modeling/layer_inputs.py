"""What every decoder layer of one forward pass takes besides the hidden states: the attention mask (with an
edge bias), positions, RoPE and where the padding is; `LayerInputs.rows` narrows them to the batch rows a solver
still runs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask


def rows_of(x: torch.Tensor | None, index: torch.Tensor, batch: int) -> torch.Tensor | None:
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
        pick = [
            rows_of(x, index, self.batch) for x in (self.mask, self.position_ids, self.cos, self.sin, self.is_token)
        ]
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

    @classmethod
    def build(
        cls,
        model: nn.Module,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        edge_features: torch.Tensor | None,
        past: int,
        cache: Cache | None,
        layer_kwargs: dict,
    ) -> LayerInputs:
        """Mask, positions and RoPE of one call of ``model`` (an `ImplicitModel`), shared by every layer and loop."""
        config = model.config
        batch, length = hidden.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=hidden.device).unsqueeze(0)
        # With an edge bias the mask must be materialised (sdpa's "no mask" shortcut would drop the bias).
        if config.is_causal:
            mask = create_causal_mask(
                config=config,
                inputs_embeds=hidden,
                attention_mask=attention_mask,
                position_ids=position_ids,
                allow_is_causal_skip=edge_features is None,
                cache=cache,
            )
        else:
            mask = create_bidirectional_mask(
                config=config,
                inputs_embeds=hidden,
                attention_mask=attention_mask,
                allow_is_bidirectional_skip=edge_features is None,
            )
        if edge_features is not None:
            mask = _add_bias(mask, model.edge_bias(edge_features).permute(0, 3, 1, 2))
        elif attention_mask is not None and attention_mask.ndim == 4 and config._attn_implementation == "eager":
            mask = _additive(mask, hidden.dtype)  # a custom 4-D mask passes through as given; eager adds it
        cos, sin = model.rotary_emb(hidden, position_ids)
        if config.position_encoding == "none":  # the identity rotation: q and k as they are
            cos, sin = torch.ones_like(cos), torch.zeros_like(sin)
        # Without padding among this call's tokens (e.g. every cached decoding step) there is nothing to mask.
        is_token = None
        if attention_mask is not None and attention_mask.ndim == 2:
            is_token = attention_mask[:, -length:, None].bool()
            if bool(is_token.all()):
                is_token = None
        return cls(mask, position_ids, cos, sin, is_token, layer_kwargs, batch)
