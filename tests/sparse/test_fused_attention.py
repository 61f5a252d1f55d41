"""The fused gated softmax (log-gate bias on SDPA / FlexAttention) against the eager reference.

Float64 on CPU: outputs and the gradients to query, key, value and the gate's logits, for hard
straight-through and soft gates, causal / left-padded / right-padded masks and grouped KV heads; the
extreme case of a dropped key far above every kept key; FlexAttention's forward (its backward needs
CUDA: checked there in fp32 and bf16 when a GPU is present). The model-level check (several layers,
predictors included) is in tests/families/test_conformance.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from dllava.sparse.attention import (
    fused_kernel,
    gated_attention_forward,
    gated_softmax_attention,
    resolve_attention,
)
from dllava.sparse.config import SparsityConfig
from dllava.sparse.log_gate import (
    LOG_GATE_DELTA,
    GateMasks,
    flash_cpu_gated_attention,
    flex_gated_attention,
    sdpa_mask_gated_attention,
)
from dllava.sparse.model import causal_padding_mask

from .test_attention import _dropped_key_far_above, _kept_softmax_reference

# sdpa: on CPU the flash kernel with its own backward (exact); sdpa_mask: SDPA with a float mask that
# requires grad, the CUDA path (here on CPU's math kernel; the delta form)
FUSED = {"sdpa": flash_cpu_gated_attention, "sdpa_keys": flash_cpu_gated_attention,
         "sdpa_mask": sdpa_mask_gated_attention, "flex": flex_gated_attention}
CUDA = torch.cuda.is_available()


class Heads(torch.nn.Module):
    """What transformers' attention functions read from the attention module (GQA groups, causality)."""

    def __init__(self, groups: int, layer_idx: int = 3) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True
        self.layer_idx = layer_idx


def _inputs(padding: str, groups: int, gates: str, dtype=torch.float64, device="cpu", b=3, h=4, n=12, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(b, h // groups, n, d, generator=g, dtype=torch.float64) for _ in range(2))
    logits = torch.randn(b, n, generator=g, dtype=torch.float64)
    valid = torch.ones(b, n, dtype=torch.long)
    if padding == "left":
        valid[1, :3] = 0
        valid[2, :5] = 0
    elif padding == "right":
        valid[1, -3:] = 0
        valid[2, -5:] = 0
    tensors = [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v, logits)]
    mask = None if padding == "none" else causal_padding_mask(valid.to(device), dtype)
    return tensors, mask, valid.to(device).bool(), gates


def _gate(logits: torch.Tensor, kind: str) -> torch.Tensor:
    soft = torch.sigmoid(logits)
    if kind == "soft":
        return soft
    return (soft > 0.5).to(soft.dtype) + soft - soft.detach()  # straight-through, as the training forward


def _run(impl: str, tensors, mask, valid, kind, groups, **options):
    """Output at valid query rows and the gradients of a fixed random loss on them."""
    q, k, v, logits = tensors
    for t in tensors:
        t.grad = None
    gate = _gate(logits, kind)
    if impl == "eager":
        out = gated_attention_forward(Heads(groups), q, k, v, mask, policy=gate, sparse_layer=0, gate_attention="eager")[0]
    else:
        key_valid = valid if impl == "sdpa_keys" else None  # the model's case: padding known, per-key masks
        out = FUSED[impl](Heads(groups), q, k, v, GateMasks(gate, mask, key_valid), **options)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(out)
    rows = valid[:, :, None, None].to(out.dtype)  # padded queries attend to nothing: not compared
    (out * weights * rows).sum().backward()
    return out * rows, [t.grad.clone() for t in tensors]


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("kind", ["hard", "soft"])
@pytest.mark.parametrize("impl", ["sdpa", "sdpa_keys", "sdpa_mask"])
def test_sdpa_equals_eager_in_output_and_every_gradient(impl, kind, padding, groups):
    tensors, mask, valid, _ = _inputs(padding, groups, kind)
    ref_out, ref_grads = _run("eager", tensors, mask, valid, kind, groups)
    out, grads = _run(impl, tensors, mask, valid, kind, groups)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)  # the exact pass: no delta in the value
    for name, grad, ref in zip(("query", "key", "value", "gate logits"), grads, ref_grads):
        torch.testing.assert_close(grad, ref, rtol=1e-10, atol=1e-12, msg=name)  # O(delta) relative
    if kind == "hard":  # the gate gradient reaches dropped keys too (the straight-through signal)
        dropped = (_gate(tensors[3], "hard") == 0) & valid
        assert (grads[3][dropped] != 0).sum() > dropped.sum() // 2


def test_the_gate_gradient_error_shrinks_with_delta():
    """The bias form's gate gradient is exact up to O(delta): 100x smaller delta, ~100x smaller error."""
    tensors, mask, valid, _ = _inputs("left", 1, "hard")
    ref = _run("eager", tensors, mask, valid, "hard", 1)[1][3]
    errors = [float((_run("sdpa_mask", tensors, mask, valid, "hard", 1, delta=delta)[1][3] - ref).abs().max())
              for delta in (1e-4, 1e-6)]
    assert 30 < errors[0] / errors[1] < 300, errors


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("groups", [1, 2])
def test_flex_forward_equals_eager(padding, groups):
    tensors, mask, valid, _ = _inputs(padding, groups, "hard")
    q, k, v, logits = (t.detach() for t in tensors)
    gate = _gate(logits, "hard")
    with torch.no_grad():
        ref = gated_attention_forward(Heads(groups), q, k, v, mask, policy=gate, sparse_layer=0, gate_attention="eager")[0]
        ours = flex_gated_attention(Heads(groups), q, k, v, GateMasks(gate, mask))
    rows = valid[:, :, None, None]
    torch.testing.assert_close(ours * rows, ref * rows, rtol=1e-12, atol=1e-12)


def test_flex_refuses_to_train_on_cpu_with_a_clear_error():
    tensors, mask, _, _ = _inputs("none", 1, "hard")
    q, k, v, logits = tensors
    with pytest.raises(RuntimeError, match="sparsity.attention=flex trains on CUDA only"):
        flex_gated_attention(Heads(1), q, k, v, GateMasks(_gate(logits, "hard"), mask))


@pytest.mark.parametrize("offset", [30.0, 100.0, 1000.0])
@pytest.mark.parametrize("impl", ["eager", "sdpa", "sdpa_mask", "flex"])
def test_a_dropped_key_far_above_the_kept_ones_gets_no_weight(impl, offset):
    """Past log(1 / delta) = 46 the bias alone would give key 1 real weight (past 88.7 the old eager
    code gave NaN); every path returns the softmax over the kept keys, finite, with finite gradients
    (the eager path's gate gradient saturates, the fused paths' is that of the delta-softmax)."""
    q, k, v, gate = _dropped_key_far_above(offset)
    reference = _kept_softmax_reference(q, k, v, gate)[0].detach()
    if impl == "flex":  # forward only on CPU
        with torch.no_grad():
            out = flex_gated_attention(Heads(1), q.detach(), k.detach(), v.detach(), GateMasks(gate.detach(), None))
            out = out.transpose(1, 2)
    else:
        if impl == "eager":
            out = gated_softmax_attention(q, k, v, gate)
        else:
            out = FUSED[impl](Heads(1), q, k, v, GateMasks(gate, None)).transpose(1, 2)
        out.square().sum().backward()
        for name, tensor in zip(("query", "key", "value", "gate"), (q, k, v, gate)):
            assert torch.isfinite(tensor.grad).all(), name
        if impl == "eager" or offset < -math.log(LOG_GATE_DELTA):  # below the gap the delta form hides
            assert gate.grad[0, 1] != 0
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), reference, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("key_valid", [False, True])
def test_without_gate_gradient_one_exact_pass_serves_value_and_gradients(key_valid):
    """Validation / frozen predictors: the gate needs no gradient, so q/k/v get the exact pass's; also
    for queries that see nothing but their own key (the first three tokens are dropped)."""
    tensors, mask, valid, _ = _inputs("left", 2, "hard")
    q, k, v, logits = tensors
    gate = _gate(logits, "hard").detach()
    gate[0, :3] = 0.0
    out = flash_cpu_gated_attention(Heads(2), q, k, v, GateMasks(gate, mask, valid if key_valid else None))
    ref = gated_attention_forward(Heads(2), q, k, v, mask, policy=gate, sparse_layer=0, gate_attention="eager")[0]
    rows = valid[:, :, None, None].double()
    torch.testing.assert_close(out * rows, ref * rows, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad((out * rows).sum(), (q, k, v))
    refs = torch.autograd.grad((ref * rows).sum(), (q, k, v))
    for grad, expected in zip(grads, refs):
        torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


def test_layers_below_k_and_calls_without_policy_stay_plain_sdpa():
    tensors, mask, _, _ = _inputs("left", 1, "hard")
    q, k, v, logits = (t.detach() for t in tensors)
    plain = gated_attention_forward(Heads(1, layer_idx=0), q, k, v, mask)[0]
    below = gated_attention_forward(Heads(1, layer_idx=0), q, k, v, mask, policy=torch.zeros(3, 12, dtype=q.dtype),
                                    sparse_layer=1, gate_attention="sdpa")[0]
    torch.testing.assert_close(below, plain, rtol=0, atol=0)


def test_choices_resolve_and_bad_names_fail_naming_the_key():
    assert fused_kernel("sdpa", torch.device("cpu")) is flash_cpu_gated_attention
    assert fused_kernel("sdpa", torch.device("cuda")) is sdpa_mask_gated_attention
    assert fused_kernel("flex", torch.device("cpu")) is flex_gated_attention
    assert resolve_attention("auto") == "sdpa"
    assert resolve_attention("eager") == "eager"
    assert SparsityConfig().attention == "auto"
    with pytest.raises(ValueError, match="sparsity.attention must be one of"):
        SparsityConfig(attention="flash")


def test_the_delta_is_small_enough_for_bf16_and_large_enough_for_fp32():
    """log(delta) is exact enough in bf16 and delta's gate gradient factor 1/delta is finite in fp32."""
    assert torch.isfinite(torch.tensor(1 / LOG_GATE_DELTA, dtype=torch.float32))
    assert torch.log(torch.tensor(LOG_GATE_DELTA)).to(torch.bfloat16).item() < -20


@pytest.mark.skipif(not CUDA, reason="needs CUDA (FlexAttention's backward; SDPA's memory-efficient kernel)")
@pytest.mark.parametrize("impl", ["sdpa_mask", "flex"])  # what sparsity.attention=sdpa / flex run on CUDA
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 2e-4), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("padding", ["none", "left"])
def test_fused_paths_on_gpu_equal_eager(impl, dtype, tolerance, padding):
    tensors, mask, valid, _ = _inputs(padding, 2, "hard", dtype=dtype, device="cuda", n=256, d=64, h=8)
    ref_out, ref_grads = _run("eager", tensors, mask, valid, "hard", 2)
    out, grads = _run(impl, tensors, mask, valid, "hard", 2)
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=tolerance, atol=tolerance)
    for name, grad, ref in zip(("query", "key", "value", "gate logits"), grads, ref_grads):
        scale = ref.float().abs().max().clamp(min=1e-6)
        assert float((grad.float() - ref.float()).abs().max() / scale) < tolerance, name
