"""CDPruner (Zhang et al., NeurIPS 2025): instruction-conditioned DPP over the projected image tokens.

Rule (official code: ``encode_images`` in ``llava/model/llava_arch.py`` of Theia-4869/CDPruner):

* similarity ``S_ij = cos(f_i, f_j)`` of the projector outputs (L2-normalised, float32);
* relevance: the *negated* mean, over the instruction's embeddings, of the cosine between an image token's
  embedding and each instruction embedding, then min-max normalised as ``(x - min + 1e-6) / (max - min)``
  (the 1e-6 keeps the least relevant token's kernel entry positive). LLaVA-1.5 uses CLIP's image-side
  patch embeddings and CLIP text-tower embeddings of the question (one per 77-token segment); on other
  families the LLM's input embeddings of the instruction tokens serve (../shared/BASELINES.md);
* kernel ``L_ij = r_i S_ij r_j``;
* greedy MAP inference of the DPP with the fast algorithm of Chen et al. (NeurIPS 2018): keep, for every
  candidate, the squared norm ``d_i^2`` of its component orthogonal to the picked set (its marginal
  log-det gain is ``log d_i^2``), pick ``argmax d_i^2``, update every ``d_i^2`` with one new Cholesky row.

Paper defaults: applied once after the projector; ``k`` = the caller's budget (``--visual_token_num``).
The official code's optional re-weighting ``r <- exp(theta / (2 (1 - theta)) * r)`` (suggested theta 0.5)
is commented out there, so it is off by default here too (``relevance(..., theta=None)``).

Deliberate deviations:

* min and max run over the row's valid image tokens (the official code pools them over its whole batch
  of images, i.e. over the crops of one LLaVA-NeXT sample: pass all of a sample's crops as one row to
  match it);
* a row without any valid instruction token gets relevance 1 on every valid image slot (plain diversity
  DPP); a row whose relevance is constant (one valid image token, or all equal) also gets 1 there, where
  the official formula divides by zero; padding slots get 0;
* exact budgets: the greedy continues for exactly ``budgets[r]`` picks. Gains at or below
  ``1e-6 * max_i L_ii`` of the row count as 0 (their Cholesky row is not formed: the candidate lies in the
  span of the picked set up to rounding), so once no remaining gain exceeds that tolerance the remaining
  picks go to the lowest slots among the largest (clamped) gains instead of to rounding noise; the official
  loop would divide by a zero or negative gain there.

Ties go to the lowest slot.
"""

from __future__ import annotations

import torch

from dllava.inference.methods.rows import check_budgets, first_argmax, unit

_GAIN_TOL = 1e-6


def relevance(
    image: torch.Tensor,
    instruction: torch.Tensor,
    image_valid: torch.Tensor,
    instruction_valid: torch.Tensor,
    theta: float | None = None,
) -> torch.Tensor:
    """CDPruner's instruction relevance of each image token, float32: (B, n, H), (B, m, H) -> (B, n).

    ``image`` (B, n, H) and ``instruction`` (B, m, H) are embeddings in one space (the same H);
    ``image_valid`` (B, n) / ``instruction_valid`` (B, m) mark real tokens. ``r = -mean_j cos(image_i,
    instruction_j)`` over the valid instruction tokens, min-max normalised over the row's valid image tokens
    as ``(r - min + 1e-6) / (max - min)``. Rows without a valid instruction token, or with a constant ``r``,
    get 1 on their valid image slots; padding slots get 0. Values lie in (0, 1 + 1e-6 / spread].
    ``theta`` in [0, 1) (default None: off, as in the official code) maps the valid slots' values through
    ``exp(theta / (2 (1 - theta)) * r)``.
    """
    if theta is not None and not 0 <= theta < 1:
        raise ValueError(f"theta must be in [0, 1), got {theta}")
    cos = unit(image) @ unit(instruction).transpose(1, 2)  # (B, n, m)
    text = instruction_valid.to(cos.dtype)[:, None, :]
    count = instruction_valid.sum(-1)  # (B,)
    raw = -(cos * text).sum(-1) / count.clamp_min(1).to(cos.dtype)[:, None]  # (B, n)
    inf = torch.tensor(float("inf"), device=raw.device)
    low = torch.where(image_valid, raw, inf).min(-1, keepdim=True).values
    high = torch.where(image_valid, raw, -inf).max(-1, keepdim=True).values
    spread = high - low
    usable = (count > 0)[:, None] & (spread > 0)
    scaled = (raw - low + 1e-6) / torch.where(usable, spread, torch.ones_like(spread))
    out = torch.where(usable, scaled, torch.ones_like(scaled))
    if theta is not None:
        out = torch.exp(theta / (2 * (1 - theta)) * out)
    return torch.where(image_valid, out, torch.zeros_like(out))


def kernel(features: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """The conditional DPP kernel ``L_ij = r_i cos(f_i, f_j) r_j``, float32: (R, n, H), (R, n) -> (R, n, n)."""
    f = unit(features)
    r = relevance.float()
    similarity = f @ f.transpose(1, 2)
    # cos(f, f) = 1 exactly (0 for a zero vector), so equal relevances tie exactly on the diagonal
    similarity.diagonal(dim1=1, dim2=2).copy_((features.float().norm(dim=-1) > 0).float())
    return r[:, :, None] * similarity * r[:, None, :]


def select(
    features: torch.Tensor, relevance: torch.Tensor, member: torch.Tensor, budgets: list[int]
) -> torch.Tensor:
    """Greedy DPP MAP selection of ``budgets[r]`` eligible slots of each row r (fast incremental Cholesky).

    ``features`` (R, n, H): projected image tokens; ``relevance`` (R, n): :func:`relevance`; ``member``
    (R, n) bool: eligible slots (padding False, never selected); ``budgets``: host ints with
    ``0 <= budgets[r] <= member[r].sum()``. Returns (R, n) bool with exactly ``budgets[r]`` True per row.
    """
    want = check_budgets(member, budgets)
    R, n = member.shape
    chosen = torch.zeros(R, n, dtype=torch.bool, device=member.device)
    k_max = int(max(budgets, default=0))
    if k_max == 0:
        return chosen
    L = kernel(features, relevance)
    rows = torch.arange(R, device=member.device)
    gains = torch.diagonal(L, dim1=1, dim2=2).clone()  # d_i^2 with nothing picked
    tol = _GAIN_TOL * torch.where(member, gains, torch.zeros_like(gains)).amax(-1, keepdim=True)
    chol = torch.zeros(k_max, R, n, device=member.device)  # rows of the incremental Cholesky factor
    inf = torch.tensor(float("inf"), device=member.device)
    for t in range(k_max):
        active = want > t
        candidate = member & ~chosen
        clamped = torch.where(gains > tol, gains, torch.zeros_like(gains))
        pick = first_argmax(torch.where(candidate, clamped, -inf))
        gain = gains[rows, pick]  # (R,)
        formed = active & (gain > tol[:, 0])
        # e_i = (L_pick,i - sum_s c_s,pick c_s,i) / sqrt(d_pick^2), zero when the pick adds no new direction
        projected = L[rows, pick] - torch.einsum("tr,trn->rn", chol[:t, rows, pick], chol[:t])
        e = projected / torch.where(formed, gain, torch.ones_like(gain)).sqrt()[:, None]
        e = torch.where(formed[:, None], e, torch.zeros_like(e))
        chol[t] = e
        gains = gains - e.square()
        chosen[rows[active], pick[active]] = True
    return chosen
