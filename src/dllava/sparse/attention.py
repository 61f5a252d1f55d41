"""Masked-softmax attention for decoder layers >= K, hooked into transformers' attention interface.

The keep decision enters attention as a multiplicative gate on the keys inside the softmax
(PAPER.md section 4.3): ``A_ij = exp(S_ij) * G_j / sum_j' exp(S_ij') * G_j'`` with ``G_ii = 1``. That
product is the only path from the LM loss to the predictors, so an additive ``-inf`` mask would not do.
Dropped tokens still run as queries. Layers < K (and the vision tower) keep their normal attention.

The function is registered under :data:`ATTENTION_NAME` in ``AttentionInterface`` together with a mask
function in ``AttentionMaskInterface`` (without it transformers would pass ``attention_mask=None``). It
reads two extra keyword arguments that the decoder loop passes through the HF layers: ``policy``
(B, N_keys) keep gate in [0, 1], ``sparse_layer`` (K) and ``gate_attention``, the implementation of
the gated softmax (``sparsity.attention``): ``eager`` (:func:`gated_softmax_attention`, the reference,
N x N fp32 scores per head) or a fused one through the log-gate bias (:mod:`dllava.sparse.log_gate`):
``sdpa`` or ``flex``. Without a policy it is plain SDPA, so a model switched to it still runs HF's own
``forward`` and ``generate`` unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from dllava.sparse.log_gate import (
    GateMasks,
    allowed_keys,
    compute_dtype,
    flash_cpu_gated_attention,
    flex_gated_attention,
    own_key,
    sdpa_mask_gated_attention,
)

ATTENTION_NAME = "dllava_gated"
ATTENTION_CHOICES = ("auto", "eager", "sdpa", "flex")


def resolve_attention(choice: str) -> str:
    """The gated-softmax implementation ``sparsity.attention`` names (:func:`fused_kernel` then picks the
    kernel for the device).

    ``auto`` is ``sdpa`` on every device. The issue that added the fused paths asked for FlexAttention on
    CUDA; it stays opt-in (``flex``) until its backward has been checked against the eager reference on
    a GPU (``tests/sparse/test_fused_attention.py`` does so wherever CUDA is present), because a wrong
    default would train silently wrong. SDPA's memory-efficient CUDA kernel returns the bias gradient.
    """
    if choice not in ATTENTION_CHOICES:
        raise ValueError(f"sparsity.attention must be one of {list(ATTENTION_CHOICES)}, got {choice!r}")
    return "sdpa" if choice == "auto" else choice


def gated_softmax_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    gate: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    scaling: float | None = None,
) -> torch.Tensor:
    """Attention whose softmax is multiplied by a per-key gate, normalised in fp32.

    ``query`` (B, h, Nq, d), ``key``/``value`` (B, h, Nk, d), ``gate`` (B, Nk); the queries are the last
    Nq positions of the keys, and each query's own key is always kept. ``attention_mask`` is an
    additive float mask broadcastable to (B, h, Nq, Nk) or a boolean one (True = attend); None means
    causal (what transformers' SDPA mask function returns when it can skip the mask).

    Unlike the reference code, which adds eps/N to every weight (a little mass on masked and padded
    keys), the row maximum is taken over the kept keys only, so every row sum is >= 1 and no eps is
    needed; the output is exactly a softmax over the kept, unmasked keys.

    Overflow: only a dropped key (gate 0) can score above that maximum, and ``exp`` of more than ~88.7
    above it is inf in fp32 (inf x 0 = NaN, forward and backward). Its exponent is therefore capped at
    :func:`gate_exponent_cap`, which changes no weight (it is multiplied by 0: the forward stays exact)
    and no gradient of ``query``/``key``/``value`` (the dropped key's weight has none). The one value it
    changes is the straight-through gradient of that key's gate, ``exp(S_ij - logZ_i) (v_j - o_i) . dO_i``
    summed over queries, which is astronomically large for such a key: it is exact while the key scores
    at most the cap above the kept keys' maximum and saturates (finite, same sign) beyond.
    """
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    n_q, n_k = query.shape[-2], key.shape[-2]
    compute = compute_dtype(query.dtype)  # fp32 at least (fp64 for gradcheck)
    scores = torch.matmul(query.to(compute), key.to(compute).transpose(-1, -2)) * scaling
    if attention_mask is None or attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~allowed_keys(attention_mask, n_q, n_k, query.device), torch.finfo(compute).min)
    else:
        scores = scores + attention_mask.to(compute)
    own = own_key(n_q, n_k, query.device)
    gates = torch.where(own, torch.ones((), dtype=compute, device=gate.device), gate.to(compute)[:, None, None, :])
    row_max = scores.masked_fill(gates == 0, float("-inf")).amax(-1, keepdim=True).detach()
    weights = torch.exp((scores - row_max).clamp(max=gate_exponent_cap(compute))) * gates
    weights = weights / weights.sum(-1, keepdim=True)
    return torch.matmul(weights.to(value.dtype), value)


def gate_exponent_cap(dtype: torch.dtype) -> float:
    """The largest exponent a dropped key's weight is computed with: half of log(max float) (44.4 in
    fp32, 354.9 in fp64), so exp of it times a gradient factor of up to exp(cap) stays finite."""
    return 0.5 * math.log(torch.finfo(dtype).max)


def gated_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    policy: torch.Tensor | None = None,
    sparse_layer: int | None = None,
    gate_attention: str = "auto",
    gate_masks: GateMasks | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """``AttentionInterface`` entry: gated softmax in layers >= ``sparse_layer`` when a policy is given,
    computed by ``gate_attention`` (a ``sparsity.attention`` value); ``gate_masks`` (made by the caller
    once per forward from ``policy`` and ``attention_mask``) shares the gate's masks between layers."""
    if policy is None or sparse_layer is None or module.layer_idx < sparse_layer:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    implementation = resolve_attention(gate_attention)
    if implementation != "eager":
        masks = gate_masks or GateMasks(policy, attention_mask)
        return fused_kernel(implementation, query.device)(module, query, key, value, masks, scaling), None
    groups = getattr(module, "num_key_value_groups", 1)
    output = gated_softmax_attention(
        query, repeat_kv(key, groups), repeat_kv(value, groups), policy, attention_mask, scaling
    )
    return output.transpose(1, 2).contiguous(), None


def fused_kernel(implementation: str, device: torch.device) -> Callable[..., torch.Tensor]:
    """The log-gate function of a fused ``sparsity.attention`` on ``device`` (``sdpa``: SDPA's CPU flash
    kernel with our backward on CPU, SDPA with a mask that requires grad elsewhere)."""
    if implementation == "flex":
        return flex_gated_attention
    return flash_cpu_gated_attention if device.type == "cpu" else sdpa_mask_gated_attention


def register_gated_attention() -> str:
    """Register the attention and mask functions (idempotent); returns the implementation name."""
    AttentionInterface.register(ATTENTION_NAME, gated_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME
