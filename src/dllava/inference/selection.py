"""Which image tokens survive prefill, and which generated tokens stay in the cache.

Image selection methods, all keeping exactly ``int(n * keep)`` of a sample's ``n`` droppable image
tokens (or of each view's, ``sparsity.budget=per_view``; never-dropped tokens such as LLaVA-NeXT's
newlines on top, :func:`dllava.sparse.decisions.top_per_group`) in their original order (PAPER.md section 7.1), so every method runs through the same pruned engine:

* ``dynamic``: top-k of the image predictor's keep log-probability (the learned method);
* ``fastv``: top-k of the attention the last prompt token pays to each image token in layer K-1,
  averaged over heads (FastV, training-free);
* ``random``: a uniformly random subset (seeded per request);
* ``dense``: keep everything.

Text decisions for generated tokens live in :mod:`dllava.inference.text_policies`.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from dllava.sparse.decisions import num_kept

IMAGE_METHODS = ("dynamic", "dense", "fastv", "random")


def check_method(method: str) -> str:
    if method not in IMAGE_METHODS:
        raise ValueError(f"method must be one of {IMAGE_METHODS}, got {method!r}")
    return method


def image_budget(method: str, n_image: int, keep: float) -> int:
    """Image tokens a sample keeps after prefill under ``method``: all for ``dense``, else :func:`num_kept`."""
    return n_image if method == "dense" or not n_image else num_kept(n_image, keep)


def last_token_attention(
    layer: torch.nn.Module,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    key_valid: torch.Tensor,
    query_index: int = -1,
    query_key: Any = None,
) -> torch.Tensor:
    """FastV's score: softmax attention of one query (default: the last column) over all keys in
    ``layer`` (a Llama decoder layer, given the hidden states entering it), mean over heads: (B, N).

    Recomputes q/k from the layer's own projections (``query_key``: the family adapter's, which adds
    e.g. Qwen3-VL's q/k norms; default Llama's); it reads nothing from the forward pass, so any
    attention kernel can run the layer itself.
    """
    attn = layer.self_attn
    normed = layer.input_layernorm(hidden)
    n = normed.shape[1]
    if query_key is None:
        from dllava.families.base import FamilyAdapter

        query_key = FamilyAdapter().query_key
    query, key = query_key(attn, normed, query_index)
    cos, sin = position_embeddings
    q_pos = n + query_index if query_index < 0 else query_index
    query, _ = apply_rotary_pos_emb(query, query, cos[:, q_pos : q_pos + 1], sin[:, q_pos : q_pos + 1])
    _, key = apply_rotary_pos_emb(key, key, cos, sin)
    allowed = key_valid & (torch.arange(n, device=hidden.device) <= q_pos)
    return attention_row(attn, query, key, allowed)


def attention_row(attn: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax attention of one rotated query (B, h, 1, d) over rotated keys (B, h_kv, N, d) where
    ``allowed`` (B, N), in fp32, mean over heads: (B, N)."""
    key = repeat_kv(key, attn.num_key_value_groups)
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * attn.scaling  # (B, h, 1, N)
    scores = scores.masked_fill(~allowed[:, None, None, :], float("-inf"))
    return scores.softmax(-1).mean(1)[:, 0]


def newest_query_attention(
    layer: torch.nn.Module,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    keys: torch.Tensor,
    allowed: torch.Tensor,
    query_key: Any,
) -> torch.Tensor:
    """H2O's score row: attention of the newest token (``hidden`` (B, 1, H) entering ``layer``, at the
    rotary ``position_embeddings`` of its own position) over already rotated ``keys`` (B, h_kv, T, d)
    where ``allowed`` (B, T): (B, T). The keys come from the cache (with cache) or are recomputed from
    the pruned sequence (without), so both paths score the same keys."""
    query, _ = query_key(layer.self_attn, layer.input_layernorm(hidden), -1)
    cos, sin = position_embeddings
    query, _ = apply_rotary_pos_emb(query, query, cos[:, -1:], sin[:, -1:])
    return attention_row(layer.self_attn, query, keys, allowed)
