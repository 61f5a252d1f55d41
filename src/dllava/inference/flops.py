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


def image_predictor_flops(
    hidden: int,
    config: PredictorConfig,
    n_image: int,
    batch: int = 1,
    instruction_tokens: int = 0,
    instruction_aware: bool = False,
) -> int:
    """LayerNorm-free count of the image predictor: embed, ``layers`` transformer blocks, score head; with
    ``instruction_aware`` plus its cross-attention to ``instruction_tokens`` instruction tokens
    (:func:`instruction_cross_flops`; ``m`` is the padded width the kernel sees, at least 1)."""
    d, n = config.d_model, n_image
    block = 2 * n * d * 3 * d + 4 * n * n * d + 2 * n * d * d + 4 * n * d * config.ff
    total = batch * (2 * n * hidden * d + config.layers * block + _head_flops(n, d))  # head on [local | global]
    if instruction_aware:
        total += instruction_cross_flops(hidden, config, n_image, instruction_tokens, batch)
    return total


def instruction_cross_flops(hidden: int, config: PredictorConfig, n_image: int, instruction_tokens: int, batch: int = 1) -> int:
    """The instruction-aware image predictor's cross-attention, ``n`` image queries over ``m`` instruction
    tokens: ``2 m H d`` (instruction embed) + ``2 n d^2`` (q) + ``4 m d^2`` (k, v) + ``4 n m d`` (QK^T, AV)
    + ``2 n d^2`` (output projection). ``m = 0`` counts as 1: the predictor pads an empty instruction to one
    (masked) column."""
    d, n, m = config.d_model, n_image, max(instruction_tokens, 1)
    return batch * (2 * m * hidden * d + 4 * n * d * d + 4 * m * d * d + 4 * n * m * d)


def text_predictor_flops(hidden: int, config: PredictorConfig, tokens: int, batch: int = 1) -> int:
    return batch * (2 * tokens * hidden * config.d_model + _head_flops(tokens, config.d_model))


def fastv_score_flops(shape: DecoderShape, n_keys: int, batch: int = 1) -> int:
    """FastV's extra work: one query and ``n_keys`` keys re-projected in layer K-1, one score row."""
    q_dim, kv_dim = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    return batch * (2 * shape.hidden * q_dim + 2 * n_keys * shape.hidden * kv_dim + 2 * shape.heads * n_keys * shape.head_dim)


def selection_flops(
    method: str, shape: DecoderShape, prompt_len: int, n_image: int, per_layer: list[int], sparse_layer: int,
    instruction: int = 0, group_budgets: list[int] | None = None,
) -> int:
    """The matmuls a training-free method adds to one prompt's prefill to choose its image tokens
    (``per_layer``: the image tokens each layer runs; ``instruction``: text tokens after the image;
    ``group_budgets``: the tokens each budget group keeps, one group under the ``global`` budget, one per
    view under ``per_view``; default: one group keeping ``per_layer[-1]``):

    * ``fastv``: one score row in layer K-1 (:func:`fastv_score_flops`); ``pdrop``: one per stage, over
      the keys present at that stage;
    * ``dart``: layer K-1's keys of every prompt token (for their norms; the adapter's projection also
      forms one query) and, per budget group, the cosine of the pivots (4 image, up to 4 text) with every
      image token;
    * ``divprune``: per budget group, the n x n cosine matrix; ``cdpruner``: that, the image-instruction
      cosines (once) and the greedy DPP's incremental Cholesky rows (``2 t n`` per group at pick ``t``,
      picks running to the largest group budget);
    * ``visionzip``: none here: its CLS attention row and the merge's key cosines run on the vision
      tower's keys (vision-side work of a few matmuls of one vision layer, not decoder prefill).

    The engine selects every budget group over the image's n slots (:func:`~dllava.sparse.decisions.select_per_group`),
    so the pairwise terms scale with the number of groups. Element-wise work (norms, argmax) is not
    counted, as ``FlopCounterMode`` does not count it."""
    if not n_image or method in ("dense", "dynamic", "random", "visionzip"):
        return 0
    budgets = list(group_budgets) if group_budgets else [per_layer[-1]]
    groups, largest = len(budgets), max(budgets)
    if method == "fastv":
        return fastv_score_flops(shape, prompt_len)
    if method == "pdrop":
        cuts = [i for i in range(1, len(per_layer)) if per_layer[i] != per_layer[i - 1]]
        return sum(fastv_score_flops(shape, prompt_len - n_image + per_layer[i - 1]) for i in cuts)
    if method == "dart":  # keys of every prompt token (and the one query the key projection comes with)
        kv_dim, q_dim = shape.kv_heads * shape.head_dim, shape.heads * shape.head_dim
        pivots = 4 + min(4, instruction)  # 4 image pivots, up to 4 text pivots among the instruction's tokens
        return 2 * prompt_len * shape.hidden * kv_dim + 2 * shape.hidden * q_dim + groups * 2 * pivots * n_image * shape.hidden
    if method == "divprune":
        return groups * 2 * n_image * n_image * shape.hidden
    if method == "cdpruner":
        # pick t updates every gain with a t-long Cholesky row: 2 t n; at t = 1 that contraction is an
        # element-wise product (no matmul), so the counted sum runs over t = 2 .. k-1
        dpp = groups * n_image * max(largest * (largest - 1) - 2, 0)
        return groups * 2 * n_image * n_image * shape.hidden + 2 * n_image * instruction * shape.hidden + dpp
    raise ValueError(f"no selection cost for method={method}")


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
    per_layer = [tokens] * sparse_layer + [kept_tokens] * (shape.layers - sparse_layer)
    return prefill_flops_layers(shape, per_layer, batch, logits_positions, extra)


def cache_tokens(prompt: int, n_image: int, kept_images: int, fed: int, kept_text: int) -> tuple[int, int]:
    """Valid tokens one sample leaves in the cache of a layer < K and of a layer >= K: the whole prompt
    plus every fed token, against the pruned prompt plus the kept fed tokens."""
    return prompt + fed, prompt - n_image + kept_images + kept_text


def kv_bytes(shape: DecoderShape, sparse_layer: int, dense_tokens: int, sparse_tokens: int, element_size: int) -> int:
    """K + V bytes of one sample: ``dense_tokens`` in layers < K, ``sparse_tokens`` in layers >= K."""
    return kv_bytes_layers(shape, [dense_tokens] * sparse_layer + [sparse_tokens] * (shape.layers - sparse_layer), element_size)


def kv_bytes_layers(shape: DecoderShape, tokens: list[int], element_size: int) -> int:
    """K + V bytes of one sample holding ``tokens[i]`` tokens in layer i."""
    return 2 * shape.kv_heads * shape.head_dim * element_size * sum(tokens)


def prefill_flops_layers(shape: DecoderShape, tokens: list[int], batch: int = 1, logits_positions: int = 1, extra: int = 0) -> int:
    """Full decoder prefill with ``tokens[i]`` tokens running layer i (a cut before the LLM or at
    several layers), plus the LM head and ``extra``: :func:`prefill_flops` for any cut plan."""
    return sum(layer_flops(shape, n, n, batch) for n in tokens) + lm_head_flops(shape, logits_positions, batch) + extra


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
