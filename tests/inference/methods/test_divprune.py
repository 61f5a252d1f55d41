"""DivPrune's batched greedy max-min selection equals a plain Python re-statement of the rule."""

import math

import pytest
import torch

from dllava.inference.methods import divprune


def cosine_distance(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    return 1.0 - dot / (na * nb)


def reference(features, member, k):
    """Greedy max-min diversity over the eligible slots of one row, written as plainly as possible."""
    slots = [i for i, m in enumerate(member) if m]
    if k == 0:
        return set()
    d = {(i, j): cosine_distance(features[i], features[j]) for i in slots for j in slots}
    # first pick: the token whose nearest other token is farthest
    first, best = None, None
    for i in slots:
        others = [d[i, j] for j in slots if j != i]
        nearest = min(others) if others else math.inf
        if best is None or nearest > best:
            first, best = i, nearest
    picked = [first]
    while len(picked) < k:
        choice, best = None, None
        for i in slots:
            if i in picked:
                continue
            gap = min(d[i, j] for j in picked)
            if best is None or gap > best:
                choice, best = i, gap
        picked.append(choice)
    return set(picked)


def random_rows(seed, rows=5, n=11, h=6):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(rows, n, h, generator=g)
    member = torch.rand(rows, n, generator=g) < 0.75
    member[0] = True  # a full row
    member[1, 6:] = False  # trailing padding
    member[2] = False
    member[2, 3] = True  # a single eligible slot
    counts = member.sum(-1).tolist()
    budgets = [counts[0], 4, 1, 0, max(counts[4] - 2, 0)]
    return features, member, budgets


@pytest.mark.parametrize("seed", range(6))
def test_matches_the_plain_greedy_loop(seed):
    features, member, budgets = random_rows(seed)
    got = divprune.select(features, member, budgets)
    assert got.dtype == torch.bool and got.shape == member.shape
    for r in range(member.shape[0]):
        assert got[r].sum().item() == budgets[r]
        assert not (got[r] & ~member[r]).any()
        expected = reference(features[r].tolist(), member[r].tolist(), budgets[r])
        assert set(torch.nonzero(got[r]).flatten().tolist()) == expected


@pytest.mark.parametrize("k", range(1, 6))
def test_budget_sweep_on_one_row(k):
    features, member, _ = random_rows(11)
    got = divprune.select(features[:1], member[:1], [k])
    assert set(torch.nonzero(got[0]).flatten().tolist()) == reference(features[0].tolist(), [True] * 11, k)


def test_ties_go_to_the_lowest_slot():
    e0, e1 = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]
    features = torch.tensor([[e0, e0, e1, e1, e0]])
    member = torch.ones(1, 5, dtype=torch.bool)
    # every nearest-neighbour distance is 0 -> slot 0; then slot 2 (distance 1); then the lowest of the rest
    for k, expected in [(1, {0}), (2, {0, 2}), (3, {0, 1, 2}), (5, {0, 1, 2, 3, 4})]:
        got = divprune.select(features, member, [k])
        assert set(torch.nonzero(got[0]).flatten().tolist()) == expected == reference(features[0].tolist(), [True] * 5, k)


def test_bf16_input_and_padding_features_never_matter():
    features, member, budgets = random_rows(3)
    spoiled = features.clone()
    spoiled[~member] = 1e4  # padding slots are never eligible, whatever they hold
    assert torch.equal(divprune.select(spoiled, member, budgets), divprune.select(features, member, budgets))
    out = divprune.select(features.bfloat16(), member, budgets)
    assert out.sum(-1).tolist() == budgets


def test_batched_equals_one_row_at_a_time_with_extra_padding():
    features, member, budgets = random_rows(5)
    batched = divprune.select(features, member, budgets)
    g = torch.Generator().manual_seed(9)
    for r in range(member.shape[0]):
        f = torch.cat([features[r : r + 1], torch.randn(1, 4, features.shape[-1], generator=g)], 1)
        m = torch.cat([member[r : r + 1], torch.zeros(1, 4, dtype=torch.bool)], 1)
        alone = divprune.select(f, m, [budgets[r]])
        assert torch.equal(alone[0, : member.shape[1]], batched[r]) and not alone[0, member.shape[1] :].any()


def test_rejects_budgets_outside_the_eligible_slots():
    features, member, budgets = random_rows(0)
    with pytest.raises(ValueError, match="row 1"):
        divprune.select(features, member, [budgets[0], 7, 1, 0, 0])
    with pytest.raises(ValueError):
        divprune.select(features, member, [1, 1])
    with pytest.raises(ValueError, match="row 0"):
        divprune.select(features, member, [-1, 0, 0, 0, 0])
