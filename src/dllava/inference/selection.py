"""Which image tokens survive prefill, and which generated tokens stay in the cache.

Image selection methods, all keeping exactly ``int(n * keep)`` of a sample's ``n`` droppable image
tokens (or of each view's, ``sparsity.budget=per_view``; never-dropped tokens such as LLaVA-NeXT's
newlines on top, :func:`dllava.sparse.decisions.top_per_group`) in their original order (PAPER.md section 7.1), so every method runs through the same pruned engine:

* ``dynamic``: top-k of the image predictor's keep log-probability (the learned method);
* ``fastv``: top-k of the attention the last prompt token pays to each image token in layer K-1,
  averaged over heads (FastV, training-free);
* ``random``: a uniformly random subset (seeded per request);
* ``dense``: keep everything.

Text decisions for generated tokens: ``learned`` thresholds the text predictor (section 7.3), ``off``
keeps every token, a float ``r`` keeps a fixed fraction ``r`` in a fixed pattern (token t is kept when
``floor((t+1) r) > floor(t r)``), the stand-in for a trained predictor on random weights.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from dllava.sparse.decisions import num_kept

IMAGE_METHODS = ("dynamic", "dense", "fastv", "random")


def check_method(method: str) -> str:
    if method not in IMAGE_METHODS:
        raise ValueError(f"method must be one of {IMAGE_METHODS}, got {method!r}")
    return method


def check_text_policy(text: str | float) -> str | float:
    """``learned``, ``off`` or a keep rate in (0, 1]."""
    if isinstance(text, str) and text in ("learned", "off"):
        return text
    try:
        rate = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"text policy must be 'learned', 'off' or a keep rate in (0, 1], got {text!r}") from None
    if not 0 < rate <= 1:
        raise ValueError(f"text keep rate must be in (0, 1], got {rate}")
    return rate


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
    key = repeat_kv(key, attn.num_key_value_groups)
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * attn.scaling  # (B, h, 1, N)
    allowed = key_valid[:, None, None, :] & (torch.arange(n, device=hidden.device) <= q_pos)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1).mean(1)[:, 0]


def text_rate_keep(step: int, rate: float) -> bool:
    """The fixed-rate pattern: generated token ``step`` (0-based) is kept iff floor((t+1)r) > floor(t r)."""
    return math.floor((step + 1) * rate + 1e-9) > math.floor(step * rate + 1e-9)
