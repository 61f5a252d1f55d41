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
