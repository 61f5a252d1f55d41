"""What every selection rule shares: rows of eligible slots with host budgets, ties to the lowest slot.

A rule sees R rows (a sample, or one budget group of a sample): ``member`` (R, n) bool marks the
eligible slots (padding False, never selected) and ``budgets`` (host ints) how many row r keeps.
"""

from __future__ import annotations

import torch

EPS = 1e-12


def check_budgets(member: torch.Tensor, budgets: list[int]) -> torch.Tensor:
    """Validate ``budgets`` against ``member`` (R, n); return them as a (R,) long tensor on its device."""
    if member.dim() != 2 or member.dtype != torch.bool:
        raise ValueError(f"member must be a (R, n) bool tensor, got {tuple(member.shape)} {member.dtype}")
    if len(budgets) != member.shape[0]:
        raise ValueError(f"got {len(budgets)} budgets for {member.shape[0]} rows")
    counts = member.sum(-1).tolist()
    for r, (b, c) in enumerate(zip(budgets, counts)):
        if not 0 <= int(b) <= c:
            raise ValueError(f"row {r}: budget {b} outside [0, {c}] (its eligible slots)")
    return torch.tensor([int(b) for b in budgets], dtype=torch.long, device=member.device)


def first_argmax(values: torch.Tensor) -> torch.Tensor:
    """Index of the largest entry of each row, the lowest index among equal maxima: (R, n) -> (R,)."""
    n = values.shape[-1]
    slots = torch.arange(n, device=values.device).expand_as(values)
    top = values.max(-1, keepdim=True).values
    return torch.where(values == top, slots, n).min(-1).values.clamp_max(n - 1)


def unit(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm in float32 (a zero vector stays zero: its cosine with anything is 0)."""
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(EPS)


def top(score: torch.Tensor, eligible: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The ``k[r]`` eligible slots of largest score in each row, ties to the lowest slot: (R, n) bool
    (eligible slots with NaN or -inf scores stay selectable, after every finite one)."""
    n = score.shape[-1]
    order = torch.sort(score.float(), dim=-1, descending=True, stable=True).indices
    order = order.gather(-1, torch.sort((~eligible).gather(-1, order).to(torch.uint8), dim=-1, stable=True).indices)
    take = torch.arange(n, device=score.device)[None, :] < k[:, None]
    return torch.zeros_like(eligible).scatter(-1, order, take)
