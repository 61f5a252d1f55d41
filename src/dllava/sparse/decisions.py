"""Keep/drop decisions from predictor logits (channel 0 = keep) and the sparsity-budget loss.

Training samples hard decisions with straight-through Gumbel-Softmax, so the forward pass sees 0/1
while gradients follow the soft sample (PAPER.md section 4.1). Evaluation thresholds the logits (what
the budget loss trains); inference keeps exactly ``int(n * keep)`` image tokens by top-k (section 7.1),
of every budget group: a sample's droppable image tokens (``global``) or each view's (``per_view``).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def gumbel_keep(logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Hard 0/1 keep decisions with straight-through gradient: (..., 2) -> (...)."""
    return F.gumbel_softmax(F.log_softmax(logits.float(), dim=-1), tau=tau, hard=True)[..., 0]


def threshold_keep(logits: torch.Tensor) -> torch.Tensor:
    """Keep where the keep logit wins: (..., 2) -> (...) float 0/1, no gradient."""
    return (logits[..., 0] > logits[..., 1]).float()


def keep_score(logits: torch.Tensor) -> torch.Tensor:
    """The top-k ranking score of each token: the keep-minus-drop logit margin, in fp32, (..., 2) -> (...).

    It orders tokens as log p(keep) does (that is ``-softplus(-margin)``, increasing in the margin) but
    never saturates: past a margin of about 17, ``log_softmax`` gives exactly 0.0 in fp32 for every
    confident token, and top-k then breaks the ties by position and tensor shape, so a sample would keep
    different tokens alone and in a padded batch."""
    logits = logits.float()
    return logits[..., 0] - logits[..., 1]


BUDGETS = ("global", "per_view")


def check_budget(budget: str) -> str:
    """The image-budget convention: ``global`` keeps ``int(n * keep)`` of a sample's droppable image tokens
    wherever they are; ``per_view`` keeps that share inside each view (base view and every crop)."""
    if budget not in BUDGETS:
        raise ValueError(f"sparsity.budget must be one of {BUDGETS}, got {budget!r}")
    return budget


def num_kept(n: int, keep: float) -> int:
    """``int(n * keep)`` (at least one): the inference-time image budget of every method."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    return max(1, int(n * keep))


def topk_keep(
    logits: torch.Tensor, keep: float, valid: torch.Tensor | None = None, groups: torch.Tensor | None = None
) -> torch.Tensor:
    """Keep the ``int(n_b * keep)`` tokens with the highest keep log-probability in each row b (ranked by
    :func:`keep_score`): (B, n, 2) -> (B, n). ``valid`` (B, n) marks each row's real tokens (``n_b`` of them, first in the
    row) when rows hold different counts; padding slots are never kept. ``groups`` (B, n) splits a row
    into budget groups (:func:`top_per_group`: each keeps its own share; -1 marks tokens always kept)."""
    score = keep_score(logits)
    if valid is None:
        valid = torch.ones_like(score, dtype=torch.bool)
    if groups is None:  # one group per row: the plain per-sample budget
        groups = torch.where(valid, 0, -1)
    return top_per_group(score, groups, valid, keep).to(score.dtype)


def group_sizes(groups: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, G) host counts of each row's valid tokens in budget group g = 0 .. G-1 (``groups`` -1: none)."""
    groups, valid = groups.cpu(), valid.cpu()
    n_groups = int(groups.max()) + 1 if groups.numel() else 0
    sizes = torch.zeros(groups.shape[0], max(n_groups, 1), dtype=torch.long)
    member = valid & (groups >= 0)
    return sizes.scatter_add_(1, groups.clamp_min(0), member.long())


def group_budgets(sizes: torch.Tensor, keep: float) -> list[list[int]]:
    """``int(size * keep)`` (at least one) of every non-empty group, 0 for empty ones: (B, G) -> host lists."""
    return [[num_kept(int(s), keep) if s else 0 for s in row] for row in sizes.tolist()]


def top_per_group(score: torch.Tensor, groups: torch.Tensor, valid: torch.Tensor, keep: float) -> torch.Tensor:
    """(B, n) bool: inside each budget group g of row b (slots with ``groups == g``), the
    ``int(n_bg * keep)`` highest scores; slots with ``groups == -1`` (e.g. LLaVA-NeXT's newline tokens) are
    always kept. One group per row is the plain per-sample budget; one group per view is ``per_view``.
    ``groups`` and ``valid`` may live on the host (budgets are host ints, so this runs on the meta device)."""
    budgets = group_budgets(group_sizes(groups, valid), keep)
    groups, valid = groups.to(score.device), valid.to(score.device)
    return select_per_group(lambda member, flat: top_per_row(group_rows(score, member), flat, member), groups, valid, budgets)


def group_rows(values: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
    """Per-sample ``values`` (B, ...) repeated for each of the G budget groups of ``member`` (B * G, n): the
    rows :func:`select_per_group` hands a selection rule."""
    return values.repeat_interleave(member.shape[0] // values.shape[0], dim=0)


def select_per_group(
    select: Callable[[torch.Tensor, list[int]], torch.Tensor],
    groups: torch.Tensor,
    valid: torch.Tensor,
    budgets: list[list[int]],
) -> torch.Tensor:
    """(B, n) bool: ``select(member, flat_budgets)`` run once over B * G rows, one per budget group g of
    sample b (row ``b * G + g``; ``member`` (B * G, n) marks the group's valid slots, ``flat_budgets`` its
    host budget ``budgets[b][g]``), the rows' picks merged per sample, plus the always-kept slots
    (``groups == -1`` and valid). The one place every image method meets the ``global`` / ``per_view``
    conventions: a method only ever selects inside a row."""
    batch, n = groups.shape
    n_groups = max(len(row) for row in budgets) if budgets else 1
    budgets = [list(row) + [0] * (n_groups - len(row)) for row in budgets]
    member = group_members(groups, valid, n_groups)
    device = member.device
    chosen = select(member.reshape(batch * n_groups, n), [b for row in budgets for b in row])
    chosen = chosen.to(device).reshape(batch, n_groups, n)
    return chosen.any(1) | (valid & (groups < 0))


def group_members(groups: torch.Tensor, valid: torch.Tensor, n_groups: int) -> torch.Tensor:
    """(B, G, n) bool: slot j of row b is a valid member of budget group g."""
    ids = torch.arange(n_groups, device=groups.device)
    return (groups[:, None, :] == ids[None, :, None]) & valid[:, None, :]


def group_keep_ratio(kept: torch.Tensor, groups: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group kept fractions (B, G) and which groups hold any token (B, G) (``groups`` -1: in none)."""
    member = group_members(groups, valid, int(groups.max().clamp_min(0)) + 1).to(kept.dtype)
    size = member.sum(-1)
    return (member * kept[:, None, :]).sum(-1) / size.clamp_min(1), size > 0


def top_per_row(score: torch.Tensor, budgets: list[int], valid: torch.Tensor) -> torch.Tensor:
    """(B, n) bool: the ``budgets[b]`` highest scores among row b's ``valid`` slots (host budgets, so the
    same code runs on the meta device)."""
    order = score.masked_fill(~valid, float("-inf")).topk(max(budgets), dim=-1).indices
    chosen = torch.arange(order.shape[1], device=score.device)[None] < torch.tensor(budgets, device=score.device)[:, None]
    return torch.zeros(score.shape, dtype=torch.bool, device=score.device).scatter(1, order, chosen)


def image_columns(image_mask: torch.Tensor, width: int) -> torch.Tensor:
    """(B, width) column indices of each row's image tokens in order, then (for rows with fewer than
    ``width``) other columns as filler. A stable sort, not boolean indexing, so shapes never depend on
    data and the same code runs on the meta device."""
    return torch.sort((~image_mask).to(torch.uint8), dim=-1, stable=True).indices[:, :width]


def keep_ratio(kept: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample fraction of kept tokens among the valid ones: (B, n) -> (B,) (0 where none is valid)."""
    if valid is None:
        return kept.mean(-1)
    valid = valid.to(kept.dtype)
    return (kept * valid).sum(-1) / valid.sum(-1).clamp_min(1)


def budget_errors(ratio: torch.Tensor, target: float, eligible: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) per-sample ``(target - ratio_b)^2``, 0 for ineligible samples. A (B, G) ``ratio`` (one per
    budget group, ``eligible`` (B, G) marking the groups a sample has) averages each sample's groups, so
    the ``per_view`` convention pulls every view to the target and a sample weighs the same either way."""
    error = (target - ratio) ** 2
    if eligible is not None:
        error = error * eligible.to(error.dtype)
    if error.dim() == 2:
        present = (eligible.to(error.dtype) if eligible is not None else torch.ones_like(error)).sum(-1)
        error = error.sum(-1) / present.clamp_min(1)
    return error


def budget_loss(ratio: torch.Tensor, target: float, eligible: torch.Tensor | None = None) -> torch.Tensor:
    """``mean_b (target - ratio_b)^2`` over the whole batch (:func:`budget_errors`); ineligible samples
    contribute 0.

    Averaging over every sample (not only eligible ones) follows the reference code, whose text term
    is diluted by short-answer samples (PAPER.md section 5).
    """
    return budget_errors(ratio, target, eligible).mean()
