"""A KV cache that stores per sample only the tokens the predictors keep (PAPER.md section 7.3).

Layers < K ("dense group") store every token; layers >= K ("sparse group") store the pruned prompt and
then only the generated tokens whose text decision says keep. A staged method (PyramidDrop) cuts image
tokens again at later layers: each later ``stage`` starts a group of its own, which holds fewer prompt
tokens and the same generated tokens as the sparse group (staged methods decode with every generated
token). All layers of a group hold the same token set, so bookkeeping (write pointers, key validity) is
per group and per sample, and the K/V tensors are per layer.

Batch > 1 with per-sample lengths: each sample writes at its own pointer; slots past a sample's pointer
and left-padding slots are marked invalid and **masked** in attention (the reference code right-padded
with unmasked zero keys). A new token is always written and always attends to itself in its own step;
:meth:`commit` then decides whether it stays. A dropped token's slot is overwritten by the next one, so
memory grows only with kept tokens (plus the batch's longest sample, as with any padded cache).
:meth:`evict` drops an earlier token (output-side baselines such as H2O); the next one-column step
writes into the freed slot, so an evicting policy's buffers stay at its budget. Slot order does not
matter: keys are stored rotated at their true positions and every cached key precedes a new query.

Write pointers are host integers, so no step reads a device tensor back: a step also runs on the
meta device (shape-only benchmarks of 7B models) when decisions are given as host booleans.

The object is duck-typed to what HF attention modules call: ``update(key, value, layer_idx)``.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Sequence

import torch

DENSE, SPARSE = 0, 1


class SparseKVCache:
    """Per-layer K/V buffers (B, heads_kv, capacity, head_dim) with per-group validity and pointers."""

    def __init__(
        self, num_layers: int, sparse_from: int, batch_size: int, grow: int = 64, stages: Sequence[int] = ()
    ) -> None:
        if not 0 < sparse_from <= num_layers:
            raise ValueError(f"sparse_from must be in [1, {num_layers}], got {sparse_from}")
        if list(stages) != sorted(set(stages)) or any(not sparse_from < s < num_layers for s in stages):
            raise ValueError(f"stages must be increasing layers in ({sparse_from}, {num_layers}), got {list(stages)}")
        self.num_layers = num_layers
        self.sparse_from = sparse_from
        self.batch_size = batch_size
        self.grow = grow
        self.starts = [0, sparse_from, *stages]  # first layer of each group
        groups = len(self.starts)
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.valid: list[torch.Tensor | None] = [None] * groups  # per group: (B, capacity) bool
        self.length: list[list[int]] = [[0] * batch_size for _ in range(groups)]  # write pointers, per group and sample
        self._slots: list[torch.Tensor | None] = [None] * groups  # (B, n) slots of the open step
        self.free: list[list[list[int]]] = [[[] for _ in range(batch_size)] for _ in range(groups)]  # evicted slots
        self.open_slots: list[list[int] | None] = [None] * groups  # host slots of a one-column open step

    @property
    def groups(self) -> int:
        return len(self.starts)

    def group(self, layer_idx: int) -> int:
        return bisect_right(self.starts, layer_idx) - 1

    def layers_of(self, group: int) -> range:
        """The decoder layers whose K/V ``group`` holds."""
        end = self.starts[group + 1] if group + 1 < self.groups else self.num_layers
        return range(self.starts[group], end)

    # -- one step: open -> update (per layer) -> commit ------------------------------------------
    def open(self, group: int, key_valid: torch.Tensor, order: torch.Tensor | None = None) -> torch.Tensor:
        """Reserve slots for ``n`` new columns of every layer of ``group``; return their attention mask.

        ``key_valid`` (B, n) bool marks which new columns are real keys (False: left padding or a filler
        column). ``order`` (B, n) gives each new column's place
        in the original sequence for causality among the new columns (default: column order). The mask
        is (B, 1, n, T) bool, True = attend: every valid earlier key, the valid new keys at or before the
        query, and always the query itself.
        """
        batch, n = key_valid.shape
        device = key_valid.device
        free = self.free[group]
        host = [min(free[b]) if n == 1 and free[b] else self.length[group][b] for b in range(batch)]
        self.open_slots[group] = host if n == 1 else None
        starts = torch.tensor(host, device=device)
        slots = starts[:, None] + torch.arange(n, device=device)[None]
        total = max(self.length[group]) + n
        self._ensure_capacity(group, total, device)
        valid = self.valid[group]
        valid[torch.arange(batch, device=device)[:, None], slots] = key_valid
        self._slots[group] = slots
        columns = torch.arange(total, device=device)
        # Old columns (< start) always precede the new ones; among new ones use the original order.
        if order is None:
            order = torch.arange(n, device=device)[None].expand(batch, n)
        column_order = torch.full((batch, total), -1, dtype=order.dtype, device=device)
        column_order[torch.arange(batch, device=device)[:, None], slots] = order
        is_new = torch.zeros(batch, total, dtype=torch.bool, device=device)
        is_new[torch.arange(batch, device=device)[:, None], slots] = True
        earlier_new = column_order[:, None, :] <= order[:, :, None]  # (B, n, T)
        visible = valid[:, None, :total] & (~is_new[:, None, :] | (is_new[:, None, :] & earlier_new))
        own = columns[None, None, :] == slots[:, :, None]
        return (visible | own)[:, None]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the open step's K/V of ``layer_idx`` into its slots; return the layer's visible K/V."""
        group = self.group(layer_idx)
        slots = self._slots[group]
        if slots is None:
            raise RuntimeError(f"layer {layer_idx}: open() the step of its group before running the layer")
        total = max(self.length[group]) + slots.shape[1]
        for store in (self.keys, self.values):
            buffer = store[layer_idx]
            if buffer is None or buffer.shape[2] < self.valid[group].shape[1]:
                buffer = self._grown(buffer, key, self.valid[group].shape[1])
                store[layer_idx] = buffer
        rows = torch.arange(key.shape[0], device=key.device)[:, None]
        # (B, n) advanced indices around the head dim: buffer[b, :, slot] <- new[b, :, j]
        self.keys[layer_idx][rows, :, slots] = key.transpose(1, 2).to(self.keys[layer_idx].dtype)
        self.values[layer_idx][rows, :, slots] = value.transpose(1, 2).to(self.values[layer_idx].dtype)
        return self.keys[layer_idx][:, :, :total], self.values[layer_idx][:, :, :total]

    def commit(self, group: int, keep: Sequence[bool] | None = None) -> None:
        """Close the open step. ``keep`` (B,) host booleans for a one-column step: False drops the token
        (its slot is reused by the next step); None keeps every new column (prefill, dense layers)."""
        slots = self._slots[group]
        if slots is None:
            raise RuntimeError("commit() without open()")
        n = slots.shape[1]
        if keep is not None:
            if n != 1:
                raise ValueError("per-sample keep decisions are only supported for one-column steps")
            keep = [bool(k) for k in keep]
            if not all(keep):
                rows = torch.tensor([b for b, k in enumerate(keep) if not k], device=slots.device)
                self.valid[group][rows, slots[rows, 0]] = False
        host = self.open_slots[group]
        for b in range(self.batch_size):
            if host is not None and host[b] < self.length[group][b]:  # wrote into an evicted slot
                if keep is None or keep[b]:
                    self.free[group][b].remove(host[b])
            else:
                self.length[group][b] += n if keep is None else int(keep[b])
        self._slots[group] = None
        self.open_slots[group] = None

    def evict(self, group: int, sample: int, slot: int) -> None:
        """Drop the token in ``slot`` of ``sample`` from every layer of ``group``; the slot is reused."""
        if self._slots[group] is not None:
            raise RuntimeError("evict() between open() and commit()")
        if not 0 <= slot < self.length[group][sample] or slot in self.free[group][sample]:
            raise ValueError(f"sample {sample}: slot {slot} holds no token to evict")
        self.valid[group][sample, slot] = False
        self.free[group][sample].append(slot)

    # -- accounting ------------------------------------------------------------------------------
    def token_counts(self) -> tuple[list[int], list[int]]:
        """Valid stored tokens per sample in a dense layer and in a sparse layer (reads the device)."""
        return self.valid[DENSE].sum(-1).tolist(), self.valid[SPARSE].sum(-1).tolist()

    def layer_token_counts(self) -> list[list[int]]:
        """Valid stored tokens per sample in every layer, (B, L) host ints (reads the device)."""
        per_group = [self.valid[g].sum(-1).tolist() for g in range(self.groups)]
        return [[per_group[self.group(i)][b] for i in range(self.num_layers)] for b in range(self.batch_size)]

    def element_size(self) -> int:
        """Bytes per stored K/V element."""
        return next(b for b in self.keys if b is not None).element_size()

    def allocated_bytes(self) -> int:
        """Bytes of the K/V buffers as allocated (padded to the batch's longest sample, grown in chunks)."""
        return sum(b.numel() * b.element_size() for b in self.keys + self.values if b is not None)

    # -- storage ---------------------------------------------------------------------------------
    def _ensure_capacity(self, group: int, needed: int, device: torch.device) -> None:
        valid = self.valid[group]
        if valid is not None and valid.shape[1] >= needed:
            return
        capacity = -(-needed // self.grow) * self.grow
        grown = torch.zeros(self.batch_size, capacity, dtype=torch.bool, device=device)
        if valid is not None:
            grown[:, : valid.shape[1]] = valid
        self.valid[group] = grown

    @staticmethod
    def _grown(buffer: torch.Tensor | None, like: torch.Tensor, capacity: int) -> torch.Tensor:
        batch, heads, _, dim = like.shape
        grown = like.new_zeros(batch, heads, capacity, dim)
        if buffer is not None:
            grown[:, :, : buffer.shape[2]] = buffer
        return grown
