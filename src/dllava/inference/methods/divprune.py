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

from dllava.inference.methods.rows import check_budgets, first_argmax, unit



def distances(features: torch.Tensor) -> torch.Tensor:
    """Cosine distance ``1 - cos`` between every pair of tokens of a row, float32: (R, n, H) -> (R, n, n)."""
    f = unit(features)
    return 1.0 - f @ f.transpose(1, 2)


def select(features: torch.Tensor, member: torch.Tensor, budgets: list[int]) -> torch.Tensor:
    """DivPrune's greedy max-min selection of ``budgets[r]`` eligible slots of each row r.

    ``features`` (R, n, H): the (projected) image tokens; ``member`` (R, n) bool: eligible slots (padding
    False, never selected); ``budgets``: host ints, ``0 <= budgets[r] <= member[r].sum()``. Returns (R, n)
    bool with exactly ``budgets[r]`` True slots in row r.
    """
    want = check_budgets(member, budgets)
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
        pick = first_argmax(torch.where(candidate, gap, -inf))
        chosen[rows[active], pick[active]] = True
        to_pick = dist[rows, pick]  # (R, n): distance of every slot to the new pick
        gap = to_pick if t == 0 else torch.minimum(gap, to_pick)
    return chosen
