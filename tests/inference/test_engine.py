"""The pruned engine against HF's own generate, the masked training forward, and itself."""

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from dllava.inference.engine import SparseEngine
from dllava.sparse.model import DynamicLlava

PREDICTOR = {"d_model": 32, "heads": 4, "ff": 64, "layers": 2}
PAD = 0


def _dynamic(path, **sparsity):
    llava = LlavaForConditionalGeneration.from_pretrained(path)
    torch.manual_seed(1)  # the predictors' init: the same whichever tests ran before (seed 0 keeps every token)
    model = DynamicLlava(llava, {"layer": 1, **sparsity}, PREDICTOR).eval()
    with torch.no_grad():  # a decisive text predictor: about half of the tokens dropped
        for p in model.predictors().parameters():
            p.mul_(20)
    return model


def _prompts(config, lengths=(30, 22, 26), seed=0):
    """Left-padded prompts of different lengths: a few text tokens, the image block, more text."""
    g = torch.Generator().manual_seed(seed)
    n_image = config.image_seq_length
    rows = []
    for n_text in lengths:
        row = torch.randint(5, 40, (n_text,), generator=g)
        rows.append(torch.cat([row[:3], torch.full((n_image,), config.image_token_id), row[3:]]))
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    pixels = torch.randn(len(rows), 3, 96, 96, generator=g)
    return ids, mask, pixels


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return _dynamic(tiny_model_dir)


@pytest.mark.parametrize("method,keep", [("dense", 1.0), ("dynamic", 1.0)])
def test_generate_without_pruning_equals_hf_generate(tiny_model_dir, model, method, keep):
    hf = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    ids, mask, pixels = _prompts(hf.config)
    reference = hf.generate(
        input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=12, do_sample=False,
        eos_token_id=None, pad_token_id=PAD,
    )[:, ids.shape[1] :]
    engine = SparseEngine(model, method=method, keep=keep, text="off")
    ours = engine.generate(ids, mask, pixels, max_new_tokens=12, pad_token_id=PAD)
    assert ours.sequences.tolist() == reference.tolist()
    assert ours.image_tokens_kept == [64, 64, 64]


@pytest.mark.parametrize("method", ["dynamic", "fastv", "random"])
def test_pruned_prefill_equals_masked_forward(model, method):
    ids, mask, pixels = _prompts(model.llava.config)
    engine = SparseEngine(model, method=method, keep=0.25, text="off")
    state = engine.start(ids, mask, pixels)[1]
    state.cache = None  # rerun the same request without cache to read every position
    logits, index, valid = engine._sequence_forward(state, every_position=True)
    assert index.shape[1] == ids.shape[1] - 64 + 16  # int(64 * 0.25) image tokens survive
    policy = torch.ones(ids.shape, dtype=torch.float32)
    policy[ids == model.llava.config.image_token_id] = state.image_keep.flatten().float()
    with torch.no_grad():
        masked = _masked_logits(model, ids, mask, pixels, policy)
    expected = masked.gather(1, index[..., None].expand(-1, -1, masked.shape[-1]))
    diff = (expected - logits)[valid].abs().max().item()
    assert diff <= 1e-4, diff


def _masked_logits(model, ids, mask, pixels, policy):
    """The training-mode gated forward with the given hard decisions (no predictor involved)."""
    from dllava.sparse.model import causal_padding_mask, positions_from_mask

    lm = model.llava.model.language_model
    hidden = lm.embed_tokens(ids)
    image_mask = ids == model.llava.config.image_token_id
    hidden = hidden.masked_scatter(image_mask[..., None], model.image_features(pixels))
    positions = positions_from_mask(mask)
    rotary = lm.rotary_emb(hidden, positions)
    additive = causal_padding_mask(mask, hidden.dtype)
    for layer in lm.layers:
        hidden = layer(hidden, attention_mask=additive, position_embeddings=rotary, policy=policy, sparse_layer=model.sparsity.layer)
    return model.llava.lm_head(lm.norm(hidden))


@pytest.mark.parametrize("text", ["learned", 0.5])
def test_cache_and_no_cache_decoding_agree(model, text):
    ids, mask, pixels = _prompts(model.llava.config)
    engine = SparseEngine(model, method="dynamic", keep=0.25, text=text)
    cached = engine.generate(ids, mask, pixels, max_new_tokens=10, pad_token_id=PAD, use_cache=True)
    uncached = engine.generate(ids, mask, pixels, max_new_tokens=10, pad_token_id=PAD, use_cache=False)
    assert cached.sequences.tolist() == uncached.sequences.tolist()
    assert cached.text_tokens_kept == uncached.text_tokens_kept
    assert 0 < sum(cached.text_tokens_kept) < sum(cached.text_tokens_fed)  # some dropped, some kept


def test_no_cache_step_equals_masked_forward_with_text_decisions(model):
    ids, mask, pixels = _prompts(model.llava.config)
    engine = SparseEngine(model, method="dynamic", keep=0.25, text="learned")
    _, state = engine.start(ids, mask, pixels, use_cache=False)
    generated = torch.randint(5, 40, (3, 6), generator=torch.Generator().manual_seed(1))
    for column in generated.T:
        logits = engine.step(state, column)
    full_ids = torch.cat([ids, generated], 1)
    full_mask = torch.cat([mask, torch.ones_like(generated)], 1)
    with torch.no_grad():
        masked = model(full_ids, full_mask, pixels, mode="generate", generated_from=ids.shape[1], keep=0.25)
    assert torch.equal(masked.image_keep.bool(), state.image_keep)
    torch.testing.assert_close(logits, masked.logits[:, -1].float(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("use_cache", [True, False])
def test_batch_results_equal_per_sample_results(model, use_cache):
    ids, mask, pixels = _prompts(model.llava.config)
    engine = SparseEngine(model, method="dynamic", keep=0.25, text="learned")
    batch = engine.generate(ids, mask, pixels, max_new_tokens=8, pad_token_id=PAD, use_cache=use_cache)
    for i in range(3):
        row = ids[i, mask[i].bool()][None]
        alone = engine.generate(row, torch.ones_like(row), pixels[i : i + 1], max_new_tokens=8, pad_token_id=PAD, use_cache=use_cache)
        assert alone.sequences[0].tolist() == batch.sequences[i].tolist()
        assert alone.text_tokens_kept[0] == batch.text_tokens_kept[i]
        assert alone.kv_tokens_sparse_layer[0] == batch.kv_tokens_sparse_layer[i]


def test_cache_holds_exactly_the_counted_tokens(model):
    ids, mask, pixels = _prompts(model.llava.config)
    engine = SparseEngine(model, method="dynamic", keep=0.25, text=0.5)
    _, state = engine.start(ids, mask, pixels)
    for _ in range(6):
        engine.step(state, torch.full((3,), 7))
    dense, sparse = state.cache.token_counts()
    prompt = mask.sum(-1)
    assert dense == (prompt + 6).tolist()
    assert sparse == (prompt - 64 + 16 + 3).tolist()  # 6 fed tokens at rate 0.5 -> 3 kept
    valid = state.cache.valid
    assert valid[0].sum(-1).tolist() == dense and valid[1].sum(-1).tolist() == sparse


def test_fastv_keeps_the_image_tokens_hf_eager_attention_ranks_highest(tiny_model_dir, model):
    hf = LlavaForConditionalGeneration.from_pretrained(tiny_model_dir, attn_implementation="eager").eval()
    ids, mask, pixels = _prompts(hf.config)
    with torch.no_grad():
        attentions = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels, output_attentions=True).attentions
    image = ids == hf.config.image_token_id
    # K = 1: FastV ranks image tokens by the last token's attention in layer K-1 = 0, mean over heads
    score = attentions[0][:, :, -1].mean(1)[image].view(3, -1)
    expected = score.topk(16, dim=-1).indices.sort(-1).values
    engine = SparseEngine(model, method="fastv", keep=0.25, text="off")
    state = engine.start(ids, mask, pixels)[1]
    assert torch.equal(state.image_keep.nonzero()[:, 1].view(3, 16), expected)


def test_random_selection_is_seeded_and_sized(model):
    ids, mask, pixels = _prompts(model.llava.config)
    first = SparseEngine(model, method="random", keep=0.1, seed=3).start(ids, mask, pixels)[1].image_keep
    again = SparseEngine(model, method="random", keep=0.1, seed=3).start(ids, mask, pixels)[1].image_keep
    other = SparseEngine(model, method="random", keep=0.1, seed=4).start(ids, mask, pixels)[1].image_keep
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.sum(-1).tolist() == [6, 6, 6]


def test_sampling_is_seeded(model):
    ids, mask, pixels = _prompts(model.llava.config)
    engine = SparseEngine(model, method="dynamic", keep=0.25, text="learned")
    a = engine.generate(ids, mask, pixels, max_new_tokens=6, do_sample=True, top_p=0.9, top_k=20, seed=1)
    b = engine.generate(ids, mask, pixels, max_new_tokens=6, do_sample=True, top_p=0.9, top_k=20, seed=1)
    assert a.sequences.tolist() == b.sequences.tolist()


def test_bad_arguments_name_the_problem(model):
    with pytest.raises(ValueError, match="method"):
        SparseEngine(model, method="h2o")
    with pytest.raises(ValueError, match="keep"):
        SparseEngine(model, keep=1.5)
    with pytest.raises(ValueError, match="text"):
        SparseEngine(model, text="sometimes")


# -- the inputs each 2025 baseline reads, extracted here independently of the engine ----------------
def _instruction_rows(ids, mask, image_token_id):
    """Each row's prompt tokens after its image (the instruction), as python lists of column indices."""
    rows = []
    for row, valid in zip(ids.tolist(), mask.tolist()):
        last = max(i for i, t in enumerate(row) if t == image_token_id)
        rows.append([i for i in range(last + 1, len(row)) if valid[i]])
    return rows


def test_divprune_and_cdpruner_select_on_the_projected_features_and_the_questions_embeddings(model):
    from dllava.inference.methods import cdpruner, divprune

    ids, mask, pixels = _prompts(model.llava.config)
    features = model.image_features(pixels)  # (B, 64, H): what the projector gives
    embed = model.llava.model.language_model.embed_tokens
    for b, columns in enumerate(_instruction_rows(ids, mask, model.llava.config.image_token_id)):
        member = torch.ones(1, 64, dtype=torch.bool)
        words = embed(ids[b, columns])[None]
        relevance = cdpruner.relevance(features[b : b + 1], words, member, torch.ones(1, len(columns), dtype=torch.bool))
        expected = {
            "divprune": divprune.select(features[b : b + 1], member, [16])[0],
            "cdpruner": cdpruner.select(features[b : b + 1], relevance, member, [16])[0],
        }
        for method, keep in expected.items():
            state = SparseEngine(model, method=method, keep=0.25, text="off").start(ids, mask, pixels)[1]
            assert torch.equal(state.image_keep[b], keep), (method, b)
            assert sorted(state.cuts) == [0]  # before the LLM


def test_dart_reads_layer_k_minus_1_keys_and_the_normed_hidden_states_entering_k(model):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from dllava.inference.methods import dart
    from dllava.sparse.model import causal_padding_mask, positions_from_mask

    ids, mask, pixels = _prompts(model.llava.config)
    lm = model.llava.model.language_model
    k = model.sparsity.layer
    weight = lm.norm.weight.detach().clone()
    with torch.no_grad():  # a final norm that is not all ones, so normed and raw states rank differently
        lm.norm.weight.copy_(torch.rand(weight.shape, generator=torch.Generator().manual_seed(3)) + 0.05)
    try:
        _check_dart(model, ids, mask, pixels, lm, k)
    finally:
        with torch.no_grad():
            lm.norm.weight.copy_(weight)


def _check_dart(model, ids, mask, pixels, lm, k):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from dllava.inference.methods import dart
    from dllava.sparse.model import causal_padding_mask, positions_from_mask

    with torch.no_grad():  # the dense forward up to layer K, HF's own layers and rotary
        image_mask = ids == model.llava.config.image_token_id
        hidden = lm.embed_tokens(ids).masked_scatter(image_mask[..., None], model.image_features(pixels))
        rotary = lm.rotary_emb(hidden, positions_from_mask(mask))
        additive = causal_padding_mask(mask, hidden.dtype)
        for layer in lm.layers[: k - 1]:
            hidden = layer(hidden, attention_mask=additive, position_embeddings=rotary)
        attn = lm.layers[k - 1].self_attn
        normed = lm.layers[k - 1].input_layernorm(hidden)
        key = attn.k_proj(normed).view(*normed.shape[:2], -1, attn.head_dim).transpose(1, 2)
        _, key = apply_rotary_pos_emb(key, key, *rotary)
        norms = key.abs().sum((1, 3))
        hidden = lm.norm(lm.layers[k - 1](hidden, attention_mask=additive, position_embeddings=rotary))
    state = SparseEngine(model, method="dart", keep=0.25, text="off").start(ids, mask, pixels)[1]
    for b, columns in enumerate(_instruction_rows(ids, mask, model.llava.config.image_token_id)):
        image = image_mask[b].nonzero()[:, 0]
        expected = dart.select(
            hidden[b, image][None], norms[b, image][None], hidden[b, columns][None], norms[b, columns][None],
            torch.ones(1, len(columns), dtype=torch.bool), torch.ones(1, 64, dtype=torch.bool), [16],
        )[0]
        assert torch.equal(state.image_keep[b], expected), b


def test_visionzip_reads_clip_cls_attention_of_the_projected_layer(model):
    from dllava.inference.methods import visionzip

    ids, mask, pixels = _prompts(model.llava.config)
    config = model.llava.config
    tower = model.llava.model.vision_tower
    captured = {}
    layers = getattr(tower, "vision_model", tower).encoder.layers
    layer = layers[len(layers) + config.vision_feature_layer]  # -2: the second to last
    hook = layer.self_attn.register_forward_hook(lambda m, args, kwargs, out: captured.update(out=out), with_kwargs=True)
    previous = tower.config._attn_implementation
    tower.config._attn_implementation = "eager"  # HF's eager attention returns the weights
    try:
        with torch.no_grad():
            tower(pixels, output_attentions=True)
    finally:
        hook.remove()
        tower.config._attn_implementation = previous
    weights = captured["out"][1]  # (B, heads, 1 + 64, 1 + 64): HF's own attention probabilities
    cls = weights[:, :, 0, 1:].sum(1)
    keys = {}
    hook = layer.self_attn.k_proj.register_forward_hook(lambda m, a, out: keys.update(k=out))
    with torch.no_grad():
        tower(pixels)
    hook.remove()
    heads = layer.self_attn.num_heads
    key = keys["k"].view(*keys["k"].shape[:2], heads, -1).mean(2)[:, 1:]
    features = model.image_features(pixels)
    state = SparseEngine(model, method="visionzip", keep=0.25, text="off").start(ids, mask, pixels)[1]
    keep, merged = visionzip.select(cls, key, features, torch.ones(3, 64, dtype=torch.bool), [16] * 3)
    assert torch.equal(state.image_keep, keep)
    torch.testing.assert_close(state.image_replacement, merged)


def test_instruction_aware_predictor_decides_in_the_engine_as_in_the_model_forward(tiny_model_dir):
    """The engine's learned decisions with ``sparsity.image_predictor=instruction_aware`` (the prompt's
    text after the image entering layer K, gathered from the engine's own columns) equal DynamicVLM's
    own eval forward over the same left-padded batch, and each sample alone; a different question
    changes them."""
    model = _dynamic(tiny_model_dir, image_predictor="instruction_aware")
    with torch.no_grad():  # a cross-attention that contributes (it starts at zero)
        model.image_predictor.cross.proj.weight.normal_(0, 2.0, generator=torch.Generator().manual_seed(4))
    ids, mask, pixels = _prompts(model.llava.config)
    engine = SparseEngine(model, method="dynamic", keep=0.25, text="off")
    state = engine.start(ids, mask, pixels)[1]
    with torch.no_grad():
        forward = model(ids, mask, mode="eval", keep=0.25, pixel_values=pixels)
    assert torch.equal(state.image_keep, forward.image_keep.bool())
    for b in range(3):
        width = int(mask[b].sum())
        alone = engine.start(ids[b : b + 1, -width:], mask[b : b + 1, -width:], pixels[b : b + 1])[1]
        assert torch.equal(alone.image_keep[0], state.image_keep[b])
    other = ids.clone()
    other[:, -4:] = torch.randint(5, 40, (3, 4), generator=torch.Generator().manual_seed(5))  # another question
    changed = engine.start(other, mask, pixels)[1]
    assert not torch.equal(changed.image_keep, state.image_keep)
    original = _dynamic(tiny_model_dir)
    original.load_state_dict(model.state_dict(), strict=False)
    same_question = SparseEngine(original, method="dynamic", keep=0.25, text="off")
    a = same_question.start(ids, mask, pixels)[1].image_keep
    assert torch.equal(a, same_question.start(other, mask, pixels)[1].image_keep)  # the original cannot tell


def test_every_pyramid_drop_stage_of_a_request_is_cut_whatever_its_counts(tmp_path):
    """The cache's stage groups come from PyramidDrop's stage layout, not from one image size: at keep
    0.8 on a 6-layer decoder (K = 1) a 64-token image cuts at layers 1, 3 and 4 (a 1000-token image would
    skip layer 3), and every one of those cuts is applied, with and without cache, the cache holding
    exactly the planned tokens in every layer."""
    from dllava.model.tiny import save_tiny_llava

    path = save_tiny_llava(tmp_path / "six", seed=0, num_hidden_layers=6)
    model = _dynamic(path)
    ids, mask, pixels = _prompts(model.llava.config)
    engine = SparseEngine(model, method="pdrop", keep=0.8, text="off")
    features = model.encode_images({"pixel_values": pixels})
    plan = engine.plan(features)
    assert [layer for layer, _ in plan] == [1, 3, 4]
    _, state = engine.start(ids, mask, pixels)
    assert sorted(state.cuts) == [1, 3, 4]
    prompt = mask.sum(-1).tolist()
    per_layer = engine.image_tokens_per_layer(features)
    assert state.cache.layer_token_counts() == [[p - 64 + t for t in row] for p, row in zip(prompt, per_layer)]
    cached = engine.generate(ids, mask, pixels, max_new_tokens=4, pad_token_id=PAD, use_cache=True)
    uncached = engine.generate(ids, mask, pixels, max_new_tokens=4, pad_token_id=PAD, use_cache=False)
    assert cached.sequences.tolist() == uncached.sequences.tolist()
