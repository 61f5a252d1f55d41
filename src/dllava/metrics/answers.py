"""Answer scoring: normalised exact match and the question-only baseline.

The baseline answers every evaluation question with the most common training answer to the same
question text. A model that beats it clearly is using the image; one that matches it has learned only
the answer prior (what ../shared/CALIBRATION.md saw from-scratch tiny models do).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from typing import Iterable

from dllava.data.conversation import final_exchange

_PUNCT = re.compile(r"[^\w\s]")
_ARTICLES = {"a", "an", "the"}


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, collapse whitespace (a subset of VQA's rules)."""
    words = _PUNCT.sub(" ", text.lower()).split()
    return " ".join(w for w in words if w not in _ARTICLES)


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


def question_only_baseline(
    train_records: Iterable[dict], eval_records: Iterable[dict], kinds: Iterable[str] | None = None
) -> float:
    """Accuracy of answering each eval question with the majority training answer for its text.

    Only records whose final kind is in ``kinds`` count (all records when ``kinds`` is None); unseen
    question texts fall back to the overall majority answer.
    """
    keep = set(kinds) if kinds is not None else None

    def selected(records: Iterable[dict]) -> Iterable[tuple[str, str]]:
        for record in records:
            record_kinds = record.get("kinds") or ["all"]
            if keep is None or record_kinds[-1] in keep:
                question, answer = final_exchange(record["conversations"])
                yield normalize_answer(question), normalize_answer(answer)

    by_question: dict[str, Counter] = defaultdict(Counter)
    overall: Counter = Counter()
    for question, answer in selected(train_records):
        by_question[question][answer] += 1
        overall[answer] += 1
    if not overall:
        raise ValueError("question_only_baseline: no training records of the selected kinds")
    fallback = overall.most_common(1)[0][0]
    hits = total = 0
    for question, answer in selected(eval_records):
        counts = by_question.get(question)
        guess = counts.most_common(1)[0][0] if counts else fallback
        hits += guess == answer
        total += 1
    if total == 0:
        raise ValueError("question_only_baseline: no evaluation records of the selected kinds")
    return hits / total
