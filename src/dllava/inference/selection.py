"""Which image tokens survive prefill, and which generated tokens stay in the cache.

Image selection methods, all keeping exactly ``int(n * keep)`` of a sample's ``n`` droppable image
tokens (or of each view's, ``sparsity.budget=per_view``; never-dropped tokens such as LLaVA-NeXT's
newlines on top, :func:`dllava.sparse.decisions.select_per_group`) in their original order and at their
original positions (PAPER.md section 7.1), so every method runs through the same pruned engine and kernel:

* ``dynamic``: top-k of the image predictor's keep log-probability (the learned method), at layer K;
* ``fastv``: top-k of the attention the last prompt token pays to each image token in layer K-1,
  averaged over heads (FastV, training-free), at layer K;
* ``random``: a uniformly random subset (seeded per request), at layer K;
* ``dart``: DART's pivot-based duplicate removal: pivots by the L1 norm of layer K-1's keys,
  similarity of the (final-normed) hidden states entering layer K (:mod:`dllava.inference.methods.dart`), at layer K;
* ``divprune``: greedy max-min diversity of the projected image features
  (:mod:`dllava.inference.methods.divprune`), before the LLM;
* ``cdpruner``: greedy DPP MAP of the projected features weighted by their relevance to the
  instruction's input embeddings (:mod:`dllava.inference.methods.cdpruner`), before the LLM;
* ``visionzip``: dominant tokens by the vision tower's attention plus merged contextual tokens
  (:mod:`dllava.inference.methods.visionzip`), before the LLM;
* ``pdrop``: FastV's ranking re-applied at several layers, each stage keeping a share of the previous
  one, with the image-token-layers of a single cut at K (:mod:`dllava.inference.methods.pdrop`);
* ``dense``: keep everything.

Where a method cuts is its paper's choice (``before_llm`` methods act on the projector's output, so
layers < K see only the kept tokens too, and their prefill FLOPs are lower at the same budget);
``prune_layer`` moves a single-cut method to layer 0 or K for an ablation of "which tokens" against
"where".

Text decisions for generated tokens live in :mod:`dllava.inference.text_policies`.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from dllava.sparse.decisions import group_budgets, num_kept

IMAGE_METHODS = ("dynamic", "dense", "fastv", "random", "dart", "divprune", "cdpruner", "visionzip", "pdrop")
BEFORE_LLM = ("divprune", "cdpruner", "visionzip")  # act on the projector's output: the cut is before layer 0
ATTENTION_RANKED = ("fastv", "pdrop")  # rank by the last prompt token's attention in the layer before each cut
STAGED = ("pdrop",)
READS_LAYER_BEFORE = ATTENTION_RANKED + ("dart",)  # DART: the key norms of layer K-1


def check_method(method: str) -> str:
    if method not in IMAGE_METHODS:
        raise ValueError(f"method must be one of {IMAGE_METHODS}, got {method!r}")
    return method


MOVABLE = ("random", "divprune", "cdpruner", "visionzip")  # rules that read no particular layer


def _option_function(method: str) -> Any:
    """The function of ``method`` whose keyword defaults are its settings (its paper's defaults)."""
    from dllava.inference.methods import cdpruner, dart, pdrop, visionzip

    return {"cdpruner": cdpruner.relevance, "dart": dart.select, "visionzip": visionzip.select, "pdrop": pdrop.schedule}.get(method)


def method_defaults(method: str) -> dict[str, Any]:
    """``method``'s settings and their paper defaults (what ``conf/method/<name>.yaml`` states under
    ``options``): the keyword defaults of its rule's function; empty for methods without settings."""
    import inspect

    function = _option_function(check_method(method))
    if function is None:
        return {}
    return {
        name: p.default for name, p in inspect.signature(function).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def check_options(method: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """``options`` for ``method``, refusing names it does not have (a typo would silently run the default)."""
    options = dict(options or {})
    known = method_defaults(method)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(
            f"method.options.{unknown[0]} is not a setting of method={method} (its settings: {', '.join(known) or 'none'})"
        )
    return options


def unsupported(method: str, adapter: Any) -> str | None:
    """Why ``adapter``'s family cannot run ``method`` (None: it can): VisionZip reads the vision tower's
    attention, which an adapter provides through ``vision_saliency``."""
    from dllava.families.base import FamilyAdapter

    if method == "visionzip" and type(adapter).vision_saliency is FamilyAdapter.vision_saliency:
        return f"the {adapter.model_type} adapter has no vision_saliency (the vision tower's attention VisionZip reads)"
    return None


def prune_layer(method: str, layer: int, requested: int | None = None) -> int:
    """The layer before which ``method`` cuts image tokens (its first cut, for a staged method): 0 for the
    methods acting on the projector's output, else K. ``requested`` (0 or K) moves a method whose rule
    reads no particular layer (:data:`MOVABLE`; the diversity methods then select on the hidden states
    entering layer K instead of the projected features); the others read layer K-1 or K and refuse."""
    if requested is None or method == "dense" or requested == (0 if method in BEFORE_LLM else layer):
        return 0 if method in BEFORE_LLM else layer
    if requested not in (0, layer):
        raise ValueError(f"prune_layer must be 0 (before the LLM) or the sparse layer K={layer}, got {requested}")
    if method not in MOVABLE:
        raise ValueError(f"method={method} reads layer K-1 or K: it cuts at K={layer} only (prune_layer={requested})")
    return requested


def cut_plan(
    method: str,
    sizes: torch.Tensor,
    keep: float,
    first: int,
    num_layers: int,
    options: dict[str, Any] | None = None,
) -> list[tuple[int, list[list[int]]]]:
    """Where ``method`` cuts image tokens and how many each budget group keeps from there on:
    ``[(layer, budgets[b][g]), ...]`` for budget-group sizes ``sizes`` (B, G) (host counts, see
    :func:`~dllava.sparse.decisions.group_sizes`); increasing layers, the first at ``first``. Empty for
    ``dense``. The one home of every method's budget, used by the engine and by the cost accounting."""
    if method == "dense":
        return []
    if method in STAGED:
        from dllava.inference.methods import pdrop

        options = dict(options or {})
        per_group = [
            [pdrop.schedule(int(s), keep, first, num_layers, **options) if s else None for s in row]
            for row in sizes.tolist()
        ]
        layers = sorted({layer for row in per_group for sched in row if sched for layer, _ in sched})
        if not layers:
            return []

        def count(sched: list[tuple[int, int]] | None, layer: int) -> int:
            return 0 if sched is None else min((c for l, c in sched if l <= layer), default=0)

        plan = [(layer, [[count(sched, layer) for sched in row] for row in per_group]) for layer in layers]
        # a stage that keeps what the previous one kept (every group of every sample) is no cut at all:
        # leave it out, so nothing is ranked there (and nothing is counted)
        return plan[:1] + [b for a, b in zip(plan, plan[1:]) if b[1] != a[1]]
    return [(first, group_budgets(sizes, keep))]


def image_tokens_per_layer(
    plan: list[tuple[int, list[list[int]]]], counts: list[int], fixed: list[int], num_layers: int
) -> list[list[int]]:
    """(B, L) image tokens each sample runs in every decoder layer under ``plan``: all ``counts[b]``
    before the first cut, then ``fixed[b]`` never-dropped ones plus the group budgets of the last cut."""
    rows = []
    for b, n in enumerate(counts):
        current, row = n, []
        cuts = {layer: fixed[b] + sum(budgets[b]) for layer, budgets in plan} if n else {}
        for i in range(num_layers):
            current = cuts.get(i, current)
            row.append(current)
        rows.append(row)
    return rows


def image_budget(method: str, n_image: int, keep: float) -> int:
    """Image tokens a sample keeps after prefill under ``method``: all for ``dense``, else :func:`num_kept`."""
    return n_image if method == "dense" or not n_image else num_kept(n_image, keep)


def last_token_attention(
    layer: torch.nn.Module,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    key_valid: torch.Tensor,
    query_index: int | torch.Tensor = -1,
    query_key: Any = None,
) -> torch.Tensor:
    """FastV's score: softmax attention of one query (default: the last column; a (B,) tensor: each
    row's own column) over the keys at or before it in ``layer`` (a Llama decoder layer, given the
    hidden states entering it), mean over heads: (B, N).

    Recomputes q/k from the layer's own projections (``query_key``: the family adapter's, which adds
    e.g. Qwen3-VL's q/k norms; default Llama's); it reads nothing from the forward pass, so any
    attention kernel can run the layer itself.
    """
    attn = layer.self_attn
    normed = layer.input_layernorm(hidden)
    batch, n = normed.shape[:2]
    if query_key is None:
        from dllava.families.base import FamilyAdapter

        query_key = FamilyAdapter().query_key
    cos, sin = position_embeddings
    if isinstance(query_index, torch.Tensor):  # rows of different widths: one more q/k projection per row
        rows = torch.arange(batch, device=hidden.device)
        q_pos = query_index.to(hidden.device)
        query, _ = query_key(attn, normed[rows, q_pos][:, None], -1)
        _, key = query_key(attn, normed, -1)
        query, _ = apply_rotary_pos_emb(query, query, cos[rows, q_pos][:, None], sin[rows, q_pos][:, None])
        before = torch.arange(n, device=hidden.device)[None] <= q_pos[:, None]
    else:
        query, key = query_key(attn, normed, query_index)
        q_pos = n + query_index if query_index < 0 else query_index
        query, _ = apply_rotary_pos_emb(query, query, cos[:, q_pos : q_pos + 1], sin[:, q_pos : q_pos + 1])
        before = torch.arange(n, device=hidden.device)[None] <= q_pos
    _, key = apply_rotary_pos_emb(key, key, cos, sin)
    return attention_row(attn, query, key, key_valid & before)


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
