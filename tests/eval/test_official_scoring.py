"""dllava.eval.scoring against the official code itself, as installed with lmms-eval.

The normaliser is compared with ``EvalAIAnswerProcessor`` (loaded from its file, which imports only
``re``), the VQA accuracies with lmms-eval's ``vqav2_process_results`` / ``textvqa_process_results``,
GQA's lmms-eval style with lmms-eval's ``exact_match``, on generated tricky strings and answer sets.
"""

from __future__ import annotations

import copy
import importlib.util
import random
import unicodedata
from pathlib import Path

import pytest

from dllava.eval import scoring
from dllava.eval.scoring import (
    gqa_accuracy,
    pope_answer,
    pope_scores,
    vqa_accuracy,
    vqa_normalize,
    vqav2_normalize,
)


def _lmms_root() -> Path | None:
    spec = importlib.util.find_spec("lmms_eval")
    return None if spec is None or not spec.submodule_search_locations else Path(spec.submodule_search_locations[0])


LMMS_ROOT = _lmms_root()
pytestmark = pytest.mark.skipif(
    LMMS_ROOT is None,
    reason='lmms-eval is not installed: pip install -e ".[lmms]", then lmms-eval itself with --no-deps '
    "(the no-deps step of the Makefile's setup)",
)


# ---------------------------------------------------------------------------------------------------
# Tricky strings: hand-picked, plus combinations of parts.

NUMBERS = ["two", "Two", "Ten", "TEN", "none", "None", "zero", "one", "eleven", "twelve", "0", "2", "10"]
NUMERALS = [
    "1,000", "1,2,3", "1,,2", "1, 2", "1 ,2", "100,000,000", "12,5.0", "3.5", "3.", ".5", "0.5.", "3..5",
    "10%", "2.5%", "$5", "$1,000.00", "3:30", "#1", "no. 5", "v1.2.3", "1.000,5", "-1", "+1", "1/2", "1st",
]
CONTRACTION_EXTRAS = [
    "dont", "don't", "Dont", "DON'T", "whats", "what's", "What's", "WHATS", "yall", "y'all", "Y'all",
    "y'all'd've", "Im", "I'm", "im", "ive", "I've", "Id've", "let's", "lets", "Let's", "she's", "it's", "its",
    "somebody'd", "ow's'at", "'ows'at", "'twas", "twas", "o'clock", "oclock", "can't", "cant", "won't",
    "it's red's", "it 's", "dogs'", "'s", "'S", "rock'n'roll",
]
PUNCTUATED = [
    "a&w", "A&W", "black-white", "black - white", "black -white", "t-shirt", "T-Shirt", "(red)", "( red )",
    '"yes"', "yes!", "yes !", "no.", "No.", "well...", "e.g.", "u.s.a.", "U.S.A", "a/b", "a / b", "a_b",
    "x+y", "a=b", "<b>", "@home", "`tick`", "[1]", "{x}", "semi;colon", "back\\slash", "what?", "why ?",
    "hi!!", "yes, sir", "red,blue", "red, blue", "a,b,c", "*star*", "~tilde~", "^caret", "a|b", "it's-red",
    "well-known, 2,000", "mr. smith", "st. louis", "e-mail", "-", "--", "(", ")", "!?", "?!", "'", '"',
]
ARTICLES_CASE = [
    "The Red", "A dog", "an apple", "THE", "a", "An", "the the", "theater", "another", "A-frame", "the-end",
    "a.", "an,", "The.", "ANY", "Apple Inc.",
]
WHITESPACE = [
    " yes ", "yes\n", "\tno", "two\ndogs", "a\tb", "red \n blue", "yes\r\n", "\x0bx", "\u00a0yes\u00a0",
    "multiple   spaces", "\n\n", "yes\n!", "a\t-\tb", "x\r-y", "\u2003two\u2003",
]
UNICODE = [
    "café", "naïve", "２", "２,３", "３.", "em—dash", "en–dash", "“quoted”", "‘single’", "İstanbul", "Straße",
    "ﬁne", "٣.٤", "١,٢", "１０％", "Ⅻ", "ǅungla", "ΣΑΣ", "日本", "🙂 yes", "e\u0301",
]
EMPTY = ["", " ", "\n", "\t\t", ".", ",", "?", "!", "...", "." * 40, "a. " * 40, "1." * 40, ", ,"]
HAND_PICKED = NUMBERS + NUMERALS + CONTRACTION_EXTRAS + PUNCTUATED + ARTICLES_CASE + WHITESPACE + UNICODE + EMPTY

SEPARATORS = [" ", "", ", ", ",", "-", " - ", "\n", "\t", ". ", "/", "?", "!", " & "]
WRAPPERS = [("", ""), ("", "."), ("", "!"), ("the ", ""), ("A ", "."), ("(", ")"), ('"', '"'), (" ", "\n"), ("", "?")]


def _official_contraction_words() -> list[str]:
    """Every key and value of the official table, also capitalised (the table is data we must match)."""
    words = []
    for key, value in _evalai_class().CONTRACTIONS.items():
        words += [key, value, key.capitalize(), value.upper()]
    return words


def tricky_strings() -> list[str]:
    parts = HAND_PICKED + _official_contraction_words()
    rng = random.Random(20240611)
    combos = []
    for _ in range(400):
        left, right = rng.choice(parts), rng.choice(parts)
        before, after = rng.choice(WRAPPERS)
        combos.append(before + left + rng.choice(SEPARATORS) + right + after)
    # every hand-picked part also in a sentence-like frame
    framed = [f"It is {part}." for part in HAND_PICKED]
    cases = list(dict.fromkeys(parts + combos + framed))  # unique, order kept
    return cases


_EVALAI = None


def _evalai_class():
    """The official ``EvalAIAnswerProcessor`` straight from its file (not via ``lmms_eval.tasks``,
    whose package import takes seconds)."""
    global _EVALAI
    if _EVALAI is None:
        path = LMMS_ROOT / "tasks" / "_task_utils" / "vqa_eval_metric.py"
        spec = importlib.util.spec_from_file_location("_official_vqa_eval_metric", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _EVALAI = module.EvalAIAnswerProcessor
    return _EVALAI


@pytest.fixture(scope="module")
def evalai():
    return _evalai_class()()


@pytest.fixture(scope="module")
def lmms():
    """lmms-eval's task code (importing ``lmms_eval.tasks`` takes a few seconds: once per module)."""
    from lmms_eval.api.metrics import exact_match_hf_evaluate
    from lmms_eval.tasks.pope import utils as pope
    from lmms_eval.tasks.textvqa.utils import textvqa_process_results
    from lmms_eval.tasks.vqav2.utils import vqav2_process_results

    return {"vqav2": vqav2_process_results, "textvqa": textvqa_process_results,
            "exact_match": exact_match_hf_evaluate, "pope": pope}


# ---------------------------------------------------------------------------------------------------
# The normaliser


def test_vqa_normalize_equals_evalai_answer_processor_on_every_tricky_string(evalai):
    cases = tricky_strings()
    assert len(cases) >= 300, f"only {len(cases)} tricky strings"
    wrong = [(s, vqa_normalize(s), evalai(s)) for s in cases if vqa_normalize(s) != evalai(s)]
    assert not wrong, f"{len(wrong)} of {len(cases)} tricky strings differ, e.g. {wrong[:5]}"
    print(f"vqa_normalize == EvalAIAnswerProcessor on {len(cases)} tricky strings")


def test_vqav2_normalize_equals_the_two_steps_vqav2_scoring_applies(evalai):
    cases = tricky_strings()
    for s in cases:
        flat = s.replace("\n", " ").replace("\t", " ").strip()
        assert vqav2_normalize(s) == evalai.process_digit_article(evalai.process_punctuation(flat)), repr(s)


def test_the_cases_cover_the_quirks(evalai):
    """The generated set reaches each rule: a case per rule whose output it decides."""
    cases = set(tricky_strings())
    assert {"1,000", "1,2,3", "10%", "3:30", "a&w", "whats", "what's", "y'all'd've", "Im", "." * 40} <= cases
    assert any(any(unicodedata.category(c) == "Nd" and not c.isascii() for c in s) for s in cases)
    assert evalai("." * 40) == "." * 8  # only 32 periods go
    assert evalai("1,2,3") == "123" and evalai("a&w") == "a&w" and evalai("10%") == "10%"


def test_contraction_table_is_the_effective_official_table():
    official = _evalai_class().CONTRACTIONS
    effective = {k: v for k, v in official.items() if k == k.lower() and k != v}
    assert scoring._CONTRACTIONS == effective
    # the official map gains identity entries as it is used (it looks words up with setdefault)
    assert scoring._NUMBER_WORDS == {k: v for k, v in _evalai_class().NUMBER_MAP.items() if k != v}
    assert scoring._ARTICLES == set(_evalai_class().ARTICLES)


# ---------------------------------------------------------------------------------------------------
# Ten-answer sets

DECORATIONS = [
    str.upper, str.title, str.capitalize, lambda s: s + ".", lambda s: s + "!", lambda s: "the " + s,
    lambda s: "a " + s, lambda s: " " + s + "\n", lambda s: s.replace(" ", "-"), lambda s: f'"{s}"',
    lambda s: s + "?", lambda s: s.replace("'", ""), lambda s: s + ",",
]
CORES = ["two", "2", "red", "black and white", "don't know", "what's that", "1,000", "3.5", "10%", "t-shirt",
         "yes", "no", "a&w", "y'all", "none", "0", "3:30", "u.s.a.", "café", "teddy bear", "john's", "whats",
         "it's red", "1,000 black-white", "red, white-blue", "why?", "lets go", "somebody'd"]


# (answer, prediction) spellings whose match depends on the style: "'s" split and "," / "?" deleted
# up front in TextVQA's processor, not in VQAv2's
STYLE_PAIRS = [("what's that", "whats that"), ("where's", "wheres"), ("that's it", "thats it"),
               ("1,000 black-white", "1000 black white"), ("1,2 x-y", "12 x y"), ("Who's there?", "whos there"),
               ("2,5 (red)", "25 red"), ("he's", "hes")]


def _answer_sets(n_sets: int, seed: int) -> list[tuple[str, list[str]]]:
    rng = random.Random(seed)
    pool = tricky_strings()
    sets = []
    for i in range(n_sets):
        size = 10 if i % 8 else rng.choice([2, 3, 5, 7, 12])
        kind = i % 5
        if kind == 4:  # a spelling pair that the two styles score differently
            answer, prediction = rng.choice(STYLE_PAIRS)
            answers = [answer if rng.random() < 0.7 else rng.choice(CORES) for _ in range(size)]
            sets.append((prediction, answers))
            continue
        if kind == 0:  # all equal (raw), possibly a form that normalisation changes
            answer = rng.choice(CORES + pool[:150])
            answers = [answer] * size
        elif kind == 1:  # one core in several spellings that normalise alike (or nearly)
            core = rng.choice(CORES)
            answers = [rng.choice(DECORATIONS)(core) if rng.random() < 0.6 else core for _ in range(size)]
        elif kind == 2:  # two or three cores with duplicates
            cores = rng.sample(CORES, rng.choice([2, 3]))
            answers = [rng.choice(cores) for _ in range(size)]
            answers = [rng.choice(DECORATIONS)(a) if rng.random() < 0.3 else a for a in answers]
        else:  # anything from the tricky pool, with duplicates
            picks = rng.sample(pool, 4)
            answers = [rng.choice(picks) for _ in range(size)]
        roll = rng.random()
        if roll < 0.5:
            prediction = rng.choice(answers)
        elif roll < 0.8:
            prediction = rng.choice(DECORATIONS)(rng.choice(answers).strip() or "x")
        else:
            prediction = rng.choice(pool)
        sets.append((prediction, answers))
    return sets


def _vqav2_doc(answers: list[str]) -> dict:
    # as lmms-lab/VQAv2 stores them: each answer a dict with its own answer_id (lmms-eval leaves one
    # annotator out by dict inequality, so the ids keep equal answers apart)
    return {"question_id": 1, "answers": [
        {"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)
    ]}


@pytest.fixture(scope="module")
def answer_sets() -> list[tuple[str, list[str]]]:
    return _answer_sets(400, seed=7)


def test_vqav2_accuracy_equals_lmms_eval_vqav2_process_results(lmms, answer_sets):
    assert len(answer_sets) >= 300
    scores = []
    for prediction, answers in answer_sets:
        if len(answers) == 1:
            continue
        official = lmms["vqav2"](copy.deepcopy(_vqav2_doc(answers)), [prediction])["exact_match"]
        ours = vqa_accuracy(prediction, answers, style="vqav2")
        assert ours == official, (prediction, answers, ours, official)
        scores.append(ours)
    # the sets are not trivial: partial credit and zeros both occur
    assert {0.0, 1.0} <= set(scores) and any(0 < s < 1 for s in scores)
    print(f"vqa_accuracy(style='vqav2') == vqav2_process_results on {len(scores)} answer sets")


def test_textvqa_accuracy_equals_lmms_eval_textvqa_process_results(lmms, answer_sets):
    scores = []
    for prediction, answers in answer_sets:
        doc = {"question_id": 1, "answers": list(answers)}
        official = lmms["textvqa"](doc, [prediction])["exact_match"]
        ours = vqa_accuracy(prediction, answers, style="textvqa")
        assert ours == official, (prediction, answers, ours, official)
        scores.append(ours)
    assert any(0 < s < 1 for s in scores)


def test_vqav2_and_textvqa_styles_really_differ_on_some_sets(answer_sets):
    differ = [(p, a) for p, a in answer_sets
              if vqa_accuracy(p, a, style="vqav2") != vqa_accuracy(p, a, style="textvqa")]
    assert len(differ) >= 10  # e.g. "what's" vs "whats", "1,000 black-white"


def test_vqaeval_style_equals_vqav2_style_on_already_normalised_answers(answer_sets):
    """vqaEval.py processes answers less than lmms-eval does; on answers that are already normalised
    (as VQAv2's annotation file stores them) the two must agree."""
    compared = 0
    for prediction, answers in answer_sets:
        answers = [vqav2_normalize(a) for a in answers]
        if len(answers) < 2 or any(scoring._punctuation(a, scoring._DIGIT_COMMA) != a for a in answers):
            continue
        compared += 1
        assert vqa_accuracy(prediction, answers, style="vqaeval") == pytest.approx(
            vqa_accuracy(prediction, answers, style="vqav2"), abs=1e-12
        )
    assert compared >= 100


# ---------------------------------------------------------------------------------------------------
# GQA: LLaVA's route vs lmms-eval's exact_match

GQA_GOLD = ["yes", "no", "tshirt", "t-shirt", "35", "3.5", "Right", "right", "red", "left", "black and white"]


def test_gqa_lmms_eval_style_equals_lmms_eval_exact_match(lmms):
    rng = random.Random(3)
    predictions = tricky_strings()[:200] + ["Yes!", "(yes)", "t-shirt", "3.5", "Right.", "yes .", "no..", " Red "]
    compared = 0
    for prediction in predictions:
        for gold in rng.sample(GQA_GOLD, 4) + [prediction]:
            # lmms-eval strips generated text before its metrics (api/task.py, generate_until)
            official = lmms["exact_match"](
                predictions=[prediction.strip()], references=[gold], ignore_case=True, ignore_punctuation=True
            )["exact_match"]
            assert gqa_accuracy(prediction, gold, style="lmms_eval") == official, (prediction, gold)
            compared += 1
    assert compared >= 1000


@pytest.mark.parametrize(
    "prediction,gold,llava,lmms_eval",
    [
        ("yes", "yes", 1.0, 1.0),
        ("Yes.", "yes", 1.0, 1.0),
        ("no..", "no", 1.0, 1.0),
        (" No.\n", "no", 1.0, 1.0),
        ("Yes!", "yes", 0.0, 1.0),
        ("(yes)", "yes", 0.0, 1.0),
        ("t-shirt", "tshirt", 0.0, 1.0),
        ("3.5", "35", 0.0, 1.0),
        ("Right.", "Right", 0.0, 1.0),  # LLaVA lower-cases the prediction only
        ("yes .", "yes", 0.0, 0.0),
        ("black and white.", "black and white", 1.0, 1.0),
        ("the red", "red", 0.0, 0.0),
    ],
)
def test_gqa_llava_and_lmms_eval_differ_as_documented(lmms, prediction, gold, llava, lmms_eval):
    assert gqa_accuracy(prediction, gold) == llava
    assert gqa_accuracy(prediction, gold, style="lmms_eval") == lmms_eval
    official = lmms["exact_match"](predictions=[prediction.strip()], references=[gold], ignore_case=True,
                                   ignore_punctuation=True)["exact_match"]
    assert official == lmms_eval


# ---------------------------------------------------------------------------------------------------
# POPE: LLaVA's eval_pope.py vs lmms-eval's pope task


def test_pope_llava_reads_no_there_is_not_as_no_where_lmms_eval_reads_neither(lmms):
    text = "No, there is not."
    assert pope_answer(text) == "no"
    result = lmms["pope"].pope_process_results({"question_id": 1, "answer": "no"}, [text])["pope_accuracy"]
    assert result["prediction"] not in ("yes", "no") and result["score"] == 0.0


def test_pope_yes_ratio_is_predicted_yes_in_llava_and_ground_truth_yes_in_lmms_eval(lmms):
    predictions = ["Yes", "Yes, there is.", "yes", "No"]
    labels = ["yes", "no", "no", "no"]
    ours = pope_scores(predictions, labels)
    assert ours["yes_ratio"] == 0.75
    pope = lmms["pope"]
    rows = [pope.pope_process_results({"question_id": i, "answer": t}, [p])["pope_yes_ratio"]
            for i, (p, t) in enumerate(zip(predictions, labels))]
    assert pope.pope_aggregate_yes_ratio(rows) == 0.25
    # on clean one-word answers the other four agree
    clean = ["yes", "no", "yes", "no", "no"]
    truth = ["yes", "yes", "no", "no", "no"]
    ours = pope_scores(clean, truth)
    rows = [pope.pope_process_results({"question_id": i, "answer": t}, [p])
            for i, (p, t) in enumerate(zip(clean, truth))]
    aggregates = {"accuracy": ("pope_accuracy", pope.pope_aggregate_accuracy),
                  "precision": ("pope_precision", pope.pope_aggregate_precision),
                  "recall": ("pope_recall", pope.pope_aggregate_recall),
                  "f1": ("pope_f1_score", pope.pope_aggregate_f1_score)}
    for name, (key, aggregate) in aggregates.items():
        assert ours[name] == pytest.approx(aggregate([row[key] for row in rows])), name
