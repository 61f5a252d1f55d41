"""Answer scoring by hand-checked examples (tests/eval/test_official_scoring.py compares against the
official code itself)."""

import pytest

from dllava.eval.scoring import (
    exact_match_any,
    gqa_accuracy,
    pope_answer,
    pope_scores,
    vqa_accuracy,
    vqa_normalize,
    vqav2_normalize,
)


@pytest.mark.parametrize(
    "raw,normalised",
    [
        ("Two", "2"),
        ("two dogs.", "2 dogs"),
        ("The Red", "red"),
        ("  yes\n", "yes"),
        ("an apple, a pear!", "apple pear"),
        ("black-and-white", "black and white"),
        ("1,000", "1000"),
        ("2.5", "2.5"),
        ("dont know", "don't know"),
        ("zero", "0"),
        # the official quirks
        ("1,2,3", "123"),  # commas deleted, not split on
        ("10%", "10%"),  # $ % : # * & ' are not punctuation there
        ("$5", "$5"),
        ("3:30", "3:30"),
        ("#1", "#1"),
        ("a&w", "a&w"),
        ("whats", "what's"),
        ("what's", "what 's"),  # "'s" is split off before the contractions are looked up
        ("Im", "im"),  # the table's "Im" is capitalised and never matches
        ("y'all'dve", "y'all'd've"),
        ("3.", "3"),
        (".5", ".5"),  # a period before a digit stays
        ("e.g.", "eg"),
        ("U.S.A.", "usa"),
        ("black - white", "black white"),  # a mark beside a space is deleted everywhere
        ("(red)", "red"),
        ('"yes"', "yes"),
        ("." * 40, "." * 8),  # only the first 32 periods are removed
        ("", ""),
        (" \t\n", ""),
    ],
)
def test_vqa_normalize_follows_evalai_answer_processor(raw, normalised):
    assert vqa_normalize(raw) == normalised


@pytest.mark.parametrize(
    "raw,normalised",
    [
        ("what's", "what's"),  # no "'s" split in VQAv2 scoring
        ("whats", "what's"),
        ("1,000 black-white", "1000 blackwhite"),  # a comma between digits: every mark deleted
        ("red, white-blue", "red white blue"),
        ("Why?", "why"),
        ("Two\tdogs", "2 dogs"),
    ],
)
def test_vqav2_normalize_is_punctuation_then_digits_and_articles(raw, normalised):
    assert vqav2_normalize(raw) == normalised


def test_vqa_accuracy_with_one_reference_is_normalised_exact_match():
    assert vqa_accuracy("Three.", "3") == 1.0
    assert vqa_accuracy("three", "two") == 0.0
    assert vqa_accuracy("Three.", ["3"]) == 1.0  # a list of one is a single reference too
    for style in ("vqav2", "textvqa", "vqaeval"):
        assert vqa_accuracy("The Two", "2", style=style) == 1.0


def test_vqa_accuracy_with_human_answers_is_min_of_matches_over_three():
    ten = ["red"] * 3 + ["blue"] * 7
    # official: mean over the 10 leave-one-out subsets of min(1, matches / 3)
    assert vqa_accuracy("red", ten) == pytest.approx((3 * (2 / 3) + 7 * 1.0) / 10)
    assert vqa_accuracy("blue", ten) == 1.0
    assert vqa_accuracy("green", ten) == 0.0
    assert vqa_accuracy("Red.", ["red"] + ["blue"] * 9) == pytest.approx(0.3)


def test_vqa_accuracy_styles_differ_where_the_official_scripts_do():
    # TextVQA's processor splits "'s" off the answers but turns "whats" into "what's"
    assert vqa_accuracy("whats", ["what's"] * 10, style="vqav2") == 1.0
    assert vqa_accuracy("whats", ["what's"] * 10, style="textvqa") == 0.0
    assert vqa_accuracy("1000 black white", ["1,000 black-white"] * 10, style="vqav2") == 0.0
    assert vqa_accuracy("1000 black white", ["1,000 black-white"] * 10, style="textvqa") == 1.0
    # vqaEval.py leaves unanimous answers untouched and never lower-cases answers
    assert vqa_accuracy("two", ["Two"] * 10, style="vqav2") == 1.0
    assert vqa_accuracy("two", ["Two"] * 10, style="vqaeval") == 0.0
    assert vqa_accuracy("2", ["2"] * 10, style="vqaeval") == 1.0
    assert vqa_accuracy("red", ["Red"] * 5 + ["blue"] * 5, style="vqaeval") == 0.0
    assert vqa_accuracy("red", ["red."] * 5 + ["blue"] * 5, style="vqaeval") == 1.0  # punctuation is processed
    assert vqa_accuracy("red", ["red."] * 10, style="vqaeval") == 0.0  # ... unless all answers agree


def test_vqa_accuracy_rejects_no_references_and_unknown_styles():
    with pytest.raises(ValueError):
        vqa_accuracy("red", [])
    with pytest.raises(ValueError):
        vqa_accuracy("red", "red", style="okvqa")


@pytest.mark.parametrize(
    "prediction,gold,expected",
    [
        ("yes", "yes", 1.0),
        ("Yes.", "yes", 1.0),
        (" No..\n", "no", 1.0),
        ("Yes!", "yes", 0.0),
        ("t-shirt", "tshirt", 0.0),
        ("Right.", "Right", 0.0),  # the gold answer is not lower-cased
        ("the red", "red", 0.0),
    ],
)
def test_gqa_accuracy_follows_llavas_conversion_and_gqa_eval(prediction, gold, expected):
    assert gqa_accuracy(prediction, gold) == expected


def test_gqa_lmms_eval_style_ignores_case_and_ascii_punctuation():
    assert gqa_accuracy("T-Shirt!", "tshirt", style="lmms_eval") == 1.0
    assert gqa_accuracy(" Right. ", "Right", style="lmms_eval") == 1.0
    assert gqa_accuracy("yes .", "yes", style="lmms_eval") == 0.0
    with pytest.raises(ValueError):
        gqa_accuracy("yes", "yes", style="gqa")


@pytest.mark.parametrize(
    "text,answer",
    [
        ("No, there is not.", "no"),
        ("No", "no"),
        ("no", "no"),
        ("There is not a dog.", "no"),
        ("Yes, there is.", "yes"),
        ("Yes. No dog is missing.", "yes"),  # only the first sentence counts
        ("NO", "yes"),  # the words are compared case-sensitively
        ("Not really", "yes"),
        ("no!", "yes"),  # only commas are removed
        ("There is nothing", "yes"),
        ("no\n", "no"),  # stripped first, as LLaVA's answer writer does
        ("", "yes"),
    ],
)
def test_pope_answer_follows_llavas_eval_pope(text, answer):
    assert pope_answer(text) == answer


def test_pope_scores_are_eval_popes():
    predictions = ["Yes", "yes", "No", "No, there is not.", "Yes, there is.", "yes"]
    labels = ["yes", "yes", "yes", "no", "no", "no"]
    # TP = 2, FN = 1, TN = 1, FP = 2
    scores = pope_scores(predictions, labels)
    assert scores["accuracy"] == 3 / 6
    assert scores["precision"] == 2 / 4
    assert scores["recall"] == 2 / 3
    assert scores["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert scores["yes_ratio"] == 4 / 6  # share of predicted yes
    assert set(scores) == {"accuracy", "precision", "recall", "f1", "yes_ratio"}


def test_pope_scores_without_predicted_yes_and_bad_input():
    assert pope_scores(["no", "no"], ["yes", "no"]) == {
        "accuracy": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0
    }
    with pytest.raises(ValueError):
        pope_scores(["yes"], ["Yes"])
    with pytest.raises(ValueError):
        pope_scores(["yes"], ["yes", "no"])
    with pytest.raises(ValueError):
        pope_scores([], [])


def test_exact_match_any_accepts_a_list():
    assert exact_match_any("Red", ["blue", "red"]) == 1.0
    assert exact_match_any("two", "2") == 0.0  # exact match does not map number words (validation's metric)
