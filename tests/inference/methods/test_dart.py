"""DART: the batched selection equals a plain loop re-statement of the pivot rule, with exact budgets."""

import math

import pytest
import torch

from dllava.inference.methods import dart


def cos(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def reference(image, image_norm, text, text_norm, text_valid, member, budget, image_pivots=4, text_pivots=4):
    """One row of DART with pivots counted in the budget, written as plainly as possible."""
    if budget == 0:
        return set()
    slots = [i for i, m in enumerate(member) if m]
    by_norm = sorted(slots, key=lambda i: (-image_norm[i], i))
    image_pivot = by_norm[: min(image_pivots, budget)]
    words = [j for j, v in enumerate(text_valid) if v]
    text_pivot = sorted(words, key=lambda j: (-text_norm[j], j))[:text_pivots]
    pivots = [image[i] for i in sorted(image_pivot)] + [text[j] for j in sorted(text_pivot)]
    rest = budget - len(image_pivot)
    quotas = [rest // len(pivots) + (1 if p < rest % len(pivots) else 0) for p in range(len(pivots))]
    kept = set(image_pivot)
    for vector, quota in zip(pivots, quotas):
        candidates = [i for i in slots if i not in kept]
        least_similar = sorted(candidates, key=lambda i: (cos(vector, image[i]), i))
        kept.update(least_similar[:quota])
    return kept


def random_rows(seed, rows=6, n=24, m=7, h=5):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(rows, n, h, generator=g)
    image_norm = torch.rand(rows, n, generator=g)
    text = torch.randn(rows, m, h, generator=g)
    text_norm = torch.rand(rows, m, generator=g)
    text_valid = torch.ones(rows, m, dtype=torch.bool)
    text_valid[1, 2:] = False  # fewer text tokens than text pivots
    text_valid[2] = False  # no text at all
    text_valid[3, :2] = False  # left padding
    member = torch.rand(rows, n, generator=g) < 0.8
    member[0] = True
    member[4, 18:] = False
    counts = member.sum(-1).tolist()
    budgets = [13, 9, 5, 2, 0, counts[5]]  # 13 - 4 = 9 over 8 pivots, budget < pivots, all members
    return image, image_norm, text, text_norm, text_valid, member, budgets


def check(out, args, budgets, **pivots):
    image, image_norm, text, text_norm, text_valid, member, _ = args
    assert out.sum(-1).tolist() == budgets and not (out & ~member).any()
    for r in range(member.shape[0]):
        expected = reference(image[r].tolist(), image_norm[r].tolist(), text[r].tolist(), text_norm[r].tolist(),
                             text_valid[r].tolist(), member[r].tolist(), budgets[r], **pivots)
        assert set(torch.nonzero(out[r]).flatten().tolist()) == expected, (r, budgets[r])


@pytest.mark.parametrize("seed", range(5))
def test_matches_the_plain_loop(seed):
    args = random_rows(seed)
    budgets = args[-1]
    check(dart.select(*args), args, budgets)


@pytest.mark.parametrize("budget", [1, 3, 4, 5, 8, 12, 16, 17, 20])
def test_every_budget_of_one_row(budget):
    args = random_rows(7)
    last = args[5][5].sum().item()
    budgets = [budget, min(budget, 9), min(budget, 5), min(budget, 2), 0, min(budget, last)]
    check(dart.select(*args[:-1], budgets), args, budgets)


@pytest.mark.parametrize("pivots", [(1, 0), (2, 3), (6, 1)])
def test_other_pivot_counts(pivots):
    args = random_rows(3)
    budgets = args[-1]
    out = dart.select(*args, image_pivots=pivots[0], text_pivots=pivots[1])
    check(out, args, budgets, image_pivots=pivots[0], text_pivots=pivots[1])


def test_pivots_are_kept_and_ties_go_to_the_lowest_slot():
    image, _, text, text_norm, text_valid, _, _ = random_rows(2)
    image, text, text_norm, text_valid = image[:1], text[:1], text_norm[:1], text_valid[:1]
    member = torch.ones(1, 24, dtype=torch.bool)
    flat = torch.ones(1, 24)  # all key norms equal: the image pivots are slots 0-3
    out = dart.select(image, flat, text, text_norm, text_valid, member, [3])
    assert torch.nonzero(out[0]).flatten().tolist() == [0, 1, 2]
    out = dart.select(image, flat, text, text_norm, text_valid, member, [12])
    assert out[0, :4].all() and out.sum().item() == 12


def test_padding_is_never_chosen_and_bf16_works():
    image, image_norm, text, text_norm, text_valid, member, budgets = random_rows(4)
    image_norm = torch.where(member, image_norm, torch.full_like(image_norm, 1e3))  # padding with huge norms
    out = dart.select(image.bfloat16(), image_norm.bfloat16(), text.bfloat16(), text_norm, text_valid, member, budgets)
    assert out.sum(-1).tolist() == budgets and not (out & ~member).any()


def test_batched_equals_one_row_at_a_time_with_extra_padding():
    image, image_norm, text, text_norm, text_valid, member, budgets = random_rows(8)
    batched = dart.select(image, image_norm, text, text_norm, text_valid, member, budgets)
    g = torch.Generator().manual_seed(0)
    for r in range(member.shape[0]):
        img = torch.cat([image[r : r + 1], torch.randn(1, 3, 5, generator=g)], 1)
        img_norm = torch.cat([image_norm[r : r + 1], torch.full((1, 3), 9.0)], 1)
        mem = torch.cat([member[r : r + 1], torch.zeros(1, 3, dtype=torch.bool)], 1)
        txt = torch.cat([text[r : r + 1], torch.randn(1, 2, 5, generator=g)], 1)
        txt_norm = torch.cat([text_norm[r : r + 1], torch.full((1, 2), 9.0)], 1)
        valid = torch.cat([text_valid[r : r + 1], torch.zeros(1, 2, dtype=torch.bool)], 1)
        alone = dart.select(img, img_norm, txt, txt_norm, valid, mem, [budgets[r]])
        assert torch.equal(alone[0, :24], batched[r]) and not alone[0, 24:].any()


def test_rejects_budgets_outside_the_eligible_slots():
    args = random_rows(0)
    budgets = list(args[-1])
    budgets[4] = 19
    with pytest.raises(ValueError, match="row 4"):
        dart.select(*args[:-1], budgets)
