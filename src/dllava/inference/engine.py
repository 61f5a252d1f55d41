"""Physically sparse inference for Dynamic-LLaVA on any family: pruned prefill, decoding with or without KV cache.

Training only masks; here the dropped tokens are gone (PAPER.md section 7). Layers 0..K-1 run on the
whole prompt; at layer K each sample's image tokens are cut to ``int(n * keep)`` of its own ``n``
droppable ones (per view under the ``per_view`` budget; LLaVA-NeXT's newlines always stay) (learned, FastV, random or none, see :mod:`dllava.inference.selection`), and layers
K..L-1 run on the shorter sequence with the kept tokens' original positions: the family's position ids
(1-D, or M-RoPE's 3-D) are computed once on the unpruned prompt, the kept columns gathered, and
decoding continues from the full prompt's last position (never renumbered). While decoding, each new token attends to
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
from typing import Any

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from dllava.families import ImageFeatures, gather_columns, next_positions
from dllava.inference.cache import DENSE, SPARSE, SparseKVCache
from dllava.inference.flops import DecoderShape, cache_tokens, kv_bytes
from dllava.inference.selection import check_method, last_token_attention, newest_query_attention, num_kept
from dllava.inference.text_policies import (
    TextMembership,
    accumulate_attention,
    check_share,
    check_text_policy,
    decide_newest,
)
from dllava.sparse.decisions import check_budget, image_columns, keep_score, top_per_group
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
    image_keep: torch.Tensor | None = None  # (B, n_image) bool, fixed after prefill (False on padding slots)
    text_kept: list[list[bool]] = field(default_factory=list)  # per fed token: (B,) decisions when fed
    generator: torch.Generator | None = None
    newest_decision: list[bool] | None = None  # no-cache path: the decision for the token just fed
    text: TextMembership | None = None  # which fed tokens stay now (evicting policies change earlier ones)

    @property
    def fed(self) -> int:
        """Generated tokens fed back into the model so far."""
        return self.input_ids.shape[1] - self.prompt_len


@dataclass
class GenerationResult:
    """New tokens plus what the sparsifier did, per sample."""

    sequences: torch.Tensor  # (B, T) new tokens; finished samples continue with pad
    lengths: list[int]  # new tokens up to and including EOS
    image_tokens: list[int]  # image tokens per sample in the prompt
    image_tokens_kept: list[int]  # never-dropped ones (image_tokens_fixed) included
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
    prompt_tokens_sparse: list[int] | None = None  # prompt tokens in layers >= K (image tokens pruned)


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
        self.adapter = model.adapter
        self.lm = self.adapter.decoder(model.base)
        self.image_token_id = self.adapter.image_token_id(model.base.config)

    @property
    def image_keep_share(self) -> float | None:
        """The share of droppable image tokens this engine keeps (None: all, the dense method)."""
        return None if self.method == "dense" else self.keep

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

    def _select_images(
        self, state: RequestState, image_hidden: torch.Tensor, fastv_score: torch.Tensor | None
    ) -> torch.Tensor:
        """(B, n_image) bool keep of the image tokens, made once per request: each sample keeps
        ``int(n_b * keep)`` of its own ``n_b`` droppable tokens, or of each view's under the ``per_view``
        budget, plus the tokens never dropped (padding slots are never kept)."""
        batch, n, _ = image_hidden.shape
        features = state.image_features
        valid = features.valid(image_hidden.device)
        ragged = len(set(features.counts)) > 1
        if self.method == "dense":
            return valid
        if self.method == "dynamic":
            logits = self.model.image_predictor(image_hidden, valid=valid if ragged else None)
            score = keep_score(logits)  # as DynamicVLM's top-k ranks (log p(keep) saturates in fp32)
        elif self.method == "fastv":
            score = fastv_score.float()
        else:
            score = torch.rand(batch, n, generator=state.generator).to(image_hidden.device)
        # host groups and mask: the budgets are counted on the host, so this also runs on the meta device
        return top_per_group(score, features.groups(self.budget), features.valid(), self.keep)

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
            cache=SparseKVCache(self.model.num_layers, self.layer, input_ids.shape[0]) if use_cache else None,
            generator=generator,
            text=TextMembership(input_ids.shape[0]),
        )
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

        Returns the newest position's logits (B, V); with ``every_position`` the logits of every
        computed column (B, n_keep, V), their original column index and whether each is a kept token.
        """
        input_ids, attention_mask, cache = state.input_ids, state.attention_mask, state.cache
        batch, length = input_ids.shape
        hidden, image_cols = self._embed(input_ids, state.image_features, state.prompt_len)
        position_ids = state.position_ids
        rotary = self.adapter.rotary(self.model.base, hidden, position_ids)
        additions = self._additions(state.image_features, image_cols, hidden)
        key_valid = attention_mask.bool()
        order = torch.arange(length, device=hidden.device)[None].expand(batch, length)
        mask = cache.open(DENSE, key_valid) if cache is not None else self._mask(key_valid, order)
        hidden = self._layers(0, self.layer - 1, hidden, mask, rotary, cache, additions)
        fastv_score = None
        if self.method == "fastv" and state.image_keep is None and image_cols is not None:
            fastv_score = last_token_attention(
                self.lm.layers[self.layer - 1], hidden, rotary, key_valid, query_index=state.prompt_len - 1,
                query_key=self.adapter.query_key,
            )
            fastv_score = fastv_score.gather(1, image_cols)
        hidden = self._layers(self.layer - 1, self.layer, hidden, mask, rotary, cache, additions)
        if cache is not None:
            cache.commit(DENSE)

        keep_cols = torch.ones(batch, length, dtype=torch.bool, device=hidden.device)
        n_keep = length
        if image_cols is not None and image_cols.shape[1]:
            features = state.image_features
            if state.image_keep is None:
                image_hidden = hidden.gather(1, image_cols[..., None].expand(-1, -1, hidden.shape[-1]))
                state.image_keep = self._select_images(state, image_hidden, fastv_score)
            keep_cols = keep_cols.scatter(1, image_cols, state.image_keep | ~features.valid(hidden.device))
            kept = features.kept_counts(self.image_keep_share, self.budget)
            n_keep = max(length - c + k for c, k in zip(features.counts, kept))
        newest = state.fed - 1  # the token fed this step (no-cache decoding), -1 at prefill
        if newest >= 0:  # earlier fed tokens stay as the policy left them; the newest takes part in its step
            staying = torch.tensor(state.text.alive, dtype=torch.bool, device=hidden.device).reshape(batch, newest)
            keep_cols[:, state.prompt_len : length - 1] = staying
            n_keep = int(keep_cols.sum(-1).max())
            newest_hidden = hidden[:, -1:]
        # Kept columns first, in original order; rows with fewer kept columns are filled with dropped
        # ones, which stay queries but are masked as keys.
        index = torch.sort((~keep_cols).to(torch.uint8), dim=-1, stable=True).indices[:, :n_keep]
        hidden = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))
        key_valid = (key_valid & keep_cols).gather(1, index)
        rotary = self.adapter.rotary(self.model.base, hidden, gather_columns(position_ids, index))
        if newest >= 0:
            state.newest_decision = self._no_cache_decision(state, newest_hidden, hidden, rotary, key_valid, index)
        additions = {i: a.gather(1, index[..., None].expand(-1, -1, a.shape[-1])) for i, a in additions.items()}
        mask = cache.open(SPARSE, key_valid, order=index) if cache is not None else self._mask(key_valid, index)
        hidden = self._layers(self.layer, len(self.lm.layers), hidden, mask, rotary, cache, additions)
        if cache is not None:
            cache.commit(SPARSE)
        if every_position:
            return self._logits(hidden), index, key_valid
        last = (index == length - 1).to(torch.uint8).argmax(-1)  # where the newest column went
        return self._logits(hidden[torch.arange(batch, device=hidden.device), last])

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
        hidden = self._layers(self.layer, len(self.lm.layers), hidden, mask, rotary, cache)
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
    ) -> list[tuple[float, int]]:
        """Teacher-forced negative log-likelihood of each sample's ``references`` token ids after its prompt,
        through the same sparse decoding: every reference token is fed back and faces the text policy,
        so a dropped or evicted token is really absent for the tokens after it. Returns per sample
        ``(summed NLL, tokens)``; perplexity is ``exp(summed / tokens)``."""
        if any(not ref for ref in references):
            raise ValueError("every reference needs at least one token")
        logits, state = self.start(input_ids, attention_mask, use_cache=use_cache, **image_inputs)
        longest = max(len(ref) for ref in references)
        totals = [0.0] * len(references)
        for t in range(longest):
            if t > 0:
                fed = [ref[t - 1] if t - 1 < len(ref) else 0 for ref in references]  # pad after a sample's end
                logits = self.step(state, torch.tensor(fed, dtype=torch.long, device=input_ids.device))
            logp = logits.float().log_softmax(-1)
            for b, ref in enumerate(references):
                if t < len(ref):
                    totals[b] -= float(logp[b, ref[t]])
        return [(total, len(ref)) for total, ref in zip(totals, references)]

    def summarize(self, state: RequestState, sequences: torch.Tensor, lengths: list[int]) -> GenerationResult:
        """Per-sample statistics as a single-sample run would give them: a sample's own tokens fed
        before its EOS count, the pad tokens a finished sample keeps feeding in a batch do not."""
        batch = sequences.shape[0]
        features = state.image_features
        n_image = features.counts if features is not None else [0] * batch
        kept_images = features.kept_counts(self.image_keep_share, self.budget) if features is not None else n_image
        prompt = state.attention_mask[:, : state.prompt_len].sum(-1).tolist()
        fed = [max(0, n - 1) for n in lengths]
        computing = [row[:f] for row, f in zip(state.text.computing, fed)]
        # staying after the sample's own last fed token (later pad tokens may evict more in a batch)
        kept = [state.text.staying_after[b][f - 1] if f else 0 for b, f in enumerate(fed)]
        counts = [cache_tokens(p, n, i, f, k) for p, n, i, f, k in zip(prompt, n_image, kept_images, fed, kept)]
        dense_tokens, sparse_tokens = [d for d, _ in counts], [s for _, s in counts]
        kv = kv_dense = None
        if state.cache is not None:
            shape = DecoderShape.from_config(self.model.text_config)
            size = state.cache.element_size()
            kv = [kv_bytes(shape, self.layer, d, s, size) for d, s in counts]
            kv_dense = [kv_bytes(shape, self.layer, d, d, size) for d in dense_tokens]
        return GenerationResult(
            sequences=sequences,
            lengths=lengths,
            image_tokens=n_image,
            image_tokens_kept=kept_images,
            image_keep=state.image_keep,
            text_tokens_fed=fed,
            text_tokens_kept=kept,
            kv_bytes=kv,
            kv_bytes_dense=kv_dense,
            kv_tokens_sparse_layer=sparse_tokens,
            kv_tokens_dense_layer=dense_tokens,
            image_grids=list(state.image_features.grids) if state.image_features is not None else None,
            image_tokens_fixed=features.fixed_counts() if features is not None else [0] * batch,
            text_computing=computing,
            prompt_tokens_sparse=[p - n + k for p, n, k in zip(prompt, n_image, kept_images)],
        )


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
