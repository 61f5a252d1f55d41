"""DivPrune (Alvar et al., CVPR 2025): keep a maximally diverse subset of the projected image tokens.

Rule (official code: ``DivPrune`` in ``LLaVA/llava/model/llava_arch.py`` of vbdi/divprune):

* distance ``d(i, j) = 1 - cos(f_i, f_j)`` between the image tokens' projector outputs (no text input);
* first pick: the token whose *nearest other* token is farthest, ``argmax_i min_{j != i} d(i, j)`` (the
  official code takes the second smallest entry of each distance column, the smallest being the token's
  distance to itself);
* every later pick: the unpicked token whose distance to its nearest *picked* token is largest (greedy
  max-min diversity, MMDP), until ``k`` tokens are picked.

Paper defaults: applied once, after the projector and before the LLM (``LAYER_INDEX=0``), with
``k = round(ratio * n)``; here ``k`` is the caller's budget (the harness's equal budget, ``int(n * keep)``).

Deliberate deviations, none of which changes the result on inputs without exact duplicates:

* the token's own distance is excluded explicitly from its nearest-neighbour distance instead of being
  assumed the smallest entry (rounding can make ``1 - cos(f, f)`` exceed the distance to a duplicate);
* picked tokens are excluded from later picks (the official loop could pick a token twice when every
  remaining token duplicates a picked one, and then keep fewer than ``k`` tokens);
* a row with a single eligible token picks it; zero vectors get cosine 0 (norms clamped at 1e-12).

Ties go to the lowest slot. Everything is computed in float32.
"""

from __future__ import annotations

import torch

_EPS = 1e-12


def _check(member: torch.Tensor, budgets: list[int]) -> torch.Tensor:
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


def _first_argmax(values: torch.Tensor) -> torch.Tensor:
    """Index of the largest entry of each row, the lowest index among equal maxima: (R, n) -> (R,)."""
    n = values.shape[-1]
    slots = torch.arange(n, device=values.device).expand_as(values)
    top = values.max(-1, keepdim=True).values
    return torch.where(values == top, slots, n).min(-1).values.clamp_max(n - 1)


def distances(features: torch.Tensor) -> torch.Tensor:
    """Cosine distance ``1 - cos`` between every pair of tokens of a row, float32: (R, n, H) -> (R, n, n)."""
    f = features.float()
    f = f / f.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    return 1.0 - f @ f.transpose(1, 2)


def select(features: torch.Tensor, member: torch.Tensor, budgets: list[int]) -> torch.Tensor:
    """DivPrune's greedy max-min selection of ``budgets[r]`` eligible slots of each row r.

    ``features`` (R, n, H): the (projected) image tokens; ``member`` (R, n) bool: eligible slots (padding
    False, never selected); ``budgets``: host ints, ``0 <= budgets[r] <= member[r].sum()``. Returns (R, n)
    bool with exactly ``budgets[r]`` True slots in row r.
    """
    want = _check(member, budgets)
    R, n = member.shape
    chosen = torch.zeros(R, n, dtype=torch.bool, device=member.device)
    k_max = int(max(budgets, default=0))
    if k_max == 0:
        return chosen
    dist = distances(features)
    rows = torch.arange(R, device=member.device)
    eye = torch.eye(n, dtype=torch.bool, device=member.device)
    inf = torch.tensor(float("inf"), device=member.device)
    # nearest other eligible token of each slot (+inf when the row has no other eligible token)
    others = member[:, None, :] & ~eye
    nearest = torch.where(others, dist, inf).min(-1).values
    gap = nearest  # the quantity maximised at each step: distance to the nearest reference token
    for t in range(k_max):
        active = want > t
        candidate = member & ~chosen
        pick = _first_argmax(torch.where(candidate, gap, -inf))
        chosen[rows[active], pick[active]] = True
        to_pick = dist[rows, pick]  # (R, n): distance of every slot to the new pick
        gap = to_pick if t == 0 else torch.minimum(gap, to_pick)
    return chosen
