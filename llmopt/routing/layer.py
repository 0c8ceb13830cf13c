"""The routed Llama decoder layer: kept tokens are gathered, run through the block, and scattered back; skipped
tokens pass on the residual (plus the router's skip adapter, if any) but still write their K/V at the block (dense
KV layout: later tokens attend to them).

In training the block runs every token and mixes ``x + gate · (block(x) − x) + (1 − gate) · adapter(x)`` with a
straight-through gate, whose forward value is the hard decision: the same numbers the gathered path computes, with
a gradient for the router and the adapters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, rotate_half

from llmopt.routing.router import BlockRecord, TokenRouter

QUERY_CHUNK = 256


class RoutedLlamaDecoderLayer(LlamaDecoderLayer):
    """A `LlamaDecoderLayer` whose class was switched in place (weights and names unchanged) and which asks the
    model's `TokenRouter` which tokens run it. Set `layer_index` and `_token_router` after switching."""

    layer_index: int
    _token_router: TokenRouter

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, past_key_values=None, use_cache: bool | None = False,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs) -> torch.Tensor:
        router, index = self._token_router, self.layer_index
        if router.dropped(index):
            output = hidden_states if not router.adapts else \
                hidden_states + router.skip_update(index, self.input_layernorm(hidden_states))
        elif not router.routes(index):
            output = super().forward(hidden_states, attention_mask, position_ids, past_key_values, use_cache,
                                     position_embeddings, **kwargs)
        else:
            normed = self.input_layernorm(hidden_states)
            if position_ids is None:
                position_ids = torch.arange(hidden_states.shape[1], device=hidden_states.device)[None]
            keep, gate = router.decide(index, hidden_states, normed, position_ids)
            router.record(BlockRecord(index, keep))
            if self.training:
                output = self._gated(hidden_states, normed, keep, gate, attention_mask, position_ids,
                                     past_key_values, use_cache, position_embeddings, **kwargs)
            elif router.feature_set != "ftp" and bool(keep.all()):  # e.g. a decode step whose tokens all run
                output = super().forward(hidden_states, attention_mask, position_ids, past_key_values, use_cache,
                                         position_embeddings, **kwargs)
            else:
                output = self._gathered(hidden_states, normed, keep, attention_mask, past_key_values,
                                        position_embeddings)
        router.remember(index, hidden_states)
        return output

    def _gated(self, hidden, normed, keep, gate, attention_mask, position_ids, past_key_values, use_cache,
               position_embeddings, **kwargs) -> torch.Tensor:
        router, index = self._token_router, self.layer_index
        full = super().forward(hidden, attention_mask, position_ids, past_key_values, use_cache,
                               position_embeddings, **kwargs)
        delta = full - hidden
        straight_through = (keep.to(gate.dtype) + gate - gate.detach())[..., None]
        skip = router.skip_update(index, normed) if router.adapts else 0
        return hidden + straight_through.to(delta.dtype) * delta + (1 - straight_through).to(delta.dtype) * skip

    def _gathered(self, hidden: torch.Tensor, normed: torch.Tensor, keep: torch.Tensor,
                  attention_mask: torch.Tensor | None, past_key_values,
                  position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """``hidden [b, s, H]`` → the block's output, running queries, o_proj and MLP for ``keep [b, s]`` only
        (and the skip adapter for the others). Tokens move by row index over the flattened ``[b·s, H]`` states:
        `index_select` and `index_copy_`, several times cheaper on CPU than gathers with expanded indices."""
        router, attention = self._token_router, self.self_attn
        batch, length, size = hidden.shape
        output = hidden.clone()
        flat_output = output.view(batch * length, size)
        if router.adapts:
            skipped = (~keep).flatten().nonzero()[:, 0]
            skipping = normed.reshape(batch * length, size).index_select(0, skipped)
            flat_output.index_add_(0, skipped, router.skip_update(self.layer_index, skipping))
        head_dim = attention.head_dim
        cos, sin = (t.expand(batch, -1, -1) for t in position_embeddings)
        keys = attention.k_proj(normed).view(batch, length, -1, head_dim).transpose(1, 2)
        values = attention.v_proj(normed).view(batch, length, -1, head_dim).transpose(1, 2)
        keys = keys * cos[:, None] + rotate_half(keys) * sin[:, None]
        if past_key_values is not None:
            keys, values = past_key_values.update(keys, values, attention.layer_idx)
        counts = keep.sum(1)
        width = int(counts.max())
        if width == 0:
            router.remember_attention(self.layer_index, None, length)
            return output
        # per row, the kept tokens first (in order), padded with skipped ones that are computed and dropped
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]
        valid = torch.arange(width, device=hidden.device)[None] < counts[:, None]
        flat = (order + length * torch.arange(batch, device=hidden.device)[:, None]).flatten()  # rows of [b·s]

        def picked(states: torch.Tensor) -> torch.Tensor:
            return states.reshape(batch * length, -1).index_select(0, flat).view(batch, width, -1)

        queries = attention.q_proj(picked(normed)).view(batch, width, -1, head_dim).transpose(1, 2)
        cos_q, sin_q = picked(cos)[:, None], picked(sin)[:, None]
        queries = queries * cos_q + rotate_half(queries) * sin_q
        mask = query_mask(attention_mask, order, keys.shape[2], length)
        if router.feature_set == "ftp":
            out, probabilities = attention_with_probabilities(queries, keys, values, mask, attention.scaling)
            router.remember_attention(self.layer_index, probabilities * valid[:, None, :, None], length)
        else:
            out = causal_chunked_attention(queries, keys, values, mask, order + (keys.shape[2] - length),
                                           attention.scaling)
        real = valid.flatten().nonzero()[:, 0]  # rows of the [b·w] layout that hold kept tokens
        out = out.transpose(1, 2).reshape(batch * width, -1).index_select(0, real)
        tokens = flat[real]
        kept = hidden.reshape(batch * length, size).index_select(0, tokens) + attention.o_proj(out)
        kept = kept + self.mlp(self.post_attention_layernorm(kept))
        flat_output.index_copy_(0, tokens, kept)
        return output


def query_mask(attention_mask: torch.Tensor | None, order: torch.Tensor, kv_length: int,
               q_length: int) -> torch.Tensor:
    """The mask rows of the gathered queries ``order [b, w]`` (indices into the step's ``q_length`` tokens)
    against all ``kv_length`` keys: the model's 4-D mask ``[b or 1, 1, q, ≥kv]`` (bool or additive) gathered by
    row, or, where the model passed none (causal, no padding), causal by the queries' place after the cache."""
    batch = order.shape[0]
    if attention_mask is None:
        place = order + (kv_length - q_length)
        return (torch.arange(kv_length, device=order.device)[None, None] <= place[..., None])[:, None]
    mask = attention_mask[..., :kv_length].expand(batch, -1, -1, -1)
    return mask.gather(2, order[:, None, :, None].expand(-1, mask.shape[1], -1, kv_length))


def causal_chunked_attention(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                             places: torch.Tensor, scale: float) -> torch.Tensor:
    """SDPA of ``queries [b, h, w, d]`` (at key positions ``places [b, w]``) over ``keys/values [b, kv_heads, k, d]``
    under ``mask [b, 1, w, k]``, `QUERY_CHUNK` queries at a time, each chunk over the keys up to its last place only:
    with an explicit mask SDPA computes every query×key score, so one call would cost the gathered queries more
    than causal attention costs all of them."""
    outputs = []
    for start in range(0, queries.shape[2], QUERY_CHUNK):
        end = min(start + QUERY_CHUNK, queries.shape[2])
        limit = int(places[:, start:end].max()) + 1
        outputs.append(F.scaled_dot_product_attention(
            queries[:, :, start:end], keys[:, :, :limit], values[:, :, :limit], attn_mask=mask[:, :, start:end, :limit],
            scale=scale, enable_gqa=True))
    return torch.cat(outputs, dim=2)


def attention_with_probabilities(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``queries [b, h, q, d]`` over ``keys/values [b, kv_heads, k, d]`` under ``mask [b, 1, q, k]``
    (bool, or additive), and its probabilities ``[b, h, q, k]`` (float32), as eager attention computes them."""
    groups = queries.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
    scores = (queries @ keys.transpose(2, 3)).float() * scale
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probabilities = scores.softmax(-1)
    return probabilities.to(values.dtype) @ values, probabilities
