"""The gated softmax on fused attention kernels, through the log-gate bias (PAPER.md section 13).

Multiplying ``exp(S_ij)`` by a key gate ``G_j`` (own key exempt) equals adding ``log(G_j + delta)`` to the
logits before an ordinary softmax, up to O(delta), in the output and in the gradient to ``G``: the
``1 / (G_j + delta)`` of the log cancels the ``(G_j + delta)`` that the biased softmax puts into
``dS_ij``. So the gate can ride kernels that take an additive bias. Three do here, all behind one
signature ``(module, query, key, value, masks, scaling, delta) -> (B, Nq, h, d)``:

* :func:`flash_cpu_gated_attention` (``sparsity.attention=sdpa`` on CPU): SDPA's CPU flash kernel with our
  own backward (:class:`FlashCpuGatedAttention`); nothing N x N is kept, or even built when the padding
  is known.
* :func:`sdpa_mask_gated_attention` (``sdpa`` elsewhere): ``F.scaled_dot_product_attention`` with a
  (B, 1, Nq, Nk) float mask that requires grad (CUDA's memory-efficient kernel returns its gradient).
* :func:`flex_gated_attention` (``flex``): a ``score_mod`` reading a per-key log-gate vector and a block
  mask (its backward needs CUDA in torch 2.13; its forward also runs on CPU).

One case the bias alone gets wrong: a dropped key (``G_j = 0``) scoring more than ``log(1 / delta)`` (46
at the default) above the kept keys takes real weight. Every path's value is therefore exact there: the
last two always run an exact pass (the dtype's minimum as a dropped key's bias) under ``no_grad`` beside
the biased one and return ``biased + (exact - biased).detach()``; the CPU path measures the weight its
biased pass puts on dropped keys and reruns exactly only when that exceeds the dtype's epsilon. Beyond
that gap the gradients are those of the delta-softmax (finite, dominated by that key; its own gate
gradient nearly 0), where the eager reference saturates only the gate's. :class:`GateMasks` builds the
masks once per forward for all gated layers.

``attention_mask`` follows ``dllava.sparse.attention``: additive float (B, 1, Nq, Nk), boolean
(True = attend) or None (causal); the queries are the last Nq positions of the keys.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

# Small enough that a dropped key changes the delta-biased pass only when it scores 46 (= -log delta)
# above the kept keys, large enough that 1 / delta (the gate gradient's factor) is finite in fp32 and
# that delta * exp(score - logsumexp) stays a normal fp32 number for every key with a say.
LOG_GATE_DELTA = 1e-20


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype softmax statistics and gate gradients are computed in: fp32 at least (fp64 in tests)."""
    return torch.promote_types(dtype, torch.float32)


def allowed_keys(attention_mask: torch.Tensor | None, n_q: int, n_k: int, device: torch.device) -> torch.Tensor:
    """Which keys each query may attend to, boolean broadcastable to (B, 1, Nq, Nk)."""
    if attention_mask is None:
        queries = torch.arange(n_q, device=device)[:, None] + (n_k - n_q)
        return (torch.arange(n_k, device=device) <= queries)[None, None]
    if attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask > torch.finfo(attention_mask.dtype).min / 2


def own_key(n_q: int, n_k: int, device: torch.device) -> torch.Tensor:
    """(Nq, Nk) True where a query meets its own key (always kept, bias 0)."""
    return (torch.arange(n_q, device=device)[:, None] + (n_k - n_q)) == torch.arange(n_k, device=device)


def log_gate(
    gate: torch.Tensor, delta: float = LOG_GATE_DELTA, exact: bool = False, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Per-key bias in ``dtype`` (fp32 at least): ``log(G + delta)``, or with ``exact`` ``log(G)`` and the
    dtype's minimum where ``G == 0`` (a dropped key then takes no weight whatever its score)."""
    compute = compute_dtype(dtype)
    gate = gate.to(compute)
    if not exact:
        return torch.log(gate + delta)
    return torch.where(gate > 0, torch.log(gate.clamp(min=torch.finfo(compute).tiny)), torch.finfo(compute).min)


def gate_bias_mask(
    gate: torch.Tensor, attention_mask: torch.Tensor | None, n_q: int, dtype: torch.dtype, exact: bool,
    delta: float = LOG_GATE_DELTA, own_exempt: bool = True,
) -> torch.Tensor:
    """The (B, 1, Nq, Nk) additive SDPA mask: the log gate off the diagonal, 0 on it, ``dtype``'s minimum
    where the attention mask forbids. Built in fp32 (at least) and cast last, so the gate's gradient (the
    bias gradient summed over queries) accumulates in fp32 even for a bf16 model; as ``forbidden +
    bias * off_diagonal``, so autograd keeps only the (Nq, Nk) off-diagonal for backward, nothing N x N
    per sample. Without ``own_exempt`` the diagonal is gated too."""
    n_k = gate.shape[-1]
    bias = log_gate(gate, delta, exact, dtype)
    compute = bias.dtype
    allowed = allowed_keys(attention_mask, n_q, n_k, gate.device)
    low = torch.finfo(dtype).min
    forbidden = torch.zeros((), dtype=compute, device=gate.device).masked_fill(~allowed, low)
    if own_exempt:
        mask = forbidden + bias[:, None, None, :] * (~own_key(n_q, n_k, gate.device)).to(compute)
    else:
        mask = forbidden + bias[:, None, None, :]
    if exact:  # a dropped key's minimum plus a forbidden one's would be -inf (NaN rows); no gradient here
        mask = mask.clamp(min=low)
    return mask.to(dtype)


class GateMasks:
    """The additive masks of one gated forward, each built once and shared by all its gated layers (and
    their backward): they depend only on the gate and the attention mask, which every layer >= K shares.
    Made by the caller per forward (``DynamicVLM`` passes it to the layers as ``gate_masks``).

    ``key_valid`` (B, Nk), optional, says that ``attention_mask`` is exactly causal plus these padded keys
    (what ``DynamicVLM`` builds); kernels that take a causal flag then need only a (B, 1, 1, Nk) key bias
    (:meth:`kernel_mask`), nothing N x N.
    """

    def __init__(
        self, gate: torch.Tensor, attention_mask: torch.Tensor | None, key_valid: torch.Tensor | None = None
    ) -> None:
        self.gate, self.attention_mask = gate, attention_mask
        self.key_valid = None if key_valid is None else key_valid.bool()
        self._built: dict[tuple, torch.Tensor] = {}

    def kernel_mask(self, n_q: int, dtype: torch.dtype, delta: float) -> tuple[torch.Tensor, bool]:
        """(mask, is_causal) of the *fully* gated softmax (the diagonal gated too) for a kernel with a
        causal flag; ``delta = 0`` means exact (the minimum where ``G = 0``). Per key when the mask's
        structure is known, else the (B, 1, Nq, Nk) mask."""
        n_k = self.gate.shape[-1]
        if n_q != n_k or (self.attention_mask is not None and self.key_valid is None):
            return self.get(n_q, dtype, exact=delta == 0, delta=delta, own_exempt=False), n_q == n_k
        key = ("keys", dtype, delta)
        if key not in self._built:
            bias = log_gate(self.gate.detach(), delta, delta == 0, dtype)
            low = torch.finfo(dtype).min
            if self.key_valid is not None:
                bias = bias.masked_fill(~self.key_valid, low)
            self._built[key] = bias.clamp(min=low)[:, None, None, :].to(dtype)
        return self._built[key], True

    def own_visible(self, n_q: int, n_k: int, device: torch.device) -> torch.Tensor:
        """(B or 1, 1, Nq): whether each query's own key is visible to it (False for padding queries)."""
        if self.key_valid is not None and n_q == n_k:
            return self.key_valid[:, None, :]
        allowed = allowed_keys(self.attention_mask, n_q, n_k, device)[..., n_k - n_q :]
        return torch.diagonal(allowed, dim1=-2, dim2=-1)

    def get(self, n_q: int, dtype: torch.dtype, exact: bool, delta: float = LOG_GATE_DELTA,
            own_exempt: bool = True) -> torch.Tensor:
        """:func:`gate_bias_mask` of this gate (with autograd through it when grad is enabled)."""
        key = (n_q, dtype, exact, delta, own_exempt, torch.is_grad_enabled())
        if key not in self._built:
            self._built[key] = gate_bias_mask(self.gate, self.attention_mask, n_q, dtype, exact, delta, own_exempt)
        return self._built[key]

    def block_mask(self, batch: int, n_q: int, n_k: int, device: torch.device) -> Any:
        """FlexAttention's block mask of the attention mask (causal and padding)."""
        key = ("block", batch, n_q, n_k)
        if key not in self._built:
            from torch.nn.attention.flex_attention import create_block_mask

            allowed = allowed_keys(self.attention_mask, n_q, n_k, device).expand(batch, 1, n_q, n_k)

            def mask_mod(b, h, q_idx, kv_idx):
                return allowed[b, 0, q_idx, kv_idx]

            self._built[key] = create_block_mask(mask_mod, batch, None, n_q, n_k, device=device)
        return self._built[key]


def _exact_and_biased(
    run: Callable[[bool], torch.Tensor], gate: torch.Tensor
) -> torch.Tensor:
    """The exact pass's value with the delta-biased pass's gradient (only when the gate needs one)."""
    if not (torch.is_grad_enabled() and gate.requires_grad):
        return run(True)
    with torch.no_grad():
        exact = run(True)
    biased = run(False)
    return biased + (exact - biased).detach()


def sdpa_mask_gated_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    masks: GateMasks,
    scaling: float | None = None,
    delta: float = LOG_GATE_DELTA,
) -> torch.Tensor:
    """Gated attention as ``F.scaled_dot_product_attention`` with a float mask that requires grad (through
    transformers' SDPA call, GQA handled there; ``sparsity.attention=sdpa`` off CPU, where the
    memory-efficient kernel returns the bias gradient); returns (B, Nq, h, d)."""
    n_q = query.shape[-2]

    def run(exact: bool) -> torch.Tensor:
        mask = masks.get(n_q, query.dtype, exact, delta)
        return sdpa_attention_forward(module, query, key, value, mask, dropout=0.0, scaling=scaling)[0]

    return _exact_and_biased(run, masks.gate)


_FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_CPU_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _pad(t: torch.Tensor, fill: float | torch.Tensor) -> torch.Tensor:
    """``t`` with one more last-dim column holding ``fill`` (a scalar or a tensor of ``t``'s leading shape)."""
    column = t.new_full((*t.shape[:-1], 1), fill) if not torch.is_tensor(fill) else fill.to(t.dtype).expand(*t.shape[:-1])[..., None]
    return torch.cat([t, column], dim=-1)


class FlashCpuGatedAttention(torch.autograd.Function):
    """SDPA's CPU flash kernel with the log-gate bias: one forward and one backward call, O(N) kept.

    The kernel runs the *fully* gated softmax (the bias on every visible key, the diagonal included; per
    key plus the causal flag when :class:`GateMasks` knows the padding, so no N x N mask at all); the
    own-key exemption is added exactly, per query, outside the kernel: with ``a_i = (1 - G_i - delta)
    exp(S_ii - lse_i)``, ``o_i = (o'_i + a_i v_i) / (1 + a_i)``. Backward is the kernel's backward once,
    with one extra column: q's = 1 and k's = 0 (scores unchanged), so the extra column of dK is
    ``scale * sum_i dS_ij``, the bias gradient summed over queries (divided by ``G_j + delta`` it is the
    gate's); grad_out's = 1 and out's = ``-dL/dlse_i``, which folds the correction's dependence on the
    logsumexp into the kernel's ``D_i`` term. Kept for backward: q, k, v, o', lse, a, the gate.

    ``delta = 0`` is the exact form (``log G``, the minimum for ``G = 0``), used when the gate needs no
    gradient. With ``delta > 0`` the forward also pads v with ``1 - G_j`` (q and k with 0), so the kernel
    returns each query's weight on dropped keys; should it exceed the dtype's epsilon (a dropped key
    scoring ~46 above the kept ones, past what delta hides), the value comes from an exact pass instead,
    and the gradients stay those of the delta form (finite).
    """

    @staticmethod
    def forward(ctx, query, key, value, gate, masks, scale, delta):
        n_q, n_k = query.shape[-2], key.shape[-2]
        visible = masks.own_visible(n_q, n_k, query.device)
        mask, causal = masks.kernel_mask(n_q, query.dtype, delta)
        # padded once for forward and backward: q's column 1, k's 0 (scores unchanged); v's the dropped
        # share, so the output's extra column is each query's weight on dropped keys (backward sets it 0)
        query_pad, key_pad = _pad(query, 1.0), _pad(key, 0.0)
        value_pad = _pad(value, (1 - gate.to(query.dtype))[:, None, :] if delta > 0 else 0.0)
        out_pad, lse = _FLASH_CPU(query_pad, key_pad, value_pad, 0.0, causal, attn_mask=mask, scale=scale)
        own_exp, extra, result = _own_key_added(query, key, value, out_pad[..., :-1], lse, gate, visible, scale, delta)
        if delta > 0:
            leaked = (out_pad[..., -1] / (1 + extra)).masked_fill(~visible, 0.0)
            if float(leaked.max()) > torch.finfo(query.dtype).eps:
                exact_mask, _ = masks.kernel_mask(n_q, query.dtype, 0.0)
                exact_out, exact_lse = _FLASH_CPU(query, key, value, 0.0, causal, attn_mask=exact_mask, scale=scale)
                result = _own_key_added(query, key, value, exact_out, exact_lse, gate, visible, scale, 0.0)[2]
        ctx.save_for_backward(query_pad, key_pad, value_pad, out_pad, lse, own_exp, extra, gate)
        ctx.masks, ctx.scale, ctx.delta = masks, scale, delta
        return result

    @staticmethod
    def backward(ctx, grad_out):
        query_pad, key_pad, value_pad, out_pad, lse, own_exp, extra, gate = ctx.saved_tensors
        query, key, value, out = (t[..., :-1] for t in (query_pad, key_pad, value_pad, out_pad))
        n_q, n_k = query.shape[-2], key.shape[-2]
        own = slice(n_k - n_q, n_k)
        compute = compute_dtype(query.dtype)
        scale = ctx.scale
        grad = grad_out.to(compute)
        keep = 1 / (1 + extra)
        d_keep = torch.einsum("bhnd,bhnd->bhn", grad, out.to(compute) - value[..., own, :].to(compute))
        d_extra = -keep.square() * d_keep
        # through exp(S_ii), also -dL/dlse; 0 where only the own key is seen (extra = inf: o_i = v_i)
        d_score = torch.where(torch.isfinite(extra), d_extra * extra, 0.0)
        value_pad[..., -1] = 0.0  # (the forward's dropped share is not a value)
        out_pad[..., -1] = d_score.to(out_pad.dtype)  # kernel's D_i = dO . o - dL/dlse
        mask, causal = ctx.masks.kernel_mask(n_q, query.dtype, ctx.delta)
        dq, dk, dv = _FLASH_CPU_BACKWARD(
            _pad((keep[..., None] * grad).to(query.dtype), 1.0), query_pad, key_pad, value_pad, out_pad, lse, 0.0,
            causal, attn_mask=mask, scale=scale,
        )
        column_sums = dk[..., -1].to(compute) / scale
        dq, dk, dv = (t[..., :-1].to(compute) for t in (dq, dk, dv))
        d_score = (d_score * scale)[..., None]
        dq.addcmul_(d_score, key[..., own, :].to(compute))
        dk[..., own, :].addcmul_(d_score, query.to(compute))
        dv[..., own, :].addcmul_((1 - keep)[..., None], grad)
        grad_gate = None
        if ctx.needs_input_grad[3]:
            grad_gate = column_sums.sum(1) / (gate.to(compute) + ctx.delta)
            grad_gate[:, own] -= (d_extra * own_exp).sum(1)
            grad_gate = grad_gate.to(gate.dtype)
        return dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype), grad_gate, None, None, None


def _own_key_added(query, key, value, out, lse, gate, visible, scale, delta):
    """The fully gated output with each query's own key put back at weight 1 (its gate share
    ``1 - G_i - delta`` added): ``exp(S_ii - lse_i)`` (0 where the own key is not visible), ``a_i`` (both
    in fp32 or wider) and the output in query's dtype."""
    n_q, n_k = query.shape[-2], key.shape[-2]
    own = slice(n_k - n_q, n_k)
    compute = compute_dtype(query.dtype)
    scores = torch.einsum("bhnd,bhnd->bhn", query.to(compute), key[..., own, :].to(compute)) * scale
    own_exp = torch.exp((scores - lse.to(compute)).masked_fill(~visible, float("-inf")))
    extra = (1 - gate[:, None, own].to(compute) - delta) * own_exp
    keep = (1 / (1 + extra))[..., None]  # 0 when only the own key is visible (extra = inf)
    result = torch.lerp(value[..., own, :].to(compute), out.to(compute), keep)
    return own_exp, extra, result.to(query.dtype)


def flash_cpu_gated_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    masks: GateMasks,
    scaling: float | None = None,
    delta: float = LOG_GATE_DELTA,
) -> torch.Tensor:
    """:class:`FlashCpuGatedAttention` with grouped KV heads repeated (the exact form, ``delta = 0``, when
    the gate needs no gradient); returns (B, Nq, h, d). ``sparsity.attention=sdpa`` on CPU, where SDPA
    itself would fall back to its math kernel (N x N per head kept) for a mask that requires grad."""
    groups = getattr(module, "num_key_value_groups", 1)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    key, value = (t.repeat_interleave(groups, dim=1) if groups > 1 else t for t in (key, value))
    gate = masks.gate
    delta = delta if torch.is_grad_enabled() and gate.requires_grad else 0.0
    out = FlashCpuGatedAttention.apply(query.contiguous(), key.contiguous(), value.contiguous(), gate, masks, scale, delta)
    return out.transpose(1, 2).contiguous()


_COMPILED_FLEX: Callable | None = None


def _flex_kernel(device: torch.device) -> Callable:
    """FlexAttention, compiled once on CUDA (uncompiled it is a reference that materialises the scores);
    the uncompiled reference elsewhere (CPU forward, for tests)."""
    from torch.nn.attention.flex_attention import flex_attention

    global _COMPILED_FLEX
    if device.type != "cuda":
        return flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


def flex_gated_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    masks: GateMasks,
    scaling: float | None = None,
    delta: float = LOG_GATE_DELTA,
) -> torch.Tensor:
    """Gated attention as FlexAttention: the log gate is a ``score_mod`` term read from a (B, Nk) vector,
    causal and padding a block mask, so nothing N x N is kept for backward. Returns (B, Nq, h, d)."""
    gate = masks.gate
    if query.device.type != "cuda" and torch.is_grad_enabled() and (gate.requires_grad or query.requires_grad):
        raise RuntimeError(
            "sparsity.attention=flex trains on CUDA only (FlexAttention has no CPU backward in torch 2.13); "
            "use sparsity.attention=sdpa (or auto) on this device"
        )
    batch, _, n_q, _ = query.shape
    n_k = key.shape[-2]
    offset = n_k - n_q
    block_mask = masks.block_mask(batch, n_q, n_k, query.device)
    kernel = _flex_kernel(query.device)
    groups = query.shape[1] // key.shape[1]

    def run(exact: bool) -> torch.Tensor:
        bias = log_gate(gate, delta, exact, query.dtype)

        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.where(q_idx + offset == kv_idx, score, score + bias[b, kv_idx].to(score.dtype))

        return kernel(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scaling,
                      enable_gqa=groups > 1)

    return _exact_and_biased(run, gate).transpose(1, 2).contiguous()
