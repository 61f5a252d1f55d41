"""Top-k ranking of confident predictors: no fp32 saturation ties (found by tests/families)."""

import torch

from dllava.sparse.decisions import keep_score, topk_keep


def test_confident_logits_are_ranked_by_margin_not_by_saturated_log_probability():
    # keep-minus-drop margins 100, 300, 50: log p(keep) is exactly 0.0 in fp32 for all three
    logits = torch.tensor([[[100.0, 0.0], [300.0, 0.0], [50.0, 0.0]]])
    assert torch.log_softmax(logits, -1)[..., 0].eq(0).all()
    assert keep_score(logits).tolist() == [[100.0, 300.0, 50.0]]
    assert topk_keep(logits, 1 / 3).tolist() == [[0.0, 1.0, 0.0]]
    # the same sample padded into a wider row with a masked slot keeps the same token
    padded = torch.cat([logits, torch.tensor([[[500.0, 0.0]]])], 1)
    valid = torch.tensor([[True, True, True, False]])
    assert topk_keep(padded, 1 / 3, valid).tolist() == [[0.0, 1.0, 0.0, 0.0]]
