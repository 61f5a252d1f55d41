"""VQA-style answer normalisation and accuracy."""

import pytest

from dllava.eval.scoring import exact_match_any, vqa_accuracy, vqa_normalize


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
    ],
)
def test_vqa_normalize_follows_the_vqa_rules(raw, normalised):
    assert vqa_normalize(raw) == normalised


def test_vqa_accuracy_with_one_reference_is_normalised_exact_match():
    assert vqa_accuracy("Three.", "3") == 1.0
    assert vqa_accuracy("three", "two") == 0.0


def test_vqa_accuracy_with_human_answers_is_min_of_matches_over_three():
    ten = ["red"] * 3 + ["blue"] * 7
    # official: mean over the 10 leave-one-out subsets of min(1, matches / 3)
    assert vqa_accuracy("red", ten) == pytest.approx((3 * (2 / 3) + 7 * 1.0) / 10)
    assert vqa_accuracy("blue", ten) == 1.0
    assert vqa_accuracy("green", ten) == 0.0


def test_exact_match_any_accepts_a_list():
    assert exact_match_any("Red", ["blue", "red"]) == 1.0
    assert exact_match_any("two", "2") == 0.0  # exact match does not map number words (validation's metric)
