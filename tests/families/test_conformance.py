"""The family conformance suite: every check below runs on a tiny random model of every family
(LLaVA-1.5, Qwen2.5-VL, Qwen3-VL, LLaVA-NeXT, LLaVA-OneVision), and a new family is supported when it
passes this file.

References nobody here wrote: HF's own forward and ``generate`` (logits, tokens, and the position ids
its decoder receives), HF's rotary module, and ``torch.utils.flop_counter.FlopCounterMode``. The
prompts are a left-padded batch of three with different image sizes (different image-token counts)
where the family has dynamic resolution (conftest.py).
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dllava.inference import flops
from dllava.inference.engine import SparseEngine
from dllava.sparse.decisions import num_kept
from dllava.sparse.model import causal_padding_mask

from .conftest import NEW_TOKENS, Family

ATOL = 1e-4  # engine vs reference logits (fp32; the engine gathers columns and uses its own masks)
METHODS = ("dense", "dynamic", "fastv", "random")
BASELINES = ("dart", "divprune", "cdpruner", "visionzip", "pdrop")  # the 2025 training-free methods


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls run fastest on one thread, and far faster than two threads on cores that other
    processes share (measured: 20x on this 2-core machine under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- helpers ---------------------------------------------------------------------------------------
def _valid(family: Family) -> torch.Tensor:
    return family.attention_mask.bool()


def _run(engine: SparseEngine, ids, mask, images, tokens: torch.Tensor | None, use_cache: bool, steps: int = NEW_TOKENS):
    """Prefill, then ``steps - 1`` steps feeding ``tokens`` (teacher forcing) or the greedy choice:
    the logits of every step (B, T, V), the tokens fed/chosen (B, T) and the request state."""
    logits, state = engine.start(ids, mask, use_cache=use_cache, **images)
    out, chosen = [logits], []
    for t in range(steps):
        token = logits.argmax(-1) if tokens is None else tokens[:, t]
        chosen.append(token)
        if t == steps - 1:
            break
        logits = engine.step(state, token)
        out.append(logits)
    return torch.stack(out, 1), torch.stack(chosen, 1), state


def _policy(family: Family, image_keep: torch.Tensor) -> torch.Tensor:
    """(B, N) gate: 1 everywhere except each sample's image tokens, which get the engine's decisions
    (its i-th image token <- slot i of ``image_keep``; slots past its own count must be empty)."""
    policy = torch.ones(family.input_ids.shape, dtype=torch.float32)
    for b, count in enumerate(family.counts):
        columns = (family.input_ids[b] == family.image_token_id).nonzero()[:, 0]
        assert not image_keep[b, count:].any(), "a padding slot was kept"
        policy[b, columns] = image_keep[b, :count].float()
    return policy


def _masked_logits(
    family: Family, policy: torch.Tensor | dict[int, torch.Tensor], deepstack: bool = True,
    features_flat: torch.Tensor | None = None,
) -> torch.Tensor:
    """The training-mode gated forward over the whole unpruned prompt with the gate ``policy`` (no
    predictor involved) in layers >= K, or with ``policy[c]`` from layer c on for every cut layer c
    (0: before the LLM), at HF generate's own prefill positions; DeepStack additions (Qwen3-VL) are
    added at every image position after their layer, as HF's ``_deepstack_process`` does.
    ``features_flat`` replaces the image features (VisionZip's merged tokens)."""
    model, adapter = family.model, family.adapter
    decoder = adapter.decoder(model.base)
    ids, mask = family.input_ids, family.attention_mask
    gates = policy if isinstance(policy, dict) else {family.sparse_layer: policy}
    with torch.no_grad():
        features = model.encode_images(family.images)
        image_mask = ids == family.image_token_id
        flat = features.flat if features_flat is None else features_flat
        hidden = decoder.embed_tokens(ids).masked_scatter(image_mask[..., None], flat)
        rotary = family.rope(hidden, family.reference["prefill_positions"])
        additive = causal_padding_mask(mask, hidden.dtype)
        for i, layer in enumerate(decoder.layers):
            cuts = [c for c in gates if c <= i]
            gate = gates[max(cuts)] if cuts else None
            hidden = layer(hidden, attention_mask=additive, position_embeddings=rotary, policy=gate,
                           sparse_layer=0 if gate is not None else None)
            if deepstack and i in features.layer_additions:
                hidden = hidden.clone()
                hidden[image_mask] += features.layer_additions[i]
        return adapter.lm_head(model.base)(decoder.norm(hidden)).float()


def _pruned_prefill(family: Family, method: str, keep: float = 0.25):
    """The engine's logits at every column its pruned prefill computes, their original column index,
    which of them are real kept tokens, and the request state."""
    engine = SparseEngine(family.model, method=method, keep=keep, text="off")
    state = engine.start(family.input_ids, family.attention_mask, **family.images)[1]
    state.cache = None  # rerun the same request without cache to read every position
    logits, index, valid = engine._sequence_forward(state, every_position=True)
    return logits, index, valid, state


# -- 1. gates at 1 ---------------------------------------------------------------------------------
def test_all_kept_equals_hf_forward(family: Family):
    # (HF's LLaVA forward numbers a left-padded row from its first padding column, generate and we from
    # its first token: a constant shift per row, which 1-D RoPE attention does not see)
    with torch.no_grad():
        reference = family.hf(**family.inputs).logits
        ours = family.model(family.input_ids, family.attention_mask, mode="all", **family.images)
    assert family.model.text_config._attn_implementation == "dllava_gated"
    assert ours.vision_keep.tolist() == [1.0] * 3
    diff = (reference - ours.logits)[_valid(family)].abs().max().item()
    assert diff <= 1e-5, diff


# -- 2. keep 1, text off == HF generate ------------------------------------------------------------
@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
def test_keep_one_equals_hf_generate(family: Family, use_cache: bool):
    reference = family.reference
    engine = SparseEngine(family.model, method="dense", keep=1.0, text="off")
    ours = engine.generate(family.input_ids, family.attention_mask, max_new_tokens=NEW_TOKENS,
                           pad_token_id=family.pad_token_id, use_cache=use_cache, **family.images)
    assert ours.sequences.tolist() == reference["tokens"].tolist()
    assert ours.image_tokens_kept == family.counts
    # tokens alone can hide a position bug: compare every step's logits, feeding HF's tokens
    logits, _, _ = _run(engine, family.input_ids, family.attention_mask, family.images, reference["tokens"], use_cache)
    diff = (logits - reference["logits"]).abs().max().item()
    assert diff <= ATOL, diff


# -- 3 + 8. pruned prefill == masked forward -------------------------------------------------------
@pytest.mark.parametrize("method", ["dynamic", "fastv", "random"])
def test_pruned_prefill_equals_masked_forward(family: Family, method: str):
    logits, index, valid, state = _pruned_prefill(family, method)
    budgets = family.budgets(0.25)
    assert state.image_keep.sum(-1).tolist() == budgets
    length = family.input_ids.shape[1]
    assert index.shape[1] == max(length - c + k for c, k in zip(family.counts, budgets))
    masked = _masked_logits(family, _policy(family, state.image_keep))
    expected = masked.gather(1, index[..., None].expand(-1, -1, masked.shape[-1]))
    # every kept, non-padding column of every sample is compared
    assert valid.sum(-1).tolist() == [int(m) - c + k for m, c, k in zip(family.attention_mask.sum(-1), family.counts, budgets)]
    diff = (expected - logits)[valid].abs().max().item()
    assert diff <= ATOL, diff


def test_deepstack_reaches_the_pruned_layers(family: Family):
    """Qwen3-VL at K = 1 drops tokens before DeepStack's additions after layers 1 and 2 are made: the
    engine must gather them with the kept columns. The additions matter here (without them the masked
    forward differs), so the equality of the test above checks that they are gathered right."""
    if family.name != "qwen3_vl":
        pytest.skip("no DeepStack in this family")
    additions = family.model.encode_images(family.images).layer_additions
    assert family.sparse_layer == 1 and sorted(additions) == [0, 1, 2]
    logits, index, valid, state = _pruned_prefill(family, "dynamic")
    policy = _policy(family, state.image_keep)
    with_, without = _masked_logits(family, policy), _masked_logits(family, policy, deepstack=False)
    assert (with_ - without)[_valid(family)].abs().max().item() > 1e-2
    expected = with_.gather(1, index[..., None].expand(-1, -1, with_.shape[-1]))
    assert (expected - logits)[valid].abs().max().item() <= ATOL


# -- 4. positions ----------------------------------------------------------------------------------
def _layer_rotary(family: Family, layer: int, run):
    """The (cos, sin) that decoder layer ``layer`` receives in every call made by ``run()``."""
    seen = []
    hook = family.adapter.decoder(family.model.base).layers[layer].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["position_embeddings"]), with_kwargs=True)
    try:
        out = run()
    finally:
        hook.remove()
    return seen, out


@pytest.mark.parametrize("method", ["dynamic", "fastv"])
def test_kept_tokens_keep_the_unpruned_prompt_positions(family: Family, method: str):
    reference = family.reference["prefill_positions"]  # what HF generate's decoder gets for the prompt
    engine = SparseEngine(family.model, method=method, keep=0.25, text="off")
    state = engine.start(family.input_ids, family.attention_mask, **family.images)[1]
    valid = _valid(family)
    assert torch.equal(state.position_ids[:, valid], reference[:, valid])
    # what the layers after the cut really rotate with: HF's ids of the prompt at the kept columns
    state.cache = None
    seen, (_, index, kept) = _layer_rotary(family, family.sparse_layer,
                                           lambda: engine._sequence_forward(state, every_position=True))
    cos, sin = seen[0]
    gathered = reference.gather(2, index[None].expand(reference.shape[0], -1, -1))
    hidden = torch.zeros(*index.shape, 1)
    expected_cos, expected_sin = family.rope(hidden, gathered)
    assert index.shape[1] < family.input_ids.shape[1]  # really pruned
    torch.testing.assert_close(cos[kept], expected_cos[kept], rtol=0, atol=0)
    torch.testing.assert_close(sin[kept], expected_sin[kept], rtol=0, atol=0)


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
def test_decoding_positions_continue_from_the_full_prompt(family: Family, use_cache: bool):
    """After pruning, generated tokens sit where HF generate puts them on the unpruned prompt."""
    reference = family.reference
    engine = SparseEngine(family.model, method="dynamic", keep=0.25, text="off")
    steps = 4
    seen, (_, _, state) = _layer_rotary(
        family, family.sparse_layer,
        lambda: _run(engine, family.input_ids, family.attention_mask, family.images, reference["tokens"], use_cache, steps))
    length = family.input_ids.shape[1]
    decoded = reference["step_positions"][..., : steps - 1]
    assert torch.equal(state.position_ids[..., length:], decoded)
    # the rotary of the newest token in each step: the step's only column with a cache; without, the
    # last of each row's kept columns (kept ones come first, in order; text off keeps every fed token)
    hidden = torch.zeros(3, 1, 1)
    pruned = [length - c + k for c, k in zip(family.counts, family.budgets(0.25))]
    for t in range(steps - 1):
        cos, _ = seen[t + 1]
        newest = [0] * 3 if use_cache else [n + t for n in pruned]
        expected, _ = family.rope(hidden, decoded[..., t : t + 1])
        torch.testing.assert_close(cos[torch.arange(3), newest], expected[:, 0], rtol=0, atol=0)


# -- 5. cache == no cache --------------------------------------------------------------------------
@pytest.mark.parametrize("method", BASELINES)
def test_baseline_prefill_equals_masked_forward(family: Family, method: str):
    """Each 2025 baseline through the same pruned engine: every cut keeps exactly its plan's budget
    (a single cut: ``int(n * keep)``, as every other method), and the pruned prefill (before the LLM,
    at K, or PDrop's stages) equals the gated forward over the unpruned prompt with each cut's gate
    from its layer on."""
    engine = SparseEngine(family.model, method=method, keep=0.25, text="off")
    logits, index, valid, state = _pruned_prefill(family, method)
    features = family.model.encode_images(family.images)
    plan = engine.plan(features)
    assert sorted(state.cuts) == [layer for layer, _ in plan]
    fixed = features.fixed_counts()
    for layer, budgets in plan:
        assert state.cuts[layer].sum(-1).tolist() == [f + sum(b) for f, b in zip(fixed, budgets)]
    first = {"divprune": 0, "cdpruner": 0, "visionzip": 0}.get(method, family.sparse_layer)
    assert plan[0][0] == first
    if method != "pdrop":
        assert state.image_keep.sum(-1).tolist() == family.budgets(0.25)
    else:  # later stages choose among the earlier stage's tokens, and token-layers stay within the single cut's
        layers = [layer for layer, _ in plan]
        for a, b in zip(layers, layers[1:]):
            assert not (state.cuts[b] & ~state.cuts[a]).any()
        per_layer = engine.image_tokens_per_layer(features)
        single = [k * (len(per_layer[0]) - family.sparse_layer) for k in family.budgets(0.25)]
        tail = [sum(row[family.sparse_layer :]) for row in per_layer]
        assert all(t <= s for t, s in zip(tail, single)) and tail != [k * len(per_layer[0]) for k in family.budgets(0.25)]
    replaced = None
    if state.image_replacement is not None:  # VisionZip: merged contextual tokens replace their centres' features
        replaced = torch.cat([state.image_replacement[b, :c] for b, c in enumerate(family.counts)])
        assert not torch.equal(replaced, features.flat)
    gates = {layer: _policy(family, state.cuts[layer]) for layer in state.cuts}
    masked = _masked_logits(family, gates, features_flat=replaced)
    expected = masked.gather(1, index[..., None].expand(-1, -1, masked.shape[-1]))
    diff = (expected - logits)[valid].abs().max().item()
    assert diff <= ATOL, diff


# the baselines decode with every generated token (text=off)
@pytest.mark.parametrize(
    "method,text", [(m, t) for m in METHODS for t in ("off", "learned", 0.5)] + [(m, "off") for m in BASELINES] + [("divprune", 0.5)]
)
def test_cache_equals_no_cache(family: Family, method: str, text):
    engine = SparseEngine(family.model, method=method, keep=0.25, text=text)
    args = (family.input_ids, family.attention_mask, family.images)
    # fed tokens: varied text tokens (no special ids), so the text decisions vary too
    fed = torch.randint(3, 60, (3, NEW_TOKENS), generator=torch.Generator().manual_seed(2))
    cached, _, with_cache = _run(engine, *args, fed, True)
    uncached, _, without = _run(engine, *args, fed, False)
    assert torch.equal(with_cache.image_keep, without.image_keep)
    assert with_cache.text_kept == without.text_kept
    diff = (cached - uncached).abs().max().item()
    assert diff <= ATOL, diff
    if text == "learned":  # the decisive text predictor drops some fed tokens, not all
        decisions = [d for step in with_cache.text_kept for d in step]
        assert 0 < sum(decisions) < len(decisions), decisions
    a = engine.generate(*args[:2], max_new_tokens=NEW_TOKENS, pad_token_id=family.pad_token_id, use_cache=True, **args[2])
    b = engine.generate(*args[:2], max_new_tokens=NEW_TOKENS, pad_token_id=family.pad_token_id, use_cache=False, **args[2])
    assert a.sequences.tolist() == b.sequences.tolist()
    assert a.text_tokens_kept == b.text_tokens_kept


def test_no_cache_step_equals_masked_forward_with_text_decisions(family: Family):
    """DynamicVLM's own gated forward in ``generate`` mode (its top-k of the image predictor, its text
    threshold from the first fed token on) over prompt + fed tokens: the engine's no-cache step."""
    engine = SparseEngine(family.model, method="dynamic", keep=0.25, text="learned")
    fed = torch.randint(3, 60, (3, 7), generator=torch.Generator().manual_seed(1))
    logits, _, state = _run(engine, family.input_ids, family.attention_mask, family.images, fed, False, steps=7)
    ids = torch.cat([family.input_ids, fed[:, :6]], 1)
    mask = torch.cat([family.attention_mask, torch.ones_like(fed[:, :6])], 1)
    with torch.no_grad():
        masked = family.model(ids, mask, mode="generate", generated_from=family.input_ids.shape[1], keep=0.25,
                              **family.images)
    assert torch.equal(masked.image_keep.bool(), state.image_keep)
    diff = (logits[:, -1] - masked.logits[:, -1].float()).abs().max().item()
    assert diff <= ATOL, diff


def test_cache_holds_exactly_the_counted_tokens(family: Family):
    engine = SparseEngine(family.model, method="dynamic", keep=0.25, text=0.5)
    _, state = engine.start(family.input_ids, family.attention_mask, **family.images)
    for _ in range(6):
        engine.step(state, torch.full((3,), 7))
    dense, sparse = state.cache.token_counts()
    prompt = family.attention_mask.sum(-1).tolist()
    assert dense == [p + 6 for p in prompt]
    # each sample: its own image tokens cut to int(n_b * keep), 6 fed tokens at rate 0.5 -> 3 kept
    assert sparse == [p - c + k + 3 for p, c, k in zip(prompt, family.counts, family.budgets(0.25))]
    valid = state.cache.valid
    assert valid[0].sum(-1).tolist() == dense and valid[1].sum(-1).tolist() == sparse


def test_fastv_keeps_the_image_tokens_hf_eager_attention_ranks_highest(family: Family):
    """FastV recomputes q/k of layer K-1 (with the family's q/k norms and M-RoPE): its ranking is the
    last prompt token's attention that HF's eager attention reports, mean over heads, per sample."""
    eager = family.adapter.model_class().from_pretrained(family.path, attn_implementation="eager").eval()
    with torch.no_grad():
        attentions = eager(**family.inputs, output_attentions=True).attentions
    score = attentions[family.sparse_layer - 1][:, :, -1].mean(1)  # (B, N): left padding, last column
    engine = SparseEngine(family.model, method="fastv", keep=0.25, text="off")
    state = engine.start(family.input_ids, family.attention_mask, **family.images)[1]
    for b, count in enumerate(family.counts):
        image = family.input_ids[b] == family.image_token_id
        newline = family.newlines[b] if family.newlines else torch.zeros(count, dtype=torch.bool)
        droppable = (~newline).nonzero()[:, 0]  # newlines are kept whatever their score
        top = score[b][image][droppable].topk(num_kept(len(droppable), 0.25)).indices
        expected = torch.cat([droppable[top], newline.nonzero()[:, 0]]).sort().values
        assert state.image_keep[b, :count].nonzero()[:, 0].tolist() == expected.tolist()


# -- 6. batch == per sample ------------------------------------------------------------------------
# (cache == no cache is checked above, so the baselines' batching is checked with the cache only)
@pytest.mark.parametrize("method,use_cache", [(m, c) for m in ("dynamic", "fastv") for c in (True, False)] + [(m, True) for m in BASELINES])
def test_batch_equals_per_sample(family: Family, method: str, use_cache: bool):
    engine = SparseEngine(family.model, method=method, keep=0.25, text="learned" if method in ("dynamic", "fastv") else "off")
    batch = engine.generate(family.input_ids, family.attention_mask, max_new_tokens=NEW_TOKENS,
                            pad_token_id=family.pad_token_id, use_cache=use_cache, **family.images)
    logits, _, _ = _run(engine, family.input_ids, family.attention_mask, family.images, batch.sequences, use_cache)
    for i, count in enumerate(family.counts):
        ids, mask, images = family.sample(i)
        alone = engine.generate(ids, mask, max_new_tokens=NEW_TOKENS, pad_token_id=family.pad_token_id,
                                use_cache=use_cache, **images)
        assert alone.sequences[0].tolist() == batch.sequences[i].tolist()
        assert alone.image_keep.shape[1] == count
        assert torch.equal(alone.image_keep[0].nonzero(), batch.image_keep[i, :count].nonzero())
        assert alone.text_tokens_kept[0] == batch.text_tokens_kept[i]
        assert alone.kv_tokens_sparse_layer[0] == batch.kv_tokens_sparse_layer[i]
        own, _, _ = _run(engine, ids, mask, images, batch.sequences[i : i + 1], use_cache)
        diff = (own[0] - logits[i]).abs().max().item()
        assert diff <= ATOL, (i, diff)


# -- 7. FLOPs --------------------------------------------------------------------------------------
def _counted(fn) -> int:
    """FlopCounterMode's count, with SDPA on its math backend: on CPU the fused kernel has no FLOP
    formula (counts 0), the math backend runs the two bmm that it counts."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        fn()
    return counter.get_total_flops()


def test_vision_flops_equal_flop_counter(family: Family):
    features = family.model.encode_images(family.images)
    counted = _counted(lambda: family.model.encode_images(family.images))
    assert counted == family.adapter.vision_flops(family.hf.config, features)


@pytest.mark.parametrize("method", ["dense", "dynamic", "fastv"])
def test_prefill_flops_equal_flop_counter(family: Family, method: str):
    """The whole prefill (vision tower included) of the padded batch: layers < K on every padded
    column, layers >= K on the widest sample's kept columns (what the engine really runs)."""
    engine = SparseEngine(family.model, method=method, keep=0.25, text="off")
    counted = _counted(lambda: engine.start(family.input_ids, family.attention_mask, **family.images))
    features = family.model.encode_images(family.images)
    shape = flops.DecoderShape.from_config(family.model.text_config)
    batch, length = family.input_ids.shape
    kept = length if method == "dense" else max(length - c + k for c, k in zip(family.counts, family.budgets(0.25)))
    extra = {"dense": 0, "fastv": flops.fastv_score_flops(shape, length, batch),
             "dynamic": flops.image_predictor_flops(shape.hidden, family.model.predictor_config, features.most, batch)}
    expected = flops.prefill_flops(shape, family.sparse_layer, length, kept, batch=batch, extra=extra[method])
    assert counted == expected + family.adapter.vision_flops(family.hf.config, features)


@pytest.mark.parametrize("budget", ["global", "per_view"])
@pytest.mark.parametrize("method", ["fastv", "dart", "divprune", "cdpruner", "pdrop"])
def test_selection_flops_equal_flop_counter(family: Family, method: str, budget: str):
    """What eval reports for one question alone (the decoder on each layer's tokens from the recorded
    cuts, plus ``flops.selection_flops`` with the groups' budgets) equals FlopCounterMode on the real
    prefill minus the vision tower: before the LLM, at K, staged, and per view (selection once per view)."""
    from dllava.eval.runner import _cuts

    if budget == "per_view" and not family.newlines:
        pytest.skip("single-view images: per_view equals global")
    ids, mask, images = family.sample(2)
    engine = SparseEngine(family.model, method=method, keep=0.25, text="off", budget=budget)
    vision = _counted(lambda: family.model.encode_images(images))
    counted = _counted(lambda: engine.start(ids, mask, **images)) - vision
    state = engine.start(ids, mask, **images)[1]
    result = engine.summarize(state, torch.zeros(1, 1, dtype=torch.long), [1])
    n, per_layer = result.image_tokens[0], result.image_tokens_per_layer[0]
    at = dict(_cuts(per_layer, n))  # what the answer file records
    rows, current = [], n
    for i in range(len(per_layer)):
        current = at.get(i, current)
        rows.append(current)
    shape = flops.DecoderShape.from_config(family.model.text_config)
    expected = flops.prefill_flops_layers(shape, [ids.shape[1] - n + t for t in rows]) + flops.selection_flops(
        method, shape, ids.shape[1], n, rows, engine.layer, result.instruction_tokens[0], result.image_group_budgets[0]
    )
    assert counted == expected


# -- 10. fused gated attention == eager, in the training forward -----------------------------------
def _train_step_grads(family: Family, attention: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Loss, logits and every parameter's gradient of one training-mode forward (Gumbel straight-through
    image decisions, same seed) with the gated softmax computed by ``attention``."""
    model = family.model
    valid = _valid(family)
    predicted_from_a_token = valid & torch.nn.functional.pad(valid[:, :-1], (1, 0))  # not from left padding
    labels = family.input_ids.masked_fill(~predicted_from_a_token, -100)
    previous, model.sparsity.attention = model.sparsity.attention, attention
    try:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        out = model(family.input_ids, family.attention_mask, labels=labels, mode="train", tau=1.0, **family.images)
        loss = out.lm_loss + out.budget_loss_vision
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    finally:
        model.sparsity.attention = previous
        model.zero_grad(set_to_none=True)
    return loss.detach(), out.logits.detach(), grads


def test_fused_training_forward_equals_eager(family: Family):
    """Every gated layer through SDPA's log-gate bias: the loss, the logits at real tokens and the
    gradient of every parameter (predictors included) equal the eager reference's (fp32)."""
    loss, logits, grads = _train_step_grads(family, "sdpa")
    ref_loss, ref_logits, ref_grads = _train_step_grads(family, "eager")
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits[_valid(family)], ref_logits[_valid(family)], rtol=1e-4, atol=1e-5)
    assert grads.keys() == ref_grads.keys() and any(n.startswith("image_predictor") for n in grads)
    for name, ref in ref_grads.items():  # (+ atol: gradients that are 0 in exact arithmetic, e.g. key biases)
        assert float((grads[name] - ref).abs().max()) <= 1e-3 * float(ref.abs().max()) + 1e-7, name


# -- 11. multi-view images (LLaVA-NeXT / OneVision): newlines and budget conventions -----------------
def _hf_views(family: Family) -> list[torch.Tensor]:
    """Per sample, each image token's view as HF's own ``pack_image_features`` places it: pack one-hot
    features (view v = base 0, then crops row-major, sets channel v of its patches) with the newline
    vector all -1; a token's view is its largest channel (OneVision's bilinear shrinking blends
    neighbouring views: the one with the largest weight, the first on a tie), -1 at newlines."""
    config = family.hf.config
    side = config.vision_config.image_size // config.vision_config.patch_size
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    sizes = family.images["image_sizes"]
    maps = []
    for size in sizes.tolist():
        n = image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
        maps.append(torch.eye(n)[:, None, :].expand(n, side * side, n).contiguous())
    kwargs = {} if family.name == "llava_next" else {"vision_aspect_ratio": config.vision_aspect_ratio}
    if family.name == "llava_next":
        kwargs["vision_feature_select_strategy"] = config.vision_feature_select_strategy
    views = []
    for size, features in zip(sizes, maps):
        n = features.shape[-1]
        packed, _ = family.hf.model.pack_image_features([features], size[None], image_newline=-torch.ones(n), **kwargs)
        views.append(torch.where(packed[0][:, 0] < 0, -1, packed[0].argmax(-1)))
    return views


def _needs_views(family: Family) -> None:
    if not family.newlines:
        pytest.skip("single-view images: no newline tokens, per_view equals global (test_per_view_is_global_for_one_view)")


@pytest.mark.parametrize("budget", ["global", "per_view"])
@pytest.mark.parametrize("method", METHODS + BASELINES)
def test_newline_tokens_survive_every_method(family: Family, method: str, budget: str):
    _needs_views(family)
    engine = SparseEngine(family.model, method=method, keep=0.1, text="off", budget=budget)
    state = engine.start(family.input_ids, family.attention_mask, **family.images)[1]
    for b, newline in enumerate(family.newlines):
        for layer, keep in state.cuts.items():  # at every cut (PyramidDrop: every stage)
            assert bool(keep[b, : newline.shape[0]][newline].all()), (method, b, layer)
        assert bool(state.image_keep[b, : newline.shape[0]][newline].all()), (method, b)
    if method in BASELINES:
        return  # the training part below is the learned method's
    # and in training: the Gumbel decisions never gate a newline (its gate stays 1)
    family.model.sparsity.budget = budget
    try:
        torch.manual_seed(0)
        with torch.no_grad():
            out = family.model(family.input_ids, family.attention_mask, mode="train", tau=1.0, **family.images)
    finally:
        family.model.sparsity.budget = "global"
    for b, newline in enumerate(family.newlines):
        assert bool((out.image_keep[b, : newline.shape[0]][newline] == 1).all())
        assert 0 < float(out.image_keep[b, : newline.shape[0]][~newline].mean()) < 1  # the others are decided


def test_views_match_hf_packing(family: Family):
    """dllava's view of every image token (ImageFeatures.views) equals where HF's packing puts each view."""
    _needs_views(family)
    features = family.model.encode_images(family.images)
    ours = torch.split(features.views, features.counts)
    for mine, hf in zip(ours, _hf_views(family)):
        assert mine.tolist() == hf.tolist()


@pytest.mark.parametrize("method", ["dynamic", "fastv", "random", "dart", "divprune", "cdpruner", "visionzip"])
def test_each_view_keeps_its_share_under_per_view(family: Family, method: str):
    _needs_views(family)
    engine = SparseEngine(family.model, method=method, keep=0.25, text="off", budget="per_view")
    state = engine.start(family.input_ids, family.attention_mask, **family.images)[1]
    for b, views in enumerate(_hf_views(family)):
        kept = state.image_keep[b, : views.shape[0]]
        for view in views.unique().tolist():
            member = views == view
            expected = int(member.sum()) if view < 0 else num_kept(int(member.sum()), 0.25)
            assert int(kept[member].sum()) == expected, (b, view)
    # and the pruned prefill under per_view still equals the masked forward with its decisions (from
    # each cut's layer on; VisionZip's merged features in place)
    state.cache = None
    logits, index, valid = engine._sequence_forward(state, every_position=True)
    replaced = None
    if state.image_replacement is not None:
        replaced = torch.cat([state.image_replacement[b, :c] for b, c in enumerate(family.counts)])
    masked = _masked_logits(family, {layer: _policy(family, keep) for layer, keep in state.cuts.items()}, features_flat=replaced)
    expected = masked.gather(1, index[..., None].expand(-1, -1, masked.shape[-1]))
    assert (expected - logits)[valid].abs().max().item() <= ATOL


def test_per_view_is_global_for_one_view(family: Family):
    """Families whose images are one view: the two conventions make the same decisions."""
    if family.newlines:
        pytest.skip("multi-view family")
    one, two = (SparseEngine(family.model, method="dynamic", keep=0.25, text="off", budget=b) for b in ("global", "per_view"))
    a = one.start(family.input_ids, family.attention_mask, **family.images)[1]
    b = two.start(family.input_ids, family.attention_mask, **family.images)[1]
    assert torch.equal(a.image_keep, b.image_keep)
