"""VisionZip (Yang et al., CVPR 2025): dominant tokens by attention, the rest merged into contextual tokens.

Rule (official code: ``CLIPVisionTower_VisionZip.forward`` in ``visionzip/clip_encoder.py`` of
dvlab-research/VisionZip), applied at the vision tower's penultimate layer:

* dominant tokens: the top-``d`` patches by the attention the CLS token pays them, summed over heads (on
  CLS-less towers the caller substitutes another per-patch attention score);
* the remaining ``R`` patches, in their original order, are split by a stride ``step = max(1, R // c)``:
  positions ``0, step, 2 step, ...`` (the first ``c`` of them) are the contextual centres;
* every other remaining patch joins the centre with the largest dot product of L2-normalised keys (the
  penultimate layer's keys averaged over heads; ties to the first centre, as ``argmax``);
* a centre's output feature is its own feature *plus the mean* of the features of the patches assigned
  to it (``target_hidden + aggregated_hidden / counts`` in the official code: not the mean of the centre
  and its patches); a centre nothing joined keeps its own feature.

Paper defaults (LLaVA-1.5, 576 patches): 54 + 10 tokens for 64, 108 + 20 for 128, 162 + 30 for 192, i.e.
a contextual share of 10/64 of the total (:func:`split`). The official dominant count includes the CLS
token (``dominant - 1`` patches + CLS); the harness's image tokens are patches only (LLaVA drops CLS), so
all ``d`` dominant slots go to patches here.

Edge cases: ``split`` rounds half up and leaves at least one dominant token, so budgets 1-3 are all
dominant (10/64 of them rounds to 0); with no contextual token nothing is merged; the remaining patches
always number at least ``c`` (the budget never exceeds the eligible slots), so exactly ``c`` centres exist.
Ties go to the lowest slot (dominant top-k) and to the lowest centre slot (assignment). Float32 throughout;
``merged`` is returned in ``features``' dtype.
"""

from __future__ import annotations

import math

import torch

from dllava.inference.methods.rows import check_budgets, top, unit

CONTEXTUAL_SHARE = 10 / 64


def split(total: int, contextual_share: float = CONTEXTUAL_SHARE) -> tuple[int, int]:
    """(dominant, contextual) token counts for a ``total`` budget: ``contextual = floor(total * share + 1/2)``
    capped at ``total - 1`` (at least one dominant token when ``total >= 1``); 64 -> (54, 10),
    128 -> (108, 20), 192 -> (162, 30) as in the paper."""
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    if not 0 <= contextual_share <= 1:
        raise ValueError(f"contextual_share must be in [0, 1], got {contextual_share}")
    contextual = min(math.floor(total * contextual_share + 0.5), max(total - 1, 0))
    return total - contextual, contextual


def select(
    score: torch.Tensor,
    keys: torch.Tensor,
    features: torch.Tensor,
    member: torch.Tensor,
    budgets: list[int],
    contextual_share: float = CONTEXTUAL_SHARE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """VisionZip's kept slots and merged features of each row r.

    ``score`` (R, n): per-patch attention score (dominant ranking); ``keys`` (R, n, d): the similarity
    metric (keys averaged over heads); ``features`` (R, n, H): the patch features to merge; ``member``
    (R, n) bool: eligible slots (padding False, never kept or merged); ``budgets``: host ints with
    ``0 <= budgets[r] <= member[r].sum()``, split by :func:`split`.

    Returns ``keep`` (R, n) bool (dominant slots plus contextual centres, exactly ``budgets[r]`` per row)
    and ``merged`` (R, n, H): ``features`` except at centre slots, which hold the centre's feature plus the
    mean feature of the patches assigned to it.
    """
    check_budgets(member, budgets)
    R, n = member.shape
    device = member.device
    pairs = [split(int(b), contextual_share) for b in budgets]
    dominant_k = torch.tensor([d for d, _ in pairs], dtype=torch.long, device=device)
    contextual_k = torch.tensor([c for _, c in pairs], dtype=torch.long, device=device)
    dominant = top(score, member, dominant_k)
    remaining = member & ~dominant
    left = remaining.sum(-1)  # (R,) >= contextual_k
    step = torch.where(contextual_k > 0, left // contextual_k.clamp_min(1), torch.ones_like(left)).clamp_min(1)
    rank = remaining.long().cumsum(-1) - 1  # order of each remaining slot among the row's remaining slots
    centre = remaining & (rank % step[:, None] == 0) & (rank // step[:, None] < contextual_k[:, None])
    keep = dominant | centre
    joins = remaining & ~centre & (contextual_k > 0)[:, None]  # without centres nothing is merged
    if not bool(joins.any()):
        return keep, features.clone()
    k = unit(keys)
    sim = k @ k.transpose(1, 2)  # (R, n, n): slot i's similarity to candidate centre j
    sim = torch.where(centre[:, None, :], sim, torch.tensor(float("-inf"), device=device))
    best = sim.max(-1, keepdim=True).values
    slots = torch.arange(n, device=device).expand(R, n, n)
    target = torch.where(sim == best, slots, n).min(-1).values.clamp_max(n - 1)  # (R, n), first best centre
    target = torch.where(joins, target, torch.zeros_like(target))
    f = features.float()
    weight = joins.float()
    summed = torch.zeros_like(f).scatter_add_(1, target[..., None].expand_as(f), f * weight[..., None])
    count = torch.zeros(R, n, device=device).scatter_add_(1, target, weight)
    merged_centre = f + summed / count.clamp_min(1)[..., None]
    merged = torch.where(centre[..., None], merged_centre, f).to(features.dtype)
    # outside the centres, return the caller's values bit for bit
    merged = torch.where(centre[..., None], merged, features)
    return keep, merged
