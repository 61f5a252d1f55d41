"""CDPruner: relevance equals a direct computation, and the fast greedy DPP equals the greedy selection
computed with explicit determinants of the kernel restricted to the chosen set plus each candidate."""

import math

import pytest
import torch

from dllava.inference.methods import cdpruner


def cos(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def reference_relevance(image, instruction, image_valid, instruction_valid):
    """One row: -mean cosine to the valid instruction tokens, min-max normalised over valid image tokens."""
    text = [t for t, v in zip(instruction, instruction_valid) if v]
    out = [0.0] * len(image)
    slots = [i for i, v in enumerate(image_valid) if v]
    if not text:
        for i in slots:
            out[i] = 1.0
        return out
    raw = {i: -sum(cos(image[i], t) for t in text) / len(text) for i in slots}
    low, high = min(raw.values()), max(raw.values())
    for i in slots:
        out[i] = 1.0 if high == low else (raw[i] - low + 1e-6) / (high - low)
    return out


def reference_greedy(features, relevance, member, k):
    """Greedy MAP by brute force: each step adds the candidate maximising det(L[S + i, S + i]) (float64)."""
    n = len(features)
    L = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            similarity = 1.0 if i == j else cos(features[i], features[j])  # cos(f, f) = 1
            L[i, j] = relevance[i] * similarity * relevance[j]
    picked = []
    while len(picked) < k:
        choice, best = None, None
        for i in range(n):
            if not member[i] or i in picked:
                continue
            idx = torch.tensor(picked + [i])
            value = torch.linalg.det(L[idx][:, idx]).item()
            if best is None or value > best:
                choice, best = i, value
        picked.append(choice)
    return set(picked)


def random_rows(seed, rows=4, n=7, h=9):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(rows, n, h, generator=g)
    relevance = 0.3 + torch.rand(rows, n, generator=g)
    member = torch.ones(rows, n, dtype=torch.bool)
    member[1, 5:] = False
    member[2, [0, 3]] = False
    member[3, 1:] = False
    budgets = [n, 3, 4, 1]
    return features, relevance, member, budgets


@pytest.mark.parametrize("seed", range(8))
def test_fast_greedy_equals_explicit_determinant_greedy(seed):
    features, relevance, member, budgets = random_rows(seed)
    for k0 in range(8):  # every budget of the full row
        budgets[0] = k0
        got = cdpruner.select(features, relevance, member, budgets)
        assert got.sum(-1).tolist() == budgets
        for r in range(member.shape[0]):
            assert not (got[r] & ~member[r]).any()
            expected = reference_greedy(features[r].tolist(), relevance[r].tolist(), member[r].tolist(), budgets[r])
            assert set(torch.nonzero(got[r]).flatten().tolist()) == expected, (seed, r, budgets[r])


def test_exact_budget_past_zero_gains_takes_the_lowest_slots():
    # rank-1 features: after the first pick every gain is 0; the rest go to the lowest remaining slots
    features = torch.ones(1, 6, 4)
    relevance = torch.tensor([[0.2, 0.5, 0.3, 0.9, 0.4, 0.1]])
    member = torch.ones(1, 6, dtype=torch.bool)
    member[0, 0] = False
    got = cdpruner.select(features, relevance, member, [3])
    assert set(torch.nonzero(got[0]).flatten().tolist()) == {3, 1, 2}
    assert cdpruner.select(features, relevance, member, [5])[0].tolist() == [False] + [True] * 5


def test_padding_is_never_chosen_even_with_the_largest_relevance():
    features, relevance, member, budgets = random_rows(2)
    relevance = relevance.clone()
    relevance[~member] = 100.0
    got = cdpruner.select(features, relevance, member, budgets)
    assert not (got & ~member).any() and got.sum(-1).tolist() == budgets


def test_relevance_matches_a_direct_computation():
    g = torch.Generator().manual_seed(4)
    B, n, m, h = 4, 6, 5, 8
    image, instruction = torch.randn(B, n, h, generator=g), torch.randn(B, m, h, generator=g)
    image_valid = torch.ones(B, n, dtype=torch.bool)
    image_valid[1, 4:] = False
    image_valid[3] = False
    image_valid[3, 2] = True  # one valid image token: constant relevance
    instruction_valid = torch.ones(B, m, dtype=torch.bool)
    instruction_valid[0, 3:] = False
    instruction_valid[2] = False  # no instruction at all
    got = cdpruner.relevance(image, instruction, image_valid, instruction_valid)
    assert got.dtype == torch.float32 and got.shape == (B, n)
    for b in range(B):
        expected = reference_relevance(image[b].tolist(), instruction[b].tolist(), image_valid[b].tolist(),
                                       instruction_valid[b].tolist())
        assert torch.allclose(got[b], torch.tensor(expected), atol=1e-5), b
    assert got[2].tolist() == [1.0] * n
    assert got[3].tolist() == [0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    # the least relevant valid token gets 1e-6 / spread, the most relevant about 1; padding 0
    assert got[0].min() > 0 and abs(got[0].max().item() - 1) < 1e-4 and got[1, 4:].tolist() == [0.0, 0.0]


def test_relevance_is_batch_independent_and_bf16_safe():
    g = torch.Generator().manual_seed(5)
    image, instruction = torch.randn(3, 6, 8, generator=g), torch.randn(3, 4, 8, generator=g)
    image_valid = torch.rand(3, 6, generator=g) < 0.8
    instruction_valid = torch.ones(3, 4, dtype=torch.bool)
    instruction_valid[1, 2:] = False
    together = cdpruner.relevance(image, instruction, image_valid, instruction_valid)
    for b in range(3):
        pad_i = torch.cat([image[b : b + 1], torch.randn(1, 3, 8, generator=g)], 1)
        pad_t = torch.cat([instruction[b : b + 1], torch.randn(1, 2, 8, generator=g)], 1)
        valid_i = torch.cat([image_valid[b : b + 1], torch.zeros(1, 3, dtype=torch.bool)], 1)
        valid_t = torch.cat([instruction_valid[b : b + 1], torch.zeros(1, 2, dtype=torch.bool)], 1)
        alone = cdpruner.relevance(pad_i, pad_t, valid_i, valid_t)
        assert torch.allclose(alone[0, :6], together[b], atol=1e-6) and alone[0, 6:].eq(0).all()
    low = cdpruner.relevance(image.bfloat16(), instruction.bfloat16(), image_valid, instruction_valid)
    assert low.dtype == torch.float32


def test_instruction_less_row_selects_by_diversity_alone():
    features, _, member, budgets = random_rows(6)
    image_valid = member
    relevance = cdpruner.relevance(features, features[:, :2], image_valid, torch.zeros(4, 2, dtype=torch.bool))
    got = cdpruner.select(features, relevance, member, budgets)
    for r in range(4):
        expected = reference_greedy(features[r].tolist(), [1.0] * 7, member[r].tolist(), budgets[r])
        assert set(torch.nonzero(got[r]).flatten().tolist()) == expected


def test_batched_equals_one_row_at_a_time_with_extra_padding():
    features, relevance, member, budgets = random_rows(7)
    batched = cdpruner.select(features, relevance, member, budgets)
    g = torch.Generator().manual_seed(1)
    for r in range(member.shape[0]):
        f = torch.cat([features[r : r + 1], torch.randn(1, 3, features.shape[-1], generator=g)], 1)
        rel = torch.cat([relevance[r : r + 1], torch.full((1, 3), 50.0)], 1)
        m = torch.cat([member[r : r + 1], torch.zeros(1, 3, dtype=torch.bool)], 1)
        alone = cdpruner.select(f, rel, m, [budgets[r]])
        assert torch.equal(alone[0, :7], batched[r]) and not alone[0, 7:].any()


def test_rejects_budgets_outside_the_eligible_slots():
    features, relevance, member, _ = random_rows(0)
    with pytest.raises(ValueError, match="row 3"):
        cdpruner.select(features, relevance, member, [1, 1, 1, 2])


def test_optional_theta_reweighting():
    g = torch.Generator().manual_seed(3)
    image, instruction = torch.randn(2, 5, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    valid_i, valid_t = torch.ones(2, 5, dtype=torch.bool), torch.ones(2, 3, dtype=torch.bool)
    valid_i[1, 3:] = False
    plain = cdpruner.relevance(image, instruction, valid_i, valid_t)
    weighted = cdpruner.relevance(image, instruction, valid_i, valid_t, theta=0.5)
    for b in range(2):
        for i in range(5):
            expected = math.exp(0.5 * plain[b, i].item()) if valid_i[b, i] else 0.0  # alpha = 0.5 / (2 * 0.5)
            assert abs(weighted[b, i].item() - expected) < 1e-6
    with pytest.raises(ValueError):
        cdpruner.relevance(image, instruction, valid_i, valid_t, theta=1.0)
