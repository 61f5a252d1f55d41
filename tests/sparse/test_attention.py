"""The gated softmax: equal to plain attention when everything is kept, exact on dropped keys, and
its gradients (including the gate's) match finite differences."""

import torch
import torch.nn.functional as F

from dllava.sparse.attention import gated_softmax_attention


def _qkv(b=2, h=2, n=7, d=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, dtype=dtype) for _ in range(3)]


def test_all_ones_gate_is_causal_sdpa():
    q, k, v = _qkv(dtype=torch.float32)
    ours = gated_softmax_attention(q, k, v, torch.ones(2, 7))
    reference = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-5)


def test_dropped_keys_are_invisible_to_others_but_attend_to_themselves():
    q, k, v = _qkv(b=1, dtype=torch.float64)
    gate = torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0]])
    ours = gated_softmax_attention(q, k, v, gate)
    kept = gate[0].bool()
    for i in range(7):  # query i sees kept keys j <= i plus itself
        visible = [j for j in range(i + 1) if kept[j] or j == i]
        weights = torch.softmax(q[0, :, i : i + 1] @ k[0, :, visible].transpose(-1, -2) / 2.0, dim=-1)
        torch.testing.assert_close(ours[0, :, i : i + 1], weights @ v[0, :, visible])


def test_padding_mask_and_gate_combine():
    q, k, v = _qkv(b=1, n=5, dtype=torch.float64)
    pad = torch.tensor([[0.0, 0.0, 0.0, 0.0, torch.finfo(torch.float64).min]])  # last key is padding
    mask = torch.full((5, 5), torch.finfo(torch.float64).min, dtype=torch.float64).triu(1) + pad
    gate = torch.tensor([[1.0, 0.0, 1.0, 1.0, 1.0]])
    ours = gated_softmax_attention(q, k, v, gate, attention_mask=mask[None, None])
    visible = [0, 2, 3]  # query 3: key 1 dropped, key 4 padding
    weights = torch.softmax(q[0, :, 3:4] @ k[0, :, visible].transpose(-1, -2) / 2.0, dim=-1)
    torch.testing.assert_close(ours[0, :, 3:4], weights @ v[0, :, visible])


def test_finite_difference_gradients_for_q_k_v_and_gate():
    q, k, v = (t.requires_grad_() for t in _qkv(b=1, h=2, n=5, d=3))
    gate = torch.rand(1, 5, dtype=torch.float64).mul(0.8).add(0.1).requires_grad_()  # soft gates in (0.1, 0.9)
    assert torch.autograd.gradcheck(lambda *xs: gated_softmax_attention(*xs), (q, k, v, gate), eps=1e-6, atol=1e-6)


def test_gate_gradient_is_nonzero_through_hard_straight_through_decisions():
    q, k, v = _qkv(b=1, n=6, dtype=torch.float32)
    logits = torch.randn(1, 6, 2, requires_grad=True)
    hard = F.gumbel_softmax(logits, tau=1.0, hard=True)[..., 0]
    gated_softmax_attention(q, k, v, hard).square().sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def _dropped_key_far_above(offset: float, dtype=torch.float32):
    """q/k/v where key 1 (dropped: gate 0) scores ``offset`` above every kept key of queries 2..5."""
    q, k, v = _qkv(b=1, h=2, n=6, d=4, dtype=torch.float64, seed=3)
    q = q * 0.1
    q[..., 0] = 1.0
    k = k * 0.1
    k[..., 1, 0] = offset * 2.0  # scaling 1/sqrt(4): the score of key 1 is ~offset for every query
    gate = torch.tensor([[1.0, 0.0, 1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    return [t.to(dtype).requires_grad_() for t in (q, k, v, gate)]


def _kept_softmax_reference(q, k, v, gate):
    """Float64 attention over the kept keys (and each query's own key) by an additive -inf mask."""
    q, k, v, gate = (t.detach().double().requires_grad_() for t in (q, k, v, gate))
    n = q.shape[-2]
    visible = torch.ones(n, n, dtype=torch.bool).tril() & (gate[0].bool()[None, :] | torch.eye(n, dtype=torch.bool))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
    return out, (q, k, v)


def test_dropped_key_scoring_1000_above_the_kept_keys_gives_finite_exact_output_and_gradients():
    q, k, v, gate = _dropped_key_far_above(1000.0)
    ours = gated_softmax_attention(q, k, v, gate)
    reference, inputs = _kept_softmax_reference(q, k, v, gate)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours.double(), reference, atol=1e-6, rtol=1e-5)  # the dropped key has weight 0
    weights = torch.randn(ours.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (ours.double() * weights).sum().backward()
    (reference * weights).sum().backward()
    for name, tensor in zip("qkv", (q, k, v)):
        assert torch.isfinite(tensor.grad).all(), name
    for tensor, exact in zip((q, k, v), inputs):
        torch.testing.assert_close(tensor.grad.double(), exact.grad, atol=1e-5, rtol=1e-4)
    assert torch.isfinite(gate.grad).all() and gate.grad[0, 1] != 0  # saturated, but still a finite signal


def test_dropped_key_gate_gradient_is_exact_while_representable():
    """30 above the kept keys (exp(30) ~ 1e13, past nothing in fp32): fp32 equals float64."""
    q, k, v, gate = _dropped_key_far_above(30.0)
    q64, k64, v64, gate64 = (t.detach().double().requires_grad_() for t in (q, k, v, gate))
    gated_softmax_attention(q, k, v, gate).square().sum().backward()
    gated_softmax_attention(q64, k64, v64, gate64).square().sum().backward()
    assert abs(float(gate64.grad[0, 1])) > 1e10
    torch.testing.assert_close(gate.grad.double(), gate64.grad, rtol=1e-4, atol=1e-6)
