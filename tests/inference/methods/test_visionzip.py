"""VisionZip: dominant top-k, strided contextual centres, key-similarity assignment and merged features
equal a plain loop re-statement; totals are exact; ``split`` reproduces the paper's 54/10, 108/20, 162/30."""

import math

import pytest
import torch

from dllava.inference.methods import visionzip


def reference(score, keys, features, member, budget, share=10 / 64):
    """One row: (kept slots, {centre slot: merged feature}), written as plainly as possible."""
    contextual = min(int(budget * share + 0.5), max(budget - 1, 0))
    dominant_count = budget - contextual
    slots = [i for i, m in enumerate(member) if m]
    dominant = sorted(slots, key=lambda i: (-score[i], i))[:dominant_count]
    remaining = [i for i in slots if i not in dominant]  # original order
    if contextual == 0:
        return set(dominant), {}
    step = max(1, len(remaining) // contextual)
    centres = remaining[::step][:contextual]

    def unit(v):
        norm = math.sqrt(sum(x * x for x in v))
        return [x / norm for x in v]

    assigned = {c: [] for c in centres}
    for i in remaining:
        if i in centres:
            continue
        best, best_sim = None, None
        for c in centres:
            sim = sum(a * b for a, b in zip(unit(keys[i]), unit(keys[c])))
            if best_sim is None or sim > best_sim:
                best, best_sim = c, sim
        assigned[best].append(i)
    merged = {}
    for c, members in assigned.items():
        if members:
            mean = [sum(features[i][h] for i in members) / len(members) for h in range(len(features[c]))]
            merged[c] = [a + b for a, b in zip(features[c], mean)]
        else:
            merged[c] = list(features[c])
    return set(dominant) | set(centres), merged


def random_rows(seed, rows=5, n=30, d=4, h=6):
    g = torch.Generator().manual_seed(seed)
    score = torch.rand(rows, n, generator=g)
    keys = torch.randn(rows, n, d, generator=g)
    features = torch.randn(rows, n, h, generator=g)
    member = torch.rand(rows, n, generator=g) < 0.85
    member[0] = True
    member[2, 20:] = False
    counts = member.sum(-1).tolist()
    budgets = [12, 1, counts[2], 0, 7]
    return score, keys, features, member, budgets


def check(score, keys, features, member, budgets, share):
    keep, merged = visionzip.select(score, keys, features, member, budgets, contextual_share=share)
    assert keep.sum(-1).tolist() == budgets and not (keep & ~member).any()
    assert merged.shape == features.shape and merged.dtype == features.dtype
    for r in range(member.shape[0]):
        kept, centres = reference(score[r].tolist(), keys[r].tolist(), features[r].tolist(), member[r].tolist(),
                                  budgets[r], share)
        assert set(torch.nonzero(keep[r]).flatten().tolist()) == kept, (r, budgets[r])
        for i in range(member.shape[1]):
            if i in centres:
                assert torch.allclose(merged[r, i], torch.tensor(centres[i]), atol=1e-5), (r, i)
            else:
                assert torch.equal(merged[r, i], features[r, i])


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("share", [10 / 64, 0.4])
def test_matches_the_plain_loop(seed, share):
    check(*random_rows(seed), share)


@pytest.mark.parametrize("budget", [1, 3, 4, 7, 10, 17, 25, 30])
def test_every_budget_of_a_full_row(budget):
    score, keys, features, member, _ = random_rows(3)
    budgets = [budget, 1, 0, 0, 0]
    check(score, keys, features, member, budgets, 0.3)


def test_split_reproduces_the_paper_and_rounds_half_up():
    assert [visionzip.split(t) for t in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]
    assert visionzip.split(0) == (0, 0) and visionzip.split(1) == (1, 0) and visionzip.split(3) == (3, 0)
    assert visionzip.split(4) == (3, 1)  # 0.625 rounds to 1
    assert visionzip.split(2, 1.0) == (1, 1)  # at least one dominant token
    for total in range(300):
        dominant, contextual = visionzip.split(total)
        assert dominant + contextual == total and abs(contextual - total * 10 / 64) <= 0.5
    with pytest.raises(ValueError):
        visionzip.split(5, 1.5)


def test_budget_equal_to_members_keeps_everything_unmerged():
    score, keys, features, member, _ = random_rows(1)
    full = member.sum(-1).tolist()
    keep, merged = visionzip.select(score, keys, features, member, full)
    assert torch.equal(keep, member) and torch.equal(merged, features)


def test_budget_one_is_the_top_scoring_slot():
    score, keys, features, member, _ = random_rows(2)
    keep, merged = visionzip.select(score, keys, features, member, [1] * 5)
    for r in range(5):
        best = max((i for i in range(30) if member[r, i]), key=lambda i: (score[r, i].item(), -i))
        assert torch.nonzero(keep[r]).flatten().tolist() == [best]
    assert torch.equal(merged, features)


def test_ties_go_to_the_lowest_slot_and_padding_never_counts():
    member = torch.tensor([[True, False, True, True, True, True, True, True]])
    score = torch.tensor([[0.5, 9.0, 0.5, 0.5, 0.1, 0.1, 0.1, 0.1]])
    keys = torch.ones(1, 8, 2)  # every key alike: everything joins the first centre
    features = torch.arange(16, dtype=torch.float32).reshape(1, 8, 2)
    keep, merged = visionzip.select(score, keys, features, member, [4], contextual_share=0.5)
    # 2 dominant: slots 0, 2 (ties by slot; padding slot 1 ignored); remaining 3..7, step 2 -> centres 3, 5
    assert torch.nonzero(keep[0]).flatten().tolist() == [0, 2, 3, 5]
    expected = features[0, 3] + features[0, [4, 6, 7]].mean(0)  # the centre plus the mean of its joiners
    assert torch.allclose(merged[0, 3], expected) and torch.equal(merged[0, 5], features[0, 5])


def test_bf16_features_come_back_in_bf16():
    score, keys, features, member, budgets = random_rows(4)
    keep, merged = visionzip.select(score.bfloat16(), keys.bfloat16(), features.bfloat16(), member, budgets)
    assert merged.dtype == torch.bfloat16 and keep.sum(-1).tolist() == budgets


def test_batched_equals_one_row_at_a_time_with_extra_padding():
    score, keys, features, member, budgets = random_rows(6)
    keep, merged = visionzip.select(score, keys, features, member, budgets, contextual_share=0.3)
    g = torch.Generator().manual_seed(2)
    for r in range(5):
        s = torch.cat([score[r : r + 1], torch.full((1, 3), 5.0)], 1)
        k = torch.cat([keys[r : r + 1], torch.randn(1, 3, 4, generator=g)], 1)
        f = torch.cat([features[r : r + 1], torch.randn(1, 3, 6, generator=g)], 1)
        m = torch.cat([member[r : r + 1], torch.zeros(1, 3, dtype=torch.bool)], 1)
        keep1, merged1 = visionzip.select(s, k, f, m, [budgets[r]], contextual_share=0.3)
        assert torch.equal(keep1[0, :30], keep[r]) and not keep1[0, 30:].any()
        assert torch.allclose(merged1[0, :30], merged[r], atol=1e-6) and torch.equal(merged1[0, 30:], f[0, 30:])


def test_rejects_budgets_outside_the_eligible_slots():
    score, keys, features, member, _ = random_rows(0)
    with pytest.raises(ValueError, match="row 2"):
        visionzip.select(score, keys, features, member, [1, 1, 21, 0, 0])
