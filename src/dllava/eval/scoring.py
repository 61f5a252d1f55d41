"""Answer accuracy: exact match and the VQA-style normalised accuracy.

``exact_match`` is the metric training validates with (:func:`dllava.metrics.answers.exact_match`:
lower case, punctuation and articles dropped). :func:`vqa_normalize` is a compact version of the
official VQA evaluation's answer processing (also what LLaVA's ``EvalAIAnswerProcessor`` applies):
lower case, common contractions restored, punctuation dropped (a period between digits stays),
number words up to ten turned into digits, articles removed. :func:`vqa_accuracy` scores one
prediction against one reference (1 or 0) or against several human answers (VQAv2's
``min(1, matches / 3)``).
"""

from __future__ import annotations

import re
from typing import Sequence

from dllava.metrics.answers import exact_match

__all__ = ["exact_match", "vqa_normalize", "vqa_accuracy"]

_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
# The VQA list is long; these are the contractions that occur in short answers.
_CONTRACTIONS = {
    "dont": "don't", "doesnt": "doesn't", "isnt": "isn't", "arent": "aren't", "cant": "can't",
    "wont": "won't", "wasnt": "wasn't", "werent": "weren't", "didnt": "didn't", "couldnt": "couldn't",
    "shouldnt": "shouldn't", "wouldnt": "wouldn't", "hasnt": "hasn't", "havent": "haven't",
    "im": "i'm", "ive": "i've", "youre": "you're", "theyre": "they're", "thats": "that's",
    "whats": "what's",
}
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # as the VQA script writes it: a period not before a digit
_COMMA_NUMBER = re.compile(r"(\d)(,)(\d)")
_PUNCT = set(";/[]\"{}()=+\\_-><@`,?!*#%^&$~|:'")


def vqa_normalize(text: str) -> str:
    """The VQA answer normaliser, compactly: ``"Two dogs."`` -> ``"2 dogs"``, ``"The Red"`` -> ``"red"``."""
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    text = _COMMA_NUMBER.sub(r"\1\3", text)  # 1,000 -> 1000
    out = []
    for char in text:
        # punctuation next to a space disappears, inside a word it separates ("black-white")
        out.append(" " if char in _PUNCT and char != "'" else char)
    text = _PERIOD_STRIP.sub("", "".join(out))
    words = []
    for word in text.split():
        word = word.strip("'")
        word = _CONTRACTIONS.get(word.replace("'", ""), word)
        word = _NUMBERS.get(word, word)
        if word and word not in _ARTICLES:
            words.append(word)
    return " ".join(words)


def vqa_accuracy(prediction: str, references: str | Sequence[str]) -> float:
    """VQA accuracy of one prediction: 1/0 against a single reference; against several human answers
    the official metric, ``min(1, matches / 3)`` averaged over the leave-one-annotator-out subsets."""
    guess = vqa_normalize(prediction)
    if isinstance(references, str):
        references = [references]
    if not references:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    hits = [guess == vqa_normalize(r) for r in references]
    if len(hits) == 1:
        return float(hits[0])
    total = sum(hits)
    return sum(min(1.0, (total - hit) / 3) for hit in hits) / len(hits)


def exact_match_any(prediction: str, references: str | Sequence[str]) -> float:
    """Exact match against one reference, or against any of several."""
    if isinstance(references, str):
        return float(exact_match(prediction, references))
    return float(any(exact_match(prediction, r) for r in references))
