"""Which generated tokens stay in the sparse layers (>= K) while decoding: the learned rule and the
output-side baselines it is compared with (PAPER.md section 9.4, Table 3).

Every fed generated token takes part in its own step. Afterwards a policy says whether it stays, and
the budget policies may evict one earlier token instead:

* ``learned``: the text predictor's threshold on the token's layer-K input (section 7.3); never evicts.
* ``off``: every token stays.
* a float ``r``: the structured pattern, token ``t`` stays iff ``floor((t+1) r) > floor(t r)``
  (``r = 0.5``: drop every other token, the paper's "structure" row); never evicts.
* ``random``, ``streaming``, ``h2o``: after feeding token ``t`` exactly :func:`text_budget` ``(t, r)``
  generated tokens stay, the same count the structured pattern keeps; when one too many would stay,
  one of the candidates (the tokens staying so far plus the newest) is evicted:

  - ``random``: a uniformly random candidate (seeded per request);
  - ``streaming`` (StreamingLLM): the oldest candidate after the first ``sinks`` (attention sinks), so
    the sinks and a recent window stay;
  - ``h2o`` (Heavy-Hitter Oracle): the non-recent candidate with the least accumulated attention, the
    ``budget // 2`` most recent tokens being protected. The attention is what each step's newest query
    pays to every cached generated token in layer K (softmax over all cached keys, mean over heads),
    summed over the steps the token has been cached; ties go to the oldest.

All layers >= K share one token set, so a policy evicts from every sparse layer at once (the original
H2O decides per layer). The prompt (system, kept image tokens, question) is never evicted: the policies
compete only over generated tokens, as the learned one does.

Request state (which tokens stay, their accumulated attention) lives in the caller's
:class:`TextMembership`; the policy functions are pure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

RULE_POLICIES = ("learned", "off")
BUDGET_POLICIES = ("random", "streaming", "h2o")


def check_text_policy(text: str | float) -> str | float:
    """``learned``, ``off``, a budget policy name, or a keep rate in (0, 1] (the structured pattern)."""
    if isinstance(text, str) and text in RULE_POLICIES + BUDGET_POLICIES:
        return text
    try:
        rate = float(text)
    except (TypeError, ValueError):
        raise ValueError(
            f"text policy must be one of {list(RULE_POLICIES + BUDGET_POLICIES)} or a keep rate in (0, 1], got {text!r}"
        ) from None
    if not 0 < rate <= 1:
        raise ValueError(f"text keep rate must be in (0, 1], got {rate}")
    return rate


def check_share(share: float) -> float:
    """A budget policy's share of generated tokens that stay, in (0, 1]."""
    share = float(share)
    if not 0 < share <= 1:
        raise ValueError(f"text keep share must be in (0, 1], got {share}")
    return share


def text_budget(step: int, share: float) -> int:
    """Generated tokens that stay after feeding token ``step`` (0-based): ``floor((step + 1) share)``."""
    return math.floor((step + 1) * share + 1e-9)


def text_rate_keep(step: int, rate: float) -> bool:
    """The structured pattern: token ``step`` stays iff the budget grows with it."""
    return text_budget(step, rate) > text_budget(step - 1, rate)


@dataclass
class TextMembership:
    """Per sample, per fed generated token: does it stay in the sparse layers now, its slot in the
    sparse cache (-1: none), its accumulated attention (``h2o``), and how many generated tokens each
    step attended to in the sparse layers (itself included: the "computing" tokens of Table 3)."""

    batch: int
    alive: list[list[bool]] = field(default_factory=list)
    slots: list[list[int]] = field(default_factory=list)
    attention: list[list[float]] = field(default_factory=list)
    staying_after: list[list[int]] = field(default_factory=list)  # per fed token: how many stay after it

    def __post_init__(self) -> None:
        for name in ("alive", "slots", "attention", "staying_after"):
            if not getattr(self, name):
                setattr(self, name, [[] for _ in range(self.batch)])

    @property
    def computing(self) -> list[list[int]]:
        """Per fed token: the generated tokens its step ran with, itself included (those staying after
        the previous token, plus it)."""
        return [[1] + [n + 1 for n in row[:-1]] if row else [] for row in self.staying_after]

    def staying(self, b: int) -> list[int]:
        """Fed indices of sample ``b``'s generated tokens that stay, oldest first."""
        return [j for j, a in enumerate(self.alive[b]) if a]


def evict_candidate(
    policy: str,
    candidates: list[int],
    budget: int,
    attention: list[float],
    sinks: int,
    generator: torch.Generator,
) -> int:
    """The fed index to evict when ``candidates`` (staying tokens plus the newest, oldest first) are one
    more than ``budget``."""
    if budget == 0:
        return candidates[-1]
    if policy == "random":
        return candidates[int(torch.randint(len(candidates), (1,), generator=generator))]
    if policy == "streaming":
        return candidates[min(sinks, budget)]
    if policy == "h2o":
        heavy = candidates[: len(candidates) - budget // 2]
        return min(heavy, key=lambda j: (attention[j], j))
    raise ValueError(f"{policy!r} is not a budget policy ({BUDGET_POLICIES})")


def decide_newest(
    policy: str | float,
    members: TextMembership,
    step: int,
    learned_keep: list[bool] | None,
    share: float,
    sinks: int,
    generator: torch.Generator,
) -> tuple[list[bool], list[tuple[int, int]]]:
    """Record token ``step`` of every sample and apply ``policy``: returns whether each newest token
    stays (B,) and the evictions ``[(sample, fed index)]`` of earlier tokens."""
    keep: list[bool] = []
    evicted: list[tuple[int, int]] = []
    for b in range(members.batch):
        members.alive[b].append(True)
        if policy == "off":
            stays = True
        elif policy == "learned":
            stays = bool(learned_keep[b])
        elif isinstance(policy, float):
            stays = text_rate_keep(step, policy)
        else:
            candidates = members.staying(b)
            budget = text_budget(step, share)
            stays = True
            if len(candidates) > budget:
                drop = evict_candidate(policy, candidates, budget, members.attention[b], sinks, generator)
                members.alive[b][drop] = False
                if drop == step:
                    stays = False
                else:
                    evicted.append((b, drop))
        members.alive[b][step] = stays
        members.staying_after[b].append(sum(members.alive[b]))
        keep.append(stays)
    return keep, evicted


def accumulate_attention(members: TextMembership, scores: list[list[float]]) -> None:
    """Add one step's attention (per sample, per fed token, 0 for tokens not attended) to the totals."""
    for b, row in enumerate(scores):
        total = members.attention[b]
        total.extend([0.0] * (len(row) - len(total)))
        for j, s in enumerate(row):
            total[j] += s
