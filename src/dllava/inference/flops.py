"""FLOPs and KV-cache accounting for dense and sparse LLaVA prefill (one place for every formula).

Two conventions:

* **paper** (PAPER.md section 10): per decoder layer ``32 n C^2 + 4 n^2 C`` for ``n`` image tokens of
  hidden size ``C``; prefill only, text tokens, predictors and the vision tower excluded. This is what
  the paper's "TFLOPs" column and :func:`paper_ratio_limit` use.
* **full**: every matmul the decoder runs, counted as ``torch.utils.flop_counter.FlopCounterMode``
  counts them (2 FLOPs per multiply-add): q/k/v/o projections with grouped KV heads, attention as
  ``4 h n_q n_k d`` (QK^T and AV over every key the kernel sees, masked or not), the SwiGLU MLP's three
  matmuls, the LM head on the positions whose logits are computed, and the predictors. The vision
  tower and projector are reported separately (:mod:`dllava.inference.vision_flops`): they run once
  per image in every method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dllava.inference.vision_flops import llava_vision_flops as vision_flops  # noqa: F401  (old name, kept for callers)
from dllava.sparse.config import PredictorConfig
from dllava.sparse.decisions import num_kept


@dataclass(frozen=True)
class DecoderShape:
    """The sizes of a Llama decoder that matter for FLOPs and KV bytes."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, text_config: Any) -> "DecoderShape":
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        return cls(
            layers=text_config.num_hidden_layers,
            hidden=text_config.hidden_size,
            intermediate=text_config.intermediate_size,
            heads=text_config.num_attention_heads,
            kv_heads=getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads,
            head_dim=head_dim,
            vocab=text_config.vocab_size,
        )


# -- the paper's convention ----------------------------------------------------------------------
def paper_layer_flops(n: int, hidden: int, batch: int = 1) -> int:
    """``32 B n C^2 + 4 B n^2 C`` (PAPER.md section 10)."""
    return 32 * batch * n * hidden**2 + 4 * batch * n**2 * hidden


def paper_prefill_flops(tokens_per_layer: list[int], hidden: int, batch: int = 1) -> int:
    """Sum of :func:`paper_layer_flops` over layers with the given image-token counts."""
    return sum(paper_layer_flops(n, hidden, batch) for n in tokens_per_layer)


def image_tokens_per_layer(layers: int, sparse_layer: int, n_image: int, kept: int) -> list[int]:
    """``n_image`` in layers 0..K-1, ``kept`` in layers K..L-1."""
    return [n_image] * sparse_layer + [kept] * (layers - sparse_layer)


def paper_ratio_limit(
    layers: int, sparse_layer: int, n_image: int, keep: float, hidden: int, kept: int | None = None
) -> float:
    """The prefill FLOPs ratio (sparse / dense) of the paper's convention for ``int(n_image * keep)``
    kept tokens (or ``kept``, e.g. LLaVA-NeXT's share plus its never-dropped newlines): what the full
    ratio tends to as text tokens and predictor cost vanish (7B: L 32, K 2, 576 tokens, keep 0.2 -> 0.247)."""
    kept = num_kept(n_image, keep) if kept is None else kept
    sparse = paper_prefill_flops(image_tokens_per_layer(layers, sparse_layer, n_image, kept), hidden)
    return sparse / paper_prefill_flops([n_image] * layers, hidden)


# -- the full count ------------------------------------------------------------------------------
def layer_flops(shape: DecoderShape, n_q: int, n_k: int, batch: int = 1) -> int:
    """One Llama decoder layer: ``n_q`` queries over ``n_k`` keys."""
    q_dim, kv_dim = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    projections = 2 * n_q * shape.hidden * (2 * q_dim + 2 * kv_dim)
    attention = 4 * shape.heads * n_q * n_k * shape.head_dim
    mlp = 6 * n_q * shape.hidden * shape.intermediate
    return batch * (projections + attention + mlp)


def lm_head_flops(shape: DecoderShape, positions: int, batch: int = 1) -> int:
    return 2 * batch * positions * shape.hidden * shape.vocab


def _head_flops(n: int, d: int) -> int:
    return 2 * n * (d * (d // 2) + (d // 2) * (d // 4) + (d // 4) * 2)


def image_predictor_flops(hidden: int, config: PredictorConfig, n_image: int, batch: int = 1) -> int:
    """LayerNorm-free count of the image predictor: embed, ``layers`` transformer blocks, score head."""
    d, n = config.d_model, n_image
    block = 2 * n * d * 3 * d + 4 * n * n * d + 2 * n * d * d + 4 * n * d * config.ff
    return batch * (2 * n * hidden * d + config.layers * block + _head_flops(n, d))  # head on [local | global]


def text_predictor_flops(hidden: int, config: PredictorConfig, tokens: int, batch: int = 1) -> int:
    return batch * (2 * tokens * hidden * config.d_model + _head_flops(tokens, config.d_model))


def fastv_score_flops(shape: DecoderShape, n_keys: int, batch: int = 1) -> int:
    """FastV's extra work: one query and ``n_keys`` keys re-projected in layer K-1, one score row."""
    q_dim, kv_dim = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    return batch * (2 * shape.hidden * q_dim + 2 * n_keys * shape.hidden * kv_dim + 2 * shape.heads * n_keys * shape.head_dim)


def prefill_flops(
    shape: DecoderShape,
    sparse_layer: int,
    tokens: int,
    kept_tokens: int,
    batch: int = 1,
    logits_positions: int = 1,
    extra: int = 0,
) -> int:
    """Full decoder prefill: ``tokens`` (padded length) in layers < K, ``kept_tokens`` after, plus
    the LM head on ``logits_positions`` positions and ``extra`` (predictors or FastV scoring)."""
    dense = sparse_layer * layer_flops(shape, tokens, tokens, batch)
    sparse = (shape.layers - sparse_layer) * layer_flops(shape, kept_tokens, kept_tokens, batch)
    return dense + sparse + lm_head_flops(shape, logits_positions, batch) + extra


def cache_tokens(prompt: int, n_image: int, kept_images: int, fed: int, kept_text: int) -> tuple[int, int]:
    """Valid tokens one sample leaves in the cache of a layer < K and of a layer >= K: the whole prompt
    plus every fed token, against the pruned prompt plus the kept fed tokens."""
    return prompt + fed, prompt - n_image + kept_images + kept_text


def kv_bytes(shape: DecoderShape, sparse_layer: int, dense_tokens: int, sparse_tokens: int, element_size: int) -> int:
    """K + V bytes of one sample: ``dense_tokens`` in layers < K, ``sparse_tokens`` in layers >= K."""
    per_token = 2 * shape.kv_heads * shape.head_dim * element_size
    return per_token * (sparse_layer * dense_tokens + (shape.layers - sparse_layer) * sparse_tokens)


def nocache_decode_flops(
    shape: DecoderShape, sparse_layer: int, prompt: int, prompt_sparse: int, computing: list[int], extra_per_step: int = 0
) -> int:
    """Decoder FLOPs of decoding one sample without a KV cache: step ``t`` re-runs the whole sequence,
    ``prompt + t + 1`` tokens in layers < K and ``prompt_sparse + computing[t]`` in layers >= K (the pruned
    prompt plus the generated tokens taking part, the newest included), every position a query
    (section 7.2); plus the LM head on the newest position and ``extra_per_step`` (e.g. the text predictor)."""
    total = 0
    for t, n_generated in enumerate(computing):
        full, sparse = prompt + t + 1, prompt_sparse + n_generated
        total += sparse_layer * layer_flops(shape, full, full)
        total += (shape.layers - sparse_layer) * layer_flops(shape, sparse, sparse)
        total += lm_head_flops(shape, 1) + extra_per_step
    return total
