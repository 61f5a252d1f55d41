import pytest
import torch

from dllava.sparse.decisions import budget_loss, gumbel_keep, keep_ratio, threshold_keep, topk_keep


def test_gumbel_decisions_are_hard_with_soft_gradient():
    logits = torch.randn(4, 9, 2, requires_grad=True)
    kept = gumbel_keep(logits, tau=0.5)
    assert set(kept.unique().tolist()) <= {0.0, 1.0}
    kept.sum().backward()
    assert logits.grad.abs().sum() > 0


def test_gumbel_follows_the_logits_at_low_temperature():
    logits = torch.tensor([[[8.0, -8.0], [-8.0, 8.0]]]).expand(200, 2, 2)
    kept = gumbel_keep(logits, tau=0.1)
    assert kept[:, 0].mean() > 0.99 and kept[:, 1].mean() < 0.01


def test_topk_keeps_exactly_int_n_keep_highest_scores():
    logits = torch.zeros(2, 10, 2)
    logits[0, :, 0] = torch.arange(10.0)
    logits[1, :, 0] = -torch.arange(10.0)
    kept = topk_keep(logits, keep=0.25)  # int(10 * 0.25) = 2
    assert kept.sum(-1).tolist() == [2.0, 2.0]
    assert kept[0, 8:].sum() == 2 and kept[1, :2].sum() == 2


def test_threshold_and_ratio():
    logits = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [0.0, 0.0]]])
    kept = threshold_keep(logits)
    assert kept.tolist() == [[1.0, 0.0, 1.0, 0.0]]
    valid = torch.tensor([[True, True, True, False]])
    assert keep_ratio(kept, valid).item() == pytest.approx(2 / 3)


def test_budget_loss_averages_over_the_whole_batch():
    ratio = torch.tensor([0.5, 0.0])
    eligible = torch.tensor([True, False])
    assert budget_loss(ratio, 0.2, eligible).item() == pytest.approx((0.3**2) / 2)
    assert budget_loss(ratio, 0.2).item() == pytest.approx((0.3**2 + 0.2**2) / 2)


# -- budget groups (views) --------------------------------------------------------------------------
def _groups_case(seed: int):
    """Random scores over 3 rows of up to 40 slots, each slot in group 0..3 or -1 (always kept), with
    per-row padding."""
    g = torch.Generator().manual_seed(seed)
    score = torch.randn(3, 40, generator=g)
    groups = torch.randint(-1, 4, (3, 40), generator=g)
    valid = torch.arange(40)[None] < torch.tensor([[40], [25], [7]])
    return score, groups, valid


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("keep", [0.1, 0.25, 0.5, 1.0])
def test_top_per_group_equals_a_loop_over_groups(seed, keep):
    from dllava.sparse.decisions import num_kept, top_per_group

    score, groups, valid = _groups_case(seed)
    kept = top_per_group(score, groups, valid, keep)
    for b in range(3):
        expected = set()
        for g in range(-1, 4):
            slots = [i for i in range(40) if valid[b, i] and groups[b, i] == g]
            if g < 0:
                expected |= set(slots)
            elif slots:
                ranked = sorted(slots, key=lambda i: -float(score[b, i]))
                expected |= set(ranked[: num_kept(len(slots), keep)])
        assert set(kept[b].nonzero()[:, 0].tolist()) == expected


def test_one_group_is_the_plain_per_sample_budget():
    from dllava.sparse.decisions import top_per_group

    logits = torch.randn(3, 40, 2, generator=torch.Generator().manual_seed(0))
    valid = torch.arange(40)[None] < torch.tensor([[40], [25], [7]])
    plain = topk_keep(logits, 0.2, valid)
    grouped = topk_keep(logits, 0.2, valid, torch.where(valid, 0, -1))
    assert torch.equal(plain, grouped)
    assert torch.equal(top_per_group(logits[..., 0] - logits[..., 1], torch.where(valid, 0, -1), valid, 0.2), plain.bool())


def test_per_group_budget_error_averages_each_samples_groups():
    from dllava.sparse.decisions import budget_errors, group_keep_ratio

    kept = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
    groups = torch.tensor([[0, 0, 1, 1, -1, -1], [0, 0, 0, 0, 0, -1]])
    valid = torch.ones_like(kept, dtype=torch.bool)
    ratio, present = group_keep_ratio(kept, groups, valid)
    assert ratio.flatten().tolist() == pytest.approx([0.5, 1.0, 0.4, 0.0]) and present.tolist() == [[True, True], [True, False]]
    errors = budget_errors(ratio, 0.5, present)
    assert errors.tolist() == pytest.approx([(0.0 + 0.25) / 2, 0.01])
    assert budget_loss(ratio, 0.5, present).item() == pytest.approx((0.125 + 0.01) / 2)
