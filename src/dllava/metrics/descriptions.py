"""Scoring generated scene descriptions (the ``describe`` and ``detail`` kinds) against their scenes.

Three layers:

* :func:`parse_description` reads generated text of either grammar of :mod:`dllava.data.synthetic` into
  :class:`DescribedObject` s (colour, shape, 0-based row and column; for ``detail`` also the quadrant and the
  relation sentences) plus the stated count. It is deterministic and tolerant: it never raises, takes an
  object only when its colour, shape and cell are all readable, and skips everything it cannot read.
* :func:`object_scores` / :func:`aggregate_object_scores`: precision, recall and F1 of the objects read
  (multiset matching of ``(color, shape, row, col)``), and :func:`attribute_accuracy` /
  :func:`aggregate_attribute_accuracy`: for ``detail``, how often the quadrant and the relation sentences of
  correctly read objects are right.
* :func:`text_overlap`: ROUGE-L and corpus BLEU-4 from torchmetrics (no stemmer, no ``nltk`` needed).

Grammars (both in :mod:`dllava.data.synthetic`)::

    describe: there are three shapes . a red circle at row one column two . a blue square at ...
    detail:   there are three shapes in the image , each in its own cell . the first shape is a red circle .
              it is at row one column two , in the top left corner of its cell .
              it is above and to the left of the blue square . it is to the left of ... in the same row . ...
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from dllava.data.synthetic import COLORS, COUNT_WORDS, ORDINALS, SHAPES, WIDE_POSITION_WORDS, Scene, _relation, quadrant

ObjectKey = tuple[str, str, int, int]  # (color, shape, row, col), row and col 0-based

_COLOR = "|".join(COLORS)
_SHAPE = "|".join(SHAPES)
_POS = "|".join(WIDE_POSITION_WORDS)
_ORD = "|".join(ORDINALS)
_COUNT = "|".join(COUNT_WORDS)

# Each pattern is matched at the start of a sentence (re.match) whose words are joined by single spaces; words
# after the part that is read are ignored, so a sentence cut off at the end of a generation still counts as far
# as it goes.
_COUNT_RE = re.compile(rf"there are ({_COUNT}) shapes\b")
_IDENTITY_RE = re.compile(rf"the ({_ORD}) shape is an? ({_COLOR}) ({_SHAPE})\b")
_LOCATION_RE = re.compile(rf"it is at row ({_POS}) column ({_POS})\b(?:(?: ,)? in the (top|bottom) (left|right)\b)?")
_OTHER_RE = re.compile(rf"\bthe ({_COLOR}) ({_SHAPE})\b")  # the other object of a relation sentence
_DESCRIBE_RE = re.compile(rf"\ba ({_COLOR}) ({_SHAPE}) at row ({_POS}) column ({_POS})\b")  # searched, not matched

_TOKEN_RE = re.compile(r"[a-z0-9]+|[.,?!;:]")
_SENTENCE_END = {".", "?", "!"}


@dataclass(frozen=True)
class DescribedRelation:
    """One ``it is ... the <color> <shape> ...`` sentence: its words (no final ``.``) and the object it names."""

    text: str
    other_color: str
    other_shape: str


@dataclass(frozen=True)
class DescribedObject:
    """An object read from a description. ``quadrant`` ("top left", ...) and ``relations`` only for ``detail``."""

    color: str
    shape: str
    row: int
    col: int
    quadrant: str | None = None
    relations: tuple[DescribedRelation, ...] = ()

    @property
    def key(self) -> ObjectKey:
        return (self.color, self.shape, self.row, self.col)


@dataclass(frozen=True)
class ParsedDescription:
    """What :func:`parse_description` read: the stated count (None when unreadable) and the objects in text order."""

    count: int | None
    objects: list[DescribedObject] = field(default_factory=list)

    @property
    def keys(self) -> list[ObjectKey]:
        return [obj.key for obj in self.objects]


def _sentences(text: str) -> list[str]:
    """Lower-cased word sentences of ``text``: split at ``.``/``?``/``!`` and also before the openers of the
    grammars' sentences ("there are", "it is", "the <ordinal> shape"), which never occur inside one, so a
    missing full stop does not merge two sentences. Punctuation glued to words is split off; any other
    character separates words."""
    tokens = _TOKEN_RE.findall(text.lower())
    sentences: list[list[str]] = [[]]
    for i, token in enumerate(tokens):
        if token in _SENTENCE_END:
            sentences.append([])
            continue
        pair = tuple(tokens[i : i + 2])
        opener = pair in {("there", "are"), ("it", "is")} or (
            token == "the" and i + 2 < len(tokens) and tokens[i + 1] in ORDINALS and tokens[i + 2] == "shape"
        )
        if opener and sentences[-1]:
            sentences.append([])
        sentences[-1].append(token)
    return [" ".join(words) for words in sentences if words]


def parse_description(text: Any) -> ParsedDescription:
    """Read a generated ``describe`` or ``detail`` answer into its objects and stated count. Never raises.

    Sentence by sentence (see :func:`_sentences`):

    * ``there are <N> shapes ...``: the stated count (the first readable one; None when there is none).
    * ``describe``: every ``a <color> <shape> at row <R> column <C>`` in a sentence (other than the ``detail``
      sentences below) is an object; "every" so that sentences run together without full stops still count.
    * ``detail``: ``the <ordinal> shape is a <color> <shape>`` opens an object, the next
      ``it is at row <R> column <C> [, in the <top|bottom> <left|right> ...]`` sentence gives its cell (and
      quadrant) and completes it; an identity never followed by a location sentence before the next identity
      is dropped, as is a location sentence with no open identity (e.g. a repeated one). Unreadable
      sentences in between are skipped. The ordinal is not checked (a model that numbers objects wrongly but
      names them right loses nothing here).
    * ``it is ... the <color> <shape> ...`` after a completed ``detail`` object: one of its relations (a
      relation sentence naming no readable object is skipped).

    Objects are returned in text order, repeats included (:func:`object_scores` counts a repeat once).
    """
    if not isinstance(text, str):
        return ParsedDescription(count=None, objects=[])
    count: int | None = None
    objects: list[DescribedObject] = []
    pending: tuple[str, str] | None = None  # (color, shape) of a detail identity awaiting its location
    current: DescribedObject | None = None  # the last completed detail object, which takes relation sentences
    for sentence in _sentences(text):
        if match := _IDENTITY_RE.match(sentence):
            pending, current = (match.group(2), match.group(3)), None
        elif match := _LOCATION_RE.match(sentence):
            if pending is not None:
                vertical, horizontal = match.group(3), match.group(4)
                current = DescribedObject(
                    color=pending[0],
                    shape=pending[1],
                    row=WIDE_POSITION_WORDS.index(match.group(1)),
                    col=WIDE_POSITION_WORDS.index(match.group(2)),
                    quadrant=f"{vertical} {horizontal}" if vertical else None,
                )
                objects.append(current)
                pending = None
        elif sentence.startswith("it is "):
            other = _OTHER_RE.search(sentence)
            if current is not None and other is not None:
                relation = DescribedRelation(sentence, other.group(1), other.group(2))
                objects[-1] = current = replace(current, relations=current.relations + (relation,))
        else:  # a count sentence, describe objects (a count sentence missing its full stop holds both), or junk
            if (match := _COUNT_RE.match(sentence)) and count is None:
                count = COUNT_WORDS.index(match.group(1))
            found = list(_DESCRIBE_RE.finditer(sentence))
            for match in found:
                color, shape, row, col = match.groups()
                row, col = WIDE_POSITION_WORDS.index(row), WIDE_POSITION_WORDS.index(col)
                objects.append(DescribedObject(color, shape, row, col))
            if found or _COUNT_RE.match(sentence):
                current = None
    return ParsedDescription(count=count, objects=objects)


# -- object precision / recall ------------------------------------------------------------------------
def _key(obj: Any) -> ObjectKey:
    if isinstance(obj, DescribedObject):
        return obj.key
    if isinstance(obj, Mapping):  # a scene object
        return (obj["color"], obj["shape"], int(obj["row"]), int(obj["col"]))
    color, shape, row, col = obj
    return (color, shape, int(row), int(col))


def _prf(tp: int, predicted: int, reference: int) -> tuple[float, float, float]:
    """Precision, recall, F1 with 0/0 := 0, except that nothing predicted for nothing scores 1."""
    if predicted == 0 and reference == 0:
        return 1.0, 1.0, 1.0
    precision = tp / predicted if predicted else 0.0
    recall = tp / reference if reference else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def object_scores(predicted_objects: Iterable[Any], scene: Scene) -> dict[str, float | int]:
    """Precision, recall and F1 of the objects read from one description against the scene's objects.

    ``predicted_objects``: :class:`DescribedObject` s (e.g. ``parse_description(text).objects``) or
    ``(color, shape, row, col)`` tuples. Matching is on the multiset of ``(color, shape, row, col)``: an object
    stated twice is a true positive once and a false positive once (unless the scene holds it twice).

    Returns ``precision`` = tp / predicted, ``recall`` = tp / reference, ``f1``, and the counts ``tp``,
    ``predicted``, ``reference``. A ratio with a zero denominator is 0.0 (an empty or unreadable
    description of a non-empty scene scores precision = recall = F1 = 0), except that an empty description
    of an empty scene scores 1.0 everywhere.
    """
    predicted = Counter(_key(obj) for obj in predicted_objects)
    reference = Counter(_key(obj) for obj in scene)
    tp = sum((predicted & reference).values())
    n_pred, n_ref = sum(predicted.values()), sum(reference.values())
    precision, recall, f1 = _prf(tp, n_pred, n_ref)
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "predicted": n_pred, "reference": n_ref}


def aggregate_object_scores(scores: Iterable[Mapping[str, Any]]) -> dict[str, float | int]:
    """Combine per-sample :func:`object_scores` dicts.

    Returns micro-averaged ``precision``, ``recall`` and ``f1`` (from the summed ``tp``, ``predicted`` and
    ``reference``, same zero conventions as :func:`object_scores`), ``mean_f1`` (the mean of the per-sample
    F1s), the summed counts and ``samples``. **Report the micro F1 in tables**: it weights every object
    equally, so a 4-object scene counts more than a 3-object one and an empty generation is not averaged in
    as a full sample of zeros; ``mean_f1`` is the per-description view (e.g. to see how many descriptions fail
    completely). Raises ValueError on no samples.
    """
    scores = list(scores)
    if not scores:
        raise ValueError("aggregate_object_scores needs at least one sample")
    tp = sum(int(s["tp"]) for s in scores)
    predicted = sum(int(s["predicted"]) for s in scores)
    reference = sum(int(s["reference"]) for s in scores)
    precision, recall, f1 = _prf(tp, predicted, reference)
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "mean_f1": sum(float(s["f1"]) for s in scores) / len(scores),
        "tp": tp,
        "predicted": predicted,
        "reference": reference,
        "samples": len(scores),
    }


# -- detail attributes ---------------------------------------------------------------------------------
def _words(sentence: str) -> str:
    return " ".join(w for w in sentence.split() if w not in _SENTENCE_END)


def attribute_accuracy(predicted_objects: Iterable[DescribedObject], scene: Scene, cell: int) -> dict[str, Any]:
    """For a ``detail`` description: how often the quadrant and the relations of correctly read objects are right.

    Only *matched* objects count: predicted objects whose ``(color, shape, row, col)`` is in the scene, each
    scene object matched once (a repeated object's later copies are ignored). ``cell`` is the layout's cell
    side in px (24 for the default 96 px / 4 x 4 task, 28 or 32 for the Qwen layouts): the true quadrant is
    :func:`dllava.data.synthetic.quadrant` of the scene object.

    * ``quadrant_accuracy`` = ``quadrant_correct`` / ``quadrant_total``, the total being the matched objects
      (a matched object whose quadrant is unreadable counts as wrong).
    * ``relation_accuracy`` = ``relation_correct`` / ``relation_total`` over the relation sentences of matched
      objects. The other object is identified by colour and shape; when the scene holds several objects of
      that colour and shape the sentence is skipped (``relation_skipped``). A sentence is correct when its
      words equal :func:`dllava.data.synthetic._relation` (matched object, other object); a sentence naming an
      object absent from the scene, or the object itself, is wrong.

    Accuracies are None when their total is 0. Counts are returned so that
    :func:`aggregate_attribute_accuracy` can sum them.
    """
    unmatched = Counter(_key(obj) for obj in scene)
    by_key = {_key(obj): obj for obj in scene}
    by_name = Counter((obj["color"], obj["shape"]) for obj in scene)
    named = {(obj["color"], obj["shape"]): obj for obj in scene}
    quadrant_correct = quadrant_total = relation_correct = relation_total = relation_skipped = 0
    for obj in predicted_objects:
        if unmatched[obj.key] <= 0:
            continue
        unmatched[obj.key] -= 1
        truth = by_key[obj.key]
        vertical, horizontal = quadrant(truth, cell)
        quadrant_total += 1
        quadrant_correct += obj.quadrant == f"{('top', 'bottom')[vertical]} {('left', 'right')[horizontal]}"
        for relation in obj.relations:
            name = (relation.other_color, relation.other_shape)
            if by_name[name] > 1:
                relation_skipped += 1
                continue
            relation_total += 1
            other = named.get(name)
            if other is not None and _key(other) != obj.key:
                relation_correct += _words(relation.text) == _words(_relation(truth, other))
    return _attribute_result(quadrant_correct, quadrant_total, relation_correct, relation_total, relation_skipped)


def _attribute_result(q_correct: int, q_total: int, r_correct: int, r_total: int, r_skipped: int) -> dict[str, Any]:
    return {
        "quadrant_accuracy": q_correct / q_total if q_total else None,
        "quadrant_correct": q_correct,
        "quadrant_total": q_total,
        "relation_accuracy": r_correct / r_total if r_total else None,
        "relation_correct": r_correct,
        "relation_total": r_total,
        "relation_skipped": r_skipped,
    }


def aggregate_attribute_accuracy(results: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Micro-averaged :func:`attribute_accuracy` over samples (sums of the counts; accuracies None when 0/0)."""
    totals = Counter()
    for result in results:
        for name in ("quadrant_correct", "quadrant_total", "relation_correct", "relation_total", "relation_skipped"):
            totals[name] += int(result[name])
    return _attribute_result(
        totals["quadrant_correct"], totals["quadrant_total"], totals["relation_correct"], totals["relation_total"],
        totals["relation_skipped"],
    )


# -- text overlap --------------------------------------------------------------------------------------
def text_overlap(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """ROUGE-L and BLEU-4 of generated descriptions against their references (one reference each), as floats.

    * ``rouge_l``: torchmetrics' ``rouge_score(..., rouge_keys="rougeL")`` F-measure, i.e. the mean over
      samples of each pair's LCS F-measure. No stemmer and not ROUGE-Lsum, so ``nltk`` is neither needed nor
      downloaded; torchmetrics' default normaliser lower-cases and drops punctuation.
    * ``bleu``: torchmetrics' corpus-level ``bleu_score(..., n_gram=4)`` (unsmoothed, whitespace tokens, so
      ``.`` and ``,`` are tokens). Texts under four tokens have no 4-grams, so BLEU is 0 unless the corpus
      holds longer ones.

    Raises ValueError when the lists are empty or of different lengths.
    """
    from torchmetrics.functional.text.bleu import bleu_score
    from torchmetrics.functional.text.rouge import rouge_score

    predictions, references = list(predictions), list(references)
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("text_overlap needs at least one prediction")
    rouge = rouge_score(predictions, references, rouge_keys="rougeL")["rougeL_fmeasure"]
    bleu = bleu_score(predictions, [[reference] for reference in references], n_gram=4)
    return {"rouge_l": float(rouge), "bleu": float(bleu)}
