"""PyramidDrop: the stage schedule meets the equal token-layer budget over a grid of shapes, follows the
paper's layout, and the ranking is a plain top-k."""

import itertools
from itertools import pairwise

import pytest
import torch

from dllava.inference.methods import pdrop


def per_layer(schedule, num_layers):
    """Image tokens seen by each layer from the schedule's first layer on, by direct lookup."""
    counts = []
    for layer in range(schedule[0][0], num_layers):
        counts.append([count for start, count in schedule if start <= layer][-1])
    return counts


GRID = list(itertools.product([1, 5, 64, 576, 2880], [0.01, 0.1, 128 / 576, 0.5, 0.9, 1.0], [4, 16, 28, 32, 40],
                              [0, 1, 2, 3, 15]))


@pytest.mark.parametrize("ratio", [0.5, 0.25, 1.0])
def test_schedule_meets_the_equal_budget_over_a_grid(ratio):
    for n, keep, num_layers, first_layer in GRID:
        if first_layer >= num_layers:
            continue
        plan = pdrop.schedule(n, keep, first_layer, num_layers, ratio=ratio)
        layers = [layer for layer, _ in plan]
        counts = [count for _, count in plan]
        assert layers[0] == first_layer and all(b > a for a, b in pairwise(layers)) and layers[-1] < num_layers
        assert all(b <= a for a, b in pairwise(counts)) and all(1 <= c <= n for c in counts)
        target = (num_layers - first_layer) * max(1, int(n * keep))
        spent = sum(per_layer(plan, num_layers))
        assert pdrop.token_layers(plan, num_layers) == spent
        longest = max(b - a for a, b in pairwise([*layers, num_layers]))
        assert spent <= target and target - spent < longest, (n, keep, num_layers, first_layer, plan)
        # the reported average is within one token of (and never above) the single-cut budget
        assert target / (num_layers - first_layer) - 1 < spent / (num_layers - first_layer) <= target / (num_layers - first_layer)


def test_default_layout_of_llava_1_5():
    plan = pdrop.schedule(576, 128 / 576, 2, 32)
    assert [layer for layer, _ in plan] == [2, 8, 16, 24]
    counts = [count for _, count in plan]
    assert pdrop.token_layers(plan, 32) == 30 * 128
    assert all(abs(b - a / 2) <= 2 for a, b in pairwise(counts))  # lambda = 0.5 up to rounding
    # the official configuration: [8, 16, 24] with 50 / 25 / 12.5 % of 576 averages 270 tokens over 32 layers
    assert pdrop.schedule(576, 270 / 576, 0, 32) == [(0, 576), (8, 288), (16, 144), (24, 72)]
    assert pdrop.default_stage_layers(2, 28) == [2, 7, 14, 21]
    assert pdrop.default_stage_layers(10, 32) == [10, 16, 24]
    assert pdrop.default_stage_layers(8, 32) == [8, 16, 24]


def test_explicit_stage_layers():
    plan = pdrop.schedule(576, 64 / 576, 2, 32, stage_layers=[4, 8, 12])
    assert [layer for layer, _ in plan] == [2, 4, 8, 12]
    assert pdrop.schedule(100, 0.5, 2, 32, stage_layers=[2, 20])[0][0] == 2
    assert pdrop.schedule(100, 0.5, 31, 32) == [(31, 50)]
    for bad in ([8, 4], [1, 8], [2, 32]):
        with pytest.raises(ValueError):
            pdrop.schedule(100, 0.5, 2, 32, stage_layers=bad)
    for args in ((0, 0.5, 2, 32), (10, 0.0, 2, 32), (10, 0.5, 32, 32)):
        with pytest.raises(ValueError):
            pdrop.schedule(*args)
    with pytest.raises(ValueError):
        pdrop.schedule(10, 0.5, 2, 32, ratio=0.0)


def reference_rank(score, member, k):
    slots = [i for i, m in enumerate(member) if m]
    return set(sorted(slots, key=lambda i: (-score[i], i))[:k])


@pytest.mark.parametrize("seed", range(4))
def test_rank_equals_a_direct_sort(seed):
    g = torch.Generator().manual_seed(seed)
    score = torch.randint(0, 6, (5, 20), generator=g).float()  # many ties
    member = torch.rand(5, 20, generator=g) < 0.7
    member[3] = False
    counts = member.sum(-1).tolist()
    budgets = [counts[0], counts[1] // 2, 1, 0, min(3, counts[4])]
    score[~member] = 100.0  # padding with the best scores is still never chosen
    got = pdrop.rank(score, member, budgets)
    assert got.sum(-1).tolist() == budgets
    for r in range(5):
        assert set(torch.nonzero(got[r]).flatten().tolist()) == reference_rank(score[r].tolist(), member[r].tolist(), budgets[r])
    for r in range(5):  # batched == one row at a time, with extra padding
        s = torch.cat([score[r : r + 1], torch.full((1, 4), 1e4)], 1)
        m = torch.cat([member[r : r + 1], torch.zeros(1, 4, dtype=torch.bool)], 1)
        alone = pdrop.rank(s, m, [budgets[r]])
        assert torch.equal(alone[0, :20], got[r]) and not alone[0, 20:].any()
    with pytest.raises(ValueError, match="row 3"):
        pdrop.rank(score, member, [0, 0, 0, 1, 0])


def test_rank_keeps_eligible_slots_with_nan_or_minus_inf_scores():
    score = torch.tensor([[float("-inf"), 2.0, float("nan"), 1.0]])
    member = torch.tensor([[True, False, True, True]])
    assert pdrop.rank(score, member, [3])[0].tolist() == [True, False, True, True]
