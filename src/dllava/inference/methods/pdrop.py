"""PyramidDrop (Xing et al., CVPR 2025) as a drop *schedule* at the harness's equal token budget.

Rule (official code: ``pdrop_rank_drop`` in ``llava/model/modeling_llama_pdrop.py`` of Cooperx521/PyramidDrop):
the LLM is cut into stages; at each stage boundary the image tokens still present are ranked by the
attention the last instruction token pays them (FastV's score, recomputed at that layer) and only the top
share survives, each stage keeping ``lambda`` of the previous stage's image tokens. The ranking itself is
plain top-k (:func:`rank`).

Paper defaults (LLaVA-1.5, 32 layers, ``scripts/v1_5/pdrop_eval``): ``layer_list [8, 16, 24]`` (rank after the
8th, 16th and 24th layer, i.e. 0-based layers 8, 16 and 24 onwards see the smaller set),
``image_token_ratio_list [0.5, 0.25, 0.125]`` (``lambda = 0.5``): 576 / 288 / 144 / 72 image tokens,
an average of 270 per layer. Comparison tables (and the PDrop paper's own 192 / 128 / 64 rows) report PDrop
at an "average number of image tokens", the image-token count summed over layers divided by the number of
layers (PyramidDrop issues #10, #22), tuning the stage layers and ratios to hit it.

Here (:func:`schedule`), every other method cuts once, at the engine's pruning layer K = ``first_layer``, to
``k = max(1, int(n * keep))`` tokens, so it spends ``(num_layers - K) * k`` image-token-layers after K.
PDrop gets the same spend: stages start at K and at the paper's boundaries scaled to the model depth
(``num_layers * j // 4`` for j = 1, 2, 3 when later than K: 8, 16, 24 of 32; 7, 14, 21 of 28), and stage j
keeps ``x * ratio**j`` tokens (clipped to [1, n]) with ``x`` solved exactly (rational arithmetic) so the
token-layer sum equals the target; the counts are then floored and topped up greedily (one token at a
time to the stage furthest below its ideal share, whenever it still fits the target and keeps the counts
non-increasing), so the sum never exceeds the target and falls short by less than the longest stage.
Layers before K see all ``n`` tokens, as for every method. :func:`token_layers` is the sum; the harness
reports PDrop's ``image_tokens_kept`` as ``token_layers(...) / (num_layers - first_layer)``, which is then
at most, and within one token of, every other method's ``k``.

Deviation from the official code: the stage sizes come from that equal-budget rule rather than from fixed
ratios of ``n`` (the default layout with ``first_layer = 0`` and ``keep = 270 / 576`` reproduces 576 / 288 /
144 / 72 exactly); an entry whose count equals the previous one is kept (it is a no-op stage).
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from itertools import pairwise

import torch

from dllava.inference.methods.rows import check_budgets, top

RATIO = 0.5
STAGE_FRACTIONS = (Fraction(1, 4), Fraction(2, 4), Fraction(3, 4))  # 8, 16, 24 of 32 layers


def default_stage_layers(first_layer: int, num_layers: int) -> list[int]:
    """The paper's stage starts scaled to ``num_layers`` (``num_layers * j // 4``, j = 1..3), those after
    ``first_layer``, preceded by ``first_layer``: [2, 8, 16, 24] for 32 layers and K = 2."""
    later = sorted({int(num_layers * f) for f in STAGE_FRACTIONS if first_layer < int(num_layers * f) < num_layers})
    return [first_layer, *later]


def stage_starts(first_layer: int, num_layers: int, stage_layers: Sequence[int] | None = None) -> list[int]:
    """Every stage's first layer, ``first_layer`` first: ``stage_layers`` checked (strictly increasing,
    within [first_layer, num_layers); ``first_layer`` prepended when missing), or
    :func:`default_stage_layers`. They depend on no image-token count, so the engine lays its cache groups
    out from them before any request."""
    if stage_layers is None:
        return default_stage_layers(first_layer, num_layers)
    layers = [int(x) for x in stage_layers]
    if any(b <= a for a, b in pairwise(layers)):
        raise ValueError(f"stage_layers must be strictly increasing, got {layers}")
    if layers and not (first_layer <= layers[0] and layers[-1] < num_layers):
        raise ValueError(f"stage_layers must lie in [{first_layer}, {num_layers}), got {layers}")
    if not layers or layers[0] != first_layer:
        layers = [first_layer, *layers]
    return layers


def _stage_lengths(layers: list[int], num_layers: int) -> list[int]:
    return [b - a for a, b in pairwise([*layers, num_layers])]


def schedule(
    n: int,
    keep: float,
    first_layer: int,
    num_layers: int,
    stage_layers: Sequence[int] | None = None,
    ratio: float = RATIO,
) -> list[tuple[int, int]]:
    """PDrop's ``(layer, image tokens kept from this layer on)`` stages at the equal token-layer budget.

    ``n``: image tokens entering ``first_layer`` (K); ``keep``: the single-cut share of every other method
    (``k = max(1, int(n * keep))``); ``stage_layers``: stage starts (strictly increasing, within
    [first_layer, num_layers); ``first_layer`` is prepended when missing; default
    :func:`default_stage_layers`); ``ratio``: lambda, each stage's ideal count over the previous one's.
    The first entry is at ``first_layer``; counts are non-increasing, in [1, n]; the token-layer sum
    (:func:`token_layers`) never exceeds ``(num_layers - first_layer) * k`` and falls short of it by less than
    the longest stage's length.
    """
    if n < 1:
        raise ValueError(f"PDrop needs at least one image token, got n={n}")
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    if not 0 <= first_layer < num_layers:
        raise ValueError(f"need 0 <= first_layer < num_layers, got {first_layer}, {num_layers}")
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    layers = stage_starts(first_layer, num_layers, stage_layers)
    lengths = _stage_lengths(layers, num_layers)
    k = max(1, int(n * keep))
    target = (num_layers - first_layer) * k
    lam = Fraction(ratio)
    powers = [lam**j for j in range(len(layers))]

    def ideal(x: Fraction) -> list[Fraction]:
        return [min(max(x * p, Fraction(1)), Fraction(n)) for p in powers]

    def spend(x: Fraction) -> Fraction:
        return sum((length * c for length, c in zip(lengths, ideal(x))), Fraction(0))

    # spend(x) is piecewise linear and non-decreasing in x, with kinks where a stage hits 1 or n
    kinks = sorted({Fraction(1) / p for p in powers} | {Fraction(n) / p for p in powers})
    x = kinks[-1]
    for lo, hi in pairwise(kinks):
        s_lo, s_hi = spend(lo), spend(hi)
        if s_lo <= target <= s_hi:
            x = lo if s_hi == s_lo else lo + (target - s_lo) * (hi - lo) / (s_hi - s_lo)
            break
    shares = ideal(x)
    counts = [int(c) for c in shares]  # floor (shares are positive)
    short = target - sum(length * c for length, c in zip(lengths, counts))
    while True:
        fits = [
            j
            for j in range(len(counts))
            if counts[j] < n and lengths[j] <= short and (j == 0 or counts[j - 1] > counts[j])
        ]
        if not fits:
            break
        j = max(fits, key=lambda i: (shares[i] - counts[i], -i))
        counts[j] += 1
        short -= lengths[j]
    return list(zip(layers, counts))


def token_layers(schedule: Sequence[tuple[int, int]], num_layers: int) -> int:
    """Image tokens summed over the layers from the schedule's first entry to ``num_layers - 1``.

    PDrop's reported ``image_tokens_kept`` is this sum divided by ``num_layers - first_layer``."""
    layers = [layer for layer, _ in schedule]
    return sum(length * count for length, (_, count) in zip(_stage_lengths(layers, num_layers), schedule))


def rank(score: torch.Tensor, member: torch.Tensor, budgets: list[int]) -> torch.Tensor:
    """Top-``budgets[r]`` eligible slots of each row by ``score`` (R, n), ties to the lowest slot: (R, n) bool.

    ``member`` (R, n) bool marks eligible slots (padding False, never selected); ``budgets`` are host ints
    with ``0 <= budgets[r] <= member[r].sum()``."""
    return top(score, member, check_budgets(member, budgets))
