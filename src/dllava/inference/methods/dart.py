"""DART (Wen et al., EMNLP 2025, "Stop looking for important tokens..."): prune duplicated image tokens.

Rule (official code: ``get_retained_image_token`` in ``llava/model/language_model/modeling_llama_self.py``
of ZichenWen1/DART), applied once inside the LLM before layer K:

* pivots: the ``image_pivots`` image tokens and the ``text_pivots`` text tokens (all tokens after the
  image) with the largest L1 norm of their layer-(K-1) keys (rotated, all heads concatenated; the caller
  computes the norms);
* for each pivot in turn, keep the ``q`` not yet kept, non-pivot image tokens *least* cosine-similar to it
  (cosine of the layer-(K-1) output hidden states; the official code passes them through the model's
  final RMSNorm first, so callers that want fidelity pass normed states), removing them from the
  candidates before the next pivot;
* image pivots are kept; text pivots are never dropped (they are text); original positions are kept.

LLaVA-1.5 defaults (``scripts/v1_5/eval/*.sh``, ``model_vqa_loader.py``): K = 2, 4 image + 4 text pivots,
``q = budget // 8`` (``max_num_trunction`` 128 -> 16 per pivot), so the official code keeps
``4 + 8 * (budget // 8)`` image tokens (132 at 128, 68 at 64).

Deliberate deviations (equal budgets):

* the pivots count toward the budget: row r keeps exactly ``budgets[r]``. ``p = min(image_pivots,
  budget)`` image pivots are kept, and the other ``budget - p`` tokens are split over the row's pivots
  (the ``p`` image pivots plus ``min(text_pivots, valid text tokens)`` text pivots): each gets
  ``(budget - p) // P`` and the first ``(budget - p) % P`` pivots in processing order get one more. A
  budget below ``image_pivots`` keeps just the top-``budget`` image tokens by key norm;
* processing order: image pivots by ascending slot, then text pivots by ascending slot (the official code
  iterates a Python ``set`` of positions, an order defined by hashing, not by the method);
* ties (key norms, similarities) go to the lowest slot; zero vectors get cosine 0; float32 throughout.
"""

from __future__ import annotations

import torch

from dllava.inference.methods.rows import check_budgets, top, unit

IMAGE_PIVOTS = 4
TEXT_PIVOTS = 4


def select(
    image_hidden: torch.Tensor,
    image_key_norm: torch.Tensor,
    text_hidden: torch.Tensor,
    text_key_norm: torch.Tensor,
    text_valid: torch.Tensor,
    member: torch.Tensor,
    budgets: list[int],
    image_pivots: int = IMAGE_PIVOTS,
    text_pivots: int = TEXT_PIVOTS,
) -> torch.Tensor:
    """DART's kept image slots, exactly ``budgets[r]`` per row r: (R, n) bool.

    ``image_hidden`` (R, n, H) / ``text_hidden`` (R, m, H): the layer-(K-1) output states of the image and
    text tokens; ``image_key_norm`` (R, n) / ``text_key_norm`` (R, m): L1 norms of their layer-(K-1) keys;
    ``text_valid`` (R, m) bool: real text tokens; ``member`` (R, n) bool: eligible image slots (padding
    False, never selected); ``budgets``: host ints with ``0 <= budgets[r] <= member[r].sum()``.
    """
    want = check_budgets(member, budgets)
    if image_pivots < 1 or text_pivots < 0:
        raise ValueError(f"need image_pivots >= 1 and text_pivots >= 0, got {image_pivots}, {text_pivots}")
    R, n = member.shape
    device = member.device
    n_img = torch.minimum(want, torch.full_like(want, image_pivots))  # image pivots of each row
    n_txt = torch.where(want > 0, text_valid.sum(-1).clamp_max(text_pivots), torch.zeros_like(want))
    chosen = top(image_key_norm, member, n_img)  # the image pivots, kept
    text_pivot = top(text_key_norm, text_valid, n_txt)
    # pivots in processing order: image pivots by slot, then text pivots by slot; P = image_pivots + text_pivots
    img_slots = torch.sort(torch.where(chosen, torch.arange(n, device=device), n), -1).values[:, :image_pivots]
    m = text_valid.shape[1]
    txt_slots = torch.sort(torch.where(text_pivot, torch.arange(m, device=device), m), -1).values[:, :text_pivots]
    img_vec = unit(image_hidden)
    txt_vec = unit(text_hidden)

    def pad(x: torch.Tensor) -> torch.Tensor:  # one zero row more: slot n (or m) stands for "no pivot"
        return torch.cat([x, x.new_zeros(R, 1, x.shape[-1])], 1)

    pivots = torch.cat([pad(img_vec).gather(1, img_slots[..., None].expand(-1, -1, img_vec.shape[-1])),
                        pad(txt_vec).gather(1, txt_slots[..., None].expand(-1, -1, txt_vec.shape[-1]))], 1)
    real = torch.cat([img_slots < n, txt_slots < m], 1)  # (R, P): which pivot entries exist
    total = n_img + n_txt  # (R,)
    rest = want - n_img
    order = real.long().cumsum(-1) - 1  # rank of each pivot among the row's pivots
    base = torch.where(total > 0, rest // total.clamp_min(1), torch.zeros_like(rest))
    extra = torch.where(total > 0, rest % total.clamp_min(1), torch.zeros_like(rest))
    quota = torch.where(real, base[:, None] + (order < extra[:, None]).long(), torch.zeros_like(order))
    for p in range(pivots.shape[1]):
        cos = (img_vec @ pivots[:, p, :, None])[..., 0]  # (R, n)
        chosen = chosen | top(-cos, member & ~chosen, quota[:, p])
    return chosen
