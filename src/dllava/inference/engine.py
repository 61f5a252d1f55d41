"""Physically sparse inference for Dynamic-LLaVA on any family: pruned prefill, decoding with or without KV cache.

Training only masks; here the dropped tokens are gone (PAPER.md section 7). Layers 0..K-1 run on the
whole prompt; at layer K each sample's image tokens are cut to ``int(n * keep)`` of its own ``n``
droppable ones (per view under the ``per_view`` budget; LLaVA-NeXT's newlines always stay), and layers
K..L-1 run on the shorter sequence with the kept tokens' original positions. Which tokens, and where
the cut falls, is the method's (:mod:`dllava.inference.selection`): the learned predictor, FastV,
random and DART cut at K; DivPrune, CDPruner and VisionZip before layer 0 (every layer runs the kept
tokens); PyramidDrop at K and again at later layers. The family's position ids (1-D, or M-RoPE's 3-D)
are computed once on the unpruned prompt, the kept columns gathered, and decoding continues from the
full prompt's last position (never renumbered). While decoding, each new token attends to
itself in its own step and is stored in the caches of layers >= K only when the text policy keeps it
(:class:`~dllava.inference.cache.SparseKVCache`); the output-side baselines may evict an earlier one
instead (:mod:`dllava.inference.text_policies`). Without a cache every step re-runs the whole
sequence, pruned the same way (section 7.2).

Everything a request needs between steps lives in a :class:`RequestState` that the caller holds; the
engine and the model keep no per-request state (the reference code stored the answer start on the
module and never reset it).

All arms use the same HF decoder layers and the same attention kernel (SDPA with an explicit boolean
mask), so latency and FLOPs differences come from the token counts alone. Left-padded batches are
supported: padding is masked as keys everywhere, and a padded query attends only to itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from dllava.families import ImageFeatures, gather_columns, next_positions
from dllava.inference.cache import DENSE, SPARSE, SparseKVCache
from dllava.inference.flops import DecoderShape, kv_bytes_layers
from dllava.inference import selection
from dllava.inference.selection import check_method, last_token_attention, newest_query_attention, num_kept
from dllava.inference.text_policies import (
    TextMembership,
    accumulate_attention,
    check_share,
    check_text_policy,
    decide_newest,
)
from dllava.sparse.decisions import (
    check_budget,
    group_sizes,
    image_columns,
    keep_score,
    group_rows,
    select_per_group,
    top_per_row,
)
from dllava.sparse.model import DynamicVLM


@dataclass
class RequestState:
    """One batch of requests in flight: the sequence so far and every decision made for it."""

    input_ids: torch.Tensor  # (B, N) prompt + fed tokens (no-cache path re-reads it)
    attention_mask: torch.Tensor  # (B, N)
    prompt_len: int
    image_features: ImageFeatures | None
    position_ids: torch.Tensor  # (R, B, N) of the unpruned sequence so far (prompt + fed tokens)
    cache: SparseKVCache | None = None
    image_keep: torch.Tensor | None = None  # (B, n_image) bool kept by the first cut, fixed after prefill (False on padding slots)
    cuts: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, n_image) bool kept from there on
    image_replacement: torch.Tensor | None = None  # (B, n_image, H) features of kept image tokens (VisionZip's merges)
    saliency: tuple[torch.Tensor, torch.Tensor] | None = None  # vision-tower (score, keys) per image token (VisionZip)
    text_kept: list[list[bool]] = field(default_factory=list)  # per fed token: (B,) decisions when fed
    generator: torch.Generator | None = None
    newest_decision: list[bool] | None = None  # no-cache path: the decision for the token just fed
    text: TextMembership | None = None  # which fed tokens stay now (evicting policies change earlier ones)

    @property
    def fed(self) -> int:
        """Generated tokens fed back into the model so far."""
        return self.input_ids.shape[1] - self.prompt_len


class ReferenceScore(NamedTuple):
    """How likely one reference continuation is after its prompt (:meth:`SparseEngine.reference_nll`)."""

    nll: float  # summed over the reference's tokens
    tokens: int
    greedy: bool  # every token was the most likely one


@dataclass
class GenerationResult:
    """New tokens plus what the sparsifier did, per sample."""

    sequences: torch.Tensor  # (B, T) new tokens; finished samples continue with pad
    lengths: list[int]  # new tokens up to and including EOS
    image_tokens: list[int]  # image tokens per sample in the prompt
    image_tokens_kept: list[int | float]  # from layer K on, never-dropped ones included (staged methods: layer mean)
    image_keep: torch.Tensor | None  # (B, n_image) bool: which image tokens survived prefill
    text_tokens_fed: list[int]  # generated tokens that went back into the model (before EOS)
    text_tokens_kept: list[int]  # of those, staying in the sparse layers (>= K) after the last one was fed
    kv_bytes: list[int] | None  # stored K/V bytes over all layers (cache path)
    kv_bytes_dense: list[int] | None  # the same tokens without any pruning
    kv_tokens_sparse_layer: list[int] | None  # valid tokens in a layer >= K
    kv_tokens_dense_layer: list[int] | None  # valid tokens in a layer < K
    image_grids: list[tuple[int, int]] | None = None  # each sample's image (rows, cols) token grid (vision FLOPs)
    image_tokens_fixed: list[int] | None = None  # image tokens no method drops (LLaVA-NeXT's newlines)
    text_computing: list[list[int]] | None = None  # per fed token: generated tokens its step ran in layers >= K
    prompt_tokens_sparse: list[int] | None = None  # prompt tokens in layer K (image tokens pruned)
    image_tokens_per_layer: list[list[int]] | None = None  # (B, L) image tokens each decoder layer ran
    image_token_layers: list[int] | None = None  # image tokens summed over layers K..L-1 (equal-budget check)
    instruction_tokens: list[int] | None = None  # prompt tokens after the image (CDPruner's and DART's text)
    image_group_budgets: list[list[int]] | None = None  # per sample, what each budget group keeps at the first cut


class SparseEngine:
    """Prefill, decode and generate with physically removed tokens (one engine for every method)."""

    def __init__(
        self,
        model: DynamicVLM,
        method: str = "dynamic",
        keep: float | None = None,
        text: str | float = "learned",
        layer: int | None = None,
        seed: int = 0,
        budget: str | None = None,
        text_keep: float | None = None,
        sinks: int = 4,
        prune_layer: int | None = None,
        options: dict[str, Any] | None = None,
    ) -> None:
        self.model = model
        self.method = check_method(method)
        self.keep = float(model.sparsity.keep if keep is None else keep)
        num_kept(1, self.keep)  # validates the range
        self.text = check_text_policy(text)
        # the share of generated tokens the budget policies (random, streaming, h2o) keep
        self.text_share = check_share(model.sparsity.text_keep if text_keep is None else text_keep)
        if sinks < 0:
            raise ValueError(f"sinks must be >= 0, got {sinks}")
        self.sinks = int(sinks)
        self.layer = int(model.sparsity.layer if layer is None else layer)
        if not 1 <= self.layer < model.num_layers:
            raise ValueError(f"layer must be in [1, {model.num_layers - 1}], got {self.layer}")
        if method == "dynamic" and model.image_predictor is None:
            raise ValueError("method='dynamic' needs a model with an image predictor (sparsity.vision=true)")
        if self.text == "learned" and model.text_predictor is None:
            raise ValueError("text='learned' needs a model with a text predictor; use text='off' or a rate")
        self.seed = seed
        self.budget = check_budget(model.sparsity.budget if budget is None else budget)
        # where the image tokens are cut (before layer 0 or at K; a staged method's first stage) and the
        # method's own settings (its paper's defaults unless given, conf/method/<name>.yaml)
        self.prune_layer = selection.prune_layer(self.method, self.layer, prune_layer)
        self.options = selection.check_options(self.method, options)
        self.stages = self._stages()
        if self.stages and self.text != "off":
            raise ValueError(f"method={self.method} cuts at several layers and decodes with every generated token: text must be 'off'")
        self.adapter = model.adapter
        missing = selection.unsupported(self.method, self.adapter)
        if missing:
            raise NotImplementedError(f"method={self.method}: {missing}")
        self.lm = self.adapter.decoder(model.base)
        self.image_token_id = self.adapter.image_token_id(model.base.config)

    @property
    def image_keep_share(self) -> float | None:
        """The share of droppable image tokens this engine keeps (None: all, the dense method)."""
        return None if self.method == "dense" else self.keep

    def _stages(self) -> list[int]:
        """Cut layers after K (a staged method's later stages; they get cache groups of their own). Every
        stage the layout has gets a group, whatever a request's counts: a batch whose stage keeps what the
        previous one kept just leaves that group's tokens as they were."""
        if self.method not in selection.STAGED:
            return []
        from dllava.inference.methods import pdrop

        starts = pdrop.stage_starts(self.layer, self.model.num_layers, self.options.get("stage_layers"))
        return [layer for layer in starts if layer > self.layer]

    def plan(self, features: ImageFeatures) -> list[tuple[int, list[list[int]]]]:
        """Every cut of a batch: ``[(layer, budgets[b][g])]`` (:func:`~dllava.inference.selection.cut_plan`)."""
        sizes = group_sizes(features.groups(self.budget), features.valid())
        return selection.cut_plan(self.method, sizes, self.keep, self.prune_layer, self.model.num_layers, self.options)

    def image_tokens_per_layer(self, features: ImageFeatures) -> list[list[int]]:
        """(B, L) image tokens each sample runs in every decoder layer."""
        return selection.image_tokens_per_layer(self.plan(features), features.counts, features.fixed_counts(), self.model.num_layers)

    # -- building blocks -------------------------------------------------------------------------
    def _embed(self, input_ids: torch.Tensor, features: ImageFeatures | None, prompt_len: int):
        """Token embeddings with the image features in place; also the (B, n_image) image columns
        (each row's image columns first, then filler where a sample has fewer image tokens).

        Image columns are found with a stable sort rather than boolean indexing, so shapes never depend
        on data and the same code runs on the meta device.
        """
        hidden = self.lm.embed_tokens(input_ids)
        if features is None:
            return hidden, None
        image_mask = input_ids == self.image_token_id
        image_mask[:, prompt_len:] = False  # a generated image-token id is text
        columns = image_columns(image_mask, features.most)
        index = columns[..., None].expand(-1, -1, hidden.shape[-1])
        placed = features.padded().to(hidden.dtype)
        if len(set(features.counts)) > 1:  # filler columns keep their own embedding
            placed = torch.where(features.valid(hidden.device)[..., None], placed, hidden.gather(1, index))
        return hidden.scatter(1, index, placed), columns

    def _additions(self, features: ImageFeatures | None, columns: torch.Tensor | None, like: torch.Tensor) -> dict:
        """Per-layer image additions (DeepStack) as (B, N, H) tensors over the sequence's columns."""
        if features is None or not features.layer_additions:
            return {}
        index = columns[..., None].expand(-1, -1, like.shape[-1])
        valid = features.valid(like.device)[..., None]
        return {
            i: torch.zeros_like(like).scatter(1, index, torch.where(valid, features.padded(flat).to(like.dtype), 0))
            for i, flat in features.layer_additions.items()
        }

    def _layers(self, first, last, hidden, mask, rotary, cache, additions=None):
        for i in range(first, last):
            hidden = self.lm.layers[i](hidden, attention_mask=mask, position_embeddings=rotary, past_key_values=cache)
            if additions and i in additions:
                hidden = hidden + additions[i]
        return hidden

    @staticmethod
    def _mask(key_valid: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """(B, 1, N, N) bool: valid keys at or before the query in the original order, plus the query."""
        earlier = order[:, None, :] <= order[:, :, None]
        own = torch.eye(order.shape[1], dtype=torch.bool, device=order.device)[None]
        return ((key_valid[:, None, :] & earlier) | own)[:, None]

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.adapter.lm_head(self.model.base)(self.lm.norm(hidden)).float()

    def _choose(
        self, state: RequestState, budgets: list[list[int]], alive: torch.Tensor, image_hidden: torch.Tensor,
        score: torch.Tensor | None, instruction: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        """(B, n_image) bool keep of one cut, made once per request: inside every budget group of each
        sample (``alive`` (B, n_image): the image tokens still present) exactly ``budgets[b][g]`` tokens,
        plus the tokens never dropped (padding slots are never kept). ``image_hidden`` (B, n_image, H):
        the hidden states entering the cut layer at the image slots (the projected features before layer
        0); ``score``: the last prompt token's attention in the layer before the cut (FastV, PDrop);
        ``instruction``: the hidden states (B, m, H) entering the cut layer at the text after the image
        and their validity (B, m) (DART and the instruction-aware predictor read them at K; CDPruner the
        input embeddings)."""
        from dllava.inference.methods import cdpruner, dart, divprune, visionzip

        batch, n, _ = image_hidden.shape
        features = state.image_features
        device = image_hidden.device
        groups = features.groups(self.budget).to(device)
        method, options = self.method, self.options

        if method == "dynamic":
            ragged = len(set(features.counts)) > 1
            words, words_valid = instruction if instruction is not None else (None, None)
            logits = self.model.image_predictor(
                image_hidden, valid=features.valid(device) if ragged else None, instruction=words, instruction_valid=words_valid
            )
            score = keep_score(logits)  # as DynamicVLM's top-k ranks (log p(keep) saturates in fp32)
        elif method == "random":
            score = torch.rand(batch, n, generator=state.generator).to(device)
        if method in ("dynamic", "random") or method in selection.ATTENTION_RANKED:
            ranked = score.float()
            return select_per_group(lambda member, flat: top_per_row(group_rows(ranked, member), flat, member), groups, alive, budgets)
        if method == "divprune":
            return select_per_group(lambda member, flat: divprune.select(group_rows(image_hidden, member), member, flat), groups, alive, budgets)
        if method == "cdpruner":
            words, words_valid = instruction
            relevance = cdpruner.relevance(image_hidden, words, alive, words_valid, **options)
            return select_per_group(
                lambda member, flat: cdpruner.select(group_rows(image_hidden, member), group_rows(relevance, member), member, flat),
                groups, alive, budgets,
            )
        if method == "dart":
            (text_hidden, text_valid), (image_norm, text_norm) = instruction, score
            image_hidden, text_hidden = self.lm.norm(image_hidden), self.lm.norm(text_hidden)  # as DART compares them
            return select_per_group(
                lambda member, flat: dart.select(
                    group_rows(image_hidden, member), group_rows(image_norm, member), group_rows(text_hidden, member),
                    group_rows(text_norm, member), group_rows(text_valid, member), member, flat, **options,
                ),
                groups, alive, budgets,
            )
        if method == "visionzip":
            if state.saliency is None:
                raise ValueError("method=visionzip needs the vision tower's attention: pass pixel inputs, not precomputed features")
            attention, keys = state.saliency
            out: list[torch.Tensor] = []

            def pick(member: torch.Tensor, flat: list[int]) -> torch.Tensor:
                keep, merged = visionzip.select(
                    group_rows(attention, member), group_rows(keys, member), group_rows(image_hidden, member), member, flat, **options
                )
                out.append(merged)
                return keep

            keep = select_per_group(pick, groups, alive, budgets)
            # each slot takes the merged features of its own budget group's row (a centre is in one group)
            merged = out[0].reshape(batch, -1, n, image_hidden.shape[-1])
            mine = groups.clamp_min(0)[:, None, :, None].expand(-1, 1, -1, merged.shape[-1])
            merged = merged.gather(1, mine)[:, 0]
            state.image_replacement = torch.where((groups >= 0)[..., None], merged.to(image_hidden.dtype), image_hidden)
            return keep
        raise AssertionError(f"no selection rule for method={method}")

    @property
    def _reads_instruction(self) -> bool:
        """The learned method with ``sparsity.image_predictor=instruction_aware``: its image predictor also
        reads the prompt's text after the image entering layer K."""
        return self.method == "dynamic" and getattr(self.model.sparsity, "image_predictor", "original") == "instruction_aware"

    def _group_budgets(self, features: ImageFeatures | None) -> list[list[int]] | None:
        """Per sample, the tokens each of its non-empty budget groups keeps at the method's first cut."""
        if features is None:
            return None
        plan = self.plan(features)
        if not plan:
            return None
        sizes = group_sizes(features.groups(self.budget), features.valid()).tolist()
        return [[b for b, size in zip(row, sizes_row) if size] for row, sizes_row in zip(plan[0][1], sizes)]

    def _instruction_counts(self, state: RequestState) -> list[int] | None:
        if state.image_features is None or state.input_ids.device.type == "meta":
            return None
        mask = _instruction_mask(state.input_ids, state.attention_mask, state.prompt_len, self.image_token_id)
        return mask.sum(-1).tolist()

    def _layer_before_cut(
        self, layer: torch.nn.Module, hidden: torch.Tensor, rotary: Any, key_valid: torch.Tensor, widths: list[int]
    ) -> torch.Tensor:
        """(B, n) per-column score read in the layer before a cut, from the hidden states entering it:
        FastV / PDrop, the last prompt token's attention; DART, the L1 norm of each rotated key (all heads)."""
        if self.method == "dart":
            _, key = self.adapter.query_key(layer.self_attn, layer.input_layernorm(hidden), -1)
            cos, sin = rotary
            _, key = apply_rotary_pos_emb(key, key, cos, sin)
            return key.float().abs().sum((1, 3))  # (B, h_kv, n, d) -> (B, n)
        # the last prompt token: each row's last real column at prefill (host widths, so meta runs too)
        query = widths[0] - 1 - hidden.shape[1] if len(set(widths)) == 1 else torch.tensor(widths, device=hidden.device) - 1
        return last_token_attention(layer, hidden, rotary, key_valid, query_index=query, query_key=self.adapter.query_key)

    def _learned_keep(self, hidden: torch.Tensor) -> list[bool] | None:
        """The text predictor's keep decision (B,) for the newest token's layer-K input (B, 1, H)."""
        if self.text != "learned":
            return None
        logits = self.model.text_predictor(hidden)
        return (logits[:, -1, 0] > logits[:, -1, 1]).tolist()

    def _decide_newest(
        self, state: RequestState, hidden: torch.Tensor, attention: torch.Tensor | None, fed_of: list[list[int]]
    ) -> tuple[list[bool], list[tuple[int, int]]]:
        """Apply the text policy to the token just fed: whether it stays (B,) and the evictions.

        ``attention`` (B, T) is the newest query's layer-K attention over T keys (``h2o`` only) and
        ``fed_of[b][c]`` the fed index of key ``c`` (-1: a prompt token)."""
        members = state.text
        if attention is not None:
            rows = attention.tolist()
            scores = [[0.0] * state.fed for _ in range(len(rows))]
            for b, row in enumerate(rows):
                for c, j in enumerate(fed_of[b]):
                    if j >= 0:
                        scores[b][j] += row[c]
            accumulate_attention(members, scores)
        return decide_newest(
            self.text, members, state.fed - 1, self._learned_keep(hidden), self.text_share, self.sinks, state.generator
        )

    # -- prefill and no-cache steps --------------------------------------------------------------
    @torch.no_grad()
    def start(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | ImageFeatures | None = None,
        use_cache: bool = True,
        position_ids: torch.Tensor | None = None,
        **image_inputs: torch.Tensor,
    ) -> tuple[torch.Tensor, RequestState]:
        """Prefill a left-padded batch: last-position logits (B, V) and the request state.

        ``image_inputs`` are the family's other pixel inputs (Qwen: ``image_grid_thw``), needed for the
        positions too; ``image_features`` (precomputed, e.g. on the meta device) skips the vision tower.
        ``position_ids`` (R, B, N), precomputed by ``adapter.prompt_positions`` on the unpruned prompt,
        skip that call: M-RoPE positions are computed from the ids' values on the host, which a prompt
        on the meta device does not have (the benchmark computes them from the same prompt on CPU).
        """
        images = {k: v for k, v in {"pixel_values": pixel_values, **image_inputs}.items() if v is not None}
        if isinstance(image_features, torch.Tensor):
            image_features = ImageFeatures.from_stacked(image_features)
        if image_features is None and pixel_values is not None:
            image_features = self.model.encode_images(images)
        if image_features is not None and input_ids.device.type != "meta":
            counts = (input_ids == self.image_token_id).sum(-1).tolist()
            if counts != image_features.counts:
                raise ValueError(
                    f"every prompt needs exactly its image's tokens (one image per prompt): the images give "
                    f"{image_features.counts}, the prompts hold {counts}"
                )
            if bool((input_ids[:, -1] == self.image_token_id).any()):
                raise ValueError("a prompt must end with text after its image (the last token is always kept)")
        generator = torch.Generator().manual_seed(self.seed)
        state = RequestState(
            input_ids=input_ids,
            attention_mask=attention_mask,
            prompt_len=input_ids.shape[1],
            image_features=image_features,
            position_ids=self._prompt_positions(input_ids, attention_mask, images, position_ids),
            cache=SparseKVCache(self.model.num_layers, self.layer, input_ids.shape[0], stages=self.stages) if use_cache else None,
            generator=generator,
            text=TextMembership(input_ids.shape[0]),
        )
        if self.method == "visionzip" and image_features is not None and images:
            score, keys = self.adapter.vision_saliency(self.model.base, images)
            if score.shape[0] != sum(image_features.counts):
                raise ValueError(f"vision saliency covers {score.shape[0]} image tokens, the features {sum(image_features.counts)}")
            state.saliency = (image_features.padded(score[:, None])[..., 0], image_features.padded(keys))
        return self._sequence_forward(state), state

    def _prompt_positions(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, images: dict[str, torch.Tensor],
        given: torch.Tensor | None,
    ) -> torch.Tensor:
        """The family's (R, B, N) positions of the prompt, or ``given`` after checking its shape."""
        if given is None:
            return self.adapter.prompt_positions(self.model.base, input_ids, attention_mask, images)
        expected = (self.adapter.rope_rows, *input_ids.shape)
        if tuple(given.shape) != expected:
            raise ValueError(f"position_ids must be (rows, batch, length) = {expected}, got {tuple(given.shape)}")
        return given.to(input_ids.device)

    def _sequence_forward(self, state: RequestState, every_position: bool = False) -> Any:
        """Run the whole current sequence pruned (prefill, or one no-cache decoding step).

        The layers run group by group (the cache's groups: layers < K, layers >= K, a staged method's later
        stages); before a group's first layer the columns it drops are cut: the image tokens of the
        method's cut at that layer (chosen once per request, at prefill) and, at K while decoding without
        cache, the generated tokens the text policy left out. Kept columns stay first in their original
        order; rows with fewer of them are filled with dropped ones, which stay queries but are masked as
        keys. Returns the newest position's logits (B, V); with ``every_position`` the logits of every
        computed column (B, n_keep, V), their original column index and whether each is a kept token.
        """
        input_ids, attention_mask, cache = state.input_ids, state.attention_mask, state.cache
        batch, length = input_ids.shape
        hidden, image_cols = self._embed(input_ids, state.image_features, state.prompt_len)
        device = hidden.device
        position_ids = state.position_ids
        all_additions = self._additions(state.image_features, image_cols, hidden)
        key_valid = attention_mask.bool()
        index = torch.arange(length, device=device)[None].expand(batch, length)  # original column of each column
        real = torch.ones(batch, length, dtype=torch.bool, device=device)  # not a filler column
        features = state.image_features
        has_images = image_cols is not None and image_cols.shape[1] > 0
        plan = dict(self.plan(features)) if has_images else {}
        if has_images and not plan and state.image_keep is None:  # dense: every image token stays
            state.image_keep = features.valid(device)
        widths = [length] * batch  # host: real columns per row (shapes never read the device)
        present = list(features.counts) if has_images else [0] * batch  # host: image tokens per row
        newest = state.fed - 1  # the token fed this step (no-cache decoding), -1 at prefill
        starts = cache.starts if cache is not None else [0, self.layer, *self.stages]
        score = None
        for group, start in enumerate(starts):
            end = starts[group + 1] if group + 1 < len(starts) else len(self.lm.layers)
            keep_cols = None
            if start in plan:
                here = self._image_columns(index, length, image_cols)
                if start not in state.cuts:
                    state.cuts[start] = self._cut_images(state, plan[start], hidden, here, score, image_cols, index, length)
                    if state.image_keep is None:  # what the first cut kept (a staged method cuts more later)
                        state.image_keep = state.cuts[start]
                keep_img = state.cuts[start] | ~features.valid(device)  # filler slots are other tokens: kept
                keep_cols = _scatter_columns(real, here, keep_img)
                if state.image_replacement is not None and start == self.prune_layer:
                    hidden = _scatter_rows(hidden, here, state.image_replacement, state.cuts[start] & (here >= 0))
                kept = [f + sum(b) for f, b in zip(features.fixed_counts(), plan[start])]
                widths = [w - p + k for w, p, k in zip(widths, present, kept)]
                present = kept
            if start == self.layer and newest >= 0:  # earlier fed tokens as the policy left them; the newest takes part
                staying = torch.tensor(state.text.alive, dtype=torch.bool, device=device).reshape(batch, newest)
                fed_here = _positions(index, length)[:, state.prompt_len : length - 1]
                keep_cols = _scatter_columns(real if keep_cols is None else keep_cols, fed_here, staying)
                widths = [w - (newest - sum(row)) for w, row in zip(widths, state.text.alive)]
                newest_hidden = hidden.gather(1, _positions(index, length)[:, -1:, None].expand(-1, -1, hidden.shape[-1]))
            if keep_cols is not None:
                order = torch.sort((~keep_cols).to(torch.uint8), dim=-1, stable=True).indices[:, : max(widths)]
                hidden = hidden.gather(1, order[..., None].expand(-1, -1, hidden.shape[-1]))
                key_valid = (key_valid & keep_cols).gather(1, order)
                real = keep_cols.gather(1, order)
                index = index.gather(1, order)
            rotary = self.adapter.rotary(self.model.base, hidden, gather_columns(position_ids, index))
            if start == self.layer and newest >= 0:
                state.newest_decision = self._no_cache_decision(state, newest_hidden, hidden, rotary, key_valid, index)
            additions = {i: a.gather(1, index[..., None].expand(-1, -1, a.shape[-1])) for i, a in all_additions.items()}
            mask = cache.open(group, key_valid, order=index) if cache is not None else self._mask(key_valid, index)
            score = None
            if end in plan and end not in state.cuts and self.method in selection.READS_LAYER_BEFORE:
                hidden = self._layers(start, end - 1, hidden, mask, rotary, cache, additions)
                score = self._layer_before_cut(self.lm.layers[end - 1], hidden, rotary, key_valid, widths)
                hidden = self._layers(end - 1, end, hidden, mask, rotary, cache, additions)
            else:
                hidden = self._layers(start, end, hidden, mask, rotary, cache, additions)
            if cache is not None:
                cache.commit(group)
        if every_position:
            return self._logits(hidden), index, key_valid
        last = (index == length - 1).to(torch.uint8).argmax(-1)  # where the newest column went
        return self._logits(hidden[torch.arange(batch, device=device), last])

    def _image_columns(self, index: torch.Tensor, length: int, image_cols: torch.Tensor) -> torch.Tensor:
        """(B, n_image) current column of every image slot (-1: cut earlier)."""
        return _positions(index, length).gather(1, image_cols)

    def _cut_images(
        self, state: RequestState, budgets: list[list[int]], hidden: torch.Tensor, here: torch.Tensor,
        score: torch.Tensor | None, image_cols: torch.Tensor, index: torch.Tensor, length: int,
    ) -> torch.Tensor:
        """The method's (B, n_image) keep at one cut, from the current sequence entering the cut layer."""
        features = state.image_features
        alive = (here >= 0) & features.valid(hidden.device)
        if state.cuts:  # a later stage chooses among the tokens the previous one kept
            alive &= state.cuts[max(state.cuts)]
        width = hidden.shape[-1]
        image_hidden = hidden.gather(1, here.clamp_min(0)[..., None].expand(-1, -1, width))
        image_score = score.gather(1, here.clamp_min(0)) if score is not None else None
        instruction = None
        if self.method in ("cdpruner", "dart") or self._reads_instruction:
            # the text after each sample's image, up to the end of its prompt (padding excluded)
            after = _instruction_mask(state.input_ids, state.attention_mask, state.prompt_len, self.image_token_id)
            # CDPruner before the LLM compares with the instruction's input embeddings; moved to K (and DART,
            # the learned predictor), with the instruction's hidden states entering the cut layer
            source = self.lm.embed_tokens(state.input_ids) if self.method == "cdpruner" and self.prune_layer == 0 else None
            width_text = max(int(after.sum(-1).max()), 1)
            text_cols = torch.sort((~after).to(torch.uint8), dim=-1, stable=True).indices[:, :width_text]
            text_valid = after.gather(1, text_cols)
            if source is None:  # DART, the learned predictor: the hidden states entering layer K, at the current columns
                text_here = _positions(index, length).gather(1, text_cols).clamp_min(0)
                words = hidden.gather(1, text_here[..., None].expand(-1, -1, width))
                if self.method == "dart":  # and the key norms
                    image_score = (image_score, score.gather(1, text_here))
            else:
                words = source.gather(1, text_cols[..., None].expand(-1, -1, width))
            instruction = (words, text_valid)
        return self._choose(state, budgets, alive, image_hidden, image_score, instruction)

    def _no_cache_decision(
        self, state: RequestState, newest_hidden: torch.Tensor, hidden: torch.Tensor, rotary: Any,
        key_valid: torch.Tensor, index: torch.Tensor,
    ) -> list[bool]:
        """The policy's decision for the newest token on the pruned sequence entering layer K (its
        evictions only change ``state.text``: the next step's sequence leaves those tokens out)."""
        attention, fed_of = None, []
        if self.text == "h2o":
            layer = self.lm.layers[self.layer]
            _, keys = self.adapter.query_key(layer.self_attn, layer.input_layernorm(hidden), -1)
            cos, sin = rotary
            _, keys = apply_rotary_pos_emb(keys, keys, cos, sin)
            length = state.input_ids.shape[1]
            last = (index == length - 1).to(torch.uint8).argmax(-1)
            rows = torch.arange(index.shape[0], device=index.device)
            newest_rotary = (cos[rows, last][:, None], sin[rows, last][:, None])
            attention = newest_query_attention(
                layer, newest_hidden, newest_rotary, keys, key_valid, self.adapter.query_key
            )
            columns = (index - state.prompt_len).masked_fill(~key_valid, -1).tolist()
            fed_of = [[j if j >= 0 else -1 for j in row] for row in columns]
        keep, _ = self._decide_newest(state, newest_hidden, attention, fed_of)
        return keep

    @torch.no_grad()
    def step(self, state: RequestState, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per sample (B,) and return the next logits (B, V), with or without cache."""
        step = state.fed
        state.input_ids = torch.cat([state.input_ids, tokens[:, None]], dim=1)
        state.attention_mask = torch.cat([state.attention_mask, state.attention_mask.new_ones(tokens.shape[0], 1)], 1)
        state.position_ids = torch.cat([state.position_ids, next_positions(state.position_ids)], dim=-1)
        if state.cache is None:
            logits = self._sequence_forward(state)
            decided = state.newest_decision
        else:
            logits, decided = self._cached_step(state, tokens, step)
        state.text_kept.append(decided)
        return logits

    def _cached_step(self, state: RequestState, tokens: torch.Tensor, step: int) -> tuple[torch.Tensor, list[bool]]:
        cache = state.cache
        batch = tokens.shape[0]
        hidden = self.lm.embed_tokens(tokens[:, None])
        position_ids = state.position_ids[..., -1:]  # the new token's true position
        rotary = self.adapter.rotary(self.model.base, hidden, position_ids)
        ones = torch.ones(batch, 1, dtype=torch.bool, device=hidden.device)
        mask = cache.open(DENSE, ones)
        hidden = self._layers(0, self.layer, hidden, mask, rotary, cache)
        cache.commit(DENSE)
        newest_hidden = hidden
        mask = cache.open(SPARSE, ones)
        slots = cache.open_slots[SPARSE]
        for group in range(SPARSE, cache.groups):  # a staged method's later groups keep every generated token
            if group > SPARSE:
                mask = cache.open(group, ones)
            layers = cache.layers_of(group)
            hidden = self._layers(layers.start, layers.stop, hidden, mask, rotary, cache)
            if group > SPARSE:
                cache.commit(group)
        attention, fed_of = None, []
        members = state.text
        if self.text == "h2o":  # the newest query over layer K's cached keys, its own included
            total = max(cache.length[SPARSE]) + 1
            attention = newest_query_attention(
                self.lm.layers[self.layer], newest_hidden, rotary, cache.keys[self.layer][:, :, :total],
                cache.valid[SPARSE][:, :total], self.adapter.query_key,
            )
            fed_of = [[-1] * total for _ in range(batch)]
            for b in range(batch):
                for j, slot in enumerate(members.slots[b]):
                    if slot >= 0:
                        fed_of[b][slot] = j
                fed_of[b][slots[b]] = step
        decided, evicted = self._decide_newest(state, newest_hidden, attention, fed_of)
        cache.commit(SPARSE, decided)
        for b in range(batch):
            members.slots[b].append(slots[b] if decided[b] else -1)
        for b, j in evicted:
            cache.evict(SPARSE, b, members.slots[b][j])
            members.slots[b][j] = -1
        return self._logits(hidden[:, -1]), decided

    # -- generate --------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        eos_token_id: int | None = None,
        pad_token_id: int = 0,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        use_cache: bool = True,
        seed: int | None = None,
        **image_inputs: torch.Tensor,
    ) -> GenerationResult:
        """Greedy or sampled decoding of a left-padded batch; stops when every sample hit EOS."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        logits, state = self.start(input_ids, attention_mask, pixel_values, image_features, use_cache, **image_inputs)
        sampler = torch.Generator().manual_seed(self.seed if seed is None else seed)
        batch = input_ids.shape[0]
        done = [False] * batch
        lengths = [0] * batch
        tokens: list[torch.Tensor] = []
        for t in range(max_new_tokens):
            if t > 0:
                logits = self.step(state, tokens[-1])
            token = pick_token(logits, do_sample, temperature, top_k, top_p, sampler)
            token = torch.where(torch.tensor(done, device=token.device), torch.full_like(token, pad_token_id), token)
            values = token.tolist()
            for b in range(batch):
                if not done[b]:
                    lengths[b] += 1
                    done[b] = eos_token_id is not None and values[b] == eos_token_id
            tokens.append(token)
            if all(done):
                break
        return self.summarize(state, torch.stack(tokens, 1), lengths)

    @torch.no_grad()
    def reference_nll(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        references: list[list[int]],
        use_cache: bool = True,
        **image_inputs: torch.Tensor,
    ) -> list[ReferenceScore]:
        """Teacher-forced negative log-likelihood of each sample's ``references`` token ids after its prompt,
        through the same sparse decoding: every reference token is fed back and faces the text policy,
        so a dropped or evicted token is really absent for the tokens after it. Returns per sample
        ``(summed NLL, tokens, greedy)``; perplexity is ``exp(summed / tokens)``; ``greedy``: every
        reference token was the argmax (lmms-eval's ``loglikelihood`` reports it)."""
        if any(not ref for ref in references):
            raise ValueError("every reference needs at least one token")
        logits, state = self.start(input_ids, attention_mask, use_cache=use_cache, **image_inputs)
        longest = max(len(ref) for ref in references)
        totals = [0.0] * len(references)
        greedy = [True] * len(references)
        for t in range(longest):
            if t > 0:
                fed = [ref[t - 1] if t - 1 < len(ref) else 0 for ref in references]  # pad after a sample's end
                logits = self.step(state, torch.tensor(fed, dtype=torch.long, device=input_ids.device))
            logp = logits.float().log_softmax(-1)
            best = logp.argmax(-1).tolist()
            for b, ref in enumerate(references):
                if t < len(ref):
                    totals[b] -= float(logp[b, ref[t]])
                    greedy[b] = greedy[b] and best[b] == ref[t]
        return [ReferenceScore(total, len(ref), g) for total, ref, g in zip(totals, references, greedy)]

    def summarize(self, state: RequestState, sequences: torch.Tensor, lengths: list[int]) -> GenerationResult:
        """Per-sample statistics as a single-sample run would give them: a sample's own tokens fed
        before its EOS count, the pad tokens a finished sample keeps feeding in a batch do not."""
        batch = sequences.shape[0]
        features = state.image_features
        num_layers = self.model.num_layers
        n_image = features.counts if features is not None else [0] * batch
        per_layer = self.image_tokens_per_layer(features) if features is not None else [[0] * num_layers] * batch
        prompt = state.attention_mask[:, : state.prompt_len].sum(-1).tolist()
        fed = [max(0, n - 1) for n in lengths]
        computing = [row[:f] for row, f in zip(state.text.computing, fed)]
        # staying after the sample's own last fed token (later pad tokens may evict more in a batch)
        kept = [state.text.staying_after[b][f - 1] if f else 0 for b, f in enumerate(fed)]
        # tokens a layer holds: the prompt with that layer's image tokens, every fed token below K and
        # the kept ones from K on
        layer_tokens = [
            [p - n + img + (f if i < self.layer else k) for i, img in enumerate(row)]
            for p, n, row, f, k in zip(prompt, n_image, per_layer, fed, kept)
        ]
        kv = kv_dense = None
        if state.cache is not None:
            shape = DecoderShape.from_config(self.model.text_config)
            size = state.cache.element_size()
            kv = [kv_bytes_layers(shape, tokens, size) for tokens in layer_tokens]
            kv_dense = [kv_bytes_layers(shape, [p + f] * num_layers, size) for p, f in zip(prompt, fed)]
        sparse_layers = num_layers - self.layer
        return GenerationResult(
            sequences=sequences,
            lengths=lengths,
            image_tokens=n_image,
            image_tokens_kept=[kept_images(row, self.layer, self.method) for row in per_layer],
            image_keep=state.image_keep,
            text_tokens_fed=fed,
            text_tokens_kept=kept,
            kv_bytes=kv,
            kv_bytes_dense=kv_dense,
            kv_tokens_sparse_layer=[row[self.layer] for row in layer_tokens],
            kv_tokens_dense_layer=[p + f for p, f in zip(prompt, fed)],
            image_grids=list(state.image_features.grids) if state.image_features is not None else None,
            image_tokens_fixed=features.fixed_counts() if features is not None else [0] * batch,
            text_computing=computing,
            prompt_tokens_sparse=[p - n + row[self.layer] for p, n, row in zip(prompt, n_image, per_layer)],
            image_tokens_per_layer=per_layer,
            instruction_tokens=self._instruction_counts(state),
            image_group_budgets=self._group_budgets(features),
            image_token_layers=[sum(row[self.layer :]) for row in per_layer] if sparse_layers else None,
        )


def _instruction_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int, image_token_id: int) -> torch.Tensor:
    """(B, N) bool: each sample's valid prompt tokens after its last image token (its instruction)."""
    is_image = (input_ids[:, :prompt_len] == image_token_id)
    columns = torch.arange(prompt_len, device=input_ids.device)[None]
    last = torch.where(is_image, columns, -1).amax(-1, keepdim=True)
    after = (columns > last) & (last >= 0) & attention_mask[:, :prompt_len].bool()
    return torch.nn.functional.pad(after, (0, input_ids.shape[1] - prompt_len))


def kept_images(per_layer: list[int], layer: int, method: str) -> int | float:
    """The image tokens a sample keeps, as answer files report them: the count from layer K on (a
    single cut), or for a staged method the mean over layers K..L-1 of its token-layers (PDrop's
    "equivalent" count, equal to the single cut's at the same budget up to rounding)."""
    tail = per_layer[layer:]
    if method in selection.STAGED and len(set(tail)) > 1:
        return sum(tail) / len(tail)
    return tail[0] if tail else per_layer[-1]


def pick_token(
    logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int, top_p: float, generator: torch.Generator
) -> torch.Tensor:
    """Greedy argmax, or a sample after temperature, top-k and top-p (nucleus) filtering: (B, V) -> (B,)."""
    if not do_sample:
        return logits.argmax(-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    logits = logits / temperature
    if top_k > 0:
        threshold = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the smallest set reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(logits.device)


def _positions(index: torch.Tensor, length: int) -> torch.Tensor:
    """(B, length) current column of every original column under ``index`` (B, n) (-1: not present)."""
    batch, n = index.shape
    found = torch.full((batch, length), -1, dtype=torch.long, device=index.device)
    return found.scatter(1, index, torch.arange(n, device=index.device)[None].expand(batch, n))


def _scatter_columns(base: torch.Tensor, columns: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``base`` (B, n) bool with ``values`` (B, m) written at ``columns`` (B, m); -1 columns are skipped."""
    batch, n = base.shape
    out = torch.cat([base, base.new_zeros(batch, 1)], dim=1)
    out = out.scatter(1, torch.where(columns >= 0, columns, n), values)
    return out[:, :n]


def _scatter_rows(hidden: torch.Tensor, columns: torch.Tensor, rows: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """``hidden`` (B, n, H) with ``rows`` (B, m, H) written at ``columns`` (B, m) where ``where`` (B, m)."""
    batch, n, width = hidden.shape
    out = torch.cat([hidden, hidden.new_zeros(batch, 1, width)], dim=1)
    target = torch.where(where & (columns >= 0), columns, n)[..., None].expand(-1, -1, width)
    return out.scatter(1, target, rows.to(hidden.dtype))[:, :n]
