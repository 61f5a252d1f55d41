"""Output-side policies: exact budgets, the same decisions with and without cache, and each eviction rule
against a direct re-statement of it."""
import random

import pytest
import torch

from dllava.inference.cache import SPARSE
from dllava.inference.engine import SparseEngine
from dllava.inference.text_policies import (
    TextMembership,
    check_text_policy,
    decide_newest,
    evict_candidate,
    text_budget,
    text_rate_keep,
)
from tests.inference.test_engine import PAD, _dynamic, _prompts

POLICIES = ["learned", "off", 0.5, "random", "streaming", "h2o"]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return _dynamic(tiny_model_dir)


def _decode(engine, ids, mask, pixels, steps, use_cache):
    """Greedy decoding by hand, returning the request state as well (generate() keeps it private)."""
    logits, state = engine.start(ids, mask, pixels, use_cache=use_cache)
    tokens = []
    for _ in range(steps):
        token = logits.argmax(-1)
        tokens.append(token)
        logits = engine.step(state, token)
    return torch.stack(tokens, 1), state


# -- the rules, without a model -------------------------------------------------------------------
def test_budget_is_the_structured_pattern_count():
    for share in (0.5, 0.3, 0.75, 1.0):
        for t in range(40):
            assert text_budget(t, share) == sum(text_rate_keep(s, share) for s in range(t + 1))


@pytest.mark.parametrize("policy", ["random", "streaming", "h2o"])
@pytest.mark.parametrize("share", [0.5, 0.3])
def test_budget_policies_keep_exactly_the_budget_after_every_step(policy, share):
    members = TextMembership(batch=2)
    generator = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    for t in range(60):
        members.attention[0].append(rng.random())
        members.attention[1].append(rng.random())
        decide_newest(policy, members, t, None, share, 4, generator)
        for b in range(2):
            assert sum(members.alive[b]) == text_budget(t, share)
            assert members.staying_after[b][t] == text_budget(t, share)


def test_streaming_keeps_the_sinks_and_the_most_recent_tokens():
    members = TextMembership(batch=1)
    generator = torch.Generator()
    for t in range(40):
        decide_newest("streaming", members, t, None, 0.5, 3, generator)
    staying = members.staying(0)
    assert len(staying) == 20
    assert staying[:3] == [1, 3, 5]  # the first tokens the budget let in (0.5: every other) are the sinks
    assert staying[3:] == list(range(40 - 17, 40))  # then a window of the 17 most recent


def test_h2o_evicts_the_least_attended_non_recent_token_like_a_direct_loop():
    rng = random.Random(1)
    share, steps = 0.5, 50
    members = TextMembership(batch=1)
    alive, totals = [], []  # the reference: its own bookkeeping
    for t in range(steps):
        row = [rng.random() if (j == t or alive[j]) else 0.0 for j in range(t + 1)]
        totals = [a + b for a, b in zip(totals + [0.0], row)]
        members.attention[0] = list(totals)
        decide_newest("h2o", members, t, None, share, 0, torch.Generator())
        alive.append(True)
        budget = text_budget(t, share)
        while sum(alive) > budget:
            staying = [j for j in range(t + 1) if alive[j]]
            protected = set(staying[len(staying) - budget // 2 :]) if budget // 2 else set()
            unprotected = [j for j in staying if j not in protected]
            alive[min(unprotected, key=lambda j: (totals[j], j))] = False
        assert members.alive[0] == alive, t


def test_evicting_with_no_budget_drops_the_newest():
    for policy in ("random", "streaming", "h2o"):
        assert evict_candidate(policy, [7], 0, [0.0] * 8, 4, torch.Generator()) == 7


def test_bad_text_policies_name_the_choices():
    with pytest.raises(ValueError, match="h2o"):
        check_text_policy("h20")
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        check_text_policy(1.5)


# -- the engine ----------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", POLICIES)
def test_cached_and_no_cache_decoding_make_the_same_decisions(model, policy):
    ids, mask, pixels = _prompts(model.llava.config)
    engine = SparseEngine(model, method="dynamic", keep=0.25, text=policy, text_keep=0.5, sinks=2)
    cached_tokens, cached = _decode(engine, ids, mask, pixels, 14, use_cache=True)
    plain_tokens, plain = _decode(engine, ids, mask, pixels, 14, use_cache=False)
    assert cached_tokens.tolist() == plain_tokens.tolist()
    assert cached.text.alive == plain.text.alive
    assert cached.text.computing == plain.text.computing
    for a, b in zip(cached.text.attention, plain.text.attention):  # h2o: cache-stored vs recomputed keys
        assert a == pytest.approx(b, abs=1e-5)
    fed = cached.fed
    if policy in ("random", "streaming", "h2o", 0.5):
        assert all(sum(row) == text_budget(fed - 1, 0.5) for row in cached.text.alive)
    # the sparse layers hold the pruned prompt plus exactly the staying tokens
    prompt_sparse = [int(m) - 64 + 16 for m in mask.sum(-1).tolist()]
    assert cached.cache.token_counts()[1] == [p + sum(row) for p, row in zip(prompt_sparse, cached.text.alive)]


def test_evicted_slots_are_reused_so_the_cache_stays_at_its_budget(model):
    ids, mask, pixels = _prompts(model.llava.config)
    steps = 40
    sizes = {}
    for policy in ("off", "h2o"):
        engine = SparseEngine(model, method="dynamic", keep=0.25, text=policy, text_keep=0.5)
        _, state = _decode(engine, ids, mask, pixels, steps, use_cache=True)
        sizes[policy] = max(state.cache.length[SPARSE])
        slots = [s for s in state.text.slots[0] if s >= 0]
        assert len(slots) == len(set(slots)) == sum(state.text.alive[0])  # one slot per staying token
    longest_prompt = int(mask.sum(-1).max()) - 64 + 16
    assert sizes["off"] == longest_prompt + steps
    assert sizes["h2o"] <= longest_prompt + steps // 2 + 1


def test_generate_reports_the_tokens_each_step_computed_with(model):
    ids, mask, pixels = _prompts(model.llava.config)
    engine = SparseEngine(model, method="dynamic", keep=0.25, text="streaming", text_keep=0.5)
    result = engine.generate(ids, mask, pixels, max_new_tokens=12, pad_token_id=PAD)
    for fed, kept, computing in zip(result.text_tokens_fed, result.text_tokens_kept, result.text_computing):
        assert len(computing) == fed
        assert computing == [text_budget(t - 1, 0.5) + 1 for t in range(fed)]
        assert kept == text_budget(fed - 1, 0.5)
    assert result.prompt_tokens_sparse == [int(m) - 64 + 16 for m in mask.sum(-1).tolist()]


@pytest.mark.parametrize("policy", ["streaming", "h2o", 0.5])
def test_a_sample_that_stops_early_reports_what_it_would_alone(model, policy):
    """In a batch a finished sample keeps feeding pad tokens, which may evict more of its tokens: its
    counts are read as of its own last fed token, so they equal a run of that sample alone."""
    ids, mask, pixels = _prompts(model.llava.config, seed=3)
    engine = SparseEngine(model, method="dynamic", keep=0.25, text=policy, text_keep=0.5, sinks=2)
    free = engine.generate(ids, mask, pixels, max_new_tokens=16, pad_token_id=PAD)
    last = free.sequences[-1].tolist()
    eos = next(t for t in last if t != last[0])  # the last sample stops where its first run of tokens ends
    batch = engine.generate(ids, mask, pixels, max_new_tokens=16, eos_token_id=eos, pad_token_id=PAD)
    # the case under test: a sample stops after several fed tokens while another goes on
    assert any(1 < n < max(batch.lengths) for n in batch.lengths), batch.lengths
    for b in range(ids.shape[0]):
        alone = engine.generate(ids[b : b + 1], mask[b : b + 1], pixels[b : b + 1], max_new_tokens=16,
                                eos_token_id=eos, pad_token_id=PAD)
        assert alone.lengths[0] == batch.lengths[b]
        assert alone.text_tokens_kept[0] == batch.text_tokens_kept[b]
        assert alone.text_computing[0] == batch.text_computing[b]
