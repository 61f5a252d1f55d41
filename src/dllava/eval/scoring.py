"""Answer scoring: re-implementations of the official metrics, quirks included.

Each function below reproduces one published script exactly (the tests compare against lmms-eval's own
code on hundreds of generated cases); where LLaVA's scripts and lmms-eval disagree, both are described.

VQA answer processing
    :func:`vqa_normalize` is EvalAI's answer processor, ``EvalAIAnswerProcessor.__call__`` (from mmf; the
    same code sits in LLaVA's ``llava/eval/m4c_evaluator.py`` and lmms-eval's
    ``tasks/_task_utils/vqa_eval_metric.py``): lower case; drop ``,`` and ``?``; split ``'s`` off
    (``"what's"`` -> ``"what 's"``); newlines and tabs to spaces; the punctuation rule; number words
    ``none``/``zero``..``ten`` to digits; articles dropped; about 120 missing-apostrophe contractions
    restored (``"whats"`` -> ``"what's"``). The punctuation rule, per mark of
    ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``: deleted everywhere when the text has that mark next
    to a space (or has a comma between digits), otherwise each one becomes a space; ``$ % : # * & '``
    are not marks and stay (``"10%"``, ``"3:30"``, ``"a&w"``). Then periods not followed by a digit are
    deleted (``"3."`` -> ``"3"``, ``".5"`` stays), but only the first 32 of them: the official scripts
    pass ``re.UNICODE`` (= 32) as ``sub``'s *count*, and their ``(?!<=\\d)`` is a look-ahead that never
    fires, not the look-behind it was meant to be. The capitalised table entries (``"Im"``, ``"Ive"``,
    ``"Id've"``) can never match lower-cased words, so ``"im"`` stays ``"im"``.

    :func:`vqav2_normalize` is what VQAv2 scoring applies instead of ``__call__``: newlines/tabs to
    spaces, strip, then only ``process_punctuation`` + ``process_digit_article`` (no ``,``/``?``
    pre-deletion, no ``'s`` split), so ``"1,000 black-white"`` -> ``"1000 blackwhite"`` (a comma
    between digits turns every mark into a deletion) where ``vqa_normalize`` gives ``"1000 black white"``.

:func:`vqa_accuracy` ``(prediction, references, style=...)``: ``min(1, matches among the other
answers / 3)`` averaged over the leave-one-annotator-out subsets of the human answers.

- ``style="vqav2"`` (default): lmms-eval ``tasks/vqav2/utils.py: vqav2_process_results`` --
  :func:`vqav2_normalize` on the prediction and on every answer, always.
- ``style="textvqa"``: lmms-eval ``tasks/textvqa/utils.py: textvqa_process_results``, identical to
  LLaVA's ``llava/eval/eval_textvqa.py`` (``m4c_evaluator.TextVQAAccuracyEvaluator``) --
  :func:`vqa_normalize` on the prediction and on every answer.
- ``style="vqaeval"``: the VQA API's own ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``
  (GT-Vision-Lab/VQA), which lmms-eval ports but not faithfully: there the prediction gets
  :func:`vqav2_normalize`, but the answers get ``process_punctuation`` only (not lower-cased, no number
  words, articles or contractions) and only when the answers are not all identical; and its comma test
  is one comma between digits (``\\d,\\d``; lmms-eval's is ``\\d,+\\d``). On answers already in normalised
  form (as VQAv2's annotation answers largely are) the two agree; on raw text they do not: ten ``"Two"`` and the prediction
  ``"two"`` score 1.0 in lmms-eval and 0.0 in vqaEval.py. LLaVA itself uploads VQAv2 predictions
  through :func:`vqa_normalize` (``scripts/convert_vqav2_for_submission.py``) to the EvalAI server.

With a single string reference (or a list of one) every style gives 1.0/0.0: the prediction equals the
reference after both went through the style's prediction normaliser (the official formula would give
0 with one answer, there being no other annotators).

GQA -- :func:`gqa_accuracy`
    ``style="llava"`` (default) is LLaVA's route: ``scripts/convert_gqa_for_eval.py`` (the generated
    text, stripped by LLaVA's answer writer, loses trailing periods and is lower-cased), then GQA's
    ``eval.py`` (plain ``==`` with the gold answer, which is not touched). ``style="lmms_eval"`` is
    lmms-eval's ``gqa.yaml`` metric: the built-in ``exact_match`` with ``ignore_case`` and
    ``ignore_punctuation`` (``lmms_eval/api/metrics.py``) on the stripped prediction: both sides
    lower-cased and stripped of every ASCII punctuation character anywhere. They differ where
    punctuation other than a trailing period is involved or the gold answer has capitals: ``"Yes!"``,
    ``"(yes)"``, ``"t-shirt"`` against gold ``"tshirt"``, ``"3.5"`` against ``"35"`` and ``"Right."``
    against gold ``"Right"`` count only in lmms-eval. Both strip the prediction and neither touches inner
    white space (``"yes ."`` is wrong in both).

POPE -- :func:`pope_answer`, :func:`pope_scores`
    LLaVA's ``llava/eval/eval_pope.py``: keep the text before the first period, delete commas, split on
    single spaces, and answer ``"no"`` when a word is exactly ``No``, ``not`` or ``no``, else ``"yes"``
    (so ``"No, there is not."`` -> ``"no"``, ``"NO"`` -> ``"yes"``). Precision, recall and F1 take
    ``yes`` as positive; ``yes_ratio`` is the share of *predicted* yes. LLaVA reports each POPE split
    (adversarial, popular, random) separately: call :func:`pope_scores` once per split. lmms-eval's
    POPE differs: it only lower-cases and strips, so ``"No, there is not."`` is neither yes nor no
    (wrong for accuracy, uncounted in precision/recall), and its ``pope_yes_ratio`` counts
    ground-truth yes, not predicted yes.

Exact match
    :func:`exact_match` (re-exported from :mod:`dllava.metrics.answers`) and :func:`exact_match_any`
    are dllava's own, stricter exact match (lower case, punctuation and articles dropped, no number
    words or contractions) used for the synthetic task and by training's validation. It is not an
    official metric.
"""

from __future__ import annotations

import re
import statistics
import string
from collections.abc import Sequence
from typing import Literal

from dllava.metrics.answers import exact_match

__all__ = [
    "exact_match",
    "exact_match_any",
    "gqa_accuracy",
    "pope_answer",
    "pope_scores",
    "vqa_accuracy",
    "vqa_normalize",
    "vqav2_normalize",
]

VqaStyle = Literal["vqav2", "textvqa", "vqaeval"]
GqaStyle = Literal["llava", "lmms_eval"]

# ---------------------------------------------------------------------------------------------------
# The VQA answer-processing tables (data, as the official processor has them).

_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})

# Written-without-apostrophe forms and what they become. The official table also has "Id've", "I'dve",
# "Im" and "Ive" (never reached: words are lower-cased first) and "let's"/"she's" mapped to themselves;
# those six change nothing and are left out. "somebody'd" -> "somebodyd" is the official direction.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've",
    "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've",
    "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}

# The punctuation marks of the rule; ' $ % : # * & . are not among them.
_MARKS = ';/[]"{}()=+\\_-><@`,?!'
_DELETE_MARKS = {ord(mark): None for mark in _MARKS}
# "A comma between digits" switches every mark to deletion. EvalAI's processor (and lmms-eval) accept a
# run of commas, vqaEval.py exactly one; only whether the text contains one matters.
_DIGIT_COMMAS = re.compile(r"\d,+\d")
_DIGIT_COMMA = re.compile(r"\d,\d")
# The official "(?!<=\d)(\.)(?!\d)": its first group is a look-ahead for "<=" + digit at a period,
# which always holds, so it is "a period not followed by a digit".
_LONE_PERIOD = re.compile(r"\.(?!\d)")
_PERIODS_REMOVED = 32  # re.UNICODE, passed where Pattern.sub takes its count


def _punctuation(text: str, digit_comma: re.Pattern[str] = _DIGIT_COMMAS) -> str:
    """``process_punctuation``: each mark deleted or turned into a space, then lone periods dropped.

    Every decision looks at the text as it came in (a mark beside a plain space " "; tabs and other
    white space do not count), so the marks can be replaced all at once."""
    if digit_comma.search(text):
        table = _DELETE_MARKS
    else:
        table = {ord(mark): None if f"{mark} " in text or f" {mark}" in text else " " for mark in _MARKS}
    return _LONE_PERIOD.sub("", text.translate(table), count=_PERIODS_REMOVED)


def _digits_articles(text: str) -> str:
    """``process_digit_article``: lower case, white-space split, number words to digits, articles
    out, contractions restored, words joined by single spaces."""
    words = (_NUMBER_WORDS.get(word, word) for word in text.lower().split())
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def _flatten_lines(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_normalize(text: str) -> str:
    """EvalAI's answer processor (``EvalAIAnswerProcessor()(text)``): ``"Two dogs."`` -> ``"2 dogs"``,
    ``"The Red"`` -> ``"red"``, ``"1,000"`` -> ``"1000"``, ``"10%"`` stays, ``"what's"`` -> ``"what 's"``."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return _digits_articles(_punctuation(_flatten_lines(text)))


def vqav2_normalize(text: str) -> str:
    """What VQAv2 scoring (lmms-eval's ``vqav2_process_results``, vqaEval.py for the prediction)
    applies: newlines/tabs to spaces, strip, ``process_punctuation``, ``process_digit_article``."""
    return _digits_articles(_punctuation(_flatten_lines(text)))


def _vqaeval_prediction(text: str) -> str:
    return _digits_articles(_punctuation(_flatten_lines(text), _DIGIT_COMMA))


def _leave_one_out(guess: str, answers: list[str]) -> list[float]:
    """Per left-out annotator: ``min(1, matches among the others / 3)``."""
    hits = [answer == guess for answer in answers]
    total = sum(hits)
    return [min(1, (total - hit) / 3) for hit in hits]


def vqa_accuracy(prediction: str, references: str | Sequence[str], style: VqaStyle = "vqav2") -> float:
    """VQA accuracy of one prediction against the human answers (see the module docstring for the
    three styles). A single reference, as a string or a list of one, scores 1.0/0.0."""
    if style not in ("vqav2", "textvqa", "vqaeval"):
        raise ValueError(f"vqa_accuracy: style must be 'vqav2', 'textvqa' or 'vqaeval', not {style!r}")
    answers = [references] if isinstance(references, str) else list(references)
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    normalize = {"vqav2": vqav2_normalize, "textvqa": vqa_normalize, "vqaeval": _vqaeval_prediction}[style]
    guess = normalize(prediction)
    if len(answers) == 1:
        return float(guess == normalize(answers[0]))
    if style == "vqaeval":
        # answers punctuation-processed only, and only when they are not all the same
        if len(set(answers)) > 1:
            answers = [_punctuation(answer, _DIGIT_COMMA) for answer in answers]
        scores = _leave_one_out(guess, answers)
        return float(sum(scores)) / len(scores)
    scores = _leave_one_out(guess, [normalize(answer) for answer in answers])
    return float(statistics.mean(scores))  # lmms-eval's mean (exact rational, then rounded)


# ---------------------------------------------------------------------------------------------------
# GQA

_DROP_ASCII_PUNCTUATION = str.maketrans("", "", string.punctuation)


def _lmms_exact_match_form(text: str) -> str:
    # numpy's fixed-width lower-casing cuts a string whose lower case grows ("İ" -> "i̇") to its length
    return text.lower()[: len(text)].translate(_DROP_ASCII_PUNCTUATION)


def gqa_accuracy(prediction: str, answer: str, style: GqaStyle = "llava") -> float:
    """GQA accuracy of one prediction, 1.0 or 0.0. ``"llava"``: LLaVA's ``convert_gqa_for_eval.py`` +
    GQA's ``eval.py`` (trailing periods off, lower case, ``==`` the untouched gold answer);
    ``"lmms_eval"``: lmms-eval's ``exact_match`` with ``ignore_case`` and ``ignore_punctuation``."""
    if style == "llava":
        return float(prediction.strip().rstrip(".").lower() == answer)
    if style == "lmms_eval":
        return float(_lmms_exact_match_form(prediction.strip()) == _lmms_exact_match_form(answer))
    raise ValueError(f"gqa_accuracy: style must be 'llava' or 'lmms_eval', not {style!r}")


# ---------------------------------------------------------------------------------------------------
# POPE

_NO_WORDS = frozenset({"No", "not", "no"})


def pope_answer(text: str) -> str:
    """``"yes"`` or ``"no"`` as LLaVA's ``eval_pope.py`` reads a generated answer: the text before the
    first period, commas deleted, split on single spaces; ``"no"`` when a word is ``No``, ``not`` or
    ``no``. The text is stripped first, as LLaVA's answer writer does."""
    first_sentence = text.strip().split(".")[0]
    words = first_sentence.replace(",", "").split(" ")
    return "no" if _NO_WORDS.intersection(words) else "yes"


def pope_scores(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """LLaVA's ``eval_pope.py`` scores of one POPE split: predictions are generated texts (read with
    :func:`pope_answer`), labels ``"yes"``/``"no"``; ``yes`` is the positive class and ``yes_ratio`` the
    share of predicted yes. Where the script would divide by zero (no predicted or no true yes),
    precision, recall or F1 is 0.0 here."""
    if len(predictions) != len(labels):
        raise ValueError(f"pope_scores: {len(predictions)} predictions but {len(labels)} labels")
    if not predictions:
        raise ValueError("pope_scores needs at least one prediction")
    odd = sorted({label for label in labels if label not in ("yes", "no")})
    if odd:
        raise ValueError(f"pope_scores: labels must be 'yes' or 'no', got {odd[:5]}")
    said_yes = [pope_answer(text) == "yes" for text in predictions]
    is_yes = [label == "yes" for label in labels]
    tp = sum(p and t for p, t in zip(said_yes, is_yes))
    fp = sum(p and not t for p, t in zip(said_yes, is_yes))
    tn = sum(not p and not t for p, t in zip(said_yes, is_yes))
    fn = sum(not p and t for p, t in zip(said_yes, is_yes))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / len(predictions),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": sum(said_yes) / len(predictions),
    }


# ---------------------------------------------------------------------------------------------------
# dllava's own exact match (not an official metric)


def exact_match_any(prediction: str, references: str | Sequence[str]) -> float:
    """dllava's exact match against one reference, or against any of several."""
    if isinstance(references, str):
        return float(exact_match(prediction, references))
    return float(any(exact_match(prediction, r) for r in references))
